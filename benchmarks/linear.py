"""Benchmarks linear BCE over C labels: bce_jax's tile sweep against dense optax.

``jax.value_and_grad`` w.r.t. h, W and bias under ``jax.jit``, B = 1024,
D = 128, 8 positive ids a row, float32 by default:

* ``linear``: ``bce_jax.linear_binary_crossentropy`` (default tiles);
* ``dense``: the logits ``h @ W.T + bias`` and the 0/1 labels materialized,
  then optax's ``sigmoid_binary_cross_entropy`` summed over labels, mean
  over rows (the same value);
* ``skip_loss``: the same sweep computing only the derivatives (no loss),
  as Renee's "skip loss" does: the cost of computing the exact loss is
  ``linear / skip_loss - 1``.

Peak memory is read from each compiled program's ``memory_analysis()``
(arguments + outputs + temporaries), without running it. A program is timed
only where that peak is under ``--run-gib`` (so the benchmark never swaps);
the largest C whose peak fits ``--budget-gib`` (24 GiB) is found for both by
bisection over compiled-but-not-run programs. Times are medians of
interleaved repeats after an ahead-of-time compile.

Usage::

  python benchmarks/linear.py              # C = 2^14 .. 2^20 (~5 min of CPU time on 2 cores)
  python benchmarks/linear.py --quick      # C = 2^12, 2^14; a smoke test (~1 min)
  python benchmarks/linear.py --dtype bfloat16 --labels 1048576 3145728 --dim 512   # a GPU run

Writes ``benchmarks/results/linear-<tag>.json`` (tag: the backend, or ``quick``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bce_jax
from bce_jax._tiles import xla

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1 << 30


def dense_loss(h, w, bias, positives):
  """The textbook way: [B, C] logits and labels, then optax."""
  logits = h @ w.T + bias
  rows = jnp.arange(h.shape[0])[:, None]
  cols = jnp.where(positives < 0, w.shape[0], positives)
  labels = jnp.zeros_like(logits).at[rows, cols].set(1.0, mode="drop")
  return optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1).mean()


def linear_loss(h, w, bias, positives):
  return bce_jax.linear_binary_crossentropy(h, w, positives, bias=bias)


def _skip_loss_step(block: int):
  """The derivatives alone (no loss), through the same sweep."""

  def step(h, w, bias, positives):
    weight = jnp.full(h.shape[0], 1.0 / h.shape[0], jnp.float32)
    out = xla.sweep(
      h,
      w,
      bias,
      rule="lists",
      block=block,
      lists=positives,
      row_weight=weight,
      grads=True,
      value=False,
    )
    return out["da"].astype(h.dtype), out["db"], out["dbias"]

  return jax.jit(step)


def _shapes(batch, labels, dim, k, dtype):
  s = jax.ShapeDtypeStruct
  return (
    s((batch, dim), dtype),
    s((labels, dim), dtype),
    s((labels,), dtype),
    s((batch, k), jnp.int32),
  )


def _compile(name: str, shapes, block: int):
  if name == "skip_loss":
    return _skip_loss_step(block).lower(*shapes).compile()
  fn = linear_loss if name == "linear" else dense_loss
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2))).lower(*shapes).compile()


def _peak(compiled) -> int:
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return int(total + m.temp_size_in_bytes)


def _data(batch, labels, dim, k, dtype, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(batch, dim)), dtype)
  w = jnp.asarray(rng.normal(size=(labels, dim)) / np.sqrt(dim), dtype)
  bias = jnp.asarray(np.full(labels, -np.log(labels)), dtype)
  positives = jnp.asarray(rng.integers(-1, labels, (batch, k)), jnp.int32)
  return h, w, bias, positives


def _time(compiled: dict, args, repeats: int) -> dict[str, float]:
  samples: dict[str, list[float]] = {name: [] for name in compiled}
  for fn in compiled.values():
    jax.block_until_ready(fn(*args))  # warm
  for _ in range(repeats):
    for name, fn in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in samples.items()}


def largest_fitting(name: str, budget: int, args, lo: int, block: int) -> int:
  """The largest C (to 1%) whose compiled program's peak fits `budget` bytes."""

  def fits(c: int) -> bool:
    shapes = _shapes(args.batch, c, args.dim, args.k, args.dtype)
    return _peak(_compile(name, shapes, block)) <= budget

  hi = lo
  while fits(hi):
    lo, hi = hi, hi * 2
  while hi - lo > max(lo // 100, 1):
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--labels", type=int, nargs="+", default=[1 << e for e in range(14, 21, 2)])
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--k", type=int, default=8, help="positive ids a row")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--budget-gib", type=float, default=24.0, help="the memory the largest-C search fits"
  )
  parser.add_argument(
    "--run-gib", type=float, default=4.0, help="time only programs under this peak"
  )
  parser.add_argument("--no-search", action="store_true", help="skip the largest-C search")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--tag", default=None)
  args = parser.parse_args()
  if args.quick:
    args.labels, args.repeats = [1 << 12, 1 << 14], 3
  args.dtype = jnp.dtype(args.dtype)
  backend = jax.default_backend()
  block = xla.default_block("cuda" if backend == "gpu" else backend, args.batch)
  print(
    f"backend {backend}, B={args.batch}, D={args.dim}, {args.dtype}, default tile {block} labels"
  )
  rows = []
  for labels in args.labels:
    shapes = _shapes(args.batch, labels, args.dim, args.k, args.dtype)
    compiled = {name: _compile(name, shapes, block) for name in ("linear", "skip_loss", "dense")}
    peaks = {name: _peak(c) for name, c in compiled.items()}
    runnable = {n: c for n, c in compiled.items() if peaks[n] <= args.run_gib * GIB}
    times = _time(runnable, _data(args.batch, labels, args.dim, args.k, args.dtype), args.repeats)
    row = {"labels": labels, "peak_bytes": peaks, "seconds": times}
    if "dense" in times:
      row["linear_over_dense"] = times["linear"] / times["dense"]
    row["exact_loss_cost"] = times["linear"] / times["skip_loss"] - 1
    rows.append(row)
    cell = {n: f"{times[n] * 1e3:9.1f} ms" if n in times else "  not run  " for n in compiled}
    ratio = (
      f"{row['linear_over_dense']:.2f}x dense" if "linear_over_dense" in row else "dense not run"
    )
    print(
      f"C={labels:>9,}: linear {cell['linear']} {peaks['linear'] / 2**20:9.1f} MiB | "
      f"dense {cell['dense']} {peaks['dense'] / 2**20:9.1f} MiB | {ratio} | "
      f"exact loss +{row['exact_loss_cost']:.0%} over skip-loss",
      flush=True,
    )
  budget = int(args.budget_gib * GIB)
  largest = {}
  if not args.no_search:
    largest = {n: largest_fitting(n, budget, args, 1 << 14, block) for n in ("dense", "linear")}
  for name, c in largest.items():
    print(f"largest C whose {name} value_and_grad fits {args.budget_gib:g} GiB: {c:,}")
  tag = args.tag or ("quick" if args.quick else backend)
  RESULTS.mkdir(exist_ok=True)
  out = RESULTS / f"linear-{tag}.json"
  meta = {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "jax": jax.__version__,
    "machine": platform.platform(),
    "devices": [str(d) for d in jax.devices()],
    "batch": args.batch,
    "dim": args.dim,
    "k": args.k,
    "dtype": str(args.dtype),
    "block": block,
  }
  out.write_text(json.dumps({"meta": meta, "rows": rows, "largest_fitting": largest}, indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
