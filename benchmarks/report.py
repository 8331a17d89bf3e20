"""Tables and markdown for the three kinds of result, plus machine and versions.

Every JSON record has ``kind`` (``flat``, ``matrix``, ``eager`` or ``narrow``),
``machine`` and ``versions``; :func:`markdown` prints any of them as README
tables headed by the machine and the versions behind them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import flat
import jax
import matrix
import narrow

OURS = "bce_jax"
FLAT = matrix.FLAT
DISTRIBUTIONS = ("bce_jax", "jax", "jaxlib", "numpy", "optax", "keras", "torch")


def machine_info() -> dict:
  """The machine, the JAX backend and the load average now."""
  info = {
    "platform": platform.platform(),
    "python": sys.version.split()[0],
    "cpu_count": os.cpu_count(),
    "jax_backend": jax.default_backend(),
    "jax_devices": [str(d) for d in jax.devices()],
    "device_kind": jax.devices()[0].device_kind,
  }
  for path, key, field in (
    ("/proc/cpuinfo", "cpu_model", "model name"),
    ("/proc/meminfo", "memory", "MemTotal"),
  ):
    try:
      for line in Path(path).read_text().splitlines():
        if line.startswith(field):
          info[key] = line.split(":", 1)[1].strip()
          break
    except OSError:
      pass
  if hasattr(os, "getloadavg"):
    info["load_average_at_start"] = os.getloadavg()
  return info


def versions() -> dict:
  """Installed versions of bce_jax, JAX and the peers (None when absent)."""
  out = {}
  for dist in DISTRIBUTIONS:
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = None
  return out


def header(record: dict) -> str:
  """One line: when, where, and the versions behind the figures."""
  info, vers = record["machine"], record["versions"]
  where = info["device_kind"]
  if info["jax_backend"] == "cpu":
    where = info.get("cpu_model", where)
  others = ", ".join(f"{k} {vers[k]}" for k in ("optax", "keras", "torch") if vers.get(k))
  return (
    f"{record.get('timestamp', '')[:10]}, {where} ({info['cpu_count']} CPU cores, "
    f"{info['jax_backend']} backend); bce_jax {vers.get('bce_jax')}, "
    f"jax/jaxlib {vers['jax']}/{vers['jaxlib']}, {others}; "
    f"median of {record.get('repeats')} interleaved repeats"
  )


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "x") -> str:
  return "" if value is None else f"{value:{spec}}{suffix}"


# --------------------------------------------------------------------------
# Matrix.


def matrix_rows(cells: list[dict]) -> list[dict]:
  """The figures of each matrix cell, derived from the raw records.

  ``x_floor``: bce_jax over the cell's floor; ``x_flat``: bce_jax per
  element over its flat ``[N]`` figure for the same family, path, mode and
  dtype; ``vs_<peer>``: the peer's time over bce_jax's; ``bf16_over_f32``:
  bce_jax's bfloat16 time over its float32 time on the same cell;
  ``metric_over_loss``: the metric update over the mean loss's forward.

  Args:
    cells: the cells' records, from :func:`matrix.run_cell`.

  Returns:
    One row per cell with its keys, ``n``, ``ms`` and the figures above
    (None where a figure's inputs were not measured), ``mismatches`` and
    ``status`` (implementation -> why it has no figure).
  """
  index = {(c["family"], c["shape"], c["path"], c["mode"], c["dtype"]): c for c in cells}

  def seconds(cell: dict | None, impl: str = OURS) -> float | None:
    return None if cell is None else cell["impls"].get(impl, {}).get("seconds")

  def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None

  rows = []
  for c in cells:
    fam, shape, path, mode, dtype = (c[k] for k in ("family", "shape", "path", "mode", "dtype"))
    ours = seconds(c)
    flat = index.get((fam, FLAT, path, mode, dtype))
    flat_per_elem = ratio(seconds(flat), flat["n"] if flat else None)
    row = {k: c[k] for k in ("family", "shape", "path", "mode", "dtype", "n")}
    row.update(
      ms=ours * 1e3 if ours is not None else None,
      x_floor=ratio(ours, seconds(c, matrix.FLOOR)),
      x_flat=ratio(ratio(ours, c["n"]), flat_per_elem),
      vs_optax=ratio(seconds(c, "optax"), ours),
      vs_keras=ratio(seconds(c, "keras"), ours),
      bf16_over_f32=None,
      metric_over_loss=None,
      mismatches=c.get("mismatches", []),
      status={k: v["status"] for k, v in c["impls"].items() if "status" in v},
    )
    if dtype == "bfloat16":
      row["bf16_over_f32"] = ratio(ours, seconds(index.get((fam, shape, path, mode, "float32"))))
    if path == "metric":
      row["metric_over_loss"] = ratio(ours, seconds(index.get((fam, shape, "mean", mode, dtype))))
    rows.append(row)
  return rows


def cell_line(row: dict) -> str:
  """A matrix row as one printed line (as each cell finishes)."""
  parts = [
    f"{row['family']:5} {row['dtype']:8} {row['mode']:14} {row['path']:6} {row['shape']:15}",
    f"bce_jax {_fmt(row['ms'], '9.3f', ' ms')}",
    f"{_fmt(row['x_floor'], '5.2f')} floor",
    f"{_fmt(row['x_flat'], '5.2f')} flat",
    f"optax {_fmt(row['vs_optax'], '5.2f')}",
    f"keras {_fmt(row['vs_keras'], '5.2f')}",
  ]
  if row["bf16_over_f32"] is not None:
    parts.append(f"bf16/f32 {row['bf16_over_f32']:.2f}")
  if row["metric_over_loss"] is not None:
    parts.append(f"metric/loss {row['metric_over_loss']:.2f}")
  parts += [f"{k}: {v[:60]}" for k, v in row["status"].items()]
  parts += [f"MISMATCH {m}" for m in row["mismatches"]]
  return "  ".join(parts)


def matrix_markdown(record: dict) -> str:
  """One table per family and dtype: every cell's figures."""
  rows = matrix_rows(record["cells"])
  out = [f"Measured {header(record)}; N = {record['n']:.0e}.", ""]
  for family in dict.fromkeys(r["family"] for r in rows):
    for dtype in dict.fromkeys(r["dtype"] for r in rows if r["family"] == family):
      mine = [r for r in rows if r["family"] == family and r["dtype"] == dtype]
      bf16 = dtype == "bfloat16"
      out.append(
        f"**{family}, {dtype}** (bce_jax's time; `x floor`, `x flat [N]`: lower is better; "
        "`vs optax`, `vs Keras`: bce_jax's speed-up)\n"
      )
      out.append(
        "| shape | path | mode | bce_jax ms | x floor | x flat [N] | vs optax | vs Keras |"
        + (" bf16 / f32 |" if bf16 else "")
      )
      out.append("|---" * (9 if bf16 else 8) + "|")
      for r in mine:
        cells = [
          r["shape"],
          r["path"],
          r["mode"],
          _fmt(r["ms"], ".3g", ""),
          _fmt(r["x_floor"]),
          _fmt(r["x_flat"]),
          _fmt(r["vs_optax"]),
          _fmt(r["vs_keras"]),
        ]
        if bf16:
          cells.append(_fmt(r["bf16_over_f32"]))
        out.append("| " + " | ".join(cells) + " |")
      out.append("")
  return "\n".join(out)


# --------------------------------------------------------------------------
# Eager, targets, and the dispatch on a record's kind.


def eager_table(records: list[dict]) -> str:
  """Microseconds per eager call and the ratio to the jitted baseline."""
  out = []
  for record in records:
    shape = "[" + ", ".join(map(str, record["shape"])) + "]"
    out.append(f"**{shape}** ({record['calls_per_sample']} calls per sample)\n")
    out.append("| call | µs per call | x jitted baseline |")
    out.append("|---|---|---|")
    for row in record["rows"]:
      out.append(f"| {row['call']} | {row['us_per_call']:.1f} | {row['ratio_to_baseline']:.2f}x |")
    out.append("")
  return "\n".join(out)


def targets_markdown(results: list[dict]) -> str:
  """The targets as a table: the worst figure, where, how many cells miss, PASS/MISS."""
  out = ["| target | worst | where | misses | |", "|---|---|---|---|---|"]
  for t in results:
    value = t["measured"]
    figure = "" if value is None else (f"{value:.3g}" if value < 1e-3 else f"{value:.2f}x")
    state = "n/a" if t["met"] is None else ("PASS" if t["met"] else "MISS")
    misses = f"{t['misses']} of {t['of']}" if "of" in t else ""
    out.append(f"| {t['target']} | {figure} | {t.get('where', '')} | {misses} | {state} |")
  return "\n".join(out)


def markdown(record: dict) -> str:
  """README tables for a JSON record of any kind."""
  kind = record.get("kind", "flat")
  if kind == "matrix":
    body = matrix_markdown(record)
  elif kind == "eager":
    body = f"Measured {header(record)}.\n\n" + eager_table(record["eager"])
  elif kind == "narrow":
    body = f"Measured {header(record)}.\n\n" + narrow.markdown(record["narrow"])
  else:
    body = f"Measured {header(record)}.\n\n" + flat.markdown(record)
  if record.get("targets"):
    body += "\n" + targets_markdown(record["targets"]) + "\n"
  return body
