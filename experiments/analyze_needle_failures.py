r"""Why kvzip_heads, kvzip and TOVA lose RULER's number needle in real text at 4k (issue 39.2).

  python -m experiments.analyze_needle_failures --haystack=docs,code --num_samples=5
  python -m experiments.analyze_needle_failures --stage=calib     # head tables on 4k text
  python -m experiments.analyze_needle_failures --stage=plots     # figures from the JSON

niah_single, query-agnostic, the default ``number`` needle. Per sample (one prefill):
  * where the needle sentence's tokens are (and its value's and key's);
  * the full cache's greedy answer, and the attention mass each query head puts on the needle
    from the queries that produce the answer (the answer teacher-forced on the full cache;
    the queries that emit the value's digits where the answer holds it);
  * per method and ratio: the answer (greedy, the evaluation's path) and, per layer and kv
    head, the fraction of the needle's tokens the prefill-time compression keeps (TOVA also
    evicts one token per decoded token later; that is not in the kept fraction);
  * KVzip's repeat scores of the needle's tokens vs the others (rank quantile within each
    head), for each ``--chunks`` setting, with the kept fraction and answer of each.
``--stage=calib`` recomputes kvzip_heads' head table (the calibration's recipe) on needle-free
stretches of docs and code text at ``--calib_length`` and compares ranks with the shipped
table. Writes one JSON per sample under ``--out_dir/samples``, ``calib.json``, ``summary.json``
and PNGs under ``--fig_dir``. Resumable: a sample whose JSON exists is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib import launch_config
from kvlab.lib import methods as methods_lib
from kvlab.lib.data import haystacks as hay
from kvlab.lib.data.text import stdlib_docs, text_of_tokens
from kvlab.lib.eval.metrics import string_match_all
from kvlab.lib.eval.runner import _SPLIT, prompt_pieces, reconstruction_prompts
from kvlab.lib.eval.tasks import Sample, make_sample
from kvlab.lib.methods.base import select
from kvlab.lib.methods.kvzip_heads import DEFAULT_TABLE, load_table, table_from_scores
from kvlab.lib.methods.window import last_queries, window_attention
from kvlab.lib.protocol import ask, compress_for, prefill_context, reconstruction_scores

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_string("model", "smollm2-135m", "Named model.")
flags.DEFINE_enum("stage", "all", ["all", "samples", "calib", "plots"], "What to run.")
flags.DEFINE_integer("length", 4096, "Context length in tokens.")
flags.DEFINE_list("haystack", ["docs", "code"], "Real-text haystacks.")
flags.DEFINE_integer("num_samples", 5, "Samples per haystack.")
flags.DEFINE_integer("seed", 0, "First sample seed.")
flags.DEFINE_list("method", ["kvzip_heads", "kvzip", "tova"], "Methods (registry specs).")
flags.DEFINE_list("ratio", ["0.5", "0.25"], "Fractions kept.")
flags.DEFINE_list("chunks", ["2048", "1024", "512"], "KVzip repeat chunks compared (the first "
                  "is the method's own, default 2048).")
flags.DEFINE_list("tables", [], "Extra kvzip_heads head tables, name=path.json (cells "
                  "kvzip_heads/<name>).")
flags.DEFINE_string("method_module", "", "Module to import first (registers extra methods).")
flags.DEFINE_integer("max_new_tokens", 32, "Answer length limit.")
flags.DEFINE_integer("calib_length", 4096, "Context tokens per recalibration sample.")
flags.DEFINE_integer("calib_samples", 2, "Recalibration samples per text.")
flags.DEFINE_list("calib_text", ["docs", "code"], "Texts of the recalibration.")
flags.DEFINE_string("out_dir", "results/needle_failures", "JSON output folder.")
flags.DEFINE_string("fig_dir", "docs/figures/needle_failures", "PNG output folder.")


# ---------------------------------------------------------------------------------------------
# needle location

def needle_spans(lm, sample: Sample, ctx: list[int]) -> dict:
  """Token positions (in ``ctx``) of the needle sentence, its value and its key."""
  tok = lm.tokenizer
  text = tok.apply_chat_template(
      [{"role": "user", "content": sample.context + "\n\n" + _SPLIT + sample.question}])
  pre = text.split(_SPLIT)[0]
  enc = tok._tok.encode(pre, add_special_tokens=False)  # pylint: disable=protected-access
  shift = len(ctx) - len(enc.ids)
  if list(ctx[shift:]) != list(enc.ids) or shift not in (0, 1):
    raise ValueError("context ids do not match the offsets' encoding")
  offsets = [(0, 0)] * shift + list(enc.offsets)
  needle = sample.needles[0]
  a = pre.index(needle)
  value = sample.answers[0]
  key = needle.split(" for ")[1].split(" is:")[0]

  def toks(lo, hi):
    return [i for i, (s, e) in enumerate(offsets) if e > lo and s < hi and e > s]

  va = a + needle.index(value)
  ka = a + needle.index(key)
  return {"sentence": toks(a, a + len(needle)), "value": toks(va, va + len(value)),
          "key": toks(ka, ka + len(key)), "key_text": key, "value_text": value}


# ---------------------------------------------------------------------------------------------
# attention of the answer's queries (full cache)

def probe(lm, cache, ctx_len: int, seq: list[int]):
  """Teacher-forces ``seq`` after a copy of the ``cache`` (``ctx_len`` context tokens).

  Returns ``(a [L, K, G, W, S] attention probabilities of the W = len(seq) new queries,
  their positions [W], slot positions [S], values [L, K, S, H])``."""
  t = gen.round_up(len(seq), 8)
  big = jax.tree.map(jnp.copy, cache).resize(ctx_len + t)
  toks, lens = gen.pad_batch([seq], t)
  _, out, obs = gen.prefill(lm.params, jnp.asarray(toks), jnp.asarray(lens), big,
                            apply_fn=lm.apply_fn, chunk_size=t, observe=last_queries(t))
  qw, pos = obs["q"][0], obs["pos"][0]  # [L, B, W, N, H], [L, B, W]
  keep = np.asarray(pos[0, 0]) >= 0
  a = np.asarray(window_attention(out, qw, pos)[:, 0])[:, :, :, keep]  # [L, K, G, W, S]
  return (a, np.asarray(pos[0, 0])[keep], np.asarray(out.positions[0, 0, 0]),
          np.asarray(out.values[:, 0], np.float32))


def stream_error(a, slots, values, ctx_len: int, sinks: int = 4, window: int = 32):
  """``[L, K]`` relative change of each head's attention output (mean over its query group and
  the queries of ``a``) when its context is cut to the first ``sinks`` and last ``window``
  context slots (what kvzip_heads leaves a dropped head); the new tokens stay."""
  sub = (slots < sinks) | ((slots >= ctx_len - window) & (slots < ctx_len)) | (slots >= ctx_len)
  sub &= slots >= 0
  v = values[:, :, None]  # [L, K, 1, S, H]
  o_full = np.matmul(a, v)
  p = a * sub
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
  o_sub = np.matmul(p, v)
  err = np.linalg.norm(o_full - o_sub, axis=-1) / np.maximum(
      np.linalg.norm(o_full, axis=-1), 1e-30)
  return err.mean((2, 3))


def answer_attention(lm, cache, ctx_len: int, q: list[int], answer: list[int], spans: dict,
                     value: str) -> dict:
  """Attention mass per (layer, query head) on the needle's tokens from the question's queries,
  the queries that emit the answer, and those that emit the value's digits (teacher-forced on a
  copy of the full ``cache``); and each kv head's ``stream_error`` on those queries."""
  a, wpos, slots, values = probe(lm, cache, ctx_len, q + answer)
  res = {"stream_error": stream_error(a, slots, values, ctx_len).round(4).tolist()}
  n_l, n_k, n_g = a.shape[:3]
  a = a.reshape(n_l, n_k * n_g, a.shape[3], a.shape[4])  # query head = k * G + g
  # queries that emit answer token j sit at position ctx_len + len(q) - 1 + j
  first = ctx_len + len(q) - 1
  emit = [first + j for j in range(len(answer))]
  dec = [lm.tokenizer.decode(answer[:j + 1]) for j in range(len(answer))]
  digit_q = []
  at = dec[-1].find(value) if answer else -1
  if at >= 0:  # the queries emitting the tokens that spell the value
    for j in range(len(answer)):
      before = len(dec[j - 1]) if j else 0
      if len(dec[j]) > at and before < at + len(value):
        digit_q.append(emit[j])
  rows = {int(p): i for i, p in enumerate(wpos)}
  res["digit_queries"] = len(digit_q)
  question = [ctx_len + j for j in range(len(q) - 1)]
  for name, qs in (("question", question), ("answer", emit), ("digits", digit_q or emit)):
    idx = [rows[p] for p in qs if p in rows]
    sub = a[:, :, idx, :]  # [L, N, Q, S]
    for what in ("sentence", "value", "key"):
      cols = np.isin(slots, spans[what])
      res[f"{name}_{what}"] = sub[..., cols].sum(-1).mean(-1).round(5).tolist()  # [L][N]
    ctx_cols = (slots >= 0) & (slots < ctx_len)
    res[f"{name}_context"] = sub[..., ctx_cols].sum(-1).mean(-1).round(5).tolist()
  return res


