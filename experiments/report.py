r"""Turn evaluation rows into a markdown leaderboard and PNG plots.

  python -m experiments.report --inputs=results/eval_niah_1k.jsonl --out_dir=results/report

leaderboard.md holds a table per (task, length, protocol); a task measured on several haystacks
(evaluate --haystack=docs,code,...) also gets a table by haystack and one averaged over them.
"""

import json
import os

from absl import app, flags

from kvlab.lib.eval import aggregate, report
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_list("inputs", ["results/eval.jsonl"], "Per-sample JSONL files.")
flags.DEFINE_string("out_dir", "results/report", "Where leaderboard.md, cells.json, *.png go.")


def main(argv):
  del argv
  launch_config.apply()
  missing = [p for p in FLAGS.inputs if not os.path.exists(p)]
  if missing:
    raise app.UsageError(f"no such results file(s): {missing}; run experiments.evaluate first")
  rows, repeats = aggregate.unique_rows(aggregate.read_rows(FLAGS.inputs))
  if not rows:
    raise app.UsageError(f"no rows in {', '.join(FLAGS.inputs)}: nothing to report (an "
                         "evaluation with --num_samples=0, or one stopped before its first "
                         "sample, writes none); run experiments.evaluate with --num_samples>0")
  if repeats:
    print(f"{repeats} repeated rows (the same cell and sample in more than one place) counted "
          "once: the last one read")
  cells = aggregate.cells(rows)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  md = report.leaderboard(cells)
  with open(os.path.join(FLAGS.out_dir, "leaderboard.md"), "w") as f:
    f.write(md)
  with open(os.path.join(FLAGS.out_dir, "cells.json"), "w") as f:
    json.dump(cells, f, indent=1)
  for metric in ("score", "kl"):
    report.plot_score_vs_ratio(cells, os.path.join(FLAGS.out_dir, f"{metric}_vs_ratio.png"),
                               metric)
  heat = report.plot_needle_heatmap(rows, os.path.join(FLAGS.out_dir, "needle_heatmap.png"))
  print(md)
  print(f"wrote {FLAGS.out_dir}/leaderboard.md, cells.json, score_vs_ratio.png, kl_vs_ratio.png"
        + (", needle_heatmap.png" if heat else ""))


if __name__ == "__main__":
  app.run(main)
