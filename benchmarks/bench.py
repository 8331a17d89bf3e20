"""Benchmarks bce_jax against optax, Keras (JAX backend) and PyTorch.

Modes (one command each; see benchmarks/README.md):

  python benchmarks/bench.py                  # flat groups: N in 1e4, 1e6, 1e7
  python benchmarks/bench.py --quick          # flat smoke test: small N, 5 repeats
  python benchmarks/bench.py --matrix         # shapes x paths x dtypes x modes, N = 1e7
  python benchmarks/bench.py --eager          # small batches called without jax.jit
  python benchmarks/bench.py --narrow         # rows of 2-16 elements against flat [N], N = 2e6
  python benchmarks/bench.py --odd-rows       # an odd row count against an even one, every peer
  python benchmarks/bench.py --matrix --check-targets   # matrix, eager and the targets
  python benchmarks/bench.py --markdown FILE.json       # a results file as README tables

Every implementation is timed once per repeat, in turn; figures are medians.
The peers are optional (``pip install -e ".[bench]"`` brings optax and
Keras; torch is installed on its own, see benchmarks/README.md); a missing
one is reported, never fatal. Results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import accuracy
import cases
import eager
import flat
import jax
import matrix
import narrow
import peers
import plots
import report
import targets

RESULTS = Path(__file__).resolve().parent / "results"


def _record(kind: str, repeats: int, argv: list[str] | None) -> dict:
  command = argv if argv is not None else sys.argv[1:]
  return {
    "kind": kind,
    "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join(["bench.py", *command]),
    "machine": report.machine_info(),
    "versions": report.versions(),
    "missing_peers": peers.load(),
    "repeats": repeats,
  }


def _write(path: Path, record: dict) -> None:
  """Writes `record` as JSON atomically (a run can be interrupted at any time)."""
  if hasattr(os, "getloadavg"):
    record["load_average_at_end"] = os.getloadavg()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + ".tmp.json")  # ignored by git as results/*.json
  tmp.write_text(json.dumps(record, indent=1))
  tmp.replace(path)


def run_flat(args, argv) -> dict:
  """The flat groups at each N and dtype, then accuracy and targets."""
  if args.sizes:
    sizes = [int(s) for s in args.sizes]
  else:
    sizes = [10**4, 10**5] if args.quick else [10**4, 10**6, 10**7]
    sizes += [10**8] if args.huge and not args.quick else []
  repeats = args.repeats or (5 if args.quick else 25)
  tag = args.tag or ("quick" if args.quick else jax.default_backend())
  record = _record("flat", repeats, argv)
  groups = args.groups or list(cases.groups())
  rows: list[dict] = []
  for dtype in args.dtypes:
    for n in sizes:
      data = cases.make_data(n, dtype)
      new = []
      for group in groups:
        try:
          new += flat.run_group(group, n, dtype, data, repeats)
        except Exception:  # noqa: BLE001 - report and carry on with the rest
          traceback.print_exc()
      print(flat.format_table(new), flush=True)
      rows += new
      del data
  acc = {} if args.no_accuracy else accuracy.accuracy()
  for key, value in acc.items():
    print(f"accuracy {key}: {value:.3g}")
  record.update(results=rows, accuracy=acc, targets=targets.flat_targets(rows, acc))
  _write(RESULTS / f"{tag}.json", record)
  print(f"wrote {RESULTS / f'{tag}.json'}")
  if not args.no_plot and plots.flat_plot(rows, RESULTS / f"{tag}.png", report.header(record)):
    print(f"wrote {RESULTS / f'{tag}.png'}")
  return record


def run_matrix(args, argv) -> dict:
  """The matrix, resumable: the JSON is rewritten after every cell."""
  n = int(args.n or 1e7)
  tag = args.tag or (jax.default_backend() + ("" if n == 10**7 else f"-n{n}"))
  path = RESULTS / f"matrix-{tag}.json"
  repeats = args.repeats or 10
  record = _record("matrix", repeats, argv)
  todo = matrix.cells(
    args.families or peers.available_families(), args.dtypes, args.shapes or tuple(matrix.SHAPES)
  )
  done: dict[str, dict] = {}
  if args.resume and path.exists():
    old = json.loads(path.read_text())
    if (old["n"], old["versions"], old["repeats"]) != (n, record["versions"], repeats):
      sys.exit(f"{path} has another N, repeats or versions: cannot resume it; remove it first.")
    done = {matrix.Cell.of(c).key: c for c in old["cells"]}
    print(f"resuming {path}: {len(done)} cells done")
  record.update(n=n, cells=[done[c.key] for c in todo if c.key in done])

  def on_cell(cell: dict) -> None:
    record["cells"].append(cell)
    rows = report.matrix_rows(record["cells"])
    print(report.cell_line(rows[-1]), flush=True)
    _write(path, record)

  print(f"matrix: {len(todo)} cells, N = {n:.0e}, {repeats} repeats; writing {path}")
  matrix.run(todo, n, repeats, done, on_cell)
  record["targets"] = targets.matrix_targets(record["cells"])
  _write(path, record)
  print(f"wrote {path}")
  png = RESULTS / f"matrix-{tag}.png"
  if not args.no_plot and plots.matrix_heatmap(record["cells"], png, report.header(record)):
    print(f"wrote {png}")
  return record


def run_eager(args, argv) -> dict:
  """The eager-call table."""
  repeats = args.repeats or 15
  record = _record("eager", repeats, argv)
  tag = args.tag or jax.default_backend()

  def on_shape(shape_record: dict) -> None:
    print(report.eager_table([shape_record]), flush=True)

  record["eager"] = eager.run(repeats, on_shape)
  record["targets"] = targets.eager_targets(record["eager"])
  _write(RESULTS / f"eager-{tag}.json", record)
  print(f"wrote {RESULTS / f'eager-{tag}.json'}")
  return record


def run_narrow(args, argv) -> dict:
  """Rows of each width against the flat [N] figure (bce_jax alone)."""
  n = int(args.n or 2e6)
  repeats = args.repeats or 9
  record = _record("narrow", repeats, argv)
  tag = args.tag or jax.default_backend()
  widths = args.widths or narrow.WIDTHS
  print(f"narrow rows: widths {list(widths)}, N = {n:.0e}, {repeats} repeats")
  rows = narrow.run(
    n,
    widths,
    args.dtypes,
    narrow.PATHS,
    matrix.MODES,
    repeats,
    lambda r: print(narrow.format_row(r)),
  )
  record.update(n=n, narrow=rows)
  print(narrow.markdown(rows))
  _write(RESULTS / f"narrow-{tag}.json", record)
  print(f"wrote {RESULTS / f'narrow-{tag}.json'}")
  return record


def run_odd_rows(args, argv) -> dict:
  """An odd number of rows against a multiple of 8, bce_jax and its peers."""
  n = int(args.n or 2e6)
  repeats = args.repeats or 9
  record = _record("odd-rows", repeats, argv)
  tag = args.tag or jax.default_backend()
  print(f"odd rows: [M + 1, 8] against [M, 8], N = {n:.0e}, {repeats} repeats")
  rows = narrow.run_odd(
    n, 8, args.dtypes, matrix.MODES, repeats, lambda r: print(narrow.format_odd_row(r))
  )
  record.update(n=n, odd_rows=rows)
  _write(RESULTS / f"odd-rows-{tag}.json", record)
  print(f"wrote {RESULTS / f'odd-rows-{tag}.json'}")
  return record


def _evaluate(record: dict) -> list[dict]:
  """The targets of a saved record, evaluated afresh (flat records keep their own)."""
  if record.get("kind") == "matrix":
    return targets.matrix_targets(record["cells"])
  if record.get("kind") == "eager":
    return targets.eager_targets(record["eager"])
  return record.get("targets", [])


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add = parser.add_argument
  add("--matrix", action="store_true", help="the shape matrix (default N = 1e7)")
  add("--eager", action="store_true", help="the eager-call table")
  add("--narrow", action="store_true", help="rows of 2-16 elements against flat [N] (N = 2e6)")
  add("--odd-rows", action="store_true", help="[M + 1, 8] against [M, 8] rows, every peer")
  add("--widths", type=int, nargs="+", help="narrow: the row widths (default 2 3 4 5 6 8 12 16)")
  add(
    "--check-targets",
    action="store_true",
    help="print every target PASS/MISS (with --matrix, runs --eager too; alone, reads the "
    "saved matrix-<tag>.json and eager-<tag>.json); exit status 1 on a MISS",
  )
  add("--quick", action="store_true", help="flat smoke test: small N, 5 repeats")
  add("--huge", action="store_true", help="flat: add N = 1e8 (needs ~8 GB)")
  add("--sizes", type=float, nargs="+", help="flat: the sizes N")
  add("--groups", nargs="+", choices=cases.GROUPS + cases.FOCAL_GROUPS, help="flat: groups")
  add("--n", type=float, help="matrix (default 1e7), narrow (default 2e6): elements")
  add("--shapes", nargs="+", choices=list(matrix.SHAPES), help="matrix: a subset of shapes")
  add("--families", nargs="+", choices=list(peers.FAMILIES), help="matrix: loss families")
  add("--resume", action="store_true", help="matrix: skip the cells already in its JSON")
  add("--dtypes", nargs="+", default=["float32", "bfloat16"])
  add(
    "--repeats", type=int, help="timed repeats (flat 25, --quick 5, matrix 10, eager 15, narrow 9)"
  )
  add("--tag", help="output name under benchmarks/results/ (default: the backend)")
  add("--no-plot", action="store_true")
  add("--no-accuracy", action="store_true")
  add("--markdown", metavar="JSON", help="print a results file as README tables")
  add("--replot", metavar="JSON", help="only redraw the plot of a results file")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.markdown:
    record = json.loads(Path(args.markdown).read_text())
    print(report.markdown({**record, "targets": _evaluate(record)}))
    return 0
  if args.replot:
    record = json.loads(Path(args.replot).read_text())
    png = Path(args.replot).with_suffix(".png")
    if record.get("kind") == "matrix":
      plots.matrix_heatmap(record["cells"], png, report.header(record))
    else:
      plots.flat_plot(record["results"], png, report.header(record))
    print(f"wrote {png}")
    return 0

  for name, why in peers.load().items():
    print(f"peer {name}: MISSING ({why}); {peers.install_hint(name)}")
  print("machine:", json.dumps(report.machine_info()))
  print("versions:", json.dumps(report.versions()))
  results = []
  if args.matrix:
    results += run_matrix(args, argv)["targets"]
  if args.narrow:
    run_narrow(args, argv)
  if args.odd_rows:
    run_odd_rows(args, argv)
  if args.eager or (args.check_targets and args.matrix):
    results += run_eager(args, argv)["targets"]
  if args.check_targets and not (args.matrix or args.eager):
    tag = args.tag or jax.default_backend()
    for kind in ("matrix", "eager"):
      saved = RESULTS / f"{kind}-{tag}.json"
      if saved.exists():
        record = json.loads(saved.read_text())
        print(f"from {saved}: {report.header(record)}")
        results += _evaluate(record)
  if not (args.matrix or args.eager or args.check_targets or args.narrow or args.odd_rows):
    results = run_flat(args, argv)["targets"]
  if results or not (args.narrow or args.odd_rows):
    print("\ntargets:")
    print(targets.format_targets(results))
  missed = any(t["met"] is False for t in results)
  return 1 if args.check_targets and missed else 0


if __name__ == "__main__":
  sys.exit(main())
