"""Benchmarks the pairwise sigmoid (SigLIP) loss: blockwise against dense.

``jax.value_and_grad`` w.r.t. x, y, scale and bias, under ``jax.jit``, at
D = 512 (unit-norm rows, scale 10, bias -10), float32:

* one device: ``bce_jax.pairwise_sigmoid_loss`` (the default "fused"
  schedule: one sweep that accumulates the gradients beside the value; and
  "recompute": the backward sweep recomputes each tile) against the dense
  formulation, ``x @ y.T`` then ``jax.nn.log_sigmoid`` and autodiff;
* 8 host devices (a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``): the ring
  (``axis_name``, inside ``jax.shard_map``) against all-gathering y and
  computing the dense loss of the local rows on every device.

Peak memory is the compiled program's ``memory_analysis()``: temporaries
plus arguments (per device for the 8-device programs); it needs no run.
Times are medians over interleaved repeats (every implementation once per
repeat), after an ahead-of-time compile. A dense program over the 4 GiB
budget, or a call estimated (from the previous size, as B^2) to take longer
than ``--max-call-s``, is not timed, and the JSON says why.

Usage::

  python benchmarks/pairwise.py            # B in 1024, 4096, 16384, 65536 (~18 min on 2 cores)
  python benchmarks/pairwise.py --quick    # B in 512, 1024; a smoke test (~1 min)

Writes ``benchmarks/results/pairwise-<tag>.json`` (tag ``cpu``, ``gpu`` or
``quick``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bce_jax
from bce_jax import _pairwise

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1 << 30
SCALE, BIAS = 10.0, -10.0
DEVICES = 8


def _embeddings(batch: int, dim: int, seed: int) -> np.ndarray:
  a = np.random.default_rng(seed).normal(size=(batch, dim)).astype(np.float32)
  return a / np.linalg.norm(a, axis=1, keepdims=True)


def dense_loss(x, y, scale, bias):
  """The textbook formulation: the [B, B] logits, then log_sigmoid."""
  logits = scale * (x @ y.T) + bias
  labels = 2 * jnp.eye(x.shape[0], dtype=logits.dtype) - 1
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / x.shape[0]


def blockwise_loss(x, y, scale, bias):
  return bce_jax.pairwise_sigmoid_loss(x, y, scale=scale, bias=bias)


def _compile(fn, args, mode: str | None = None, mesh=None):
  """`jax.jit(value_and_grad(fn))` compiled for `args`; traced with `mode`."""
  step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
  saved = _pairwise._MODE
  _pairwise._MODE = mode or saved
  try:
    if mesh is not None:
      with jax.set_mesh(mesh):
        return step.lower(*args).compile()
    return step.lower(*args).compile()
  finally:
    _pairwise._MODE = saved


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  temp, arguments = int(m.temp_size_in_bytes), int(m.argument_size_in_bytes)
  return {"temp": temp, "arguments": arguments, "peak": temp + arguments}


def _time(calls: dict, repeats: dict[str, int]) -> dict[str, dict]:
  """Median seconds of each call, interleaved. A call with `repeats` 1 is
  run once, cold (no warm-up: it is estimated to take minutes)."""
  outputs = {}
  for name, call in calls.items():
    if repeats[name] > 1:
      outputs[name] = jax.block_until_ready(call())
  samples = {name: [] for name in calls}
  for i in range(max(repeats.values(), default=0)):
    for name, call in calls.items():
      if i < repeats[name]:
        start = time.perf_counter()
        outputs[name] = jax.block_until_ready(call())
        samples[name].append(time.perf_counter() - start)
  out = {}
  for name, s in samples.items():
    out[name] = {"median_s": statistics.median(s), "min_s": min(s), "repeats": len(s)}
    out[name]["value"] = float(outputs[name][0])
  return out


def _schedule(entry: dict, estimate: float, args, quick: bool) -> int:
  """How many timed calls an implementation gets (0: none; `entry` says why)."""
  if estimate > args.skip_above_s:
    entry["skipped"] = f"estimated {estimate:.0f} s a call, over --skip-above-s"
    return 0
  if estimate > args.max_call_s:
    entry["note"] = f"one cold call (estimated {estimate:.0f} s, over --max-call-s)"
    return 1
  if quick:
    return 3
  return 7 if estimate < 2 else 5 if estimate < 10 else 3


def _estimate(previous: dict, name: str, batch: int) -> float:
  """Seconds a call should take: the previous size's time scaled as B^2."""
  if name not in previous:
    return 0.0
  return previous[name] * (batch / previous["B"]) ** 2