# ---------------------------------------------------------------------------------------------
# what a method keeps

def kept_positions(method, cache, obs) -> np.ndarray:
  """``[L, K, budget]`` positions the prefill-time compression keeps (-1 pads)."""
  lengths = np.asarray(jax.device_get(cache.lengths))
  kept = method.kept(lengths)
  scores = (method.scores(cache, obs, kept=jnp.asarray(kept))
            if getattr(method, "scores_take_kept", False) else method.scores(cache, obs))
  out = select(cache, scores, jnp.asarray(kept, jnp.int32), int(kept.max()))
  return np.asarray(out.positions[:, 0])


def kept_fraction(pos: np.ndarray, tokens: list[int]) -> list:
  """``[L][K]`` fraction of ``tokens`` among the kept positions."""
  if not tokens:
    return []
  t = np.asarray(tokens)
  return np.stack([[np.isin(t, pos[l, k]).mean() for k in range(pos.shape[1])]
                   for l in range(pos.shape[0])]).round(4).tolist()


def rank_quantile(scores: np.ndarray, tokens: list[int], lo: int, n: int) -> list:
  """``[L][K]`` mean over ``tokens`` of the fraction of context slots ``lo..n-1`` scored below
  each (1 = the head's best)."""
  s = scores[:, 0, :, lo:n]  # [L, K, S']
  t = np.asarray(tokens) - lo
  mine = s[..., t]  # [L, K, T]
  below = (s[..., None, :] < mine[..., None]).mean(-1)  # [L, K, T]
  return below.mean(-1).round(4).tolist()


