"""Tokenizer glue: HF ``tokenizer.json`` or a byte-level BPE built from GGUF vocab/merges,
plus the checkpoint's own chat template rendered with jinja2."""

from __future__ import annotations

import json
import os
from typing import Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

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
    chat_template: jinja2 source of the checkpoint's template (or None).
  """

  def __init__(self, tok: tokenizers.Tokenizer, *, bos_token: str | None, eos_token: str | None,
               chat_template: str | None, add_bos: bool):
    self._tok = tok
    self.bos_token = bos_token
    self.eos_token = eos_token
    self.bos_id = tok.token_to_id(bos_token) if bos_token else None
    self.eos_id = tok.token_to_id(eos_token) if eos_token else None
    self.chat_template = chat_template
    self.add_bos = add_bos

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Text -> token ids. Templated chat text already holds its specials: pass False."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if add_special_tokens and self.add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
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
  return Tokenizer(tok, bos_token=bos, eos_token=eos, chat_template=template, add_bos=add_bos)


def from_gguf(reader) -> Tokenizer:
  """Byte-level BPE from ``tokenizer.ggml.tokens/merges`` (GPT-2 style models)."""
  from kvlab.models.gguf_loader import field  # pylint: disable=g-import-not-at-top

  kind = field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE "
                     "'gpt2', used by Llama 3, Qwen and SmolLM); use an HF directory with "
                     "tokenizer.json instead")
  tokens = field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
  types = field(reader, "tokenizer.ggml.token_type")
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                        byte_fallback=False))
  tok.pre_tokenizer = _pre_tokenizer(field(reader, "tokenizer.ggml.pre", "gpt2"))
  tok.decoder = decoders.ByteLevel()
  # CONTROL (3) and USER_DEFINED (4) tokens are never split by the BPE.
  special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
             for i, ty in enumerate(types) if ty in (3, 4)]
  tok.add_special_tokens(special)
  bos_id = field(reader, "tokenizer.ggml.bos_token_id")
  eos_id = field(reader, "tokenizer.ggml.eos_token_id")
  return Tokenizer(
      tok,
      bos_token=tokens[bos_id] if bos_id is not None else None,
      eos_token=tokens[eos_id] if eos_id is not None else None,
      chat_template=field(reader, "tokenizer.chat_template"),
      add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
  )
