"""MatryoshkaKV distillation: train the per-head bases (and means) of ``lib.lowrank.matryoshka``
so that the model with projected keys/values matches the full model, at every rank at once.

Per step: a batch of text windows; one rank per (layer, kv head), independently for keys and
values, drawn from ``{s, 2s, ..., H}`` (``s = rank_step``; the reference draws ``16 * randint(1,
9)`` for H = 128, i.e. s = H / 8); the student is the frozen model whose post-RoPE keys and
values pass through ``(x - mean) U_r U_r^T + mean`` (``models.decoder``'s ``project``), the
teacher the same model unprojected. Loss = ``kl_weight * KL(teacher || student) + (1 -
kl_weight) * CE(next token)`` (reference: 0.25 / 0.75), Adam with a warm-up + cosine schedule
(reference LR 1e-3 for the projections).

Resumable: an orbax ``CheckpointManager`` saves ``(theta, optimizer state)`` every
``save_every`` steps; the batch and the ranks of step s depend only on ``(seed, s)``, so a
killed run restarted from its last checkpoint computes exactly the losses it would have.
Data-parallel: with a mesh, the batch is split over its ``data`` axis and everything else is
replicated (the same code runs on a TPU pod slice).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from kvlab.lib import jsonl, sharding
from kvlab.lib.lowrank import matryoshka as mk


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training settings (defaults sized for the 2-core CPU; the reference trains 1 epoch of
  RedPajama at 2048 tokens)."""

  steps: int = 300
  batch: int = 2
  seqlen: int = 256
  lr: float = 1e-3
  warmup: int = 10
  kl_weight: float = 0.25
  rank_step: int = 8
  seed: int = 0
  save_every: int = 25

  def __post_init__(self):
    if self.steps < 1 or self.batch < 1 or self.seqlen < 2:
      raise ValueError("steps and batch must be >= 1 and seqlen >= 2")
    if not 0.0 <= self.kl_weight <= 1.0:
      raise ValueError(f"kl_weight must be in [0, 1], got {self.kl_weight}")
    if self.save_every < 1:
      raise ValueError("save_every must be >= 1")
    if self.warmup < 0:
      raise ValueError(f"warmup must be >= 0 steps, got {self.warmup}")


def init_theta(pca: mk.Projections) -> dict:
  """Trainable state at the PCA start: skew generators 0 (U = U_pca) and the PCA means."""
  z = jnp.zeros_like(jnp.asarray(pca.u_k))
  return {"x_k": z, "x_v": z, "mean_k": jnp.asarray(pca.mean_k),
          "mean_v": jnp.asarray(pca.mean_v)}


def bases(pca: mk.Projections, theta: dict) -> tuple[jax.Array, jax.Array]:
  """The current ``(U_k, U_v) [L, K, H, H]``."""
  return (mk.orthogonal(jnp.asarray(pca.u_k), theta["x_k"]),
          mk.orthogonal(jnp.asarray(pca.u_v), theta["x_v"]))


def to_projections(pca: mk.Projections, theta: dict, meta: dict) -> mk.Projections:
  """The trained bases as ``Projections`` (what the method loads)."""
  u_k, u_v = bases(pca, theta)
  return mk.Projections(np.asarray(u_k), np.asarray(theta["mean_k"]), np.asarray(u_v),
                        np.asarray(theta["mean_v"]), {**pca.meta, **meta, "kind": "trained"})


