"""The GPU benchmark: every bce_jax figure that matters on an accelerator, in one short run.

One command measures, in one process: the chip's copy, read and matmul
ceilings; BCE from logits on every shape (``[N]``, ``[N, 1]``, rows of width
2, 4, 8 and 16, ``[B, T, L]``), path (mean, ``[B]`` weight, mask, metric
update) and mode (forward, value_and_grad), float32 and bfloat16, beside
optax, torch and Keras (reported as missing where not installed) and the
floors that move the same bytes; probabilities against a naive formula;
focal; eager calls; the pairwise sweep; and the linear BCE sweep. Every
call is pipelined: K calls back to back and one wait per trial, the figure
the median of the trials (waiting after every call measures dispatch).

Usage::

  python benchmarks/gpu.py                       # N = 2^27, ~4 min on an H200
  python benchmarks/gpu.py --out $OUT/gpu.json   # JSON there, markdown beside it
  python benchmarks/gpu.py --smoke               # tiny sizes, every code path, seconds on CPU
  python benchmarks/gpu.py --n 1e6 --sections ceilings flat   # a part, at another size

Every cell is guarded: an error or an out-of-memory is recorded in its cell
and the run goes on. No cell starts after ``--budget`` seconds (the cells
left are listed as skipped). The JSON and the markdown are rewritten after
every section, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

# The sibling modules, and this checkout's bce_jax ahead of any installed one.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import gpu_common
import gpu_flat
import gpu_report
import gpu_sweeps
import jax
import peers
import report

import bce_jax

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("ceilings", "flat", "probabilities", "focal", "eager", "pairwise", "linear", "narrow")
NARROW = ("[N/2,2]", "[N/4,4]", "[N/16,16]")  # measured last: the core shapes come first

FULL = {
  "n": 1 << 27,
  "matmul_m": 8192,
  "pairwise_b": [16384, 65536],
  "pairwise_d": 512,
  "pairwise_blocks": [2048, 4096, 8192],
  "linear_c": [1 << 16, 1 << 18, 1 << 20, 3 << 20],
  "linear_b": 1024,
  "linear_d": 512,
}
SMOKE = {
  "n": 1 << 12,
  "matmul_m": 64,
  "pairwise_b": [48],
  "pairwise_d": 16,
  "pairwise_blocks": [32],
  "linear_c": [256],
  "linear_b": 8,
  "linear_d": 16,
}
SMALL = {  # a CPU-sized run of the full plan
  "n": 1 << 20,
  "matmul_m": 1024,
  "pairwise_b": [1024, 2048],
  "pairwise_d": 128,
  "pairwise_blocks": [256, 512],
  "linear_c": [1 << 12, 1 << 14],
  "linear_b": 256,
  "linear_d": 128,
}
SIZES = {"full": FULL, "small": SMALL, "smoke": SMOKE}
ALL = None  # every path and mode
# A smoke run takes each code path once, not every combination (CI runs it):
# section -> [(shapes, dtypes, (path, mode) pairs or ALL)].
SMOKE_FLAT = {
  "flat": [
    (("[N/8,8]",), ("float32",), ALL),
    (("[N/8,8]",), ("bfloat16",), {("mean", "forward"), ("mean", "value_and_grad")}),
    (("[N/512,64,8]",), ("float32",), {("mask", "forward")}),
  ],
  "narrow": [(("[N]",), ("float32",), {("weight", "forward"), ("mask", "value_and_grad")})],
}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add = parser.add_argument
  add("--out", type=Path, help="the JSON file; the markdown goes beside it (.md)")
  add("--smoke", action="store_true", help="tiny sizes, 2 trials, each code path once (CI)")
  add(
    "--size",
    choices=list(SIZES),
    help="the sizes: full (default; N = 2^27, pairwise B up to 65536), small (a CPU-sized "
    "run of the whole plan), smoke (the --smoke sizes)",
  )
  add("--budget", type=float, default=270.0, help="seconds after which no cell starts")
  add("--n", type=float, help="elements of each element-wise array (default 2^27)")
  add("--matmul-m", type=int, help="the matmul ceiling's M (default 8192)")
  add("--pairwise-b", type=int, nargs="+", help="pairwise batch sizes (default 16384 65536)")
  add("--pairwise-impl", nargs="+", default=[], help="extra implementation= values to time")
  add("--linear-c", type=int, nargs="+", help="label counts of the linear sweep")
  add("--dtypes", nargs="+", default=["float32", "bfloat16"])
  add("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  add("--skip-peers", nargs="+", default=[], choices=peers.PEER_NAMES, help="peers left out")
  return parser


def _write(record: dict, path: Path) -> None:
  """The JSON and the markdown, each replaced atomically."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(record, indent=1))
  tmp.replace(path)
  md = path.with_suffix(".md")
  tmp = md.with_name(md.name + ".tmp")
  tmp.write_text(gpu_report.markdown(record))
  tmp.replace(md)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  config = dict(SIZES[args.size or ("smoke" if args.smoke else "full")])
  if args.n:
    config["n"] = int(args.n)
  if args.matmul_m:
    config["matmul_m"] = args.matmul_m
  if args.pairwise_b:
    config["pairwise_b"] = args.pairwise_b
  if args.linear_c:
    config["linear_c"] = args.linear_c
  effort = gpu_common.SMOKE_EFFORT if args.smoke else gpu_common.Effort()
  size = args.size or ("smoke" if args.smoke else "full")
  path = args.out or RESULTS / ("gpu.json" if size == "full" else f"gpu-{size}.json")
  missing = peers.load(skip=tuple(args.skip_peers))
  for name, why in missing.items():
    print(f"peer {name}: MISSING ({why}); {peers.install_hint(name)}")
  record = {
    "kind": "gpu",
    "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join(["gpu.py", *(sys.argv[1:] if argv is None else argv)]),
    "machine": {**report.machine_info(), "device_memory_bytes": gpu_common.device_memory_limit()},
    "versions": {**report.versions(), "bce_jax": bce_jax.__version__},
    "bce_jax_path": str(Path(bce_jax.__file__).parent),
    "missing_peers": missing,
    "repeats": effort.trials,
    "config": {**config, "budget_s": args.budget, "dtypes": args.dtypes, "smoke": args.smoke},
    "ceilings": {},
    "sections": {},
  }
  print("machine:", json.dumps(record["machine"]))
  print("versions:", json.dumps(record["versions"]))
  if jax.default_backend() == "cpu" and not args.smoke:
    print("note: the cpu backend: these are not GPU figures.")

  def save() -> None:
    record["sections"] = run.sections
    record["skipped_cells"] = run.skipped
    record["seconds"] = run.elapsed()
    if hasattr(os, "getloadavg"):
      record["load_average_at_end"] = os.getloadavg()
    _write(record, path)

  run = gpu_common.Run(args.budget, save)
  key = jax.random.key(0)
  n, dtypes, wanted = config["n"], args.dtypes, set(args.sections)
  # Most important first: the budget cuts from the end.
  if "ceilings" in wanted:
    record["ceilings"] = gpu_sweeps.ceilings(run, n, config["matmul_m"], effort)
    run.section_done()
  matmul = record["ceilings"].get("matmul_flop_per_s")

  def flat(section: str, shapes) -> None:
    plan = SMOKE_FLAT[section] if args.smoke else [(shapes, dtypes, ALL)]
    for plan_shapes, plan_dtypes, only in plan:
      gpu_flat.flat_cells(run, n, plan_shapes, plan_dtypes, effort, key, only)

  if "flat" in wanted:
    flat("flat", gpu_flat.CORE_SHAPES)
    run.section_done()
  if "probabilities" in wanted:
    gpu_flat.probability_cells(run, n, ["float32"] if args.smoke else dtypes, effort, key)
  if "focal" in wanted:
    gpu_flat.focal_cells(run, n, ["bfloat16"] if args.smoke else dtypes, effort, key)
  if "eager" in wanted:
    gpu_flat.eager_cells(run, effort)
  run.section_done()
  if "pairwise" in wanted:
    gpu_sweeps.pairwise_cells(
      run,
      config["pairwise_b"],
      config["pairwise_d"],
      ["bfloat16"] if args.smoke else ["bfloat16", "float32"],
      config["pairwise_blocks"],
      args.pairwise_impl,
      effort,
      matmul,
    )
    run.section_done()
  if "linear" in wanted:
    gpu_sweeps.linear_cells(
      run, config["linear_c"], config["linear_b"], config["linear_d"], effort, matmul
    )
    run.section_done()
  if "narrow" in wanted:
    flat("narrow", NARROW)
  save()
  print()
  print(gpu_report.markdown(record))
  print(f"wrote {path} and {path.with_suffix('.md')} ({run.elapsed():.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
