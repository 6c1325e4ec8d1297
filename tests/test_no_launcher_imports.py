"""Tests and library code never import a launcher module (``experiments.*``).

Launchers define absl flags at import; two of them imported into one pytest worker define the
same flag twice (``DuplicateFlagError``), and which pair meets depends on how the files are
split across workers — the suite passes file by file and fails whole. Launchers are run as
subprocesses (``python -m experiments.x``); what a test needs from one lives in ``lib``.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _launcher_imports(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text(), filename=str(path))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [a.name for a in node.names if a.name.split(".")[0] == "experiments"]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split(".")[0] == "experiments":
        found.append(node.module)
  return found


@pytest.mark.parametrize("folder", ["tests", "lib", "models", "pallas_kernels"])
def test_no_module_imports_a_launcher(folder):
  bad = {str(p.relative_to(ROOT)): _launcher_imports(p)
         for p in sorted((ROOT / folder).rglob("*.py"))}
  bad = {k: v for k, v in bad.items() if v}
  assert not bad, (f"these import launcher modules (absl flags defined at import): {bad}; move "
                   "what they need into lib/ and import it from there")


def test_the_check_sees_an_import(tmp_path):
  p = tmp_path / "t.py"
  p.write_text("import os\nfrom experiments.evaluate import x\nimport experiments.report as r\n")
  assert _launcher_imports(p) == ["experiments.evaluate", "experiments.report"]
