"""The decode benchmark runs end to end and knows the peak bandwidth of the devices it targets."""

import json
import os
import subprocess
import sys

from kvlab.lib.device_peaks import peak_gb_s


def test_peak_bandwidth_by_device_kind():
  assert peak_gb_s("NVIDIA H100 80GB HBM3") == 3350.0
  assert peak_gb_s("NVIDIA H100 PCIe") == 2000.0  # the more specific name wins
  assert peak_gb_s("NVIDIA H200") == 4800.0
  assert peak_gb_s("TPU v5 lite") == 819.0
  assert peak_gb_s("cpu") is None
  assert peak_gb_s("NVIDIA H100 80GB HBM3", override=3000.0) == 3000.0


def test_bench_decode_writes_rows(tmp_path):
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, "-m", "experiments.bench_decode", "--lengths=384", "--reps=1",
                  f"--out={out}"], check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                 capture_output=True)
  res = json.loads(out.read_text())
  paths = {r["path"] for r in res["rows"]}
  assert paths == {"full_bf16", "full_f32", "q4_xla", "q2_xla"}  # no kernel rows on CPU
  assert all(r["peak_fraction"] is None and r["seconds_per_step"] > 0 for r in res["rows"])
  assert res["peak_gb_s"] is None
