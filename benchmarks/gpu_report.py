"""The GPU benchmark's record as markdown: ceilings, targets, then one table per section.

Conventions as in the other benchmarks: ``x floor`` is bce_jax's time over
the floor's (lower is better); ``<peer> / ours`` is the peer's time over
bce_jax's (above 1: bce_jax is faster).
"""

from __future__ import annotations

import peers
import report

OURS = peers.OURS
READ, VAG, COMPUTE = "read floor", "vag floor", "exp+log1p"
PEERS = ("optax", "keras", "torch")
MIB = 1 << 20


def _s(entry: dict | None) -> float | None:
  return None if entry is None else entry.get("seconds")


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a is not None and b else None


def _x(value: float | None) -> str:
  return "" if value is None else f"{value:.2f}x"


def _short(entry: dict | None) -> str:
  """Why an implementation has no figure, in a word or two."""
  if entry is None:
    return ""
  status = entry.get("status", "")
  return status.split(":")[0] if status else ""


def _us(seconds: float | None) -> str:
  return "" if seconds is None else f"{seconds * 1e6:,.0f}"


def _impls(cell: dict) -> dict:
  return cell.get("impls", {})


def _index(cells: list[dict]) -> dict:
  return {(c["shape"], c["dtype"], c["path"], c["mode"]): c for c in cells if "impls" in c}


def flat_rows(cells: list[dict]) -> list[dict]:
  """The figures of each BCE cell, derived from the raw records."""
  index = _index(cells)
  rows = []
  for c in cells:
    row = {k: c.get(k) for k in ("shape", "dtype", "path", "mode")}
    if "impls" not in c:
      row["status"] = c.get("skipped") or c.get("status", "")
      rows.append(row)
      continue
    impls = _impls(c)
    ours = _s(impls.get(OURS))
    floor_name = VAG if c["mode"] == "value_and_grad" else READ
    floor = _s(impls.get(floor_name))
    mean = index.get(
      (c["shape"], c["dtype"], "mean", "forward" if c["path"] == "metric" else c["mode"])
    )
    compute = _s(_impls(mean).get(COMPUTE)) if mean else None
    row.update(
      us=None if ours is None else ours * 1e6,
      floor=floor_name,
      x_floor=_ratio(ours, floor),
      x_bound=_ratio(ours, max(floor or 0, compute or 0) or None)
      if c["mode"] == "forward"
      else None,
      x_mean=_ratio(ours, _s(_impls(mean).get(OURS))) if mean and mean is not c else None,
      status=_short(impls.get(OURS)),
      mismatches=c.get("mismatches", []),
    )
    for peer in PEERS:
      entry = impls.get(peer)
      row[peer] = _ratio(_s(entry), ours) if _s(entry) else _short(entry)
    rows.append(row)
  return rows


def targets(record: dict) -> list[dict]:
  """The issue's GPU targets: the worst cell of each, and how many cells miss."""
  sections = record.get("sections", {})
  rows = [r for r in flat_rows(sections.get("flat", [])) if r.get("us") is not None]
  out = []

  def target(name: str, figures: list[tuple[float, str]], limit: float, unit: str = "x") -> None:
    if not figures:
      out.append({"target": name, "measured": None, "met": None, "unit": unit})
      return
    worst, where = max(figures)
    misses = sum(1 for v, _ in figures if v > limit)
    out.append(
      {
        "target": name,
        "measured": worst,
        "unit": unit,
        "where": where,
        "misses": misses,
        "of": len(figures),
        "met": misses == 0,
      }
    )

  def where(r: dict) -> str:
    return f"{r['shape']} {r['dtype']} {r['path']} {r['mode']}"

  vag = [(r["x_floor"], where(r)) for r in rows if r["mode"] == "value_and_grad" and r["x_floor"]]
  target("value_and_grad <= 1.15x the vag floor, every cell", vag, 1.15)
  fwd = [(r["x_bound"], where(r)) for r in rows if r["x_bound"] and r["path"] != "metric"]
  target("forward <= 1.1x max(read floor, exp+log1p), every cell", fwd, 1.1)
  probs = []
  for c in sections.get("probabilities", []):
    ratio = _ratio(_s(_impls(c).get(OURS)), _s(_impls(c).get("naive clip+log")))
    if ratio:
      probs.append((ratio, f"{c['dtype']} {c['mode']}"))
  target("probabilities: bce_jax no slower than the naive formula", probs, 1.0)
  eager = []
  for c in sections.get("eager", []):
    for r in c.get("rows", []):
      if not r["peer"] and r["call"] not in (c["baseline"], "jit(x.sum())"):
        eager.append((r["ratio_to_baseline"], r["call"]))
  target("eager calls <= 1.5x a bare jitted call", eager, 1.5)
  # The pairwise kernel's targets, on the default (chosen per backend).
  big, big_mib, versus_dense = [], [], []
  for c in sections.get("pairwise", []):
    impls, at = _impls(c), f"B={c['B']} {c['dtype']}"
    default = impls.get("default", {})
    if c["B"] == 65536 and c["dtype"] == "bfloat16" and "seconds" in default:
      big.append((default["seconds"] * 1e3, at))
      big_mib.append((default["memory"]["temp"] / MIB, at))
    ratio = _ratio(_s(default), _s(impls.get("dense")))
    if ratio:
      versus_dense.append((ratio, at))
  target("pairwise B=65536 bf16: default value_and_grad <= 25 ms", big, 25.0, "ms")
  target("pairwise B=65536 bf16: default <= 256 MiB of temporaries", big_mib, 256.0, "MiB")
  target("pairwise: default no slower than dense, where dense runs", versus_dense, 1.0)
  return out


