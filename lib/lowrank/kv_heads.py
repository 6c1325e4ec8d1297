r"""KV-head compression: "Effectively Compress KV Heads for LLM" (Yu et al., arXiv 2406.07056).

Letters: L layers, D width, N query heads, K kv heads before, K' = K / g after (g adjacent heads
merged into one), G = N / K query heads per original kv head, H head dim, P = H / 2 RoPE
frequency pairs, M calibration tokens.

The model is turned into one with fewer kv heads (MHA -> GQA, or GQA -> coarser GQA) by folding
low-rank bases fitted on calibration caches into the projection weights; nothing changes at
inference except ``num_kv_heads``, so the cache shrinks by K / K'.

Values. The g value heads of a group, concatenated, ``X [M, g*H]``, are replaced by their
projection on the top-H right singular vectors ``Psi [g*H, H]`` of the uncentred X (the
paper's SVD of the cache): the merged head stores ``v' = X Psi``, so ``wv' = [wv_1 .. wv_g] Psi``
(and ``bv`` alike). Head i is read back as ``v_i ~ v' Psi_i^T`` with ``Psi_i`` the i-th ``H x H``
block; attention is linear in the values, so ``Psi_i^T`` folds into the ``wo`` rows of every
query head that used kv head i.

Keys (RoPE). RoPE rotates pre-RoPE keys between ``wk`` and the cache, so a general ``Psi``
cannot be folded. In the rotate-half layout channels ``(j, j + P)`` form the complex number
``z_j = k[j] + i k[j + P]`` and RoPE multiplies it by ``e^{i theta_j t}``: any complex scalar
per frequency commutes with it. Per frequency j and group we take the top right singular vector
``v_j`` (unit, length g) of the complex ``Z_j [M, g]`` (column i: head i's ``z_{i,j}``) and keep
the rank-1 projection

  w_j = sum_i v_{i,j} z_{i,j},        z_{i,j} ~ conj(v_{i,j}) w_j.

A query pair ``q_j`` meets key pair ``z_j`` as ``q . k = sum_j Re(q_j conj(z_j))``; after RoPE
both sides pick up phases ``e^{i theta t}`` and ``e^{i theta s}``, which factor out of
``Re(q_j conj(z_j) e^{i theta (t - s)})``. With the projection,
``q_j conj(z_{i,j}) ~ q_j v_{i,j} conj(w_j)``, so the query heads that used kv head i get their
pair j multiplied by ``v_{i,j}`` (not its conjugate) and the key by ``sum_i v_{i,j} (.)``.
Multiplying a pair by ``a + ib`` is the 2x2 real map ``(x1, x2) -> (a x1 - b x2, b x1 + a x2)``
on the output columns of ``wq``/``bq`` and ``wk``/``bk``: the fold is exact, and at g = 1
(``kv_heads == K``) ``|v| = 1`` and ``Psi`` is orthogonal, so the model is unchanged. This is
our RoPE-commuting variant (METHODS.md lists the paper's RoPE strategy as unverified): one
complex rank per frequency, no rank beyond H for the merged key head.

Not done: the paper's LoRA recovery fine-tuning after the conversion; models whose keys pass a
per-head RMSNorm (Qwen3's ``k_norm``), which sits between ``wk`` and RoPE and cannot absorb a
linear map, are refused.

Writing the converted model as an HF checkpoint is model code: ``models.hf_export``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from kvlab.lib.protocol import prefill_context


# ---- calibration caches --------------------------------------------------------------------

def _observe_kv(layer, x, cache):
  """Observation hook: this layer's pre-RoPE keys and values, each ``[B, K, T, H]``."""
  del layer, cache
  return x.k_pre, x.v


