"""KVzip with span-protected scores (a prototype from docs/needle_failures.md).

KVzip (``lib.methods.kvzip``) keeps single tokens by their repeat scores. In real text at 4k and
25 % kept it often keeps some digits of the needle's value in the heads that retrieve it and
drops others, so the answer comes out truncated ("7" for "7105104"). Here each slot's score is
the largest repeat score within ``kernel // 2`` slots either side (a max-pool along the sequence,
per kv head), so a kept token brings its neighbours: short spans such as a number survive whole
or not at all. Same observations, budgets and forced slots as KVzip.

Not registered in ``lib.methods.__init__``: importing this module registers ``kvzip_spans``
(``--method_module=kvlab.lib.methods.kvzip_spans``).
"""

from __future__ import annotations

import dataclasses

from kvlab.lib.methods import register
from kvlab.lib.methods.base import check_at_least
from kvlab.lib.methods.kvzip import KVzip
from kvlab.lib.methods.window import max_pool


@register("kvzip_spans")
@dataclasses.dataclass(frozen=True)
class KVzipSpans(KVzip):
  """KVzip whose per-head scores are max-pooled over ``kernel`` neighbouring slots (odd)."""

  kernel: int = 7
  name = "kvzip_spans"

  def __post_init__(self):
    super().__post_init__()
    check_at_least(self, "kernel", 1, "slots pooled per score")
    if self.kernel % 2 == 0:
      raise ValueError(f"kvzip_spans: kernel must be odd (centred), got {self.kernel}: e.g. "
                       "--method=kvzip_spans:kernel=7")

  def head_scores(self, cache, obs):
    pooled = {**obs, "scores": max_pool(obs["scores"], self.kernel)}
    return super().head_scores(cache, pooled)
