"""KVQuant calibration of the default model (16 x 2048 tokens of stdlib docs; Fisher k-means
LUTs at 2 / 3 / 4 bits, Q-Norm at 2, 1 % outliers).

Reproduces results/calibration/kvquant_smollm2-135m (docs/results.md, "KVQuant calibration").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.calibrate_kvquant"


def get_config():
  """The committed calibration's output directory; every other flag at its default."""
  c = config_dict.ConfigDict()
  c.out = "results/calibration/kvquant_smollm2-135m"
  return c
