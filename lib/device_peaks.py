"""Vendor peak memory bandwidth by device kind, to report a kernel's rate as a fraction of it."""

from __future__ import annotations

# Vendor peak HBM bandwidth (GB/s) by a substring of ``device_kind``, most specific first.
PEAK_GB_S = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("H200", 4800.0),
             ("A100-SXM4-80GB", 2039.0), ("A100-PCIE-80GB", 1935.0), ("A100", 1555.0),
             ("L4", 300.0), ("TPU v4", 1200.0), ("TPU v5 lite", 819.0), ("TPU v5e", 819.0),
             ("TPU v5p", 2765.0), ("TPU v5", 2765.0), ("TPU v6 lite", 1640.0),
             ("TPU v6e", 1640.0))


def peak_gb_s(device_kind: str, override: float = 0.0) -> float | None:
  """Peak memory bandwidth (GB/s) of a device kind: ``override`` if set, else the first
  ``PEAK_GB_S`` entry whose name occurs in it, else None (CPU, unknown devices)."""
  if override > 0:
    return override
  return next((v for name, v in PEAK_GB_S if name in device_kind), None)
