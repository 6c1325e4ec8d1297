"""MatryoshkaKV distillation of a tiny random model, on one device or data-parallel on a mesh.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/matryoshka_dp_run.py OUT MESH

``MESH`` is ``data:8`` style or ``one``; writes the per-step losses to ``OUT`` (JSON). Used by
``tests/test_matryoshka.py`` (a fresh process: the host device count is fixed when jax starts).
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from kvlab import models
from kvlab.lib import sharding
from kvlab.lib.lowrank import matryoshka as mk
from kvlab.lib.lowrank import matryoshka_train as mt
from kvlab.lib.rope import RopeConfig
from kvlab.models.config import ModelConfig
from kvlab.models.decoder import init_params, make_apply_fn


def main(out: str, mesh_spec: str):
  cfg = ModelConfig(family="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    rope=RopeConfig(head_dim=16), max_position_embeddings=256)
  params = init_params(cfg, jax.random.PRNGKey(0))
  lm = models.LanguageModel(cfg, params, None, make_apply_fn(cfg, attn_block_size=16),
                            attn_block_size=16)
  rng = np.random.RandomState(0)
  pca = mk.pca(mk.kv_moments(lm, [rng.randint(0, 96, 32).tolist() for _ in range(2)]))
  pool = rng.randint(0, 96, 1000).astype(np.int32)
  mesh = None if mesh_spec == "one" else sharding.make_mesh(mesh_spec)
  if mesh is not None:
    lm.params = sharding.replicated(lm.params, mesh)
  train_cfg = mt.TrainConfig(steps=4, batch=8, seqlen=16, lr=1e-2, warmup=1, rank_step=4,
                             save_every=2)
  with tempfile.TemporaryDirectory() as d:
    _, run = mt.train(lm, pca, pool, train_cfg, d, mesh=mesh)
  with open(out, "w") as f:
    json.dump([r["loss"] for r in run], f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