def sample_ranks(key: jax.Array, shape: tuple[int, ...], head_dim: int, step: int) -> jax.Array:
  """Ranks ``[2, *shape]`` (keys, values) uniform over ``{step, 2 step, ..., head_dim}``."""
  return step * jax.random.randint(key, (2,) + shape, 1, head_dim // step + 1)


def make_loss(lm) -> Callable:
  """``loss(theta, params, pca_u, tokens [B, T], masks [2, L, K, H], kl_weight, cache) ->
  (loss, (kl, ce))``; ``cache`` an empty cache of capacity T. The model's params and the cache
  are arguments, so jit neither embeds them as constants nor constant-folds attention. ``lm``:
  a loaded model; its ``apply_fn`` runs the teacher and the projected student."""
  apply_fn = lm.apply_fn

  def loss(theta, params, pca_u, toks, masks, kl_weight, cache):
    b, t = toks.shape
    n = jnp.full((b,), t, jnp.int32)
    teacher, _, _ = apply_fn(params, toks, cache, n)
    teacher = jax.lax.stop_gradient(teacher)
    u_k = mk.orthogonal(pca_u[0], theta["x_k"])
    u_v = mk.orthogonal(pca_u[1], theta["x_v"])
    project = (mk.projector(u_k, masks[0]), theta["mean_k"], mk.projector(u_v, masks[1]),
               theta["mean_v"])
    student, _, _ = apply_fn(params, toks, cache, n, project=project)
    lp_t = jax.nn.log_softmax(teacher[:, :-1])
    lp_s = jax.nn.log_softmax(student[:, :-1])
    kl = jnp.mean(jnp.sum(jnp.exp(lp_t) * (lp_t - lp_s), -1))
    ce = -jnp.mean(jnp.take_along_axis(lp_s, toks[:, 1:, None], axis=-1))
    return kl_weight * kl + (1.0 - kl_weight) * ce, (kl, ce)

  return loss


def batch_at(pool: np.ndarray, step: int, batch: int, seqlen: int, seed: int) -> np.ndarray:
  """Windows ``[batch, seqlen]`` of the token ``pool`` for ``step`` (a function of seed, step)."""
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(pool) - seqlen, size=batch)
  return np.stack([pool[s:s + seqlen] for s in starts])


def evaluate(lm, pca: mk.Projections, theta: dict, windows: np.ndarray, rank,
             kl_weight: float = 0.25) -> dict:
  """Distillation loss, KL and CE over ``windows [n, T]`` (one at a time) at ``rank``: an int
  for every head, or ranks ``[2, L, K]`` (keys, values)."""
  fn = _eval_fn(lm, kl_weight)
  l, k, h = pca.shape
  ranks = np.broadcast_to(np.asarray(rank), (2, l, k))
  masks = mk.rank_mask(jnp.asarray(ranks), h)
  pca_u = jnp.stack([jnp.asarray(pca.u_k), jnp.asarray(pca.u_v)])
  cache = lm.new_cache(1, windows.shape[1])
  got = [fn(theta, lm.params, pca_u, jnp.asarray(w[None]), masks, cache) for w in windows]
  mean = lambda i: float(np.mean([float(g[i]) for g in got]))
  return {"loss": mean(0), "kl": mean(1), "ce": mean(2), "mean_rank": float(ranks.mean()),
          "windows": len(windows)}


_EVAL: dict = {}


def _eval_fn(lm, kl_weight):
  key = (id(lm), kl_weight)
  if key not in _EVAL:
    loss = make_loss(lm)

    @jax.jit
    def fn(theta, params, pca_u, toks, masks, cache):
      val, (kl, ce) = loss(theta, params, pca_u, toks, masks, kl_weight, cache)
      return val, kl, ce

    _EVAL[key] = fn
  return _EVAL[key]


