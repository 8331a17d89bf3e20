"""Plots: ns per element against N for the flat groups, heat maps of the matrix.

matplotlib is optional: without it the plots are skipped with a note.
"""

from __future__ import annotations

from pathlib import Path

import matrix
import numpy as np
import report

STYLES = {  # impl -> (color, line style)
  "floor": ("k", ":"),
  "exp+log1p": ("0.5", ":"),
  "bce_jax": ("C3", "-"),
  "optax": ("C0", "--"),
  "keras": ("C2", "--"),
  "torch": ("C1", "--"),
}


def _pyplot():
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is missing: no plot.")
    return None
  return plt


def _save(fig, path: Path) -> None:
  fig.savefig(path, dpi=72)
  try:  # a palette PNG is a third of the size, small enough to commit
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)
  except ImportError:
    pass


def flat_plot(rows: list[dict], path: Path, title: str) -> bool:
  """One panel per group and dtype: ns per element against N, log-log."""
  plt = _pyplot()
  if plt is None:
    return False
  dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: d != "float32")
  groups = list(dict.fromkeys(r["group"] for r in rows))
  fig, axes = plt.subplots(
    len(dtypes),
    len(groups),
    figsize=(3.2 * len(groups), 2.6 * len(dtypes)),
    squeeze=False,
    sharex=True,
  )
  for i, dtype in enumerate(dtypes):
    for j, group in enumerate(groups):
      ax = axes[i][j]
      for impl, (color, ls) in STYLES.items():
        pts = sorted(
          (r["n"], r["ns_per_element"])
          for r in rows
          if r["group"] == group and r["dtype"] == dtype and r["impl"] == impl and "seconds" in r
        )
        if pts:
          ax.plot(*zip(*pts), color=color, ls=ls, marker="o", ms=3, lw=1.2, label=impl)
      ax.set(xscale="log", yscale="log")
      ax.set_title(f"{group}, {dtype}", fontsize=9)
      ax.tick_params(labelsize=7)
      ax.grid(True, which="major", lw=0.3)
      if j == 0:
        ax.set_ylabel("ns / element", fontsize=8)
      if i == len(dtypes) - 1:
        ax.set_xlabel("N", fontsize=8)
  labels = {}
  for ax in axes.flat:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      labels.setdefault(label, handle)
  fig.legend(
    labels.values(), labels.keys(), loc="upper center", ncol=len(labels), fontsize=8, frameon=False
  )
  fig.suptitle(title, fontsize=8, y=0.005, va="bottom")
  fig.tight_layout(rect=(0, 0.03, 1, 0.94))
  _save(fig, path)
  plt.close(fig)
  return True


COLUMNS = [(p, "forward") for p in matrix.PATHS] + [
  (p, "value_and_grad") for p in matrix.PATHS if p != "metric"
]
PANELS = (  # figure, title, color scale (low, target, high)
  ("x_flat", "bce_jax / its flat [N] (per element); target <= 1.25", (0.5, 1.25, 2.5)),
  ("x_floor", "bce_jax / floor; targets: flat fwd <= 2.8, v&g <= 1.6", (1.0, 2.0, 6.0)),
)


def matrix_heatmap(cells: list[dict], path: Path, title: str, family: str = "bce") -> bool:
  """Rows: shapes; columns: path x mode; panels: ratio to flat and to floor, per dtype."""
  plt = _pyplot()
  if plt is None:
    return False
  from matplotlib.colors import TwoSlopeNorm

  rows = [r for r in report.matrix_rows(cells) if r["family"] == family]
  dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
  shapes = [s for s in matrix.SHAPES if any(r["shape"] == s for r in rows)]
  index = {(r["dtype"], r["shape"], r["path"], r["mode"]): r for r in rows}
  fig, axes = plt.subplots(
    len(dtypes),
    len(PANELS),
    figsize=(6.4 * len(PANELS), 0.45 * len(shapes) * len(dtypes) + 2),
    squeeze=False,
  )
  for i, dtype in enumerate(dtypes):
    for j, (key, what, (low, mid, high)) in enumerate(PANELS):
      ax = axes[i][j]
      grid = np.full((len(shapes), len(COLUMNS)), np.nan)
      for a, shape in enumerate(shapes):
        for b, (p, mode) in enumerate(COLUMNS):
          value = index.get((dtype, shape, p, mode), {}).get(key)
          grid[a, b] = np.nan if value is None else value
      norm = TwoSlopeNorm(vmin=low, vcenter=mid, vmax=max(high, np.nanmax(grid, initial=high)))
      cmap = plt.get_cmap("RdYlGn_r").copy()
      cmap.set_bad("0.85")
      ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
      for (a, b), value in np.ndenumerate(grid):
        if not np.isnan(value):
          ax.text(b, a, f"{value:.2f}", ha="center", va="center", fontsize=7)
      ax.set_xticks(range(len(COLUMNS)))
      ax.set_xticklabels(
        [f"{p}\n{'fwd' if m == 'forward' else 'v&g'}" for p, m in COLUMNS], fontsize=7
      )
      ax.set_yticks(range(len(shapes)))
      ax.set_yticklabels(shapes, fontsize=7)
      ax.set_title(f"{family}, {dtype}: {what}", fontsize=8)
  fig.suptitle(title, fontsize=7, y=0.005, va="bottom")
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _save(fig, path)
  plt.close(fig)
  return True
