"""Tests and library code never import a launcher module (``experiments.*``).

Launchers define absl flags at import; two of them imported into one pytest worker define the
same flag twice (``DuplicateFlagError``), and which pair meets depends on how the files are
split across workers — the suite passes file by file and fails whole. Launchers are run as
subprocesses (``python -m experiments.x``); what a test needs from one lives in ``lib``.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _is_launcher(module: str) -> bool:
  parts = module.split(".")
  return parts[0] == "experiments" or parts[:2] == ["kvlab", "experiments"]


def _launcher_imports(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text(), filename=str(path))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [a.name for a in node.names if _is_launcher(a.name)]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if _is_launcher(node.module):
        found.append(node.module)
  return found


@pytest.mark.parametrize("folder", ["tests", "lib", "models", "pallas_kernels", "kvlab"])
def test_no_module_imports_a_launcher(folder):
  bad = {str(p.relative_to(ROOT)): _launcher_imports(p)
         for p in sorted((ROOT / folder).rglob("*.py"))}
  bad = {k: v for k, v in bad.items() if v}
  assert not bad, (f"these import launcher modules (absl flags defined at import): {bad}; move "
                   "what they need into lib/ and import it from there")


def test_the_check_sees_an_import(tmp_path):
  p = tmp_path / "t.py"
  p.write_text("import os\nfrom experiments.evaluate import x\nimport experiments.report as r\n"
               "from kvlab.experiments import generate\n")
  assert _launcher_imports(p) == ["experiments.evaluate", "experiments.report",
                                  "kvlab.experiments"]


_GENERIC = ("lib", "models", "pallas_kernels")


def _generic_imports(path: pathlib.Path) -> list[str]:
  """Imports of kvlab's folders by their bare names (``from lib import x``): the installed
  package is ``kvlab`` only, so these would find a user's own ``lib``/``models``, or load a
  second copy of a module (two registries)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [a.name for a in node.names if a.name.split(".")[0] in _GENERIC]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split(".")[0] in _GENERIC:
        found.append(node.module)
  return found


def test_code_imports_kvlab_by_its_one_installed_name():
  files = [p for folder in ("tests", "lib", "models", "pallas_kernels", "experiments", "kvlab")
           for p in sorted((ROOT / folder).rglob("*.py"))]
  bad = {str(p.relative_to(ROOT)): _generic_imports(p) for p in files}
  bad = {k: v for k, v in bad.items() if v}
  assert not bad, f"import these as kvlab.<folder>: {bad}"
  nb = (ROOT / "notebooks" / "quickstart.ipynb").read_text()
  assert not re.search(r'^\s*"(from|import) (lib|models|pallas_kernels)\b', nb, re.M)
