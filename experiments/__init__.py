"""absl-flag launchers (``python -m experiments.<name>``); nothing reusable lives here."""

import logging

# absl runs Python logging at INFO: keep JAX's "no TPU/GPU backend found" probing out of the
# launchers' output (real warnings still show).
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
