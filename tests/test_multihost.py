"""Two local CPU processes (gloo collectives) give what one process gives, and write one orbax
checkpoint together."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from kvlab.lib import distributed
from xla_env import with_host_devices


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(out, n_proc, devices_per_proc):
  env = with_host_devices(devices_per_proc, JAX_PLATFORMS="cpu")
  script = os.path.join(os.path.dirname(__file__), "multiprocess_run.py")
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, script, str(out), str(n_proc), str(i), port],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(n_proc)]
  logs = [p.communicate(timeout=900)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return dict(np.load(out))


def test_two_processes_match_one(tmp_path):
  one = _run(tmp_path / "one.npz", 1, 4)
  two = _run(tmp_path / "two.npz", 2, 2)
  assert int(one["processes"]) == 1 and int(two["processes"]) == 2
  for key in ("first", "tokens", "keys", "lengths"):
    np.testing.assert_array_equal(two[key], one[key], err_msg=key)
  assert bool(two["restored_equal"]) and bool(one["restored_equal"])
  assert (tmp_path / "two.npz.ckpt" / "ocdbt.process_1").exists()  # both processes wrote


def test_flag_errors():
  with pytest.raises(ValueError, match="needs --coordinator_address"):
    distributed.initialize("", 2, 0)
  with pytest.raises(ValueError, match="must be in \\[0, 2\\)"):
    distributed.initialize("localhost:1", 2, 5)
  assert distributed.initialize("", 1, 0) is False
