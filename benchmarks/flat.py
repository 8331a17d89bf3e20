"""The flat groups: run one group at one N, and their tables.

A row is one implementation in one group, dtype and N: its median time,
ns per element, ratio to the group's floor and bce_jax's speed-up over it
(the peer's time over bce_jax's), or why it is missing.
"""

from __future__ import annotations

import cases
import peers
import timing

OURS = peers.OURS


def run_group(group: str, n: int, dtype: str, data: dict, repeats: int) -> list[dict]:
  """Times every implementation of a flat group.

  Args:
    group: one of :func:`cases.groups`.
    n: elements of the flat data.
    dtype: ``"float32"`` or ``"bfloat16"``.
    data: :func:`cases.make_data` for `n` and `dtype`.
    repeats: timed samples per implementation.

  Returns:
    One row per implementation (see the module docstring).
  """
  calls = cases.build(group, data, dtype)
  available = {k: v for k, v in calls.items() if not isinstance(v, str)}
  status = {k: "missing: " + v for k, v in calls.items() if isinstance(v, str)}
  for name, fn in list(available.items()):
    try:  # the first call compiles; a peer that fails (a dtype, say) is reported
      fn()
    except Exception as e:  # noqa: BLE001
      status[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      del available[name]
  n_elements = cases.elements(group, data)
  timings = timing.time_interleaved(available, repeats, warmup=1)
  median = {k: t.median for k, t in timings.items()}
  rows = []
  for name in calls:
    row = {"group": group, "impl": name, "n": n_elements, "dtype": dtype}
    if name in median:
      row.update(
        seconds=median[name],
        ns_per_element=median[name] / n_elements * 1e9,
        ratio_to_floor=median[name] / median[cases.FLOOR] if cases.FLOOR in median else None,
        repeats=repeats,
        inner=timings[name].inner,
        iqr_ns_per_element=[q / n_elements * 1e9 for q in timings[name].iqr],
      )
      if name not in (OURS, cases.FLOOR, cases.COMPUTE) and OURS in median:
        row["bce_jax_speedup"] = median[name] / median[OURS]
    else:
      row["status"] = status[name]
    rows.append(row)
  return rows


def format_table(rows: list[dict]) -> str:
  """A fixed-width table of rows, for the terminal."""
  head = (
    f"| {'group':10} | {'dtype':8} | {'N':>9} | {'impl':9} | {'ns/elem':>8} "
    f"| {'x floor':>7} | {'bce_jax speed-up':>16} |"
  )
  lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
  for r in rows:
    if "seconds" in r:
      ns = f"{r['ns_per_element']:.3f}"
      ratio = f"{r['ratio_to_floor']:.2f}" if r.get("ratio_to_floor") else "-"
      speed = f"{r['bce_jax_speedup']:.2f}x" if "bce_jax_speedup" in r else ""
    else:
      ns, ratio, speed = r["status"].split(":")[0], "", ""
    lines.append(
      f"| {r['group']:10} | {r['dtype']:8} | {r['n']:>9.0e} | {r['impl']:9} | {ns:>8} "
      f"| {ratio:>7} | {speed:>16} |"
    )
  return "\n".join(lines)


def _find(rows: list[dict], group: str, impl: str, n: int) -> dict | None:
  for r in rows:
    if r["group"] == group and r["impl"] == impl and abs(r["n"] - n) <= n // 100:
      return r
  return None


def markdown(record: dict) -> str:
  """README tables: per dtype, ns/element at each N, and ratios at the largest N."""
  rows = record["results"]
  out = []
  for dtype in sorted({r["dtype"] for r in rows}, key=lambda d: d != "float32"):
    mine = [r for r in rows if r["dtype"] == dtype]
    sizes = sorted({r["n"] for r in mine if r["group"] != "metric"})
    out.append(f"**{dtype}** (ns per element; ratios at N = {sizes[-1]:.0e})\n")
    head = "| group | impl | " + " | ".join(f"N={n:.0e}" for n in sizes)
    out.append(head + " | x floor | bce_jax speed-up |")
    out.append("|" + "---|" * (len(sizes) + 4))
    for group in dict.fromkeys(r["group"] for r in mine):
      for impl in dict.fromkeys(r["impl"] for r in mine if r["group"] == group):
        cells, last = [], None
        for n in sizes:
          r = _find(mine, group, impl, n)
          if r is not None:
            last = r
          cells.append(
            ""
            if r is None
            else f"{r['ns_per_element']:.3g}"
            if "seconds" in r
            else r["status"].split(":")[0]
          )
        ratio = f"{last['ratio_to_floor']:.2f}" if last and last.get("ratio_to_floor") else ""
        speed = f"{last['bce_jax_speedup']:.2f}x" if last and "bce_jax_speedup" in last else ""
        name = f"**{impl}**" if impl == OURS else impl
        out.append(f"| {group} | {name} | " + " | ".join(cells) + f" | {ratio} | {speed} |")
    out.append("")
  return "\n".join(out)
