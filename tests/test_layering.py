"""The packages import one way: ``experiments -> kvlab (the facade) -> models -> lib ->
pallas_kernels`` (DESIGN.md, Layout), and the modules of ``lib`` import one another without a
cycle.

Every import counts, at module level or inside a function: a function-level import that points
up still ties the lower package to the upper one (it fails, or loads a model family, the first
time that function runs). Imports are read with ``ast``, resolved to ``kvlab.<...>`` (absolute
and relative forms, and the bare ``lib.x`` spelling), and the test lists ``file:line`` for each
one that goes the wrong way.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent

# folder -> rank: a file may import its own folder and any of lower rank. ``kvlab/`` is the
# facade (``import kvlab``), above the packages it re-exports.
RANK = {"pallas_kernels": 0, "lib": 1, "models": 2, "kvlab": 3, "experiments": 4}
_SUBPACKAGES = ("pallas_kernels", "lib", "models", "experiments")


def _module_of(root: pathlib.Path, path: pathlib.Path) -> tuple[str, bool]:
  """``lib/quant/store.py`` -> ``("kvlab.lib.quant.store", False)``; a package's
  ``__init__.py`` -> its own name and True (``kvlab/__init__.py`` is ``kvlab``)."""
  parts = list(path.relative_to(root).with_suffix("").parts)
  is_pkg = parts[-1] == "__init__"
  if is_pkg:
    parts = parts[:-1]
  if parts[0] != "kvlab":
    parts = ["kvlab"] + parts
  return ".".join(parts), is_pkg


def _absolute(name: str) -> str:
  """The bare spelling of a folder (``lib.x``) as the installed name (``kvlab.lib.x``)."""
  return f"kvlab.{name}" if name.split(".")[0] in _SUBPACKAGES else name


def imports(root: pathlib.Path, path: pathlib.Path) -> list[tuple[int, str]]:
  """``(line, module)`` for every import in ``path`` (functions included). ``from m import n``
  gives ``m.n`` (the submodule when ``n`` is one; otherwise ``m.n`` still resolves to ``m``'s
  layer); relative imports are resolved against the file's package."""
  module, is_pkg = _module_of(root, path)
  package = module.split(".") if is_pkg else module.split(".")[:-1]
  found = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, _absolute(a.name)) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
        base_name = ".".join(base + ([node.module] if node.module else []))
      else:
        base_name = _absolute(node.module)
      found += [(node.lineno, f"{base_name}.{a.name}") for a in node.names if a.name != "*"]
      if any(a.name == "*" for a in node.names):
        found.append((node.lineno, base_name))
  return found


def layer_of(module: str) -> str | None:
  """The folder a ``kvlab`` module lives in (``kvlab`` for the facade), None outside kvlab."""
  parts = module.split(".")
  if parts[0] != "kvlab":
    return None
  return parts[1] if len(parts) > 1 and parts[1] in _SUBPACKAGES else "kvlab"


def _files(root: pathlib.Path, folders) -> list[pathlib.Path]:
  return [p for f in folders for p in sorted((root / f).rglob("*.py"))]


def upward_imports(root: pathlib.Path,
                   folders=("pallas_kernels", "lib", "models", "kvlab")) -> list[str]:
  """``file:line`` and the target of every import that points to a higher layer."""
  bad = []
  for path in _files(root, folders):
    here = path.relative_to(root).parts[0]
    for line, target in imports(root, path):
      there = layer_of(target)
      if there is not None and RANK[there] > RANK[here]:
        allowed = [f for f, r in RANK.items() if r < RANK[here]]
        bad.append(f"{path.relative_to(root)}:{line}: {here}/ imports {target} ({there}/); "
                   f"{here}/ may import only {', '.join(allowed) or 'jax'}")
  return bad


def _edges(root: pathlib.Path, folder: str) -> dict[str, dict[str, list[str]]]:
  """``{module: {imported module: [file:line, ...]}}`` between the modules of ``folder``; an
  imported name resolves to the longest module prefix that exists (``from kvlab.lib.quant
  import packing`` -> ``kvlab.lib.quant.packing``, ``from kvlab.lib.methods import make`` ->
  ``kvlab.lib.methods``)."""
  files = _files(root, [folder])
  known = {_module_of(root, p)[0] for p in files}
  edges: dict[str, dict[str, list[str]]] = {}
  for path in files:
    src = _module_of(root, path)[0]
    out = edges.setdefault(src, {})
    for line, target in imports(root, path):
      parts = target.split(".")
      while parts and ".".join(parts) not in known:
        parts.pop()
      dst = ".".join(parts)
      where = f"{path.relative_to(root)}:{line}"
      if dst and dst != src and where not in out.get(dst, []):
        out.setdefault(dst, []).append(where)
  return edges


