"""The quickstart notebook runs top to bottom on CPU (nbclient)."""

import os

import pytest

from xla_env import optimized

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes():
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
  # The kernel runs the default model over 1k tokens: at XLA's default optimisation, not the
  # suite's compile-bound level 0 (tests/xla_env.py).
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute(env=optimized())
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "snapkv" in outputs and "knorm" in outputs and "full" in outputs
  assert any(o.get("output_type") == "display_data" for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []))