def collect_kv(lm, samples: Sequence[Sequence[int]], progress: bool = True,
               chunk_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """Pre-RoPE keys and values of the calibration ``samples`` (token id lists).

  Returns:
    ``(keys, values)``, each float32 ``[L, M, K, H]`` with M the total number of tokens.
  """
  from kvlab.lib.progress import tqdm  # pylint: disable=g-import-not-at-top
  c = lm.config
  ks, vs = [], []
  for s in tqdm(samples, desc="calibration caches", disable=not progress):
    _, obs, _ = prefill_context(lm.params, lm.apply_fn, [list(s)], num_layers=c.num_layers,
                                kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=lm.dtype,
                                observe=_observe_kv, chunk_size=chunk_size,
                                block=lm.attn_block_size)
    for out, acc in zip(obs, (ks, vs)):  # [chunks, L, 1, K, C, H] -> [L, chunks*C, K, H]
      x = np.asarray(out[:, :, 0], np.float32).transpose(1, 0, 3, 2, 4)
      acc.append(x.reshape(c.num_layers, -1, c.num_kv_heads, c.head_dim)[:, :len(s)])
  return np.concatenate(ks, 1), np.concatenate(vs, 1)


# ---- bases ---------------------------------------------------------------------------------

def _top_eigvecs(gram: np.ndarray, r: int) -> np.ndarray:
  """Top-``r`` eigenvectors (descending) of Hermitian ``gram [..., n, n]``: ``[..., n, r]``."""
  _, vecs = np.linalg.eigh(gram)  # ascending eigenvalues
  return vecs[..., ::-1][..., :r]


def _pairs(x: np.ndarray) -> np.ndarray:
  """Rotate-half pairs as complex numbers: ``[..., H]`` real -> ``[..., H/2]`` complex."""
  p = x.shape[-1] // 2
  return x[..., :p] + 1j * x[..., p:]


def _unpairs(z: np.ndarray) -> np.ndarray:
  return np.concatenate([z.real, z.imag], -1)


def value_basis(values: np.ndarray, g: int) -> np.ndarray:
  """Top-H right singular vectors of each group's uncentred values.

  Args:
    values: ``[L, M, K, H]``.
    g: kv heads merged per group (divides K).

  Returns:
    ``Psi [L, K', g*H, H]`` float64 with orthonormal columns.
  """
  l, m, k, h = values.shape
  x = values.astype(np.float64).reshape(l, m, k // g, g * h)  # [L, M, K', g*H]
  gram = np.einsum("lmkx,lmky->lkxy", x, x)                   # SVD via the Gram matrix: any M
  return _top_eigvecs(gram, h)


def key_basis(keys: np.ndarray, g: int) -> np.ndarray:
  """Per frequency, the top complex right singular vector of each group's pre-RoPE keys.

  Args:
    keys: ``[L, M, K, H]`` pre-RoPE keys.
    g: kv heads merged per group (divides K).

  Returns:
    ``v [L, K', P, g]`` complex128, unit norm over g (see the module docstring).
  """
  l, m, k, h = keys.shape
  z = _pairs(keys.astype(np.float64)).reshape(l, m, k // g, g, h // 2)  # [L, M, K', g, P]
  gram = np.einsum("lmkip,lmkjp->lkpij", z.conj(), z)  # Z^H Z per (layer, group, frequency)
  return _top_eigvecs(gram, 1)[..., 0]


def project_keys(keys: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Merged pre-RoPE keys ``w = sum_i v_i z_i``: ``[L, M, K, H]`` -> ``[L, M, K', H]``."""
  l, m, k, h = keys.shape
  kp, g = v.shape[1], v.shape[3]
  z = _pairs(keys.astype(np.float64)).reshape(l, m, kp, g, h // 2)
  return _unpairs(np.einsum("lmkip,lkpi->lmkp", z, v))


# ---- the conversion ------------------------------------------------------------------------

def check_kv_heads(config, kv_heads: int) -> int:
  """Validates the target; returns g, the kv heads merged into each new one."""
  k = config.num_kv_heads
  valid = [d for d in range(1, k + 1) if k % d == 0]
  if not isinstance(kv_heads, (int, np.integer)) or kv_heads not in valid:
    raise ValueError(f"kv_heads must divide the model's {k} kv heads (adjacent heads are merged "
                     f"in equal groups): valid values are {valid}, got {kv_heads}")
  if config.qk_norm:
    raise ValueError("this model normalises keys per head (qk_norm, e.g. Qwen3): the RMSNorm "
                     "between wk and RoPE cannot absorb the merge; KV-head compression supports "
                     "Llama/Mistral/Qwen2-style attention only")
  return k // kv_heads


def compress_kv_heads(config, params: dict, keys: np.ndarray, values: np.ndarray,
                      kv_heads: int) -> tuple[Any, dict]:
  """Merges each group of ``g = K / kv_heads`` adjacent kv heads into one (see module docstring).

  Args:
    config: the ``ModelConfig``.
    params: its parameter tree (layers stacked under ``params["layers"]``).
    keys: ``[L, M, K, H]`` pre-RoPE calibration keys (``collect_kv``).
    values: ``[L, M, K, H]`` calibration values.
    kv_heads: K', the new number of kv heads (divides K).

  Returns:
    ``(new_config, new_params)``: ``num_kv_heads = kv_heads`` and the folded ``wq``, ``wk``,
    ``wv``, ``wo`` (and biases) in the original dtype; every other leaf is shared.
  """
  g = check_kv_heads(config, kv_heads)
  c = config
  l, k, h, n = c.num_layers, c.num_kv_heads, c.head_dim, c.num_heads
  want = (l, k, h)
  for name, x in (("keys", keys), ("values", values)):
    if x.ndim != 4 or (x.shape[0], x.shape[2], x.shape[3]) != want:
      raise ValueError(f"{name} must be [L={l}, tokens, K={k}, H={h}] (from collect_kv on this "
                       f"model), got {x.shape}")
  kp, p, grp = kv_heads, h // 2, n // k
  psi = value_basis(values, g)                          # [L, K', g*H, H]
  v = key_basis(keys, g)                                # [L, K', P, g]
  v_head = v.transpose(0, 1, 3, 2).reshape(l, k, p)     # multiplier of original kv head i
  lay = params["layers"]
  f64 = lambda name: np.asarray(lay[name], np.float64)
  out = dict(lay)

  # values: wv' = [wv_1 .. wv_g] Psi; wo rows of head n <- Psi_i^T wo_n
  wv = f64("wv").reshape(l, -1, kp, g * h)
  out["wv"] = np.einsum("ldkx,lkxh->ldkh", wv, psi).reshape(l, -1, kp * h)
  if "bv" in lay:
    out["bv"] = np.einsum("lkx,lkxh->lkh", f64("bv").reshape(l, kp, g * h), psi).reshape(l, -1)
  blocks = psi.reshape(l, kp, g, h, h).reshape(l, k, h, h)          # Psi_i [H_old, H_new]
  wo = f64("wo").reshape(l, k, grp, h, -1)                           # [L, K, G, H, D]
  out["wo"] = np.einsum("lkab,lkgad->lkgbd", blocks, wo).reshape(l, n * h, -1)

  # keys: w = sum_i v_i z_i; queries of kv head i: q_j <- q_j v_{i,j}
  wk = _pairs(f64("wk").reshape(l, -1, kp, g, h))                    # [L, D, K', g, P]
  out["wk"] = _unpairs(np.einsum("ldkip,lkpi->ldkp", wk, v)).reshape(l, -1, kp * h)
  if "bk" in lay:
    bk = _pairs(f64("bk").reshape(l, kp, g, h))
    out["bk"] = _unpairs(np.einsum("lkip,lkpi->lkp", bk, v)).reshape(l, -1)
  wq = _pairs(f64("wq").reshape(l, -1, k, grp, h))                   # [L, D, K, G, P]
  out["wq"] = _unpairs(wq * v_head[:, None, :, None, :]).reshape(l, -1, n * h)
  if "bq" in lay:
    bq = _pairs(f64("bq").reshape(l, k, grp, h))
    out["bq"] = _unpairs(bq * v_head[:, :, None, :]).reshape(l, -1)

  for name in ("wq", "wk", "wv", "wo", "bq", "bk", "bv"):
    if name in lay:
      out[name] = jnp.asarray(out[name], lay[name].dtype)
  return dataclasses.replace(c, num_kv_heads=kv_heads), {**params, "layers": out}


def kv_bytes_per_token(config, dtype=jnp.float32) -> int:
  """Key + value bytes one token occupies in the cache over all layers: ``2 L K H itemsize``."""
  return 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize
