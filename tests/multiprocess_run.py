"""One process of a multi-process CPU run (or the single-process reference).

  python tests/multiprocess_run.py OUT.npz NUM_PROCESSES PROCESS_ID PORT

Each process has 2 host devices; the global mesh is data:2,model:2 (4 devices) whatever the
process count. Prefill + SnapKV + 16 greedy decode steps of a tiny random model; process 0
writes the tokens and logits (gathered from every process) and an orbax checkpoint of the
params written by all processes together and read back.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvlab.lib import distributed  # pylint: disable=g-import-not-at-top


def main(out, num_processes, process_id, port):
  if num_processes > 1:
    distributed.initialize(f"localhost:{port}", num_processes, process_id)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils
  from kvlab.lib import generate as gen
  from kvlab.lib import methods, sharding
  from kvlab.lib.cache import KVCache
  from kvlab.lib.rope import RopeConfig
  from kvlab.models.config import ModelConfig
  from kvlab.models.decoder import init_params, make_apply_fn

  assert jax.device_count() == 4, jax.devices()
  cfg = ModelConfig(family="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=8, num_kv_heads=4, head_dim=32,
                    rope=RopeConfig(head_dim=32), max_position_embeddings=512)
  params = jax.tree.map(lambda x: x * 3.0, init_params(cfg, jax.random.PRNGKey(0)))
  mesh = sharding.make_mesh("data:2,model:2")
  params = sharding.shard_params(params, cfg, mesh)
  apply_fn = make_apply_fn(cfg, attn_block_size=16)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(1, 96, n).tolist() for n in (70, 45, 64, 33)]
  tokens, lengths = gen.pad_batch(prompts, 16)
  cache = KVCache.init(num_layers=2, batch=4, kv_heads=4, capacity=tokens.shape[1], head_dim=32)
  cache = sharding.shard_cache(cache, mesh)
  tokens, lengths = sharding.replicated((jnp.asarray(tokens), jnp.asarray(lengths)), mesh)
  m = methods.make("snapkv", ratio=0.5)
  first, cache, obs = gen.prefill(params, tokens, lengths, cache, apply_fn=apply_fn,
                                  chunk_size=16, observe=m.observe)
  small = sharding.shard_cache(methods.compress(m, cache, obs, extra=24), mesh)
  toks, _, final = gen.decode_loop(params, small, first, jax.random.PRNGKey(0),
                                   apply_fn=apply_fn, max_new_tokens=16)
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  # orbax: every process writes its shards, then all read them back
  ckpt_dir = os.path.abspath(out + ".ckpt")
  with ocp.StandardCheckpointer() as ck:
    ck.save(ckpt_dir, {"keys": final.keys}, force=True)
  with ocp.StandardCheckpointer() as ck:
    back = ck.restore(ckpt_dir, {"keys": final.keys})
  same = bool(jnp.array_equal(back["keys"], final.keys))
  result = {"first": gather(first), "tokens": gather(toks), "keys": gather(final.keys),
            "lengths": gather(final.lengths), "restored_equal": np.asarray(same),
            "processes": np.asarray(jax.process_count())}
  if jax.process_index() == 0:
    np.savez(out, **result)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
