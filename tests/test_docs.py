"""The docs hold together (issue 33 items 3, 7): the README stays a short guide, every link and
cited results path exists, and results/ keeps only files something cites."""

import fnmatch
import itertools
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _cited(text: str) -> list[str]:
  """``results/...`` paths a doc names, braces expanded (``a_{x,y}.json``), ``<n>`` as ``*``."""
  out = []
  for raw in re.findall(r"(?<![\w/.-])(results/[\w./{},<>*-]+)", text):
    raw = re.sub(r"<[^>]*>", "*", raw.rstrip(".,"))
    parts = re.split(r"\{([^}]*)\}", raw)  # literal, choices, literal, ...
    choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
    for combo in itertools.product(*choices):
      out += [p for p in "".join(combo).split(",") if p.startswith("results/")]
  return out


def test_readme_is_a_short_guide():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150): move detail to docs/"
  long = [(i + 1, len(l)) for i, l in enumerate(lines) if len(l) > 200]
  assert not long, f"README.md lines over 200 characters (line, length): {long}"


def test_links_and_cited_results_exist():
  missing = []
  for doc in DOCS:
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)", text):  # markdown links
      if "://" in target:
        continue
      if not (doc.parent / target).resolve().exists():
        missing.append(f"{doc.name}: link {target}")
    for pattern in _cited(text):
      if any(c in pattern for c in "*?") or "results/my_" in pattern or "results/demo" in pattern:
        continue  # a pattern, or a user's own output in an example
      if not (ROOT / pattern).exists():
        missing.append(f"{doc.name}: {pattern}")
  assert not missing, "cited but missing (fix the doc or restore the file):\n" + "\n".join(missing)


def test_results_keeps_only_what_is_cited():
  """Superseded result files leave the tree (git keeps them): each top-level file or folder of
  results/ is named by a doc, a test, a launcher or the library."""
  texts = [p.read_text(errors="ignore") for pat in ("*.md", "docs/*.md", "experiments/*",
                                                     "tests/*.py", "lib/**/*.py", "kvlab/*.py",
                                                     "Makefile")
           for p in ROOT.glob(pat) if p.is_file()]
  blob = "\n".join(texts)
  patterns = [c.split("/")[1] for t in texts for c in _cited(t)]
  named = lambda name: re.search(re.escape(name) + r"(?![\w.-])", blob)  # not as a prefix
  uncited = [p.name for p in sorted((ROOT / "results").iterdir())
             if not named(p.name) and not p.name.startswith(".") and p.name != "demo"
             and not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
  assert not uncited, f"results/ entries nothing cites (delete them; git keeps them): {uncited}"
