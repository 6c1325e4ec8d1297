"""Will a cache fit? Headroom under the process's memory limit, checked before allocating.

A cache that does not fit should fail before the prefill starts, with the sizes and the fix,
rather than as an allocator abort halfway through a long prompt. The limit is the tightest of:

* accelerator: the device's ``bytes_limit - bytes_in_use`` (``memory_stats``; on GPU this
  follows ``XLA_PYTHON_CLIENT_MEM_FRACTION``);
* CPU: the address-space limit (``ulimit -v`` / ``prlimit --as``) minus the process's current
  virtual size, the cgroup's ``memory.max`` minus its current usage, and the machine's
  available physical memory (``MemAvailable`` of ``/proc/meminfo``: free RAM plus what the
  kernel can reclaim, not counting swap: a cache is read whole on every step, so one paged out
  to swap thrashes rather than runs). ``KVLAB_MEMORY_LIMIT_GIB`` (a cap of resident memory,
  for notebooks and demos) minus the current resident size stands in for the physical limit
  when set: set it above the RAM to use swap on purpose.

Only the cache is checked (activations of one chunk are bounded and small next to it);
``margin`` leaves room for them.
"""

from __future__ import annotations

import contextlib
import os
import resource

import jax


def _proc_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:  # not Linux: no /proc
    return None
  return None


def _read_int(path: str) -> int | None:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None


def available_bytes() -> int | None:
  """The machine's available physical memory (``MemAvailable``), or None off Linux."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def resident_bytes() -> int | None:
  """The process's current resident memory (``VmRSS``), or None off Linux."""
  kib = _proc_kib("VmRSS")
  return None if kib is None else kib * 1024


def peak_resident_bytes() -> int:
  """The process's peak resident memory since it started this program: ``VmHWM`` (reset by
  exec), else ``ru_maxrss``. ``ru_maxrss`` alone is kept across exec, so a launcher started by
  a large parent (a pytest worker) would report the parent's peak."""
  kib = _proc_kib("VmHWM")
  if kib is not None:
    return kib * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def headroom() -> tuple[int, str] | None:
  """``(bytes still allocatable, which limit)`` for the tightest known limit, or None."""
  found = []
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
      found.append((stats["bytes_limit"] - stats.get("bytes_in_use", 0),
                    f"{dev.platform} memory of {dev.device_kind}"))
    return min(found) if found else None
  soft, _ = resource.getrlimit(resource.RLIMIT_AS)
  vm = _proc_kib("VmSize")
  if soft != resource.RLIM_INFINITY and vm is not None:
    found.append((soft - vm * 1024, f"address-space limit (ulimit -v) of {soft / 2**30:.2f} GiB"))
  mx = _read_int("/sys/fs/cgroup/memory.max")
  cur = _read_int("/sys/fs/cgroup/memory.current")
  if mx is not None and cur is not None:
    found.append((mx - cur, f"cgroup memory.max of {mx / 2**30:.2f} GiB"))
  env = os.environ.get("KVLAB_MEMORY_LIMIT_GIB")
  rss = _proc_kib("VmRSS")
  if env and rss is not None:
    lim = int(float(env) * 2**30)
    found.append((lim - rss * 1024, f"KVLAB_MEMORY_LIMIT_GIB={env}"))
  elif not env and (avail := available_bytes()) is not None:
    found.append((avail, "machine's available physical memory (MemAvailable, without swap; "
                  "KVLAB_MEMORY_LIMIT_GIB overrides it)"))
  return min(found) if found else None


def check_fits(nbytes: int, what: str, fix: str, margin: float = 1.1) -> None:
  """Raises ``MemoryError`` naming ``what``, the sizes and ``fix`` if ``nbytes`` (x margin)
  exceeds the headroom; does nothing when no limit is known."""
  room = headroom()
  if room is None:
    return
  free, source = room
  if nbytes * margin > free:
    spare = f" ({nbytes * margin / 2**30:.2f} GiB with the margin)" if margin > 1 else ""
    raise MemoryError(
        f"{what} needs {nbytes / 2**30:.2f} GiB{spare} but only {max(free, 0) / 2**30:.2f} GiB "
        f"is left under the {source}; {fix}")


@contextlib.contextmanager
def explain_oom(what: str, fix: str):
  """Turns an XLA out-of-memory error raised inside the block (an executable's workspace can
  exceed the headroom even when the cache itself fit) into ``MemoryError`` naming the fix."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "Out of memory" not in msg:
      raise
    room = headroom()
    where = f" under the {room[1]}" if room else ""
    raise MemoryError(f"{what} ran out of memory{where} ({msg.splitlines()[0][:200]}); "
                      f"{fix}") from e


class PeakRSS:
  """Samples the resident size every ``interval`` seconds in a thread, so the peak of one phase
  (a prefill) can be told apart from earlier peaks (loading weights) that ``ru_maxrss`` keeps.

    with PeakRSS() as p:
      run()
    p.peak_bytes
  """

  def __init__(self, interval: float = 0.005):
    self.interval = interval
    self.peak_bytes = 0
    self._stop = None
    self._thread = None

  def _poll(self):
    while not self._stop.is_set():
      self.peak_bytes = max(self.peak_bytes, resident_bytes() or 0)
      self._stop.wait(self.interval)

  def __enter__(self):
    import threading  # pylint: disable=g-import-not-at-top
    self.peak_bytes = resident_bytes() or 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak_bytes = max(self.peak_bytes, resident_bytes() or 0)
    return False