def answer_with(lm, method, cache, obs, q: list[int], room: int) -> str:
  evicting = hasattr(method, "update")
  m_room = gen.round_up(len(q), 8) + 1 if evicting else room
  small, _, _ = compress_for(method, cache, obs, m_room, lm.attn_block_size)
  if not evicting:
    small = small.resize(gen.round_up(small.capacity, 128))
  ans, _ = ask(lm.params, lm.apply_fn, small, [q], max_new_tokens=FLAGS.max_new_tokens,
               stop_tokens=lm.stop_tokens, method=method if evicting else None)
  return lm.tokenizer.decode(ans[0])


# ---------------------------------------------------------------------------------------------
# one sample

def method_specs() -> list[tuple[str, float, object]]:
  """``[(key, ratio, Method)]``: ``--method`` at each ratio, KVzip at each ``--chunks``, and
  kvzip_heads with each ``--tables`` table (``kvzip_heads/<name>``)."""
  out = []
  for r in (float(x) for x in FLAGS.ratio):
    for spec in FLAGS.method:
      m = methods_lib.make(spec, ratio=r)
      if getattr(m, "reconstructs", False):
        for i, ch in enumerate(int(x) for x in FLAGS.chunks):
          out.append((f"{spec}@{r:g}" + (f":chunk={ch}" if i else ""), r,
                      dataclasses.replace(m, chunk=ch)))
      else:
        out.append((f"{spec}@{r:g}", r, m))
    for item in FLAGS.tables:
      name, path = item.split("=", 1)
      out.append((f"kvzip_heads/{name}@{r:g}", r, methods_lib.make("kvzip_heads", ratio=r,
                                                                    table=path)))
  return out


