r"""Peak cache bytes and peak process memory: compress-after-prefill vs compress-during-prefill.

  python -m experiments.bench_online_memory --length=8192 --ratio=0.25 \
      --out=results/bench_online_memory_cpu.json

Each configuration runs ``experiments.prefill_memory`` in a fresh process (``ru_maxrss`` is a
per-process high-water mark), so the figures are side by side from one invocation.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

from lib.provenance import git_rev

FLAGS = flags.FLAGS
flags.DEFINE_integer("length", 8192, "Prompt tokens (the default model's full context is 8192).")
flags.DEFINE_float("ratio", 0.25, "Fraction kept.")
flags.DEFINE_list("method", ["snapkv", "h2o"], "Methods.")
flags.DEFINE_string("out", "results/bench_online_memory_cpu.json", "JSON output.")


def _run(args):
  out = subprocess.run([sys.executable, "-m", "experiments.prefill_memory"] + args,
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  # The default model's context is 8192 including the first generated token.
  length = FLAGS.length - 1 if FLAGS.length >= 8192 else FLAGS.length
  rows = [_run([f"--length={length}"])]
  print(json.dumps(rows[-1]))
  for m in FLAGS.method:
    for during in (False, True):
      rows.append(_run([f"--length={length}", f"--method={m}", f"--ratio={FLAGS.ratio}",
                        f"--compress_during_prefill={during}"]))
      print(json.dumps(rows[-1]))
  res = {"benchmark": "bench_online_memory", "rows": rows, "git": git_rev(),
         "command": f"python -m experiments.bench_online_memory --length={FLAGS.length} "
                    f"--ratio={FLAGS.ratio}"}
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
