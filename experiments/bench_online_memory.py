r"""Peak cache bytes and peak process memory: compress-after-prefill vs compress-during-prefill.

  python -m experiments.bench_online_memory --length=8192 --ratio=0.25 \
      --out=results/bench_online_memory_cpu.json

A method composed with KIVI (``snapkv+kivi``) gets a third row, quantized after every chunk
(``--quantize_each_chunk``). Each configuration runs ``experiments.prefill_memory`` in a fresh
process (``ru_maxrss`` is a per-process high-water mark), so the figures are side by side from
one invocation.

With ``--limit_gib`` (CPU, Linux), it then prefills ``--limit_batch`` prompts of the same length
under an address-space limit (``prlimit --as``) in both modes: the full-cache mode should stop
with a clear error, compress-during-prefill should complete.
"""

import json
import subprocess
import sys

from absl import app, flags

from kvlab.lib.provenance import git_rev, write_result

from kvlab.lib import flag_checks  # noqa
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_integer("length", 8192, "Prompt tokens (the default model's full context is 8192).")
flags.DEFINE_float("ratio", 0.25, "Fraction kept.")
flags.DEFINE_list("method", ["snapkv", "h2o"], "Methods.")
flags.DEFINE_float("limit_gib", 4.0, "Address-space limit of the demo (0 = skip the demo).")
flags.DEFINE_integer("limit_batch", 4, "Prompts prefilled together in the demo.")
flags.DEFINE_string("out", "results/bench_online_memory_cpu.json", "JSON output.")

flag_checks.at_least("length", 1)
flags.register_validator("ratio", lambda v: 0 < v <= 1, "must be in (0, 1]")
flags.register_validator("limit_gib", lambda v: v >= 0, "must be >= 0 (0 = skip the demo)")
flag_checks.at_least("limit_batch", 1)


def _run(args, limit_bytes=None):
  cmd = [sys.executable, "-m", "experiments.prefill_memory"] + args
  if limit_bytes:
    cmd = ["prlimit", f"--as={limit_bytes}", "--"] + cmd
  out = subprocess.run(cmd, capture_output=True, text=True, check=limit_bytes is None)
  lines = out.stdout.strip().splitlines()
  row = json.loads(lines[-1]) if lines else {}
  if limit_bytes:
    row.update(returncode=out.returncode, stderr_tail=out.stderr.strip()[-600:],
               limit_as_bytes=limit_bytes)
  return row


def main(argv):
  del argv
  launch_config.apply()
  # The default model's context is 8192 including the first generated token.
  length = FLAGS.length - 1 if FLAGS.length >= 8192 else FLAGS.length
  rows = [_run([f"--length={length}"])]
  print(json.dumps(rows[-1]))
  for m in FLAGS.method:
    modes = [(False, False), (True, False)] + ([(True, True)] if "kivi" in m else [])
    for during, each_chunk in modes:
      rows.append(_run([f"--length={length}", f"--method={m}", f"--ratio={FLAGS.ratio}",
                        f"--compress_during_prefill={during}",
                        f"--quantize_each_chunk={each_chunk}"]))
      print(json.dumps(rows[-1]))
  demo = []
  if FLAGS.limit_gib > 0:
    lim = int(FLAGS.limit_gib * 2**30)
    for during in (False, True):
      demo.append(_run([f"--length={length}", f"--batch={FLAGS.limit_batch}",
                        f"--method={FLAGS.method[0]}", f"--ratio={FLAGS.ratio}",
                        f"--compress_during_prefill={during}"], limit_bytes=lim))
      print(json.dumps(demo[-1]))
  res = {"benchmark": "bench_online_memory", "rows": rows, "limit_demo": demo, "git": git_rev(),
         "command": f"python -m experiments.bench_online_memory --length={FLAGS.length} "
                    f"--ratio={FLAGS.ratio} --method={','.join(FLAGS.method)} "
                    f"--limit_gib={FLAGS.limit_gib} --limit_batch={FLAGS.limit_batch}"}
  write_result(FLAGS.out, res)


if __name__ == "__main__":
  app.run(main)
