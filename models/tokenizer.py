"""Tokenizer glue: HF ``tokenizer.json``, or a tokenizer built from GGUF metadata (byte-level
BPE from vocab/merges, or SentencePiece BPE from vocab/scores), plus the checkpoint's own chat
template rendered with jinja2."""

from __future__ import annotations

import json
import os
from typing import Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# Split patterns of the byte-level BPE pre-tokenizers named by GGUF ``tokenizer.ggml.pre``.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":  # SmolLM/SmolLM2: digits split one by one, then GPT-2 byte level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in ("llama-bpe", "llama3", "smaug-bpe"):
    split = pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated")
  elif pre in ("qwen2", "deepseek-llm"):
    split = pre_tokenizers.Split(tokenizers.Regex(_QWEN2_SPLIT), behavior="isolated")
  else:  # "gpt2", "default", unknown: plain GPT-2 byte level
    return byte_level
  return pre_tokenizers.Sequence(
      [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class Tokenizer:
  """Encodes/decodes text and renders chat templates.

  Attributes:
    bos_id, eos_id: special token ids (or None).
    add_bos: whether ``encode(..., add_special_tokens=True)`` prepends BOS.
    add_eos: whether ``encode(..., add_special_tokens=True)`` appends EOS.
    chat_template: jinja2 source of the checkpoint's template (or None).
  """

  def __init__(self, tok: tokenizers.Tokenizer, *, bos_token: str | None, eos_token: str | None,
               chat_template: str | None, add_bos: bool, add_eos: bool = False):
    self._tok = tok
    self.bos_token = bos_token
    self.eos_token = eos_token
    self.bos_id = tok.token_to_id(bos_token) if bos_token else None
    self.eos_id = tok.token_to_id(eos_token) if eos_token else None
    self.chat_template = chat_template
    self.add_bos = add_bos
    self.add_eos = add_eos

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Text -> ``[T]`` token ids (BOS/EOS as the checkpoint asks when ``add_special_tokens``).
    Templated chat text already holds its specials: pass False."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if add_special_tokens and self.add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    if add_special_tokens and self.add_eos and self.eos_id is not None:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """``[T]`` token ids -> text (control tokens dropped when ``skip_special_tokens``)."""
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Renders ``messages`` with the checkpoint's template (HF semantics)."""
    if not self.chat_template:
      raise ValueError("this checkpoint has no chat template: pass --chat=false and give a raw "
                       "prompt")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
      raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                   indent=indent)
    return env.from_string(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token or "", eos_token=self.eos_token or "")

  def encode_chat(self, user: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}]
    return self.encode(self.apply_chat_template(msgs), add_special_tokens=False)


def _token_str(x):
  if isinstance(x, dict):
    return x.get("content")
  return x


def from_hf_dir(path: str) -> Tokenizer:
  """Tokenizer from ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``chat_template.jinja``)."""
  tj = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tj):
    raise FileNotFoundError(f"no tokenizer.json in {path!r}: kvlab needs the fast-tokenizer file "
                            "(save it with transformers' tokenizer.save_pretrained)")
  tok = tokenizers.Tokenizer.from_file(tj)
  conf = {}
  tc = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(tc):
    with open(tc) as f:
      conf = json.load(f)
  template = conf.get("chat_template")
  jinja_file = os.path.join(path, "chat_template.jinja")
  if template is None and os.path.isfile(jinja_file):
    with open(jinja_file) as f:
      template = f.read()
  if isinstance(template, list):  # list of named templates: take "default"
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  bos = _token_str(conf.get("bos_token"))
  eos = _token_str(conf.get("eos_token"))
  # tokenizer.json post-processors may add BOS themselves; we add it only when the config asks.
  add_bos = bool(conf.get("add_bos_token", False))
  return Tokenizer(tok, bos_token=bos, eos_token=eos, chat_template=template, add_bos=add_bos,
                   add_eos=bool(conf.get("add_eos_token", False)))


# GGUF ``tokenizer.ggml.token_type`` values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPM_SPACE = "\u2581"  # "▁": SentencePiece's escaped space


