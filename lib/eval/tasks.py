"""RULER-style synthetic tasks, generated offline and deterministically from a seed.

Each sample is a context (compressed before or with the question, by protocol), a question and
the expected answers. Contexts are sized in tokens of the model's own tokenizer. Haystacks
(``lib.data.haystacks``): ``noise`` (RULER's repeated sentences), ``docs`` (the standard
library's pydoc text), ``code`` (stdlib source), ``license`` (the stdlib's LICENSE.txt),
``changelog`` (IDLE's change logs). Needle formats (``NEEDLES``): ``number`` (RULER's "special
magic number" sentence, the question in the same words), ``pin`` (a 7-digit number), ``word``,
``uuid``, ``phrase`` (a two-word phrase in a clause set inside a sentence of the haystack);
every format but ``number`` says its needle in one of several templates, drawn from the seed,
whose words differ from the question's.
Task names follow RULER: niah_single, niah_multikey, niah_multivalue, niah_multiquery,
variable_tracking, common_words, frequent_words.
"""

from __future__ import annotations

import dataclasses
import random
import string
import uuid
from typing import Callable

from kvlab.lib.data import haystacks as hay
from kvlab.lib.data.text import stdlib_docs

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
         "again. ")
_WORDS = ("apple river stone cloud tiger lamp garden silver ocean pencil mirror forest candle "
          "violin desert rocket pillow harbor meadow castle spider window jacket button planet "
          "bridge thunder marble feather lantern compass needle orchard basket whistle glacier "
          "falcon pepper velvet anchor cactus puzzle ribbon saddle tunnel walnut zebra crystal "
          "dragon engine fossil ginger helmet island jungle kettle lemon magnet nectar oyster "
          "parrot quartz rabbit salmon tomato umbrella vessel wizard yogurt badger cobalt dolphin "
          "ember fjord gazelle hazel igloo jasper koala lotus mango nutmeg otter pebble quill").split()
# Needle values of the word and phrase formats: ordinary nouns (and adjectives), none inside
# another or inside a common English word (answers are scored by substring match: "ember"
# would be found in "remember").
_NEEDLE_NOUNS = ("walrus saffron tangerine zeppelin obsidian platypus marmalade trombone "
                 "pelican avalanche hammock lighthouse porcupine cinnamon volcano pyramid "
                 "blizzard chameleon dandelion flamingo gondola harmonica iguana juniper "
                 "kangaroo labyrinth meteorite nightingale octopus papaya raccoon sapphire "
                 "tornado unicorn vulture waffle xylophone zucchini armadillo buffalo caramel "
                 "dinosaur emerald giraffe hurricane jellyfish mosquito pistachio").split()
_NEEDLE_ADJECTIVES = ("amber brisk crimson dusty eager frozen gentle hollow ivory jolly lunar "
                      "misty noble purple rustic silent tawny wooden yellow zesty").split()

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking", "common_words", "frequent_words", "perplexity")
NEEDLE_TASKS = TASKS[:4]
HAYSTACKS = hay.HAYSTACKS
NEEDLES = ("number", "pin", "word", "uuid", "phrase")
# Today's needle: samples (and run identities) of the default are those of before needles had
# formats.
DEFAULT_NEEDLE = "number"


def uses_haystack(task: str) -> bool:
  """Whether ``task``'s context is built on a haystack (the needle tasks, variable tracking)."""
  return task in NEEDLE_TASKS or task == "variable_tracking"


def uses_needle(task: str) -> bool:
  """Whether ``task`` has a needle format (the four niah tasks)."""
  return task in NEEDLE_TASKS