def _targets_table(results: list[dict]) -> list[str]:
  out = ["| target | worst | where | misses | |", "|---|---|---|---|---|"]
  for t in results:
    state = "n/a" if t["met"] is None else ("PASS" if t["met"] else "MISS")
    misses = f"{t['misses']} of {t['of']}" if "of" in t else ""
    unit, value = t.get("unit", "x"), t["measured"]
    figure = _x(value) if unit == "x" or value is None else f"{value:.3g} {unit}"
    out.append(f"| {t['target']} | {figure} | {t.get('where', '')} | {misses} | {state} |")
  return out


def _peer_cell(value) -> str:
  return _x(value) if isinstance(value, float) else (value or "")


def _flat_table(cells: list[dict]) -> list[str]:
  out = [
    (
      "| shape | dtype | path | mode | bce_jax µs | x floor | x max(floor, exp+log1p) "
      "| x mean path | optax / ours | torch / ours | keras / ours | notes |"
    ),
    "|---" * 12 + "|",
  ]
  for r in flat_rows(cells):
    notes = "; ".join([r.get("status") or "", *r.get("mismatches", [])]).strip("; ")
    out.append(
      f"| {r['shape']} | {r['dtype']} | {r['path']} | {r['mode']} | {_us((r.get('us') or 0) / 1e6 or None)} "
      f"| {_x(r.get('x_floor'))} | {_x(r.get('x_bound'))} | {_x(r.get('x_mean'))} "
      f"| {_peer_cell(r.get('optax'))} | {_peer_cell(r.get('torch'))} "
      f"| {_peer_cell(r.get('keras'))} | {notes} |"
    )
  return out


def _simple_table(cells: list[dict], columns: tuple[str, ...], floor_of) -> list[str]:
  """One row per cell: bce_jax's µs, x floor, and each column's time over bce_jax's."""
  head = "| dtype | mode | bce_jax µs | x floor | " + " | ".join(f"{c} / ours" for c in columns)
  out = [head + " | notes |", "|---" * (5 + len(columns)) + "|"]
  for c in cells:
    impls = _impls(c)
    ours = _s(impls.get(OURS))
    floor = _s(impls.get(floor_of(c)))
    ratios = [
      _x(_ratio(_s(impls.get(k)), ours)) if _s(impls.get(k)) else _short(impls.get(k))
      for k in columns
    ]
    note = c.get("skipped") or c.get("status") or _short(impls.get(OURS))
    note = "; ".join([note, *c.get("mismatches", [])]).strip("; ")
    out.append(
      f"| {c['dtype']} | {c['mode']} | {_us(ours)} | {_x(_ratio(ours, floor))} | "
      + " | ".join(ratios)
      + f" | {note} |"
    )
  return out


def _sweep_entry(entry: dict) -> str:
  """``7.6 ms, 202 TFLOP/s (26%), 138 MiB`` or why there is no time."""
  parts = []
  if "seconds" in entry:
    parts.append(f"{entry['seconds'] * 1e3:.3g} ms")
    parts.append(f"{entry['flop_per_s'] / 1e12:.3g} TFLOP/s")
    if "of_matmul_rate" in entry:
      parts[-1] += f" ({entry['of_matmul_rate']:.0%})"
  elif "status" in entry:
    parts.append(entry["status"][:90])
  if "memory" in entry:
    parts.append(f"{entry['memory']['temp'] / MIB:,.0f} MiB")
  return ", ".join(parts)