def _shape_args(batch: int, dim: int, sharding=None):
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  return emb, emb, scalar, scalar


def largest_fitting(fn, dim: int, budget: int, mode: str | None = None) -> int:
  """The largest B (a multiple of 1024, up to 2^20) whose program fits in `budget`."""
  fits = lambda b: _memory(_compile(fn, _shape_args(b, dim), mode))["peak"] <= budget
  lo, hi = 0, 1024
  while hi <= 1 << 20 and fits(hi):
    lo, hi = hi, hi * 2
  while hi - lo > 1024:
    mid = (lo + hi) // 2 // 1024 * 1024
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def single_device(sizes, dim, budget, args) -> dict:
  impls = {
    "dense": (dense_loss, None),
    "blockwise": (blockwise_loss, "fused"),
    "blockwise-recompute": (blockwise_loss, "recompute"),
  }
  rows, previous = [], {}
  for batch in sizes:
    x, y = jnp.asarray(_embeddings(batch, dim, 0)), jnp.asarray(_embeddings(batch, dim, 1))
    data = (x, y, jnp.float32(SCALE), jnp.float32(BIAS))
    row, calls, repeats = {"B": batch, "D": dim}, {}, {}
    for name, (fn, mode) in impls.items():
      compiled = _compile(fn, _shape_args(batch, dim), mode)
      row[name] = entry = {"memory": _memory(compiled)}
      if name == "dense" and entry["memory"]["peak"] > budget:
        entry["skipped"] = f"needs {entry['memory']['peak'] / GIB:.1f} GiB, over the budget"
        continue
      if name == "blockwise-recompute" and batch > args.recompute_max_b:
        entry["skipped"] = f"the schedules are compared up to B={args.recompute_max_b}"
        continue
      repeats[name] = _schedule(entry, _estimate(previous, name, batch), args, args.quick)
      if repeats[name]:
        calls[name] = lambda c=compiled, a=data: c(*a)
    print(f"B={batch}: timing {', '.join(calls) or 'nothing'}", flush=True)
    previous = {"B": batch}
    for name, t in _time(calls, repeats).items():
      row[name].update(t)
      previous[name] = t["median_s"]
    if "value" in row["dense"] and "value" in row["blockwise"]:
      row["value_rel_diff"] = abs(row["blockwise"]["value"] / row["dense"]["value"] - 1)
    rows.append(row)
  return {"rows": rows}