def import_cycles(root: pathlib.Path, folder: str = "lib") -> list[str]:
  """One line per group of ``folder``'s modules that import one another in a circle (the
  strongly connected components of the import graph), with the imports that close it."""
  edges = _edges(root, folder)
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  groups: list[list[str]] = []

  def visit(v):  # Tarjan's algorithm
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, {}):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        groups.append(sorted(group))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  out = []
  for group in groups:
    where = [f"{a} -> {b} ({', '.join(edges[a][b])})" for a in group for b in edges[a]
             if b in group]
    out.append(f"cycle {' <-> '.join(group)}: " + "; ".join(where))
  return out


def test_no_package_imports_a_higher_one():
  bad = upward_imports(ROOT)
  assert not bad, ("imports against the layering (experiments -> kvlab -> models -> lib -> "
                   "pallas_kernels): pass what the lower code needs as arguments (an apply_fn, "
                   "config values), or move the piece to the layer it belongs to:\n"
                   + "\n".join(bad))


def test_lib_modules_import_each_other_without_a_cycle():
  cycles = import_cycles(ROOT, "lib")
  assert not cycles, ("modules of lib/ import each other in a circle: move what they share "
                      "into a module both import:\n" + "\n".join(cycles))


def _tree(tmp_path, files: dict[str, str]) -> pathlib.Path:
  for name, text in files.items():
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
  return tmp_path


def test_the_checker_flags_a_planted_upward_import(tmp_path):
  root = _tree(tmp_path, {
      "pallas_kernels/__init__.py": "",
      "pallas_kernels/k.py": "import jax\nfrom kvlab.lib import sharding\n",
      "lib/__init__.py": "",
      "lib/ok.py": "from kvlab.pallas_kernels import k\nfrom . import sub\n",
      "lib/sub/__init__.py": "",
      "lib/sub/deep.py": ("import numpy as np\n\n\ndef f():\n"
                          "  from kvlab.models.decoder import Decoder\n  return Decoder\n"),
      "lib/rel.py": "from ..models import weights\n",
      "lib/facade.py": "def g():\n  import kvlab\n  from kvlab import models\n",
      "lib/bare.py": "from models.config import ModelConfig\n",
      "models/__init__.py": "from kvlab.lib import ok\n",
      "models/m.py": "import kvlab.experiments.evaluate as ev\n",
      "kvlab/__init__.py": "from kvlab import models\nfrom kvlab.lib import ok\n",
  })
  bad = upward_imports(root)
  where = sorted(b.split(": ")[0] for b in bad)
  assert where == ["lib/bare.py:1", "lib/facade.py:2", "lib/facade.py:3", "lib/rel.py:1",
                   "lib/sub/deep.py:5", "models/m.py:1", "pallas_kernels/k.py:2"], bad
  assert "lib/ may import only pallas_kernels" in next(b for b in bad if "deep" in b)
  assert "pallas_kernels/ may import only jax" in next(b for b in bad if "k.py" in b)


def test_the_checker_flags_a_planted_cycle(tmp_path):
  root = _tree(tmp_path, {
      "lib/__init__.py": "",
      "lib/a.py": "from kvlab.lib import b\n",
      "lib/b.py": "def f():\n  from kvlab.lib.c import x\n  return x\n",
      "lib/c.py": "import kvlab.lib.a\n",
      "lib/d.py": "from kvlab.lib import a, b\n",  # imports into the circle: not part of it
  })
  cycles = import_cycles(root)
  assert len(cycles) == 1, cycles
  assert "kvlab.lib.a <-> kvlab.lib.b <-> kvlab.lib.c" in cycles[0]
  assert "lib/b.py:2" in cycles[0] and "kvlab.lib.d" not in cycles[0]
  (root / "lib/c.py").write_text("import numpy\n")
  assert import_cycles(root) == []
