"""The decode kernels under ``jax.shard_map`` on a ``('data', 'model')`` mesh.

Both kernels run one program per (batch row, kv head) and never mix rows or heads, so each
device runs the kernel on its own block: rows split over ``data``, kv heads over ``model``. The
caller passes that placement as ``spec``, a ``PartitionSpec`` of the leading (row, kv head)
axes (``lib.sharding.kernel_spec`` replicates, with a logged reason, what does not divide; the
model shards then compute the same heads). The paged kernel's page pool is indexed by global
page numbers, so the pool is replicated and only the per-(row, head) tables are split. Outputs
``[B, K, G, H]`` come back laid out like the inputs.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P

from kvlab.pallas_kernels.quantized_decode_attention import quantized_decode_attention
from kvlab.pallas_kernels.sparse_decode_attention import paged_decode_attention


def sharded_quantized_decode_attention(mesh: Mesh, spec: P, q, k_codes, k_scale, k_zero,
                                       v_codes, v_scale, v_zero, n_quant, k_res, v_res, n_res, *,
                                       bits: int, group: int, block: int = 128,
                                       interpret: bool = False):
  """``quantized_decode_attention`` (same arguments and ``[B, K, G, H]`` result) with every
  device running the kernel on its rows and heads; ``spec`` places the (row, kv head) axes."""
  kernel = functools.partial(quantized_decode_attention, bits=bits, group=group, block=block,
                             interpret=interpret)
  args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_quant, k_res, v_res, n_res)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                       check_vma=False)(*args)


def sharded_paged_decode_attention(mesh: Mesh, spec: P, q, k_pages, v_pages, page_table,
                                   page_valid, *, interpret: bool = False):
  """``paged_decode_attention`` (same arguments and result) with the tables and queries split
  over rows and heads as ``spec`` says and the page pool replicated."""
  kernel = functools.partial(paged_decode_attention, interpret=interpret)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, P(), P(), spec, spec), out_specs=spec,
                       check_vma=False)(q, k_pages, v_pages, page_table, page_valid)
