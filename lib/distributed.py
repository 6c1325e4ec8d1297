"""Multi-host start-up for launchers: ``--coordinator_address``, ``--num_processes``,
``--process_id`` -> ``jax.distributed.initialize()``.

On CPU the cross-process collectives use gloo; on GPU/TPU jax picks its own. Nothing else in
kvlab assumes one host: meshes span ``jax.devices()`` (all processes' devices), host reads of
sharded arrays go through ``lib.sharding.to_host``.
"""

from __future__ import annotations

from absl import flags


def define_flags() -> None:
  """Defines ``--mesh`` and the three multi-host flags (call once, at a launcher's module
  level)."""
  flags.DEFINE_string("mesh", "", "Device mesh, e.g. data:4,model:2 (default: one device); "
                      "see lib/sharding.py.")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-host runs "
                      "(empty: one process).")
  flags.DEFINE_integer("num_processes", 1, "Processes in a multi-host run.")
  flags.DEFINE_integer("process_id", 0, "This process's index in a multi-host run.")


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> bool:
  """Joins a multi-process run (before any other jax call). Returns whether it did."""
  if not coordinator_address:
    if num_processes != 1:
      raise ValueError(f"--num_processes={num_processes} needs --coordinator_address=host:port "
                       "(the address of process 0)")
    return False
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def initialize_from_flags() -> bool:
  """``initialize`` with the launcher's flags."""
  f = flags.FLAGS
  return initialize(f.coordinator_address, f.num_processes, f.process_id)
