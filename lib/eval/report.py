"""Leaderboard markdown and plots from per-cell statistics (``lib.eval.aggregate.cells``)."""

from __future__ import annotations

import collections
import os

import numpy as np

from kvlab.lib.data.haystacks import HAYSTACKS
from kvlab.lib.eval.aggregate import label
from kvlab.lib.eval.metrics import mean_of_means


def _fmt(stat, digits=2, pct=False):
  if stat["mean"] is None:
    return "–"
  k = 100.0 if pct else 1.0
  lo, hi = stat["ci95"]
  return f"{k * stat['mean']:.{digits}f} [{k * lo:.{digits}f}, {k * hi:.{digits}f}]"


def leaderboard(cells: list[dict]) -> str:
  """Markdown: one table per (task, length, protocol); the full cache first, then each kept ratio
  (largest first) with its methods best first. Tasks measured on several haystacks then get a
  table by haystack and one averaged over haystacks (``haystack_tables``)."""
  groups = collections.defaultdict(list)
  for c in cells:
    groups[(c["task"], c["length"], c["protocol"])].append(c)
  out = []
  for (task, length, protocol), cs in sorted(groups.items(), key=lambda kv: str(kv[0])):
    full = next((c for c in cs if c["method"] == "full"), None)
    out.append(f"### {task}, {length} tokens, {protocol}\n")
    is_ppl = task == "perplexity"
    head = "perplexity [95% CI]" if is_ppl else "score % [95% CI]"
    out.append(f"| method | kept | {head} | vs full | KL vs full (nats) | top-1 agree % "
               "| cache bytes / full | peak cache / full | n |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    key = "ppl" if is_ppl else "score"

    def rank(c):
      """Full cache first; then each kept ratio (largest first), best score first (lowest
      perplexity), KL vs full breaking ties, then the name."""
      m = c[key]["mean"]
      m = float("inf") if m is None else (m if is_ppl else -m)
      kl = c["kl"]["mean"] if c["kl"]["mean"] is not None else float("inf")
      return (c["method"] != "full", -c["ratio"], m, kl, c["method"])

    for c in sorted(cs, key=rank):
      rel = "–"
      if full and full[key]["mean"]:
        rel = f"{100 * c[key]['mean'] / full[key]['mean']:.0f} %"
      peak = "–" if c.get("peak_ratio") is None else f"{c['peak_ratio']:.3f}"
      main = _fmt(c["ppl"], 2) if is_ppl else _fmt(c["score"], 1, True)
      out.append(f"| {c['method']} | {c['ratio']:g} | {main} | {rel} | "
                 f"{_fmt(c['kl'], 3)} | {_fmt(c['top1'], 1, True)} | "
                 f"{c['bytes_ratio']:.3f} | {peak} | {c[key]['n']} |")
    out.append("")
  by_haystack = haystack_tables(cells)
  if by_haystack:
    out.append(by_haystack)
  return "\n".join(out)


def haystack_tables(cells: list[dict]) -> str:
  """Markdown: for each (task without haystack, length, protocol) measured on two or more
  haystacks, a table of scores by haystack and one of the average over haystacks (the mean of
  the per-haystack means, 95 % CI by combining their standard errors,
  ``lib.eval.metrics.mean_of_means``), with the lowest haystack beside it; "" when no task
  spans two haystacks."""
  groups = collections.defaultdict(list)
  for c in cells:
    if c.get("haystack") is not None and c.get("base"):
      groups[(c["base"], c["length"], c["protocol"])].append(c)
  order = {h: i for i, h in enumerate(HAYSTACKS)}
  out = []
  for (base, length, protocol), cs in sorted(groups.items(), key=lambda kv: str(kv[0])):
    hs = sorted({c["haystack"] for c in cs}, key=lambda h: (order.get(h, len(order)), h))
    if len(hs) < 2:
      continue
    by = collections.defaultdict(dict)  # (method, ratio) -> haystack -> cell
    for c in cs:
      by[(c["method"], c["ratio"])][c["haystack"]] = c
    avg = {k: mean_of_means([v[h]["score"] if h in v else {"mean": None, "n": 0} for h in hs],
                            0.0, 1.0) for k, v in by.items()}
    full = next((avg[k] for k in avg if k[0] == "full"), None)

    def rank(k):
      m = avg[k]["mean"]
      return (k[0] != "full", -k[1], float("inf") if m is None else -m, k[0])

    keys = sorted(by, key=rank)
    out.append(f"### {base}, {length} tokens, {protocol}: score % by haystack\n")
    out.append("| method | kept | " + " | ".join(hs) + " | n per haystack |")
    out.append("|---|---|" + "---|" * len(hs) + "---|")
    for k in keys:
      v = by[k]
      ns = sorted({v[h]["score"]["n"] for h in hs if h in v})
      out.append(f"| {k[0]} | {k[1]:g} | "
                 + " | ".join(_fmt(v[h]["score"], 1, True) if h in v else "–" for h in hs)
                 + f" | {'/'.join(str(n) for n in ns)} |")
    out.append("")
    out.append(f"### {base}, {length} tokens, {protocol}: average over {len(hs)} haystacks "
               f"({', '.join(hs)})\n")
    out.append("| method | kept | mean of haystack means % [95% CI] | vs full | lowest haystack "
               "| n |")
    out.append("|---|---|---|---|---|---|")
    for k in keys:
      a, v = avg[k], by[k]
      rel = "–"
      if full and full["mean"] and a["mean"] is not None:
        rel = f"{100 * a['mean'] / full['mean']:.0f} %"
      low = min((h for h in hs if h in v and v[h]["score"]["mean"] is not None),
                key=lambda h: v[h]["score"]["mean"], default=None)
      worst = "–" if low is None else f"{low} {100 * v[low]['score']['mean']:.1f}"
      out.append(f"| {k[0]} | {k[1]:g} | {_fmt(a, 1, True)} | {rel} | {worst} | {a['n']} |")
    out.append("")
    out.append("The average weighs each haystack alike (the mean of the per-haystack means); "
               "its interval combines the per-haystack standard errors, each read off that "
               "haystack's interval (Wilson for 0/1 scores, else bootstrap): SE = sqrt(sum of "
               "SE_h^2) / H. A method missing on a haystack has no average (–).\n")
  return "\n".join(out)


def plot_score_vs_ratio(cells: list[dict], path: str, metric: str = "score"):
  """One panel per (task, length): ``metric`` vs fraction kept, a line per method, CI bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if not cells:
    raise ValueError(f"no cells to plot into {path}: the results had no rows; evaluate at "
                     "least one sample first")
  panels = sorted({(c["task"], c["length"], c["protocol"]) for c in cells}, key=str)
  names = sorted({c["method"] for c in cells} - {"full"})
  # One colour and marker per method, the same in every panel, and one legend beside the
  # panels: with more than ten methods the default cycle repeats colours, and a legend inside
  # a panel hides its lines.
  colours = plt.get_cmap("tab20")
  markers = "osD^v<>ph*"
  style = {n: dict(color=colours(i % 20), marker=markers[i % len(markers)])
           for i, n in enumerate(names)}
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
  for ax, key in zip(axes[0], panels):
    cs = [c for c in cells if (c["task"], c["length"], c["protocol"]) == key]
    metric_k = "ppl" if key[0] == "perplexity" and metric == "score" else metric
    full = next((c for c in cs if c["method"] == "full"), None)
    for name in sorted({c["method"] for c in cs} - {"full"}):
      pts = sorted(((c["ratio"], c[metric_k]) for c in cs if c["method"] == name),
                   key=lambda p: p[0])
      x = np.array([p[0] for p in pts])
      y = np.array([p[1]["mean"] for p in pts], float)
      lo = np.array([p[1]["ci95"][0] for p in pts], float)
      hi = np.array([p[1]["ci95"][1] for p in pts], float)
      # Clipped at 0: a Wilson bound equal to the mean (0 % or 100 %) can sit a rounding
      # error past it, and matplotlib refuses negative error bars.
      err = [np.maximum(y - lo, 0.0), np.maximum(hi - y, 0.0)]
      ax.errorbar(x, y, yerr=err, capsize=3, label=name, **style[name])
    if full is not None:
      ax.axhline(full[metric_k]["mean"], color="k", ls="--", lw=1, label="full cache")
    ax.set_xlabel("fraction of KV cache kept")
    ax.set_ylabel(metric_k)
    ax.set_title(f"{key[0]}, {key[1]} tok, {key[2]}")
    ax.grid(alpha=0.3)
  legend = {}
  for ax in axes[0]:
    for h, l in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(l, h)
  order = (["full cache"] if "full cache" in legend else []) + [n for n in names if n in legend]
  fig.legend([legend[l] for l in order], order, loc="center left", bbox_to_anchor=(1.0, 0.5),
             fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_needle_heatmap(rows: list[dict], path: str, bins: int = 5):
  """Needle score by depth (rows, binned) x context length (columns), one panel per
  (method, ratio); ``rows`` are per-sample rows of needle tasks."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = [r for r in rows if r["task"].startswith("niah") and r.get("depth") is not None]
  if not rows:
    return None
  lengths = sorted({r["length"] for r in rows})
  panels = sorted({(label(r), r["ratio"]) for r in rows},
                  key=lambda p: (p[0] != "full", p[0], -p[1]))
  cols = min(4, len(panels))
  nrows = -(-len(panels) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  for ax, (method, ratio) in zip(axes.ravel(), panels):
    grid = np.full((bins, len(lengths)), np.nan)
    for j, n in enumerate(lengths):
      sel = [r for r in rows if (label(r), r["ratio"], r["length"]) == (method, ratio, n)]
      for i in range(bins):
        s = [r["score"] for r in sel if min(int(r["depth"] * bins), bins - 1) == i]
        if s:
          grid[i, j] = np.mean(s)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(bins), [f"{(i + .5) / bins:.1f}" for i in range(bins)])
    ax.set_title(f"{method} {ratio:g}", fontsize=9)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("needle depth")
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="score")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
