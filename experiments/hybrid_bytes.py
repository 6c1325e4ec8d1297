r"""Bytes of a hybrid (local/global) model's cache per layer kind, full vs compressed.

  python -m experiments.hybrid_bytes --model=gemma3-270m --length=4096 \
      --method=snapkv --ratio=0.5 --out=results/hybrid_bytes_gemma3.json

Prefills ``--length`` tokens of the stdlib docs, compresses with ``--method`` (query-agnostic),
and reports ``KVCache.trimmed().nbytes_by_kind()`` (global / local / other bytes from the
leaves) for both caches, and the tokens each layer keeps. Also the bytes a cache would take if
each local layer held only its window (what a ring layout would allocate).
"""

from absl import app, flags
import numpy as np

import kvlab
from kvlab.lib import launch_config
from kvlab.lib.data.text import text_of_tokens
from kvlab.lib.provenance import write_result

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_string("model", "gemma3-270m", "A hybrid model (Gemma 3).")
flags.DEFINE_integer("length", 4096, "Prompt tokens.", lower_bound=8)
flags.DEFINE_string("method", "snapkv", "Compression method.")
flags.DEFINE_float("ratio", 0.5, "Fraction of the prompt kept on global layers.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_string("out", "results/hybrid_bytes_gemma3.json", "JSON output.")


def main(argv):
  del argv
  launch_config.apply()
  lm = kvlab.load(FLAGS.model)
  if lm.config.layer_windows is None:
    raise app.UsageError(f"--model={FLAGS.model} has no sliding-window layers; pick a hybrid "
                         "model such as gemma3-270m")
  ids = text_of_tokens(lm.tokenizer, FLAGS.length)
  method = kvlab.methods.make(FLAGS.method, ratio=FLAGS.ratio)
  cache, obs = lm.prefill([ids], observe=method)
  small = kvlab.compress(method, cache, obs, room=0)
  windows = np.asarray(lm.config.layer_windows)
  local = windows > 0
  per_slot = 2 * lm.config.num_kv_heads * lm.config.head_dim * cache.keys.dtype.itemsize
  ring_local = int(np.minimum(windows[local], FLAGS.length).sum()) * per_slot
  result = {
      "model": FLAGS.model, "tokens": len(ids), "method": FLAGS.method, "ratio": FLAGS.ratio,
      "layers": {"local": int(local.sum()), "global": int((~local).sum()),
                 "window": int(windows[local].max())},
      "full_bytes": cache.trimmed().nbytes_by_kind(),
      "compressed_bytes": small.trimmed().nbytes_by_kind(),
      "kept_per_layer": np.asarray(small.lengths)[:, 0, 0].tolist(),
      "local_keys_values_bytes_if_each_layer_held_its_window": ring_local,
  }
  print(result)
  write_result(FLAGS.out, result)


if __name__ == "__main__":
  app.run(main)