@dataclasses.dataclass
class Sample:
  """One evaluation case. ``context + question`` is the full user message."""

  task: str
  context: str
  question: str
  answers: list[str]
  depth: float | None = None  # where the (first) needle sits, 0 = start, 1 = end
  seed: int = 0
  # Further (question, answers) pairs about the same context, for the shared-context protocol
  # (compress once, ask each). The main question is always first.
  more_queries: list = dataclasses.field(default_factory=list)
  # The needle texts placed in the context (sentences, or clauses for the phrase format).
  needles: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Needle:
  """A needle format: sentence ``templates`` ({key}, {value}) and the questions ``one`` (one
  value of one key), ``many`` (every value of one key), ``several`` ({keys}: one value each).
  ``draw(rng, n, used)`` gives ``n`` values not in ``used``; ``embed``: each needle is a clause
  set inside a sentence of the haystack rather than a sentence of its own."""

  templates: tuple
  one: str
  many: str
  several: str
  draw: Callable
  embed: bool = False


def _distinct(pool):
  def draw(rng, n, used):
    return rng.sample([w for w in pool if w not in used], n)
  return draw


def _phrases(rng, n, used):
  out = []
  while len(out) < n:
    p = f"{rng.choice(_NEEDLE_ADJECTIVES)} {rng.choice(_NEEDLE_NOUNS)}"
    if p not in used and p not in out:
      out.append(p)
  return out


_FORMATS = {
    "number": _Needle(
        ("One of the special magic numbers for {key} is: {value}.",),
        "What is the special magic number for {key} mentioned in the provided text?",
        "What are all the special magic numbers for {key} mentioned in the provided text?",
        "What are all the special magic numbers for {keys} mentioned in the provided text?",
        lambda rng, n, used: [_value(rng) for _ in range(n)]),
    "pin": _Needle(
        ("The access code for {key} reads {value}.",
         "Whoever asks about {key} should be given the combination {value}.",
         "According to the logbook, {key} opens only with {value}."),
        "Which 7-digit number belongs to {key} in the text above?",
        "Which 7-digit numbers belong to {key} in the text above? List every one.",
        "Which 7-digit numbers belong to {keys} in the text above? Give one for each.",
        lambda rng, n, used: [_value(rng) for _ in range(n)]),
    "word": _Needle(
        ("The password chosen for {key} was {value}.",
         "If anyone mentions {key}, reply with {value}.",
         "Among the staff, {key} is known simply as {value}."),
        "Which term is paired with {key} in the text above?",
        "Which terms are paired with {key} in the text above? List every one.",
        "Which terms are paired with {keys} in the text above? Give one for each.",
        _distinct(_NEEDLE_NOUNS)),
    "uuid": _Needle(
        ("The record for {key} carries the identifier {value}.",
         "Reference {value} was filed under {key} in the registry.",
         "Ticket {value} is the one opened for {key}."),
        "What UUID is tied to {key} in the text above?",
        "What UUIDs are tied to {key} in the text above? List every one.",
        "What UUIDs are tied to {keys} in the text above? Give one for each.",
        lambda rng, n, used: [str(uuid.UUID(int=rng.getrandbits(128), version=4))
                              for _ in range(n)]),
    "phrase": _Needle(
        (" (the countersign for {key} is {value})",
         ", whereas {key} goes by the watchword {value},",
         " -- and {key} is remembered as {value} --"),
        "Which two-word phrase is linked to {key} in the text above?",
        "Which two-word phrases are linked to {key} in the text above? List every one.",
        "Which two-word phrases are linked to {keys} in the text above? Give one for each.",
        _phrases, embed=True),
}


def _key(rng):
  return "-".join("".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(2))


def _value(rng):
  return str(rng.randint(1000000, 9999999))