def run_one(lm, haystack: str, seed: int, rec: dict | None = None) -> dict:
  """One sample's record; with ``rec`` (an earlier record of it) only the missing method
  cells are run."""
  c = lm.config
  count = lambda s: len(lm.tokenizer.encode(s, add_special_tokens=False))
  sample = make_sample("niah_single", FLAGS.length, seed, count, haystack=haystack)
  ctx, q = prompt_pieces(lm.tokenizer, sample, "query_agnostic")
  spans = needle_spans(lm, sample, ctx)
  n = len(ctx)
  t0 = time.time()
  hook = last_queries(1)  # TOVA's observation
  cache, obs_tova, _ = prefill_context(lm.params, lm.apply_fn, [ctx], num_layers=c.num_layers,
                                       kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                       dtype=lm.dtype, observe=hook, block=lm.attn_block_size)
  room = gen.round_up(len(q), 8) + FLAGS.max_new_tokens + 16
  prompts, prefix = reconstruction_prompts(lm.tokenizer, ctx)
  recon = {}

  def scores_of(ch):
    if ch not in recon:
      recon[ch] = reconstruction_scores(
          lm.params, lm.apply_fn, cache, ctx, prompts, chunk=ch, prefix=prefix,
          max_context=c.max_position_embeddings, block=lm.attn_block_size)
    return recon[ch]

  if rec is None:
    full = cache.resize(gen.round_up(n + room, 128))
    ans, _ = ask(lm.params, lm.apply_fn, jax.tree.map(jnp.copy, full), [q],
                 max_new_tokens=FLAGS.max_new_tokens, stop_tokens=lm.stop_tokens)
    full_pred = lm.tokenizer.decode(ans[0])
    rec = {"haystack": haystack, "seed": seed, "length": FLAGS.length, "context_tokens": n,
           "depth": sample.depth, "needle": sample.needles[0], "answer": sample.answers[0],
           "positions": {k: spans[k] for k in ("sentence", "value", "key")}, "prefix": prefix,
           "full": {"prediction": full_pred,
                    "correct": string_match_all(full_pred, sample.answers) == 1.0},
           "methods": {}, "kvzip": {}}
    rec["attention"] = answer_attention(lm, full, n, q, ans[0], spans, sample.answers[0])
  elif "stream_error" not in rec["attention"]:
    full = cache.resize(gen.round_up(n + room, 128))
    a, _, slots, values = probe(lm, full, n, q + lm.tokenizer.encode(
        rec["full"]["prediction"], add_special_tokens=False))
    rec["attention"]["stream_error"] = stream_error(a, slots, values, n).round(4).tolist()
  for key, r, m in method_specs():
    if key in rec["methods"]:
      continue
    if getattr(m, "reconstructs", False):
      obs = scores_of(m.chunk)
    elif m.observe is not None:
      if m.observe is not hook:
        raise ValueError(f"{key}: only TOVA's observation is formed here")
      obs = obs_tova
    else:
      obs = None
    pos = kept_positions(m, cache, obs)
    pred = answer_with(lm, m, cache, obs, q, room)
    rec["methods"][key] = {
        "prediction": pred, "correct": string_match_all(pred, sample.answers) == 1.0,
        **{f"kept_{w}": kept_fraction(pos, spans[w]) for w in ("sentence", "value", "key")},
        "budget": (pos >= 0).sum(-1).tolist()}
  for ch, out in recon.items():
    if str(ch) in rec["kvzip"]:
      continue
    s = np.asarray(jax.device_get(out["scores"]))
    lo = max(4, prefix)
    rec["kvzip"][str(ch)] = {
        "rank_sentence": rank_quantile(s, spans["sentence"], lo, n),
        "rank_value": rank_quantile(s, spans["value"], lo, n),
        "head_table": table_from_scores(s, n, lo).round(6).tolist(),
        "needle_log10": np.log10(s[:, 0, :, spans["value"]] + 1e-12).mean(-1).round(3).tolist(),
        "median_log10": np.log10(np.median(s[:, 0, :, lo:n], -1) + 1e-12).round(3).tolist()}
  rec["seconds"] = round(rec.get("seconds", 0) + time.time() - t0, 1)
  return rec


# ---------------------------------------------------------------------------------------------
# recalibration of kvzip_heads' table on other lengths and texts

