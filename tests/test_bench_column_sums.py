"""experiments/bench_column_sums runs (interpret mode, tiny shape) and what it times computes the
references' column sums and row normalisers."""

import json
import os
import subprocess
import sys


def test_bench_column_sums_writes_rows_matching_the_references(tmp_path):
  out = tmp_path / "bcs.json"
  subprocess.run([sys.executable, "-m", "experiments.bench_column_sums", "--interpret",
                  "--chunk=32", "--slots=96", "--reps=1", "--blocks=16x16,32x16",
                  "--dtype=float32", "--row_partitions=auto,1,3", f"--out={out}"], check=True,
                 cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True)
  res = json.loads(out.read_text())
  paths = {(r["path"], r["blocks"]) for r in res["rows"]}
  for spec in ("16x16", "32x16"):
    for name in ("column_plain", "column_gumbel", "row_plain", "row_gumbel", "row_plain_p1",
                 "row_gumbel_p1", "row_gumbel_p3"):
      assert (name, spec) in paths
  checked = [r for r in res["rows"] if "max_rel_diff_vs_dense" in r]
  assert len(checked) == 10  # per block shape: 2 column passes, row_gumbel at 3 partitions
  assert {r["partitions"] for r in res["rows"] if "partitions" in r} == {1, 3}
  assert all(r["max_rel_diff_vs_dense"] < 1e-4 for r in checked), checked
  assert all(r["seconds"] > 0 for r in res["rows"])
  assert res["causal_pairs"] == 3 * 3 * (32 * 64 + 32 * 33 // 2)