def _ring_worker(sizes, dim, args) -> dict:
  """Runs in the 8-device subprocess: the ring against all-gather-then-dense."""
  mesh = jax.make_mesh((DEVICES,), ("data",))
  rows_spec = NamedSharding(mesh, P("data"))

  def ring(x, y, scale, bias):
    return bce_jax.pairwise_sigmoid_loss(x, y, scale=scale, bias=bias, axis_name="data")

  def gathered(x, y, scale, bias):
    # Every device: its rows of x against all of y, dense; then the sum.
    y_all = jax.lax.all_gather(y, "data", tiled=True)
    logits = scale * (x @ y_all.T) + bias
    rows = jax.lax.axis_index("data") * x.shape[0] + jnp.arange(x.shape[0])
    labels = jnp.where(rows[:, None] == jnp.arange(y_all.shape[0])[None, :], 1.0, -1.0)
    local = -jnp.sum(jax.nn.log_sigmoid(labels * logits))
    return jax.lax.psum(local, "data") / y_all.shape[0]

  def mapped(fn):
    specs = (P("data"), P("data"), P(), P())
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P())

  impls = {
    "ring": (ring, "fused"),
    "all-gather-dense": (gathered, None),
    "ring-recompute": (ring, "recompute"),
  }
  rows, previous = [], {}
  for batch in sizes:
    x = jax.device_put(_embeddings(batch, dim, 0), rows_spec)
    y = jax.device_put(_embeddings(batch, dim, 1), rows_spec)
    data = (x, y, jnp.float32(SCALE), jnp.float32(BIAS))
    row, calls, repeats = {"B": batch, "D": dim, "devices": DEVICES}, {}, {}
    for name, (fn, mode) in impls.items():
      compiled = _compile(mapped(fn), _shape_args(batch, dim, rows_spec), mode, mesh)
      row[name] = entry = {"memory_per_device": _memory(compiled)}
      if name == "ring-recompute" and batch > args.recompute_max_b:
        entry["skipped"] = f"the schedules are compared up to B={args.recompute_max_b}"
        continue
      repeats[name] = _schedule(entry, _estimate(previous, name, batch), args, args.quick)
      if repeats[name]:
        calls[name] = lambda c=compiled, a=data: c(*a)
    print(f"8 devices, B={batch}: timing {', '.join(calls)}", file=sys.stderr, flush=True)
    previous = {"B": batch}
    for name, t in _time(calls, repeats).items():
      row[name].update(t)
      previous[name] = t["median_s"]
    rows.append(row)
  return {"rows": rows}


