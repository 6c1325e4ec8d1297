"""Progress bars that never warn: ``tqdm`` is the notebook widget where a Jupyter kernel has
ipywidgets, else the plain text bar (``tqdm.auto`` alone warns "IProgress not found" on stderr
in a kernel without ipywidgets, e.g. a local Jupyter or nbclient run)."""

import importlib.util
import sys


def _widgets_usable() -> bool:
  """True inside an IPython kernel (Jupyter, Colab) that can draw ipywidgets."""
  shell = sys.modules.get("IPython")
  if shell is None or importlib.util.find_spec("ipywidgets") is None:
    return False
  ip = shell.get_ipython() if hasattr(shell, "get_ipython") else None
  return ip is not None and type(ip).__name__ != "TerminalInteractiveShell"


if _widgets_usable():
  from tqdm.notebook import tqdm  # pylint: disable=g-import-not-at-top,unused-import
else:
  from tqdm.std import tqdm  # pylint: disable=g-import-not-at-top,unused-import

__all__ = ["tqdm"]
