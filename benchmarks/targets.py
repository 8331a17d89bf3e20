"""The targets, evaluated on measured figures: PASS or MISS, never adjusted.

Flat groups (N = 1e7, float32) keep their published targets. The matrix and
eager targets are those of the issue "Fast on every shape, dtype and call";
each is evaluated per family and dtype, and reports the worst cell.
"""

from __future__ import annotations

import peers
import report

OURS = "bce_jax"

FLAT_TARGETS = (
  # (description, group, kind, impl, bound)
  ("forward logits <= 3.2x read floor", "logits", "floor", OURS, 3.2),
  ("forward logits >= 3.5x faster than optax", "logits", "speedup", "optax", 3.5),
  ("forward logits >= 3.5x faster than Keras", "logits", "speedup", "keras", 3.5),
  ("value_and_grad <= 2.3x floor", "grad", "floor", OURS, 2.3),
  ("value_and_grad >= 2.5x faster than optax", "grad", "speedup", "optax", 2.5),
  ("value_and_grad >= 2.5x faster than Keras", "grad", "speedup", "keras", 2.5),
  ("probabilities >= 1.5x faster than Keras", "probs", "speedup", "keras", 1.5),
  ("metric scan >= 3x faster than Keras loop", "metric", "speedup", "keras", 3.0),
)
_FWD, _VG = {"mode": "forward"}, {"mode": "value_and_grad"}
_FLAT_MEAN = {"shape": report.FLAT, "path": "mean"}
MATRIX_TARGETS = (
  # (description, figure of report.matrix_rows, cells it applies to, bound, is upper bound)
  ("forward: every cell <= 1.25x flat [N]", "x_flat", _FWD, 1.25, True),
  ("flat forward <= 2.8x read floor", "x_floor", {**_FWD, **_FLAT_MEAN}, 2.8, True),
  ("value_and_grad: every cell <= 1.25x flat [N]", "x_flat", _VG, 1.25, True),
  ("flat value_and_grad <= 1.6x its floor", "x_floor", {**_VG, **_FLAT_MEAN}, 1.6, True),
  ("bfloat16 never slower than float32", "bf16_over_f32", {}, 1.0, True),
  ("metric update <= 1.2x loss forward, same shape", "metric_over_loss", {}, 1.2, True),
  (">= 3x faster than optax, every forward cell", "vs_optax", _FWD, 3.0, False),
  (">= 3x faster than Keras, every forward cell", "vs_keras", _FWD, 3.0, False),
  (">= 2.5x faster than optax, every value_and_grad cell", "vs_optax", _VG, 2.5, False),
  (">= 2.5x faster than Keras, every value_and_grad cell", "vs_keras", _VG, 2.5, False),
)
ACCURACY_TARGETS = (
  ("loss_max_rel_err", "loss within 2e-7 relative of float64, logits in [-100, 100]", 2e-7),
  ("grad_max_rel_err", "gradient within 2e-7 relative of float64, same logits", 2e-7),
  ("probs_max_diff_vs_keras", "probabilities within 2e-7 of Keras (relative above 1)", 2e-7),
)


def _result(target: str, values: list[tuple[float, str]], bound: float, upper: bool) -> dict:
  """The worst of `values` ((figure, where) pairs) against `bound`."""
  if not values:
    return {"target": target, "measured": None, "where": "", "misses": 0, "of": 0, "met": None}
  worst = max(values) if upper else min(values)
  misses = sum(v > bound if upper else v < bound for v, _ in values)
  return {
    "target": target,
    "measured": worst[0],
    "where": worst[1],
    "misses": misses,
    "of": len(values),
    "met": misses == 0,
  }


def flat_targets(rows: list[dict], acc: dict, n: int = 10**7) -> list[dict]:
  """The flat groups' targets, at N = `n` in float32."""
  out = []
  for desc, group, kind, impl, bound in FLAT_TARGETS:
    match = [
      r
      for r in rows
      if r["group"] == group
      and r["impl"] == impl
      and r["dtype"] == "float32"
      and abs(r["n"] - n) <= n // 100
      and "seconds" in r
    ]
    values = [(r["ratio_to_floor"] if kind == "floor" else r["bce_jax_speedup"], "") for r in match]
    out.append(_result(desc, values, bound, upper=kind == "floor"))
  for key, desc, bound in ACCURACY_TARGETS:
    if key in acc:
      out.append(_result(desc, [(acc[key], "")], bound, upper=True))
  return out


def matrix_targets(cells: list[dict]) -> list[dict]:
  """The matrix targets, per family and dtype, from the cells' records."""
  rows = report.matrix_rows(cells)
  out = []
  for family in dict.fromkeys(r["family"] for r in rows):
    prefix = "" if family == "bce" else f"{family}: "
    for dtype in dict.fromkeys(r["dtype"] for r in rows if r["family"] == family):
      mine = [r for r in rows if r["family"] == family and r["dtype"] == dtype]
      for desc, key, match, bound, upper in MATRIX_TARGETS:
        if key == "bf16_over_f32" and dtype != "bfloat16":
          continue
        if key == "metric_over_loss" and not peers.has_metric(family):
          continue
        values = [
          (r[key], f"{r['shape']} {r['path']} {r['mode']}")
          for r in mine
          if r.get(key) is not None and all(r[k] == v for k, v in match.items())
        ]
        out.append(_result(f"{prefix}{desc} ({dtype})", values, bound, upper))
  return out


def eager_targets(records: list[dict]) -> list[dict]:
  """Every bce_jax eager call <= 1.5x the call of a jitted BCE formula, per shape."""
  out = []
  for record in records:
    values = [
      (row["ratio_to_baseline"], row["call"])
      for row in record["rows"]
      if not row["peer"] and not row["call"].startswith("jit(")
    ]
    shape = "[" + ", ".join(map(str, record["shape"])) + "]"
    out.append(
      _result(f"eager calls <= 1.5x a jitted BCE formula's call ({shape})", values, 1.5, True)
    )
  return out


def format_targets(results: list[dict]) -> str:
  """One line per target: PASS/MISS, the worst figure and where, and the misses."""
  lines = []
  for t in results:
    if t["met"] is None:
      lines.append(f"  n/a   {t['target']}: not measured")
      continue
    state = "PASS" if t["met"] else "MISS"
    value = t["measured"]
    figure = f"{value:.3g}" if value < 1e-3 else f"{value:.2f}x"
    where = f" at {t['where']}" if t["where"] else ""
    count = f"; {t['misses']} of {t['of']} miss" if t["misses"] else f"; {t['of']} measured"
    lines.append(f"  {state}  {t['target']}: worst {figure}{where}{count}")
  return "\n".join(lines)