def _haystack(rng, kind: str, n_chars: int) -> list[str]:
  """Sentences (lines for code) filling about ``n_chars`` characters."""
  if kind == "noise":
    return [NOISE] * (n_chars // len(NOISE) + 1)
  if kind == "docs":
    text = stdlib_docs()
    start = rng.randrange(0, max(1, len(text) - n_chars - 1))
    chunk = text[start:start + n_chars]
    return [s + ". " for s in chunk.split(". ") if s]
  if kind in hay.FILES:
    return hay.pieces(kind, hay.chunk(kind, rng, n_chars))
  raise ValueError(f"unknown haystack {kind!r}; known: {', '.join(HAYSTACKS)}")


def _insert(sentences: list[str], needles: list[str], depths: list[float]) -> str:
  out = list(sentences)
  for needle, d in sorted(zip(needles, depths), key=lambda x: -x[1]):
    out.insert(int(round(d * len(out))), " " + needle + " ")
  return "".join(out)


def _insert_after(pieces: list[str], needles: list[str], depths: list[float], end: str) -> str:
  """Each needle as a piece of its own (a line for code, a sentence for prose) between the
  pieces, ending in ``end``; a needle after a piece not ending in whitespace starts a new one."""
  out = list(pieces)
  for needle, d in sorted(zip(needles, depths), key=lambda x: -x[1]):
    i = int(round(d * len(out)))
    lead = "" if i == 0 or out[i - 1][-1:].isspace() else end
    out.insert(i, lead + needle + end)
  return "".join(out)


def _mid_space(piece: str) -> int | None:
  """The space nearest the middle of ``piece`` that sits between two words of one sentence (not
  after a full stop or colon), or None."""
  best = None
  for i in range(1, len(piece) - 1):
    if (piece[i] == " " and not piece[i - 1].isspace() and piece[i - 1] not in ".!?:;,"
        and not piece[i + 1].isspace()):
      if best is None or abs(i - len(piece) // 2) < abs(best - len(piece) // 2):
        best = i
  return best


def _embed(pieces: list[str], clauses: list[str], depths: list[float]) -> str:
  """Each clause set between two words in the middle of a sentence (line), one per sentence,
  the one nearest its depth that has such a place."""
  out = list(pieces)
  used = set()
  for clause, d in zip(clauses, depths):
    j = min(int(d * len(out)), len(out) - 1)
    at = None
    for k in sorted((k for k in range(len(out)) if k not in used), key=lambda k: (abs(k - j), k)):
      at = _mid_space(out[k])
      if at is not None:
        break
    if at is None:  # a haystack too short to hold it: placed alone (such a context is too short)
      out.append(clause.strip(" ,-()") + ". ")
      continue
    out[k] = out[k][:at] + clause + out[k][at:]
    used.add(k)
  return "".join(out)


def _place(kind: str, pieces: list[str], needles: list[str], depths: list[float],
           embed: bool = False) -> str:
  """The context: ``needles`` at ``depths`` among the haystack's ``pieces``."""
  if embed:
    return _embed(pieces, needles, depths)
  if kind in ("noise", "docs"):
    return _insert(pieces, needles, depths)
  return _insert_after(pieces, needles, depths, "\n" if kind in hay.LINES else " ")


def _fit(build, count_tokens, target: int) -> str:
  """Binary search on the haystack size so the context is just under ``target`` tokens."""
  lo, hi = 1, target * 8
  best = build(lo)
  least = count_tokens(best)
  if least > target:
    raise ValueError(f"a context of {target} tokens cannot hold this task's needles and "
                     f"filler: the shortest one has {least} tokens; use a length >= {least}")
  while lo <= hi:
    mid = (lo + hi) // 2
    ctx = build(mid)
    if count_tokens(ctx) <= target:
      best, lo = ctx, mid + 1
    else:
      hi = mid - 1
  return best


def perplexity_tokens(tokenizer, length: int, seed: int, continuation: int = 256):
  """Real text (stdlib docs) for the perplexity task: ``(prefix ids [length],
  continuation ids [continuation])``, from a seed-dependent offset."""
  from kvlab.lib.data.text import text_of_tokens  # pylint: disable=g-import-not-at-top
  offset = random.Random(f"ppl:{seed}").randrange(0, len(stdlib_docs()) // 2)
  ids = text_of_tokens(tokenizer, length + continuation, offset_chars=offset)
  return ids[:length], ids[length:]


def make_sample(task: str, length: int, seed: int, count_tokens, haystack: str = "noise",
                depth: float | None = None, needle: str = DEFAULT_NEEDLE) -> Sample:
  """Builds one sample whose context has at most ``length`` tokens (by ``count_tokens``).

  ``haystack``: one of ``HAYSTACKS`` (the niah tasks and variable_tracking); ``needle``: one of
  ``NEEDLES`` (the niah tasks; the other tasks ignore it). The default needle gives the samples
  of before needle formats existed, byte for byte.
  """
  if task == "perplexity":
    raise ValueError("the perplexity task has no question: use perplexity_tokens()")
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
  if haystack not in HAYSTACKS:
    raise ValueError(f"unknown haystack {haystack!r}; known: {', '.join(HAYSTACKS)}")
  if needle not in NEEDLES:
    raise ValueError(f"unknown needle format {needle!r}; known: {', '.join(NEEDLES)}")
  if not uses_needle(task):
    needle = DEFAULT_NEEDLE
  tail = "" if needle == DEFAULT_NEEDLE else f":{needle}"
  rng = random.Random(f"{task}:{length}:{seed}:{haystack}:{depth}{tail}")
  d0 = rng.random() if depth is None else depth
  needles = []

  if task.startswith("niah"):
    fmt = _FORMATS[needle]
    template = fmt.templates[0] if len(fmt.templates) == 1 else rng.choice(fmt.templates)
    n_keys = {"niah_multikey": 4, "niah_multiquery": 2}.get(task, 1)
    n_vals = 4 if task == "niah_multivalue" else 1
    keys = [_key(rng) for _ in range(n_keys)]
    depths, answers_by_key, used = [], {}, set()
    for k in keys:
      vals = fmt.draw(rng, n_vals, used)
      used.update(vals)
      answers_by_key[k] = vals
      for v in vals:
        needles.append(template.format(key=k, value=v))
        depths.append(d0 if not depths else rng.random())
    if task == "niah_multiquery":
      asked = keys
      question = fmt.several.format(keys=", ".join(asked))
    else:
      asked = [keys[0]]
      question = (fmt.many if n_vals > 1 else fmt.one).format(key=keys[0])
    answers = [v for k in asked for v in answers_by_key[k]]
    more = [(fmt.one.format(key=k), answers_by_key[k])
            for k in keys[1:]] if task == "niah_multikey" else []
    build = lambda n: _place(haystack, _haystack(random.Random(seed), haystack, n * 40),
                             needles, depths, embed=fmt.embed)

  elif task == "variable_tracking":
    value = str(rng.randint(10000, 99999))
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(5)]
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}."
                                               for i in range(1, 5)]
    needles = chain
    depths = sorted(rng.random() for _ in chain)
    question = (f"Find all variables that are assigned the value {value} in the text above.")
    answers = names
    build = lambda n: _place(haystack, _haystack(random.Random(seed), haystack, n * 40), chain,
                             depths)
  else:  # common_words / frequent_words: word lists with planted frequencies
    words = rng.sample(_WORDS, 40)
    top_n = 10 if task == "common_words" else 3
    common, rare = words[:top_n], words[top_n:]
    question = (f"What are the {top_n} most common words in the above list?")
    answers = common

    def build(n):
      r = random.Random(seed)
      # Exact frequencies: rare words ``per`` or ``per + 1`` times, common words ``3 * (per + 1)``,
      # so the answer is unambiguous at any length (RULER plants fixed frequencies likewise).
      per, extra = divmod(n, len(rare))
      items = [w for w in common for _ in range(3 * (per + 1))] + rare * per + rare[:extra]
      r.shuffle(items)
      return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)) + "."


  context = _fit(build, count_tokens, length)
  if task.startswith("niah") or task == "variable_tracking":
    missing = [a for a in answers if a not in context] + [n for n in needles if n not in context]
    if missing:
      raise ValueError(f"{task} at {length} tokens cannot hold its needles; use a longer length")
  return Sample(task, context, question, answers, depth=d0, seed=seed,
                more_queries=more if task.startswith("niah") else [], needles=needles)