def train(lm, pca: mk.Projections, pool: np.ndarray, cfg: TrainConfig, ckpt_dir: str, *,
          mesh=None, stop_after: int | None = None, progress: bool = False,
          log: Callable[[dict], None] | None = None) -> tuple[dict, list[dict]]:
  """Trains from the PCA start (or the last checkpoint in ``ckpt_dir``) to ``cfg.steps``.

  Args:
    pool: token ids ``[N]`` windows are drawn from.
    mesh: optional ``('data', 'model')`` mesh: batch split over ``data``.
    stop_after: stop (as if killed) after this many steps of *this* call (tests).

  Returns:
    ``(theta, metrics)``: the trained state and one dict per step run in this call; the
    per-step metrics are also appended to ``ckpt_dir/metrics.jsonl``.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from kvlab.lib.progress import tqdm  # pylint: disable=g-import-not-at-top
  l, k, h = pca.shape
  if h % cfg.rank_step:
    raise ValueError(f"rank_step {cfg.rank_step} must divide the head dim {h}")
  if len(pool) <= cfg.seqlen:
    raise ValueError(f"the token pool ({len(pool)}) must be longer than seqlen ({cfg.seqlen})")
  if mesh is not None and cfg.batch % mesh.shape["data"]:
    raise ValueError(f"batch {cfg.batch} does not split over the data axis "
                     f"({mesh.shape['data']}): use a multiple of it")
  # warm-up clipped to steps - 1: the cosine part needs at least one step (optax refuses 0)
  sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup, cfg.steps - 1),
                                             cfg.steps)
  opt = optax.adam(sched)
  theta = init_theta(pca)
  state = {"theta": theta, "opt": opt.init(theta)}
  pca_u = jnp.stack([jnp.asarray(pca.u_k), jnp.asarray(pca.u_v)])
  loss = make_loss(lm)

  @jax.jit
  def step_fn(state, params, pca_u, toks, step, cache):
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
    masks = mk.rank_mask(sample_ranks(key, (l, k), h, cfg.rank_step), h)
    (val, (kl, ce)), grads = jax.value_and_grad(loss, has_aux=True)(
        state["theta"], params, pca_u, toks, masks, cfg.kl_weight, cache)
    updates, opt_state = opt.update(grads, state["opt"], state["theta"])
    theta = optax.apply_updates(state["theta"], updates)
    return {"theta": theta, "opt": opt_state}, val, kl, ce

  os.makedirs(ckpt_dir, exist_ok=True)
  # synchronous saves: an async save left the next CPU step waiting forever (jax 0.10, orbax
  # 0.12); a save every N steps of a few MB costs little.
  opts = ocp.CheckpointManagerOptions(save_interval_steps=cfg.save_every, max_to_keep=2,
                                      create=True, enable_async_checkpointing=False)
  metrics_path = os.path.join(ckpt_dir, "metrics.jsonl")
  # the lock on metrics.jsonl also keeps a second run out of this ckpt_dir (LockedError)
  with jsonl.appender(metrics_path, "wait for that run to finish, or train into another "
                      "directory (--out)") as metrics, \
      ocp.CheckpointManager(os.path.join(os.path.abspath(ckpt_dir), "state"),
                            options=opts) as mgr:
    start = mgr.latest_step() or 0
    if start:
      state = mgr.restore(start, args=ocp.args.StandardRestore(state))
    _truncate(metrics_path, start)
    if mesh is not None:
      state = sharding.replicated(state, mesh)
    cache = lm.new_cache(cfg.batch, cfg.seqlen)  # empty: each window is one prefill chunk
    if mesh is not None:
      cache = sharding.shard_cache(cache, mesh)
    run: list[dict] = []
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for s in tqdm(range(start, end), desc="matryoshka", initial=start, total=cfg.steps,
                  disable=not progress):
      toks = jnp.asarray(batch_at(pool, s, cfg.batch, cfg.seqlen, cfg.seed), jnp.int32)
      if mesh is not None:
        toks = jax.device_put(toks, NamedSharding(mesh, P("data", None)))
      t0 = time.time()
      state, val, kl, ce = step_fn(state, lm.params, pca_u, toks, s, cache)
      row = {"step": s + 1, "loss": float(val), "kl": float(kl), "ce": float(ce),
             "seconds": round(time.time() - t0, 3)}
      run.append(row)
      metrics.write(row)
      if log is not None:
        log(row)
      mgr.save(s + 1, args=ocp.args.StandardSave(state), force=s + 1 == cfg.steps)
    mgr.wait_until_finished()
  return state["theta"], run


def _truncate(path: str, step: int) -> None:
  """Drops metric rows past ``step`` (written after the checkpoint a resumed run starts from)
  and a torn last line (a run killed mid-write), in place: ``jsonl.appender``'s writes follow."""
  if not os.path.exists(path):
    return
  rows = [r for r in jsonl.read(path) if r["step"] <= step]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def windows_of(pool: Sequence[int], n: int, seqlen: int) -> np.ndarray:
  """``n`` consecutive ``seqlen`` windows from the start of ``pool`` -> ``[n, seqlen]``."""
  pool = np.asarray(pool)
  if len(pool) < n * seqlen:
    raise ValueError(f"need {n * seqlen} tokens, the pool has {len(pool)}")
  return pool[: n * seqlen].reshape(n, seqlen)
