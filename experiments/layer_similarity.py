r"""How alike adjacent layers' keys and values are (MiniCache's premise), per layer pair.

  python -m experiments.layer_similarity --model=smollm2-135m --length=1024 \
      --out=results/layer_similarity_smollm2.json

Prefills real text (the stdlib docs) and reports, for each pair of adjacent layers, the mean
cosine similarity of the same token's vectors in the same kv head (post-RoPE keys, values), the
quantity MiniCache's SLERP merge relies on being high in the deeper half.
"""

import json

from absl import app, flags
import jax.numpy as jnp
import numpy as np

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib.data.text import text_of_tokens
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_string("model", "smollm2-135m", "Named model, HF checkpoint dir or .gguf file.")
flags.DEFINE_integer("length", 1024, "Prompt tokens.")
flags.DEFINE_string("out", "results/layer_similarity_smollm2.json", "Output JSON.")


def adjacent_cosine(x: np.ndarray) -> np.ndarray:
  """``x [L, K, T, H]`` -> ``[L - 1]`` mean cosine of layer l and l + 1 (same head and token)."""
  u = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
  return (u[1:] * u[:-1]).sum(-1).mean((1, 2))


def main(argv):
  del argv
  launch_config.apply()
  lm = models.load(FLAGS.model, progress=True)
  ids = text_of_tokens(lm.tokenizer, FLAGS.length)
  tokens, lengths = gen.pad_batch([ids], 512)
  cache = lm.new_cache(1, tokens.shape[1])
  _, cache, _ = gen.prefill(lm.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                            apply_fn=lm.apply_fn, chunk_size=512)
  n = len(ids)
  out = {"model": FLAGS.model, "tokens": n}
  for name, x in (("keys", cache.keys), ("values", cache.values)):
    cos = adjacent_cosine(np.asarray(x, np.float32)[:, 0, :, :n])
    half = len(cos) // 2
    out[name] = {"per_pair": np.round(cos, 4).tolist(),
                 "mean_deeper_half": float(cos[half:].mean()),
                 "mean_abs_deeper_half": float(np.abs(cos[half:]).mean())}
    print(f"{name}: adjacent-layer cosine, deeper half mean {cos[half:].mean():+.3f} "
          f"(|cos| {np.abs(cos[half:]).mean():.3f})")
  with open(FLAGS.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