def calibrate(lm) -> dict:
  """Per text of ``--calib_text`` and sample: KVzip's head table (the shipped table's recipe,
  at ``--calib_length``) and each head's ``stream_error`` for the queries of a repeat of 64
  tokens from the middle of the context (KVzip's later-chunk prompt). Needle-free text."""
  c = lm.config
  rng = random.Random("needle_failures:calib")
  out = {}
  n_tok = FLAGS.calib_length
  for text in FLAGS.calib_text:
    tables, errors = [], []
    for _ in range(FLAGS.calib_samples):
      if text == "docs":
        ids = text_of_tokens(lm.tokenizer, n_tok, offset_chars=rng.randrange(
            0, len(stdlib_docs()) // 2))
      else:
        raw = hay.chunk(text, rng, n_tok * 6)
        ids = lm.tokenizer.encode(raw, add_special_tokens=False)[:n_tok]
      body = lm.tokenizer.decode(ids)
      ctx, _ = prompt_pieces(lm.tokenizer, Sample("calibration", body, "", []),
                             "query_agnostic")
      ctx = ctx[:n_tok]
      cache, _, _ = prefill_context(lm.params, lm.apply_fn, [ctx], num_layers=c.num_layers,
                                    kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                    block=lm.attn_block_size)
      prompts, prefix = reconstruction_prompts(lm.tokenizer, ctx)
      r = reconstruction_scores(lm.params, lm.apply_fn, cache, ctx, prompts, chunk=2048,
                                prefix=prefix, max_context=c.max_position_embeddings,
                                block=lm.attn_block_size)
      s = np.asarray(jax.device_get(r["scores"]))
      tables.append(table_from_scores(s, len(ctx), max(4, prefix)).round(6).tolist())
      mid = len(ctx) // 2
      seq = list(prompts[1]) + ctx[mid - 8:mid] + list(prompts[2]) + ctx[mid:mid + 64]
      room = cache.resize(gen.round_up(len(ctx) + len(seq) + 8, 128))
      a, _, slots, values = probe(lm, room, len(ctx), seq)
      errors.append(stream_error(a, slots, values, len(ctx)).round(5).tolist())
      print(f"calib {text} {len(ctx)} tokens done", flush=True)
    out[f"{text}_{n_tok}"] = tables
    out[f"stream_{text}_{n_tok}"] = errors
    for kind, ts in (("kvzip", tables), ("stream", errors)):
      path = os.path.join(FLAGS.out_dir, f"table_{kind}_{text}_{n_tok}.json")
      with open(path, "w") as f:
        json.dump({"model": FLAGS.model, "fingerprint": lm.fingerprint,
                   "scores": np.mean(ts, 0).round(6).tolist(), "per_sample": ts,
                   "text": text, "length": n_tok,
                   "pooling": ("max over context slots (KVzip repeat scores)" if kind == "kvzip"
                               else "relative change of the head's output with sinks + window "
                               "only, mean over 64 repeat queries")}, f)
  return out


# ---------------------------------------------------------------------------------------------
# summaries and plots

def spearman(a, b) -> float:
  ra = np.argsort(np.argsort(np.ravel(a)))
  rb = np.argsort(np.argsort(np.ravel(b)))
  return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(a, b, k: int) -> int:
  ta = set(np.argsort(-np.ravel(a))[:k].tolist())
  tb = set(np.argsort(-np.ravel(b))[:k].tolist())
  return len(ta & tb)


def load_samples(out_dir: str) -> list[dict]:
  d = os.path.join(out_dir, "samples")
  if not os.path.isdir(d):
    return []
  recs = []
  for f in sorted(os.listdir(d)):
    if f.endswith(".json"):
      with open(os.path.join(d, f)) as fh:
        recs.append(json.load(fh))
  return recs


def selected_heads(table: np.ndarray, ratio: float, n: int, sinks: int = 4,
                   window: int = 32) -> np.ndarray:
  """``[L, K]`` bool: the heads kvzip_heads with head scores ``table`` keeps more than
  ``sinks + window`` of at ``ratio`` of an ``n``-token context (whole heads and the boundary
  one), by its budget rule: the spare budget fills heads in table order."""
  base = min(sinks + window, n)
  spare = (int(np.ceil(ratio * n)) - base) * table.size
  order = np.argsort(-np.ravel(table), kind="stable")
  room = n - base
  sel = np.zeros(table.size, bool)
  sel[order[:int(-(-spare // room))]] = True
  return sel.reshape(table.shape)


def summarize(recs: list[dict], calib: dict | None) -> dict:
  out = {"samples": len(recs), "per_sample": [], "cells": {}}
  shipped = np.asarray(load_table(DEFAULT_TABLE)["scores"])
  for r in recs:
    row = {"haystack": r["haystack"], "seed": r["seed"], "depth": round(r["depth"], 3),
           "sentence_at": [min(r["positions"]["sentence"]), max(r["positions"]["sentence"])],
           "context_tokens": r["context_tokens"], "full": r["full"]["correct"]}
    for k, v in r["methods"].items():
      row[k] = v["correct"]
    out["per_sample"].append(row)
  keys = sorted({k for r in recs for k in r["methods"]})
  for hs in sorted({r["haystack"] for r in recs}) + ["all"]:
    sub = [r for r in recs if hs in ("all", r["haystack"])]
    if not sub:
      continue
    cell = {"n": len(sub), "full": sum(r["full"]["correct"] for r in sub)}
    for k in keys:
      have = [r for r in sub if k in r["methods"]]
      m = [r["methods"][k] for r in have]
      ok_full = [r for r in have if r["full"]["correct"]]
      cell[k] = {
          "correct": sum(x["correct"] for x in m),
          "correct_where_full": sum(r["methods"][k]["correct"] for r in ok_full),
          "n_full_correct": len(ok_full),
          "sentence_kept_mean": round(float(np.mean([np.mean(x["kept_sentence"]) for x in m])),
                                      4),
          "value_kept_mean": round(float(np.mean([np.mean(x["kept_value"]) for x in m])), 4),
          # the share of the answer's attention mass on the needle that lands on kept slots,
          # weighted per (layer, kv head) by the full cache's mass
          # over the samples the full cache answers (their digit queries)
          "retrieval_mass_kept": round(float(np.mean([
              weighted_kept(r["attention"]["digits_value"], r["methods"][k]["kept_value"])
              for r in (ok_full or have)])), 4)}
    out["cells"][hs] = cell
  if calib:
    ref = shipped
    out["head_table"] = {}
    for name, tables in calib.items():
      t = np.mean(tables, 0)
      out["head_table"][name] = {
          "spearman_vs_shipped": round(spearman(ref, t), 3),
          "top10_shared": top_overlap(ref, t, 10), "top22_shared": top_overlap(ref, t, 22),
          "top45_shared": top_overlap(ref, t, 45),
          "per_sample_spearman": [round(spearman(ref, x), 3) for x in tables]}
    for ch in {k for r in recs for k in r["kvzip"]}:
      for hs in sorted({r["haystack"] for r in recs}):
        ts = [np.asarray(r["kvzip"][ch]["head_table"]) for r in recs
              if r["haystack"] == hs and ch in r["kvzip"]]
        if not ts:
          continue
        t = np.mean(ts, 0)
        out["head_table"][f"needle_samples_{hs}_chunk{ch}"] = {
            "spearman_vs_shipped": round(spearman(ref, t), 3),
            "top10_shared": top_overlap(ref, t, 10), "top22_shared": top_overlap(ref, t, 22),
            "top45_shared": top_overlap(ref, t, 45)}
    # retrieval heads vs the table
    mass = np.mean([kv_mass(r["attention"]["digits_value"]) for r in good(recs)], 0)
    out["head_table"]["retrieval_mass_samples"] = len(good(recs))
    out["head_table"]["retrieval_mass_vs_shipped_spearman"] = round(spearman(ref, mass), 3)
    for ratio in (0.5, 0.25):
      sel = selected_heads(ref, ratio, FLAGS.length)
      out["head_table"][f"retrieval_mass_in_selected_heads@{ratio:g}"] = round(
          float(mass[sel].sum() / mass.sum()), 3)
      out["head_table"][f"selected_heads@{ratio:g}"] = int(sel.sum())
    err = np.mean([r["attention"]["stream_error"] for r in recs
                   if "stream_error" in r["attention"]], 0)
    out["head_table"]["stream_error_vs_shipped_spearman"] = round(spearman(ref, err), 3)
    for ratio in (0.5, 0.25):
      sel = selected_heads(ref, ratio, FLAGS.length)
      out["head_table"][f"stream_error_kept_vs_dropped@{ratio:g}"] = [
          round(float(err[sel].mean()), 3), round(float(err[~sel].mean()), 3)]
    out["head_table"]["stream_error_by_layer"] = err.mean(1).round(3).tolist()
    top = np.argsort(-mass.reshape(-1))[:10]
    out["head_table"]["top_retrieval_heads"] = [
        {"layer": int(i) // mass.shape[1], "kv_head": int(i) % mass.shape[1],
         "mass": round(float(mass.reshape(-1)[i]), 4),
         "table_rank": int(np.argsort(np.argsort(-ref.reshape(-1)))[i]) + 1}
        for i in top]
  return out


def good(recs: list[dict]) -> list[dict]:
  """The samples the full cache answers, with queries that emit the value (else all)."""
  g = [r for r in recs if r["full"]["correct"] and r["attention"]["digit_queries"] > 0]
  return g or recs


def kv_mass(per_qhead, groups: int = 3) -> np.ndarray:
  """``[L][N]`` -> ``[L, K]``: summed over each kv head's query group."""
  a = np.asarray(per_qhead)
  return a.reshape(a.shape[0], -1, groups).sum(-1) if a.shape[1] > 3 else a


def weighted_kept(mass_qheads, kept) -> float:
  m = kv_mass(mass_qheads)
  k = np.asarray(kept)
  return float((m * k).sum() / max(m.sum(), 1e-12))


def plots(recs: list[dict], calib: dict | None, fig_dir: str) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(fig_dir, exist_ok=True)
  made = []
  hss = sorted({r["haystack"] for r in recs})
  base_keys = [f"{m}@{r}" for m in FLAGS.method for r in FLAGS.ratio]
  base_keys = [k for k in base_keys if any(k in r["methods"] for r in recs)]

  # 1. needle tokens kept, layer x kv head, per method / ratio / haystack
  for hs in hss:
    sub = [r for r in recs if r["haystack"] == hs]
    fig, axes = plt.subplots(len(base_keys), 1, figsize=(9, 1.0 + 1.2 * len(base_keys)),
                             squeeze=False, sharex=True)
    fig.subplots_adjust(hspace=0.7)
    for ax, k in zip(axes[:, 0], base_keys):
      have = [r for r in sub if k in r["methods"]]
      m = np.mean([r["methods"][k]["kept_sentence"] for r in have], 0)
      ok = sum(r["methods"][k]["correct"] for r in have)
      full_ok = sum(r["full"]["correct"] for r in have)
      im = ax.imshow(m.T, vmin=0, vmax=1, cmap="viridis", aspect="auto")
      ax.set_yticks(range(m.shape[1]))
      ax.set_ylabel("kv head", fontsize=7)
      ax.set_title(f"{k}: needle sentence tokens kept (mean of {len(have)}); "
                   f"answers {ok}/{len(have)} (full {full_ok})", fontsize=8)
      ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("layer")
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.02)
    p = os.path.join(fig_dir, f"kept_{hs}.png")
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    made.append(p)

  # 2. attention mass onto the needle's value, full cache, layer x query head
  fig, axes = plt.subplots(len(hss), 1, figsize=(9, 1.9 * len(hss) + 0.6), squeeze=False,
                           sharex=True)
  fig.subplots_adjust(hspace=0.5)
  for ax, hs in zip(axes[:, 0], hss):
    sub = [r for r in good(recs) if r["haystack"] == hs]
    what = f"mean of the {len(sub)} it answers"
    if not sub:
      sub = [r for r in recs if r["haystack"] == hs]
      what = f"it answers none: all {len(sub)}, every answer query"
    m = np.mean([r["attention"]["digits_value"] for r in sub], 0)  # [L, N]
    im = ax.imshow(m.T, cmap="magma", aspect="auto", vmin=0, vmax=max(m.max(), 1e-3))
    ax.set_ylabel("query head", fontsize=7)
    ax.set_yticks(range(m.shape[1]))
    ax.tick_params(labelsize=7)
    ax.set_title(f"{hs}: attention mass on the needle's value from the queries that emit it "
                 f"(full cache, {what})", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.02)
  axes[-1, 0].set_xlabel("layer")
  p = os.path.join(fig_dir, "attention_mass.png")
  fig.savefig(p, dpi=110, bbox_inches="tight")
  plt.close(fig)
  made.append(p)

  # 3. head table: shipped vs recomputed, and vs retrieval mass
  ref = np.asarray(load_table(DEFAULT_TABLE)["scores"])
  panels = []
  if calib:
    panels += [(name, np.mean(t, 0)) for name, t in calib.items()]
  mass = np.mean([kv_mass(r["attention"]["digits_value"]) for r in good(recs)], 0)
  panels.append(("retrieval mass (needle samples)", mass))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
  sel = selected_heads(ref, 0.25, FLAGS.length)
  for ax, (name, t) in zip(axes[0], panels):
    ax.scatter(ref.ravel(), t.ravel(), s=10, c=np.where(sel.ravel(), "C3", "C0"))
    ax.set_xlabel("shipped table (2k docs)", fontsize=8)
    ax.set_ylabel(name, fontsize=8)
    ax.set_title(f"{name}\nSpearman {spearman(ref, t):.2f}", fontsize=8)
    ax.tick_params(labelsize=7)
  fig.suptitle("kvzip_heads head scores (red: heads kept whole at 25 %)", fontsize=9)
  fig.tight_layout()
  p = os.path.join(fig_dir, "head_table.png")
  fig.savefig(p, dpi=110, bbox_inches="tight")
  plt.close(fig)
  made.append(p)

  # 4. KVzip rank of the needle's tokens per layer x head, per chunk
  chunks = sorted({k for r in recs for k in r["kvzip"]}, key=lambda x: -int(x))
  fig, axes = plt.subplots(len(chunks), 1, figsize=(9, 1.0 + 1.2 * len(chunks)), squeeze=False,
                           sharex=True)
  fig.subplots_adjust(hspace=0.7)
  for ax, ch in zip(axes[:, 0], chunks):
    have = [r for r in recs if ch in r["kvzip"]]
    m = np.mean([r["kvzip"][ch]["rank_value"] for r in have], 0)
    im = ax.imshow(m.T, vmin=0, vmax=1, cmap="coolwarm_r", aspect="auto")
    ax.set_yticks(range(m.shape[1]))
    ax.set_ylabel("kv head", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.set_title(f"KVzip chunk {ch}: rank quantile of the value's tokens among the context "
                 f"(1 = best; kept at 50 % above 0.5), mean of {len(have)}", fontsize=8)
  axes[-1, 0].set_xlabel("layer")
  fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.02)
  p = os.path.join(fig_dir, "kvzip_rank.png")
  fig.savefig(p, dpi=110, bbox_inches="tight")
  plt.close(fig)
  made.append(p)

  # 5. retrieval mass vs what each method keeps, per (layer, kv head)
  ncol = min(4, len(base_keys))
  nrow = -(-len(base_keys) // ncol)
  fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.6 * nrow), squeeze=False,
                           sharey=True)
  for ax in axes.ravel()[len(base_keys):]:
    ax.axis("off")
  for ax, k in zip(axes.ravel(), base_keys):
    have = [r for r in good(recs) if k in r["methods"]]
    kept = np.mean([r["methods"][k]["kept_value"] for r in have], 0)
    ax.scatter(mass.ravel(), kept.ravel(), s=9)
    w = np.mean([weighted_kept(r["attention"]["digits_value"], r["methods"][k]["kept_value"])
                 for r in have])
    ax.set_title(f"{k}\nmass-weighted kept {w:.2f}", fontsize=8)
    ax.set_xlabel("needle attention mass (full)", fontsize=7)
    ax.tick_params(labelsize=7)
  for ax in axes[:, 0]:
    ax.set_ylabel("value tokens kept", fontsize=8)
  fig.tight_layout()
  p = os.path.join(fig_dir, "mass_vs_kept.png")
  fig.savefig(p, dpi=110, bbox_inches="tight")
  plt.close(fig)
  made.append(p)
  # 6. each head's output change when cut to sinks + window (needle samples' queries), with
  # the heads the shipped table keeps whole
  have = [r for r in recs if "stream_error" in r["attention"]]
  if have:
    err = np.mean([r["attention"]["stream_error"] for r in have], 0)
    fig, ax = plt.subplots(figsize=(9, 1.9))
    im = ax.imshow(err.T, cmap="viridis", aspect="auto", vmin=0, vmax=min(1.0, err.max()))
    for ratio, mk, col in ((0.5, "o", "w"), (0.25, "x", "r")):
      sel = selected_heads(ref, ratio, FLAGS.length)
      ls, ks = np.nonzero(sel)
      ax.scatter(ls, ks, marker=mk, s=14, c=col, label=f"kept whole at {ratio:g}")
    ax.set_yticks(range(err.shape[1]))
    ax.set_ylabel("kv head", fontsize=7)
    ax.set_xlabel("layer", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.1, 1.0))
    ax.set_title(f"relative change of each head's output (question + answer queries) when cut "
                 f"to 4 sinks + 32 recent, full cache, mean of {len(have)}", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.02)
    p = os.path.join(fig_dir, "stream_error.png")
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    made.append(p)
  return made


def main(argv):
  del argv
  launch_config.apply()
  if FLAGS.method_module:
    __import__(FLAGS.method_module)
  os.makedirs(os.path.join(FLAGS.out_dir, "samples"), exist_ok=True)
  calib_path = os.path.join(FLAGS.out_dir, "calib.json")
  lm = None
  if FLAGS.stage in ("all", "samples"):
    lm = models.load(FLAGS.model, progress=False)
    for hs in FLAGS.haystack:
      for seed in range(FLAGS.seed, FLAGS.seed + FLAGS.num_samples):
        path = os.path.join(FLAGS.out_dir, "samples", f"{hs}_{FLAGS.length}_{seed}.json")
        old = None
        if os.path.exists(path):
          with open(path) as f:
            old = json.load(f)
          if ("stream_error" in old["attention"]
              and all(k in old["methods"] for k, _, _ in method_specs())):
            continue
        rec = run_one(lm, hs, seed, old)
        with open(path, "w") as f:
          json.dump(rec, f)
        print(f"{hs} seed {seed}: full {rec['full']['correct']} "
              + " ".join(f"{k}={int(v['correct'])}" for k, v in rec["methods"].items())
              + f" ({rec['seconds']} s)", flush=True)
  if FLAGS.stage in ("all", "calib"):
    lm = lm or models.load(FLAGS.model, progress=False)
    cal = calibrate(lm)
    old = {}
    if os.path.exists(calib_path):
      with open(calib_path) as f:
        old = json.load(f)
    old.update(cal)
    with open(calib_path, "w") as f:
      json.dump(old, f)
  calib = None
  if os.path.exists(calib_path):
    with open(calib_path) as f:
      calib = json.load(f)
  recs = [r for r in load_samples(FLAGS.out_dir) if r["length"] == FLAGS.length]
  if recs:
    summ = summarize(recs, calib)
    summ["command"] = "python -m experiments.analyze_needle_failures " + " ".join(
        f"--{k}={FLAGS[k].value if not isinstance(FLAGS[k].value, list) else ','.join(FLAGS[k].value)}"
        for k in ("length", "haystack", "num_samples", "method", "ratio", "chunks"))
    with open(os.path.join(FLAGS.out_dir, "summary.json"), "w") as f:
      json.dump(summ, f, indent=1)
    for p in plots(recs, calib, FLAGS.fig_dir):
      print("wrote", p)


if __name__ == "__main__":
  app.run(main)