def from_gguf(reader) -> Tokenizer:
  """Tokenizer from a GGUF's ``tokenizer.ggml.*`` metadata.

  ``tokenizer.ggml.model`` ``gpt2`` (Llama 3, Qwen, SmolLM): byte-level BPE from the stored
  merges. ``llama`` (Llama 2, Mistral, Gemma): SentencePiece BPE rebuilt from the scores (see
  ``_spm_bpe``). BOS/EOS as the file's ``add_bos_token``/``add_eos_token`` say; the chat
  template is the file's own, or None.
  """
  from kvlab.models.gguf_loader import field  # pylint: disable=g-import-not-at-top

  kind = field(reader, "tokenizer.ggml.model")
  tokens = list(field(reader, "tokenizer.ggml.tokens"))
  types = field(reader, "tokenizer.ggml.token_type")
  bos_id = field(reader, "tokenizer.ggml.bos_token_id")
  eos_id = field(reader, "tokenizer.ggml.eos_token_id")
  if kind == "gpt2":
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = _byte_level_bpe(tokens, merges, types, field(reader, "tokenizer.ggml.pre", "gpt2"))
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
  elif kind == "llama":
    scores = field(reader, "tokenizer.ggml.scores")
    if scores is None:
      raise ValueError("GGUF tokenizer model 'llama' (SentencePiece) without "
                       "tokenizer.ggml.scores: the file cannot rebuild its merges; re-convert "
                       "it with llama.cpp's convert_hf_to_gguf.py")
    if types is None:  # old files: every token normal except the named specials
      types = [_NORMAL] * len(tokens)
      for key in ("bos", "eos", "unknown", "padding"):
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None:
          types[i] = _UNKNOWN if key == "unknown" else _CONTROL
    tok = _spm_bpe(tokens, scores, types,
                   add_space_prefix=bool(field(reader, "tokenizer.ggml.add_space_prefix", True)),
                   unk_id=field(reader, "tokenizer.ggml.unknown_token_id"))
    # SentencePiece checkpoints start with BOS unless the file says otherwise.
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", True))
  else:
    raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; kvlab reads 'gpt2' "
                     "(byte-level BPE: Llama 3, Qwen, SmolLM) and 'llama' (SentencePiece BPE: "
                     "Llama 2, Mistral, Gemma). Use an HF directory with tokenizer.json instead")
  return Tokenizer(
      tok,
      bos_token=tokens[bos_id] if bos_id is not None else None,
      eos_token=tokens[eos_id] if eos_id is not None else None,
      chat_template=field(reader, "tokenizer.chat_template"),
      add_bos=add_bos,
      add_eos=bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
  )


def _byte_level_bpe(tokens: list[str], merges: list[tuple[str, str]], types, pre: str):
  """GPT-2 style byte-level BPE over ``tokens [V]`` and the stored ``merges``."""
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                        byte_fallback=False))
  tok.pre_tokenizer = _pre_tokenizer(pre)
  tok.decoder = decoders.ByteLevel()
  # CONTROL (3) and USER_DEFINED (4) tokens are never split by the BPE.
  special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
             for i, ty in enumerate(types) if ty in (_CONTROL, _USER_DEFINED)]
  tok.add_special_tokens(special)
  return tok


def _spm_bpe(tokens: list[str], scores, types, *, add_space_prefix: bool,
             unk_id: int | None) -> tokenizers.Tokenizer:
  """SentencePiece BPE (llama.cpp's "SPM" vocabulary) from ``tokens/scores/types [V]``.

  The file stores no merges. SentencePiece BPE encodes by repeatedly joining the adjacent pair
  whose concatenation is the best-scoring vocabulary piece; a ``tokenizers`` BPE gives the same
  result when its merges are every split ``(left, right)`` of every NORMAL piece with both
  halves NORMAL pieces, ranked by the piece's score (best first). Spaces become "▁" (plus one
  in front of each text segment when ``add_space_prefix``: Llama 2 and Mistral do, Gemma does
  not); the whole segment is one BPE word (no pre-split), as in SentencePiece. Characters not
  in the vocabulary fall back to their UTF-8 ``<0xXX>`` byte tokens. USER_DEFINED pieces (Gemma:
  runs of newlines, spaces and tabs, HTML tags) are matched in the raw text before the BPE and
  kept when decoding; CONTROL pieces (``<bos>``, ``<start_of_turn>``, ...) are special: always
  matched, dropped by ``decode(skip_special_tokens=True)``.
  """
  # A USER_DEFINED piece holding spaces (Gemma's runs "  ", "   ", ...) is matched in the
  # normalized text, where spaces are "▁", so it is stored escaped: "▁▁" matches "  ".
  pieces = [t.replace(" ", _SPM_SPACE) if ty == _USER_DEFINED else t
            for t, ty in zip(tokens, types)]
  normal = {}
  for i, (t, ty) in enumerate(zip(tokens, types)):
    if ty == _NORMAL and t not in normal:
      normal[t] = i
  ranked = []  # (-score, piece id, split) per merge
  for t, i in normal.items():
    for k in range(1, len(t)):
      if t[:k] in normal and t[k:] in normal:
        ranked.append((-float(scores[i]), i, k))
  ranked.sort()
  merges = [(tokens[i][:k], tokens[i][k:]) for _, i, k in ranked]
  vocab = {}
  for i, t in enumerate(pieces):
    vocab.setdefault(t, i)
  unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
  byte_fallback = any(ty == _BYTE for ty in types)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                        fuse_unk=True, byte_fallback=byte_fallback))
  steps = [normalizers.Replace(" ", _SPM_SPACE)]
  if add_space_prefix:  # per segment: the text's start and after each special/user token
    steps.insert(0, normalizers.Prepend(_SPM_SPACE))
  tok.normalizer = normalizers.Sequence(steps)
  dec = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  if add_space_prefix:
    dec.append(decoders.Strip(" ", 1, 0))
  tok.decoder = decoders.Sequence(dec)
  tok.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                          for i, ty in enumerate(types) if ty in (_CONTROL, _UNKNOWN)])
  tok.add_tokens([tokenizers.AddedToken(pieces[i], special=False,
                                        normalized=pieces[i] != tokens[i])
                  for i, ty in enumerate(types) if ty == _USER_DEFINED])
  return tok
