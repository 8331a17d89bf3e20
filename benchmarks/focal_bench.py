"""Focal loss timing: bce_jax against optax.sigmoid_focal_loss and Keras 3's BinaryFocalCrossentropy.

N float32 elements, labels in {0, 1}, logits ~ N(0, 3^2) (probabilities: their sigmoid); the mean
loss forward and `value_and_grad` w.r.t. the predictions, every implementation jitted, interleaved
(with --warm, each timed call right after an untimed call of the same function). Prints the median
wall time and the minimum process CPU time over --repeats, and each peer's time over bce_jax's.

  python benchmarks/focal_bench.py [--gamma 0.5] [--probs] [--warm] [--n 1e7] [--repeats 9]
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import keras
import numpy as np
import optax

import bce_jax


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=float, default=1e7)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--gamma", type=float, default=2.0)
  parser.add_argument("--probs", action="store_true", help="probabilities instead of logits")
  parser.add_argument("--warm", action="store_true", help="an untimed call before each timed one")
  args = parser.parse_args()
  n, gamma, logits = int(args.n), args.gamma, not args.probs
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.normal(0, 3, n).astype(np.float32))
  y = jax.numpy.asarray(rng.integers(0, 2, n).astype(np.float32))
  if not logits:
    x = jax.nn.sigmoid(x)
  ours = bce_jax.BinaryFocalCrossentropy(gamma=gamma, from_logits=logits)
  theirs = keras.losses.BinaryFocalCrossentropy(gamma=gamma, from_logits=logits)
  fns = {"bce_jax": lambda x, y: ours(y, x), "keras": lambda x, y: theirs(y, x)}
  if logits:
    fns["optax"] = lambda x, y: optax.sigmoid_focal_loss(x, y, gamma=gamma).mean()
  cases = {}
  for name, f in fns.items():
    cases[name, "forward"] = jax.jit(f)
    cases[name, "value_and_grad"] = jax.jit(jax.value_and_grad(f))
  for f in cases.values():
    for _ in range(2):
      jax.block_until_ready(f(x, y))
  wall = {k: [] for k in cases}
  cpu = {k: [] for k in cases}
  for _ in range(args.repeats):
    for k, f in cases.items():
      if args.warm:
        jax.block_until_ready(f(x, y))
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(f(x, y))
      wall[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  what = "logits" if logits else "probabilities"
  print(
    f"N={n:.0e} gamma={gamma} {what}{' warm' if args.warm else ''}; jax {jax.__version__}, "
    f"optax {optax.__version__}, keras {keras.__version__}; load {os.getloadavg()[0]:.1f}"
  )
  for mode in ("forward", "value_and_grad"):
    for stat, times, reduce in (("wall median", wall, np.median), ("cpu min", cpu, np.min)):
      base = reduce(times["bce_jax", mode])
      cells = []
      for name in fns:
        t = reduce(times[name, mode])
        cells.append(
          f"{name} {t * 1e3:7.1f} ms" + ("" if name == "bce_jax" else f" ({t / base:4.1f}x)")
        )
      print(f"{mode:15s} {stat:12s} " + "  ".join(cells))


if __name__ == "__main__":
  main()
