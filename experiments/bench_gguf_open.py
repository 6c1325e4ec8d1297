r"""Opening a GGUF (header, every metadata field, tensor index): kvlab's reader vs gguf's.

  python -m experiments.bench_gguf_open --model=gemma3-270m,smollm2-135m \
      --out=results/bench_gguf_open_cpu.json

Both readers alternate in one process (best of ``--reps``); each run reads every field's value,
as loading a model and its tokenizer does.
"""

import time

from absl import app, flags
import gguf

from kvlab.lib import launch_config
from kvlab.lib.provenance import write_result
from kvlab.models import gguf_loader, registry
from kvlab.models.gguf_reader import GGUFFile

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_list("model", ["gemma3-270m", "smollm2-135m"], "Named models or .gguf paths.")
flags.DEFINE_integer("reps", 2, "Repetitions (best is reported).", lower_bound=1)
flags.DEFINE_string("out", "results/bench_gguf_open_cpu.json", "JSON output.")


def _open_and_read(cls, path: str) -> float:
  """Seconds to open ``path`` with reader class ``cls`` and read every field's value."""
  t0 = time.perf_counter()
  reader = cls(path)
  for name in reader.fields:
    gguf_loader.field(reader, name)
  return time.perf_counter() - t0


def main(argv):
  del argv
  launch_config.apply()
  rows = []
  for model in FLAGS.model:
    path = registry.resolve(model)[1]
    times = {"kvlab": [], "gguf": []}
    for _ in range(FLAGS.reps):
      times["kvlab"].append(_open_and_read(GGUFFile, path))
      times["gguf"].append(_open_and_read(gguf.GGUFReader, path))
    row = {"model": model, "kvlab_s": min(times["kvlab"]), "gguf_s": min(times["gguf"])}
    row["speedup"] = row["gguf_s"] / row["kvlab_s"]
    print(row)
    rows.append(row)
  write_result(FLAGS.out, {"rows": rows, "reps": FLAGS.reps})


if __name__ == "__main__":
  app.run(main)
