"""Methods by name: list them, make them, register your own.

  kvlab.methods.available()                 # {"snapkv": "SnapKV (Li et al. 2024): ...", ...}
  kvlab.methods.make("snapkv+kivi", ratio=0.5)

  @kvlab.methods.register("my_method")
  @dataclasses.dataclass(frozen=True)
  class MyMethod(kvlab.methods.Method):
    name = "my_method"
    def scores(self, cache, obs=None):  # [L, B, K, S], higher is kept
      ...
"""

from kvlab.lib.methods import (REGISTRY, Compose, Method, available, kept_fraction, make,
                               register)

__all__ = ["available", "make", "register", "kept_fraction", "Method", "Compose", "REGISTRY"]
