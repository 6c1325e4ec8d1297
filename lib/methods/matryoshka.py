"""MatryoshkaKV (Lin et al. 2025, METHODS.md §4.2): per-head orthogonal projections of keys
and values, truncated to a rank; the cache stores each token's coefficients
(``lib.lowrank.projected``) and attention rebuilds them.

Projections come from ``experiments/train_matryoshka.py``: ``pca`` (the PCA initialisation) and
``trained`` (after Matryoshka distillation). ``matryoshka`` uses the trained ones,
``matryoshka_pca`` the PCA ones; SmolLM2's are committed in ``results/matryoshka/``.

Choices:
* ``rank``: a fraction of the head dim (0.5 = half the channels) or an absolute rank, the same
  for every layer and head; ``searched=True`` uses the per-(layer, head) ranks the greedy search
  stored with the projections (their mean is the fraction they were searched for). Layers sit
  side by side on one flat coefficient axis, so each layer stores its own width (its largest
  head rank); heads of one layer share that width (a head of lower rank pads to it).
* keys are projected post-RoPE (as the reference); decoded tokens stay in full precision (the
  reference projects them too; here they are the newest tokens of the window).
* composes after any eviction (``snapkv+matryoshka``): coefficients are per (head, slot). It
  takes the cache's stored-part slot, so it does not also compose with a quantizer.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.cache import KVCache, round_capacity
from kvlab.lib.lowrank import matryoshka as mk
from kvlab.lib.lowrank.projected import ProjectedStore, flat_offsets, flatten, layer_widths
from kvlab.lib.methods.base import check_types
from kvlab.lib.quant.store import check_plain, first_slots, split_window
from kvlab.lib.sharding import to_host

_ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "results",
                                      "matryoshka", "smollm2-135m"))
DEFAULT_TRAINED = os.path.join(_ROOT, "trained")
DEFAULT_PCA = os.path.join(_ROOT, "pca")


@functools.lru_cache(maxsize=8)
def _load(path: str) -> mk.Projections:
  return mk.load(path)


@dataclasses.dataclass(frozen=True)
class MatryoshkaKV:
  """``rank`` kept per head (fraction of the head dim, or an integer rank); ``projections`` an
  orbax directory written by ``experiments/train_matryoshka.py``."""

  rank: float = 0.5
  projections: str = DEFAULT_TRAINED
  searched: bool = False
  name = "matryoshka"
  quantizes = True  # keeps every token (changes its representation): composes last
  observe = None

  def __post_init__(self):
    check_types(self)
    if self.rank <= 0 or (self.rank > 1 and self.rank != int(self.rank)):
      raise ValueError(f"{self.name}: rank must be a fraction in (0, 1] of the head dim or an "
                       f"integer rank, got {self.rank}: e.g. --method={self.name}:rank=0.5 or "
                       f"--method={self.name}:rank=32")

  def load_projections(self) -> mk.Projections:
    """The projections (cached per path); clear errors if missing or damaged."""
    return _load(self.projections)

  def check_for(self, config, params, what: str = "the model") -> None:
    """Raises a clear error when the projections were made for another model."""
    from kvlab.lib.quant.kvquant_calibrate import model_fingerprint  # pylint: disable=g-import-not-at-top
    self.load_projections().check_model(model_fingerprint(config, params), config.num_layers,
                                        config.num_kv_heads, config.head_dim, what)

  def ranks(self, num_layers: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """``[2, L, K]`` ranks of keys and values."""
    if not self.searched:
      return np.full((2, num_layers, kv_heads), mk.as_ranks(self.rank, head_dim), np.int32)
    p = self.load_projections()
    if p.ranks is None:
      raise ValueError(f"{self.projections} holds no searched ranks: run python -m "
                       "experiments.train_matryoshka --search_budget=0.5, or use searched=False")
    budget = p.meta.get("search_budget")
    if budget is not None and abs(budget - self.rank) > 1e-6:
      raise ValueError(f"the stored ranks were searched for a mean rank of {budget} of the head "
                       f"dim, not {self.rank}: pass rank={budget} or search again")
    return np.asarray(p.ranks, np.int32)

  def apply(self, cache: KVCache, observations=None, *, extra: int = 0,
            block: int = 512) -> KVCache:
    """Projects every cached token; ``extra`` free full-precision slots. Returns the cache with
    a ``ProjectedStore``."""
    del observations, block
    check_plain(self.name, cache)
    p = self.load_projections()
    l, k, h = cache.num_layers, cache.kv_heads, cache.head_dim
    if p.shape != (l, k, h):
      raise ValueError(f"{self.name}: projections {self.projections} are for (layers, kv heads, "
                       f"head dim) {p.shape}, the cache has {(l, k, h)}")
    ranks = self.ranks(l, k, h)
    r_max = int(ranks.max())
    widths = (layer_widths(ranks[0]), layer_widths(ranks[1]))
    lengths = to_host(cache.lengths)
    q_cap = max(-(-int(lengths.max()) // 64) * 64, 64)
    bases = tuple(jnp.asarray(x) for x in (p.u_k, p.mean_k, p.u_v, p.mean_v))
    return _project(cache, bases, jnp.asarray(ranks), r_max, widths, q_cap,
                    round_capacity(extra))


@dataclasses.dataclass(frozen=True)
class MatryoshkaPCA(MatryoshkaKV):
  """MatryoshkaKV with the PCA-initialised (untrained) projections."""

  projections: str = DEFAULT_PCA
  name = "matryoshka_pca"


@functools.partial(jax.jit, static_argnames=("r_max", "widths", "q_cap", "res_cap"))
def _project(cache: KVCache, bases, ranks, r_max: int, widths, q_cap: int,
             res_cap: int) -> KVCache:
  u_k, m_k, u_v, m_v = bases
  h = cache.head_dim
  take = lambda x: first_slots(x, q_cap)
  pos = take(cache.positions)
  valid = (pos >= 0)[..., None]

  def part(x, u, mean, rank, width):  # x [L, B, K, Q, H]; u [L, K, H, H]; rank [L, K]
    basis = u[..., :r_max] * mk.rank_mask(rank, h)[:, :, None, :r_max]  # [L, K, H, R]
    coef = jnp.einsum("LBKQH,LKHR->LBKQR", x.astype(jnp.float32) - mean[:, None, :, None], basis)
    coef = flatten(jnp.where(valid, coef, 0).astype(cache.keys.dtype), width)
    return coef, basis, mean, flat_offsets(width)[0]

  k_coef, k_basis, k_mean, k_off = part(take(cache.keys), u_k, m_k, ranks[0], widths[0])
  v_coef, v_basis, v_mean, v_off = part(take(cache.values), u_v, m_v, ranks[1], widths[1])
  dt = cache.keys.dtype
  store = ProjectedStore(k_coef=k_coef, k_basis=k_basis.astype(dt), k_mean=k_mean.astype(dt),
                         v_coef=v_coef, v_basis=v_basis.astype(dt), v_mean=v_mean.astype(dt),
                         positions=pos, lengths=cache.lengths, k_offsets=k_off,
                         v_offsets=v_off)
  return split_window(cache, cache.lengths, res_cap, store)
