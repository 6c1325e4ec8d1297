r"""A model's architecture and tokenizer with seeded random weights, as an HF checkpoint directory.

For timing on a machine that the model's file cannot reach (a lent accelerator takes at most
64 MiB of files, the default model's GGUF is 98 MB): the architecture fixes every FLOP and byte a
prefill, a compression or a decode step moves, so seconds measured on the twin are the model's;
what the weights say (needle scores, greedy text) is not, and is never reported from a twin.

  # where the model's file is (writes config.json, tokenizer.json, tokenizer_config.json):
  python -m experiments.random_twin --model=smollm2-135m --out=/tmp/smollm2-twin --stage=config
  # anywhere (torch + transformers; writes model.safetensors beside that config):
  python -m experiments.random_twin --out=/tmp/smollm2-twin --stage=weights

``--stage=all`` (the default) does both. Both kvlab (``models.load(dir)``) and transformers
(``from_pretrained(dir)``) load the result.
"""

from __future__ import annotations

from absl import app, flags

from kvlab.models.random_twin import write_config, write_weights
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_string("model", "smollm2-135m", "Model whose architecture and tokenizer to copy "
                    "(named or .gguf; stage config).")
flags.DEFINE_string("out", None, "Checkpoint directory to write.", required=True)
flags.DEFINE_enum("stage", "all", ["config", "weights", "all"], "What to write.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights.")


def main(argv):
  del argv
  launch_config.apply()
  if FLAGS.stage in ("config", "all"):
    write_config(FLAGS.model, FLAGS.out)
  if FLAGS.stage in ("weights", "all"):
    write_weights(FLAGS.out, FLAGS.seed)


if __name__ == "__main__":
  app.run(main)
