"""kvzip_heads' head table for the default model: 4 samples x 2048 tokens of stdlib docs.

Reproduces results/kvzip_heads/smollm2-135m.json (docs/results.md, "kvzip_heads' cost").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.calibrate_kvzip_heads"


def get_config():
  """The committed table's calibration."""
  c = config_dict.ConfigDict()
  c.length = 2048
  c.samples = 4
  c.out = "results/kvzip_heads/smollm2-135m.json"
  return c