def _sweep_table(cells: list[dict], keys: tuple[str, ...]) -> list[str]:
  names = list(dict.fromkeys(n for c in cells for n in _impls(c)))
  out = ["| " + " | ".join(keys) + " | " + " | ".join(names) + " |"]
  out.append("|---" * (len(keys) + len(names)) + "|")
  for c in cells:
    if "impls" not in c:
      body = [c.get("skipped") or c.get("status", "")] + [""] * (len(names) - 1)
    else:
      body = [_sweep_entry(_impls(c)[n]) if n in _impls(c) else "" for n in names]
    out.append("| " + " | ".join(str(c[k]) for k in keys) + " | " + " | ".join(body) + " |")
  return out


def markdown(record: dict) -> str:
  """The whole record as markdown tables."""
  sections = record.get("sections", {})
  config = record["config"]
  out = [f"# bce_jax on {record['machine']['device_kind']}", ""]
  missing = record.get("missing_peers", {})
  versions = {k: None if k in missing else v for k, v in record["versions"].items()}
  out.append(
    f"Measured {report.header({**record, 'versions': versions})}. Command: `{record['command']}`. "
    f"N = {config['n']:,} elements; each figure is the median of pipelined trials "
    f"(K calls back to back, one wait per trial). Run time {record.get('seconds', 0):.0f} s."
  )
  if missing:
    out.append("")
    out += [f"- peer **{k}** missing: {v}" for k, v in missing.items()]
  if record.get("skipped_cells"):
    out.append(f"\n**{record['skipped_cells']} cells skipped: the time budget was spent.**")
  c = record.get("ceilings", {})
  out += ["", "## Ceilings", "", "| ceiling | figure |", "|---|---|"]
  for name, key, unit, scale in (
    ("copy (`x + 1`: read + write)", "copy_bytes_per_s", "TB/s", 1e12),
    ("read (`sum(x)`)", "read_bytes_per_s", "TB/s", 1e12),
    (f"matmul, {config['matmul_m']}³ bfloat16", "matmul_flop_per_s", "TFLOP/s", 1e12),
  ):
    value = c.get(key)
    out.append(f"| {name} | {'' if value is None else f'{value / scale:.3g} {unit}'} |")
  out += ["", "## Targets", ""] + _targets_table(targets(record))
  if sections.get("flat"):
    out += [
      "",
      "## BCE from logits",
      "",
      (
        "`x floor`: over the read floor (forward) or the vag floor (value_and_grad), "
        "each with the path's weight or mask; `x mean path`: over bce_jax's unweighted "
        "cell (for the metric: its forward loss)."
      ),
      "",
    ]
    out += _flat_table(sections["flat"])
  if sections.get("probabilities"):
    out += ["", "## From probabilities, `[N/8,8]`", ""]
    out += _simple_table(
      sections["probabilities"],
      ("naive clip+log",),
      lambda c: VAG if c["mode"] == "value_and_grad" else READ,
    )
  if sections.get("focal"):
    out += ["", "## Focal (gamma 2, logits), `[N/8,8]`", ""]
    out += _simple_table(
      sections["focal"],
      ("optax", "keras"),
      lambda c: VAG if c["mode"] == "value_and_grad" else READ,
    )
  for c in sections.get("eager", []):
    out += ["", f"## Eager calls, `{c['shape']}`", ""]
    if "rows" in c:
      out += ["| call | µs per call | x jitted baseline |", "|---|---|---|"]
      out += [
        f"| {r['call']} | {r['us_per_call']:.1f} | {r['ratio_to_baseline']:.2f}x |"
        for r in c["rows"]
      ]
    else:
      out.append(c.get("skipped") or c.get("status", ""))
  if sections.get("pairwise"):
    out += [
      "",
      "## Pairwise sigmoid loss (value_and_grad w.r.t. x, y, scale, bias)",
      "",
      (
        "Each entry: time, TFLOP/s counting 6·B²·D (in brackets: of the matmul rate "
        "above), temporaries of the compiled program."
      ),
      "",
    ]
    out += _sweep_table(sections["pairwise"], ("B", "D", "dtype"))
  if sections.get("linear"):
    out += ["", "## Linear BCE over C labels (value_and_grad w.r.t. h and w)", ""]
    out += _sweep_table(sections["linear"], ("B", "D", "C", "dtype"))
  return "\n".join(out) + "\n"