def eight_devices(sizes, dim, args) -> dict:
  """`_ring_worker` in a fresh interpreter with 8 host devices."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  flags.append(f"--xla_force_host_platform_device_count={DEVICES}")
  env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
  cmd = [sys.executable, __file__, "--ring-worker", "--dim", str(dim), "--sizes", *map(str, sizes)]
  cmd += ["--max-call-s", str(args.max_call_s), "--skip-above-s", str(args.skip_above_s)]
  cmd += ["--recompute-max-b", str(args.recompute_max_b)] + (["--quick"] if args.quick else [])
  proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
  if proc.returncode != 0:
    return {"error": f"exit status {proc.returncode}; see stderr above"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _ms(entry: dict) -> str:
  if "median_s" in entry:
    return f"{entry['median_s'] * 1e3:,.0f}"
  return "–"


def _mib(memory: dict) -> str:
  return f"{memory['peak'] / (1 << 20):,.0f}"


def _ratio(a: dict, b: dict) -> float | None:
  return a["median_s"] / b["median_s"] if "median_s" in a and "median_s" in b else None


def _x(ratio: float | None) -> str:
  return "–" if ratio is None else f"{ratio:.2f}x"


def _notes(rows: list[dict], names: tuple[str, ...]) -> None:
  for r in rows:
    for name in names:
      why = r[name].get("skipped") or r[name].get("note")
      if why:
        print(f"  B={r['B']} {name}: {why}")


def report(results: dict) -> list[dict]:
  """Prints the tables; returns the targets with PASS/MISS."""
  single, ring, targets = results["single"]["rows"], results["ring"].get("rows", []), []

  def target(name: str, measured: str, ok: bool) -> None:
    targets.append({"target": name, "measured": measured, "pass": bool(ok)})

  print("\nOne device: value_and_grad ms (median); peak MiB (temporaries + arguments)\n")
  print("| B | dense | blockwise | recompute | blockwise / dense | recompute / blockwise ", end="")
  print("| dense MiB | blockwise MiB | recompute MiB |\n" + "|---" * 9 + "|")
  for r in single:
    d, b, rc = r["dense"], r["blockwise"], r["blockwise-recompute"]
    print(f"| {r['B']} | {_ms(d)} | {_ms(b)} | {_ms(rc)} | {_x(_ratio(b, d))} ", end="")
    print(f"| {_x(_ratio(rc, b))} | {_mib(d['memory'])} | {_mib(b['memory'])} ", end="")
    print(f"| {_mib(rc['memory'])} |")
    if _ratio(b, d) is not None:
      ratio = _ratio(b, d)
      target(f"B={r['B']}: blockwise time <= 1.3x dense", f"{ratio:.2f}x", ratio <= 1.3)
    if r["B"] == 16384:
      ratio = b["memory"]["peak"] / d["memory"]["peak"]
      target("B=16384: blockwise peak memory <= 1/8 dense", f"1/{1 / ratio:.0f}", ratio <= 1 / 8)
  _notes(single, ("dense", "blockwise", "blockwise-recompute"))
  budget = results["config"]["budget_gib"]
  for name, fits in results["largest_b_in_budget"].items():
    print(f"largest B whose value_and_grad fits in {budget:g} GiB, {name}: {fits}")
  if ring:
    print(f"\n{DEVICES} host devices: value_and_grad ms (median); peak MiB per device\n")
    print("| B | ring | all-gather-dense | ring-recompute | ring / all-gather ", end="")
    print("| ring-recompute / ring | ring MiB | all-gather MiB |\n" + "|---" * 8 + "|")
    for r in ring:
      a, g, rc = r["ring"], r["all-gather-dense"], r["ring-recompute"]
      print(f"| {r['B']} | {_ms(a)} | {_ms(g)} | {_ms(rc)} | {_x(_ratio(a, g))} ", end="")
      print(f"| {_x(_ratio(rc, a))} | {_mib(a['memory_per_device'])} ", end="")
      print(f"| {_mib(g['memory_per_device'])} |")
      if _ratio(a, g) is not None:
        ratio = _ratio(a, g)
        target(f"B={r['B']}, 8 devices: ring <= all-gather-dense", f"{ratio:.2f}x", ratio <= 1)
    _notes(ring, ("ring", "all-gather-dense", "ring-recompute"))
  elif "error" in results["ring"]:
    print("8-device run failed: " + results["ring"]["error"])
  print("\n| target | measured | |\n|---|---|---|")
  for t in targets:
    print(f"| {t['target']} | {t['measured']} | {'PASS' if t['pass'] else 'MISS'} |")
  return targets


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="B in 512, 1024; 3 repeats")
  parser.add_argument("--sizes", type=int, nargs="+", help="batch sizes (default by mode)")
  parser.add_argument("--ring-sizes", type=int, nargs="+", help="batch sizes on 8 devices")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--budget-gib", type=float, default=4.0, help="memory budget for dense")
  parser.add_argument(
    "--max-call-s", type=float, default=150.0, help="time a longer call once, cold"
  )
  parser.add_argument(
    "--skip-above-s", type=float, default=1500.0, help="do not time a longer call"
  )
  parser.add_argument(
    "--recompute-max-b", type=int, default=16384, help="largest B timed with recompute"
  )
  parser.add_argument("--ring-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.ring_worker:
    print(json.dumps(_ring_worker(args.sizes, args.dim, args)))
    return
  sizes = args.sizes or ([512, 1024] if args.quick else [1024, 4096, 16384, 65536])
  ring_sizes = args.ring_sizes or ([512, 1024] if args.quick else [1024, 4096, 16384])
  budget = int(args.budget_gib * GIB)
  tag = "quick" if args.quick else jax.default_backend()
  started = time.perf_counter()
  results = {
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "machine": {
      "platform": platform.platform(),
      "processor": platform.processor(),
      "cpus": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "load_average": os.getloadavg(),
    },
    "config": {
      "dim": args.dim,
      "budget_gib": args.budget_gib,
      "scale": SCALE,
      "bias": BIAS,
      "default_block": _pairwise._BLOCK,
      "default_mode": _pairwise._MODE,
    },
  }
  results["single"] = single_device(sizes, args.dim, budget, args)
  results["largest_b_in_budget"] = {
    name: largest_fitting(fn, args.dim, budget, mode)
    for name, fn, mode in (("dense", dense_loss, None), ("blockwise", blockwise_loss, "fused"))
  }
  results["ring"] = eight_devices(ring_sizes, args.dim, args)
  results["targets"] = report(results)
  results["seconds"] = time.perf_counter() - started
  RESULTS.mkdir(exist_ok=True)
  path = RESULTS / f"pairwise-{tag}.json"
  path.write_text(json.dumps(results, indent=1))
  print(f"\nwrote {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
