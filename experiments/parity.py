r"""kvlab vs transformers on one real checkpoint: ``python -m experiments.parity``.

Writes the max-abs logit difference on a real-text prompt (stdlib docs) and whether greedy
generation is token-identical, both in fp32, to JSON.
"""

import json
import os

from absl import app, flags
import jax.numpy as jnp
import numpy as np

from kvlab import models
from kvlab.lib.data.text import text_of_tokens
from kvlab.lib.provenance import git_rev
from kvlab.lib.reference import load_hf_reference
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_string("model", "smollm2-135m", "Model (transformers must load it too).")
flags.DEFINE_integer("prompt_tokens", 256, "Real-text prompt length.")
flags.DEFINE_integer("new_tokens", 32, "Greedy tokens compared.")
flags.DEFINE_string("out", "results/parity_smollm2.json", "JSON output.")


def main(argv):
  del argv
  launch_config.apply()
  import torch  # pylint: disable=g-import-not-at-top
  m = models.load(FLAGS.model, progress=False)
  hf = load_hf_reference(m.source)
  ids = text_of_tokens(m.tokenizer, FLAGS.prompt_tokens, offset_chars=20000)
  with torch.no_grad():
    want = hf(torch.tensor([ids])).logits[0].numpy()
    hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=FLAGS.new_tokens, do_sample=False,
                         min_new_tokens=FLAGS.new_tokens)[0, len(ids):].tolist()
  got, _, _ = m.apply_fn(m.params, jnp.asarray([ids]), m.new_cache(1, len(ids)),
                         jnp.asarray([len(ids)]))
  ours = m.generate_ids([ids], max_new_tokens=FLAGS.new_tokens, stop=False)["tokens"][0]
  agree = next((i for i, (a, b) in enumerate(zip(ours, hf_out)) if a != b), len(ours))
  res = {"model": m.source, "prompt_tokens": len(ids),
         "max_abs_logit_diff": float(np.abs(np.asarray(got[0]) - want).max()),
         "max_abs_logit": float(np.abs(want).max()),
         "greedy_identical_tokens": agree, "greedy_compared": FLAGS.new_tokens,
         "git": git_rev(), "command": "python -m experiments.parity"}
  print(json.dumps(res))
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  app.run(main)
