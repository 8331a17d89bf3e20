"""Narrow rows of every width: bce_jax on ``[N/L, L]`` against its own flat ``[N]``.

For each dtype, path (``mean``, ``weight``: a ``[B]`` sample weight, ``mask``:
a ``[B]`` bool mask) and mode (``forward``, ``value_and_grad`` w.r.t. the
logits), the flat ``[N]`` call and the call on rows of each width are timed
interleaved in one :func:`timing.time_interleaved` (a slow phase of a shared
machine hits them all alike). The figure is bce_jax's time per element on
the rows over its time per element on ``[N]`` for the same path, mode and
dtype (``[N]`` is one sample in Keras's convention: its weight and mask are
scalars). The rows of each width are ``N // L`` rounded down to a multiple
of 8, as batch sizes are: XLA:CPU's elementwise gradient pass runs about
3x slower over an odd number of rows, at any width (``[250001, 8]``
against ``[250000, 8]``), which would otherwise show up as a width's cost
(N = 2e6 gives 333,333 rows of 6).
Only bce_jax is timed: the peers are in the matrix (``--matrix``).

:func:`run_odd` times that odd-row effect itself, for bce_jax and each peer:
rows of 8 (a multiple of 8 of them) against one row more.
"""

from __future__ import annotations

import matrix
import peers
import timing

WIDTHS = (2, 3, 4, 5, 6, 8, 12, 16)
PATHS = ("mean", "weight", "mask")


def shape_name(width: int) -> str:
  return f"[N/{width},{width}]"


def _call(cell: matrix.Cell, inputs: dict):
  impl = peers.implementations(cell.family)[peers.OURS]
  run, _ = matrix._impl_call(impl, cell, inputs)
  return run


def run(n: int, widths, dtypes, paths, modes, repeats: int, on_row=print) -> list[dict]:
  """Times every (dtype, path, mode) group; returns one row per width.

  Args:
    n: elements of the flat array (rows hold ``n // L // 8 * 8 * L``).
    widths: the row widths L.
    dtypes, paths, modes: what to time.
    repeats: interleaved samples per call; figures are medians.
    on_row: called with each row as soon as its group is timed.

  Returns:
    Rows with ``dtype``, ``path``, ``mode``, ``width``, ``n``, ``seconds``,
    ``flat_seconds`` and ``x_flat`` (per element, rows over flat).
  """
  rows = []
  for dtype in dtypes:
    data = {0: matrix.make_inputs((n,), dtype)}
    for width in widths:
      data[width] = matrix.make_inputs((n // width // 8 * 8, width), dtype)
    for path in paths:
      for mode in modes:
        calls = {
          w: _call(matrix.Cell("bce", "", path, mode, dtype), inputs) for w, inputs in data.items()
        }
        times = timing.time_interleaved({str(w): c for w, c in calls.items()}, repeats)
        flat = times["0"].median / n
        for width in widths:
          count = data[width]["x"].size
          seconds = times[str(width)].median
          row = {
            "dtype": dtype,
            "path": path,
            "mode": mode,
            "width": width,
            "n": count,
            "seconds": seconds,
            "flat_seconds": flat * n,
            "x_flat": seconds / count / flat,
          }
          rows.append(row)
          on_row(row)
    del data
  return rows


def run_odd(n: int, width: int, dtypes, modes, repeats: int, on_row=print) -> list[dict]:
  """Each implementation on ``[M + 1, width]`` against ``[M, width]``, M a multiple of 8.

  XLA:CPU's loop emitter splits the rows between parallel partitions; an
  odd count leaves them uneven, and the loop it emits is then not
  vectorized. Every jax program meets it, the peers' too.

  Returns:
    Rows with ``dtype``, ``mode``, ``impl``, ``even_seconds``,
    ``odd_seconds`` and ``x_even`` (per element, odd rows over even rows).
  """
  rows = []
  m = n // width // 8 * 8
  impls = {k: v for k, v in peers.implementations("bce").items() if isinstance(v, peers.Impl)}
  for dtype in dtypes:
    data = {
      "even": matrix.make_inputs((m, width), dtype),
      "odd": matrix.make_inputs((m + 1, width), dtype),
    }
    for mode in modes:
      calls = {}
      for name, impl in impls.items():
        cell = matrix.Cell("bce", "", "mean", mode, dtype)
        for parity, inputs in data.items():
          run, _ = matrix._impl_call(impl, cell, inputs)
          calls[f"{name}|{parity}"] = run
      times = timing.time_interleaved(calls, repeats)
      for name in impls:
        even, odd = times[f"{name}|even"].median, times[f"{name}|odd"].median
        row = {
          "dtype": dtype,
          "mode": mode,
          "impl": name,
          "width": width,
          "rows": m,
          "even_seconds": even,
          "odd_seconds": odd,
          "x_even": odd / (m + 1) / (even / m),
        }
        rows.append(row)
        on_row(row)
    del data
  return rows


def format_odd_row(row: dict) -> str:
  return (
    f"{row['dtype']:8s} {row['mode']:14s} {row['impl']:8s} [{row['rows']},{row['width']}] "
    f"{row['even_seconds'] * 1e3:8.2f} ms  [{row['rows'] + 1},{row['width']}] "
    f"{row['odd_seconds'] * 1e3:8.2f} ms  {row['x_even']:5.2f}x"
  )


def format_row(row: dict) -> str:
  return (
    f"{row['dtype']:8s} {row['path']:6s} {row['mode']:14s} {shape_name(row['width']):10s} "
    f"{row['seconds'] * 1e3:8.2f} ms  flat {row['flat_seconds'] * 1e3:7.2f} ms  "
    f"{row['x_flat']:5.2f}x flat"
  )


def markdown(rows: list[dict]) -> str:
  """One table per dtype: a line per (path, mode), a column per width (x flat [N])."""
  widths = sorted({r["width"] for r in rows})
  out = []
  for dtype in dict.fromkeys(r["dtype"] for r in rows):
    out += [
      f"**{dtype}**: bce_jax per element on `[N/L, L]` over its flat `[N]` (lower is better)",
      "",
      "| path | mode | " + " | ".join(f"L = {w}" for w in widths) + " |",
      "|---|---|" + "---|" * len(widths),
    ]
    groups: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
      if r["dtype"] == dtype:
        groups.setdefault((r["path"], r["mode"]), {})[r["width"]] = r["x_flat"]
    for (path, mode), by_width in groups.items():
      cells = (f"{by_width[w]:.2f}x" if w in by_width else "" for w in widths)
      out.append(f"| {path} | {mode} | " + " | ".join(cells) + " |")
    out.append("")
  return "\n".join(out)
