"""RULER-style synthetic tasks, generated offline and deterministically from a seed.

Each sample is a context (compressed before or with the question, by protocol), a question and
the expected answers. Contexts are sized in tokens of the model's own tokenizer. Haystacks:
``noise`` (RULER's repeated sentences) or ``docs`` (the standard library's pydoc text).
Task names follow RULER: niah_single, niah_multikey, niah_multivalue, niah_multiquery,
variable_tracking, common_words, frequent_words.
"""

from __future__ import annotations

import dataclasses
import random
import string

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

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking", "common_words", "frequent_words", "perplexity")


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


def _key(rng):
  return "-".join("".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(2))


def _value(rng):
  return str(rng.randint(1000000, 9999999))


def _haystack(rng, kind: str, n_chars: int) -> list[str]:
  """Sentences filling about ``n_chars`` characters."""
  if kind == "noise":
    return [NOISE] * (n_chars // len(NOISE) + 1)
  if kind == "docs":
    text = stdlib_docs()
    start = rng.randrange(0, max(1, len(text) - n_chars - 1))
    chunk = text[start:start + n_chars]
    return [s + ". " for s in chunk.split(". ") if s]
  raise ValueError(f"haystack must be 'noise' or 'docs', got {kind!r}")


def _insert(sentences: list[str], needles: list[str], depths: list[float]) -> str:
  out = list(sentences)
  for needle, d in sorted(zip(needles, depths), key=lambda x: -x[1]):
    out.insert(int(round(d * len(out))), " " + needle + " ")
  return "".join(out)


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
                depth: float | None = None) -> Sample:
  """Builds one sample whose context has at most ``length`` tokens (by ``count_tokens``)."""
  if task == "perplexity":
    raise ValueError("the perplexity task has no question: use perplexity_tokens()")
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
  rng = random.Random(f"{task}:{length}:{seed}:{haystack}:{depth}")
  d0 = rng.random() if depth is None else depth

  if task.startswith("niah"):
    n_keys = {"niah_multikey": 4, "niah_multiquery": 2}.get(task, 1)
    n_vals = 4 if task == "niah_multivalue" else 1
    keys = [_key(rng) for _ in range(n_keys)]
    needles, depths, answers_by_key = [], [], {}
    for i, k in enumerate(keys):
      vals = [_value(rng) for _ in range(n_vals)]
      answers_by_key[k] = vals
      for v in vals:
        needles.append(f"One of the special magic numbers for {k} is: {v}.")
        depths.append(d0 if not depths else rng.random())
    if task == "niah_multiquery":
      asked = keys
      question = ("What are all the special magic numbers for " + ", ".join(asked) +
                  " mentioned in the provided text?")
    else:
      asked = [keys[0]]
      what = "are all the special magic numbers" if n_vals > 1 else "is the special magic number"
      question = f"What {what} for {keys[0]} mentioned in the provided text?"
    answers = [v for k in asked for v in answers_by_key[k]]
    more = [(f"What is the special magic number for {k} mentioned in the provided text?",
             answers_by_key[k]) for k in keys[1:]] if task == "niah_multikey" else []
    build = lambda n: _insert(_haystack(random.Random(seed), haystack, n * 40), needles, depths)

  elif task == "variable_tracking":
    value = str(rng.randint(10000, 99999))
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(5)]
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}."
                                               for i in range(1, 5)]
    depths = sorted(rng.random() for _ in chain)
    question = (f"Find all variables that are assigned the value {value} in the text above.")
    answers = names
    build = lambda n: _insert(_haystack(random.Random(seed), haystack, n * 40), chain, depths)

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
    missing = [a for a in answers if a not in context]
    if missing:
      raise ValueError(f"{task} at {length} tokens cannot hold its needles; use a longer length")
  return Sample(task, context, question, answers, depth=d0, seed=seed,
                more_queries=more if task.startswith("niah") else [])
