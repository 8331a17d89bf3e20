"""bce_jax on 8 devices: a sharded batch, and the metric combined with psum.

On a CPU-only machine JAX is asked for 8 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set below unless
XLA_FLAGS already asks for a device count); on a machine with accelerators
the mesh uses the first 8 real devices. Everything runs on JAX's own SPMD
partitioner: ``NamedSharding`` for jit, ``jax.shard_map`` for per-shard code.
It checks that

1. the jitted loss on sharded inputs equals the single-device value;
2. a metric state updated on each shard and summed with ``jax.lax.psum``
   equals ``merge`` of the per-shard states, ``reduce`` of the states
   stacked on a leading axis, and one update over all data.

Run::

  python examples/sharded_eval.py
  python examples/sharded_eval.py --fast
"""

from __future__ import annotations

import argparse
import os

# JAX reads XLA_FLAGS when its CPU backend starts, so the flag is set before
# jax is imported; a device count already given by the caller is kept.
_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  flag = f"--xla_force_host_platform_device_count={_DEVICES}"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bce_jax


def relative(a, b) -> float:
  return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1 << 20, help="samples (a multiple of 8)")
  parser.add_argument("--features", type=int, default=8, help="predictions per sample")
  parser.add_argument("--fast", action="store_true", help="a small batch, for tests")
  args = parser.parse_args()
  batch = 8 * 1024 if args.fast else args.batch

  if len(jax.devices()) < _DEVICES:
    raise SystemExit(f"needs {_DEVICES} devices, found {jax.devices()}; check XLA_FLAGS")
  mesh = jax.make_mesh((_DEVICES,), ("data",), devices=jax.devices()[:_DEVICES])
  print(f"mesh: {_DEVICES} x {jax.devices()[0].platform} devices, axis 'data'")

  # Synthetic labels and logits, with per-sample weights; the batch axis is
  # split over the mesh, the feature axis kept whole on each device.
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, (batch, args.features)).astype(np.float32)
  logits = rng.normal(0.0, 3.0, (batch, args.features)).astype(np.float32)
  weights = rng.uniform(0.0, 2.0, batch).astype(np.float32)
  rows = NamedSharding(mesh, P("data"))  # shard axis 0 over 'data'
  y_s, logits_s, weights_s = (jax.device_put(a, rows) for a in (y, logits, weights))
  print(f"batch {y.shape}, each device holds {y_s.addressable_shards[0].data.shape}")

  # 1. The jitted loss: the partitioner splits the sum and adds one
  #    all-reduce; no change to bce_jax or to the calling code.
  loss = bce_jax.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)
  loss_step = jax.jit(lambda y, x, w: loss(y, x, sample_weight=w))
  single_device = jax.devices()[0]
  one = loss_step(*(jax.device_put(a, single_device) for a in (y, logits, weights)))
  sharded = loss_step(y_s, logits_s, weights_s)
  loss_diff = relative(sharded, one)
  print(
    f"loss   single device {float(one):.8f}   sharded {float(sharded):.8f}   "
    f"relative diff {loss_diff:.2e}"
  )

  # 2. The metric: each device updates a state with its own rows.
  metric = bce_jax.BinaryCrossentropyMetric(from_logits=True)

  def local_state(y, x, w) -> bce_jax.MetricState:
    return metric.update(metric.init(), y, x, sample_weight=w)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P())
  def psum_state(y, x, w):
    # The state is a pytree of one array of four sums; psum adds each sum
    # over the mesh, which is what merge does up to float32 rounding.
    return jax.lax.psum(local_state(y, x, w), "data")

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data"))
  def stacked_states(y, x, w):
    # Each device's state, given a leading axis of 1 so that the outputs
    # concatenate to one state per device.
    return jax.tree.map(lambda leaf: leaf[None], local_state(y, x, w))

  summed = metric.result(psum_state(y_s, logits_s, weights_s))
  # The eight states, stacked on a leading axis, folded into one by reduce,
  # as a job that collects per-worker states would; and merged one by one.
  stacked = stacked_states(y_s, logits_s, weights_s)
  reduced = metric.result(metric.reduce(stacked))
  host = jax.device_get(stacked)
  per_device = [jax.tree.map(lambda leaf, i=i: leaf[i], host) for i in range(_DEVICES)]
  merged = metric.result(metric.merge(*per_device))
  one_pass = metric.result(metric.update(metric.init(), y, logits, sample_weight=weights))
  psum_vs_merge, merge_vs_one = relative(summed, merged), relative(merged, one_pass)
  reduce_vs_merge = relative(reduced, merged)
  print(
    f"metric psum {float(summed):.8f}   reduce {float(reduced):.8f}   "
    f"merge {float(merged):.8f}   one pass {float(one_pass):.8f}"
  )
  print(
    f"relative diff: psum vs merge {psum_vs_merge:.2e}, reduce vs merge "
    f"{reduce_vs_merge:.2e}, merge vs one pass {merge_vs_one:.2e}"
  )

  assert loss_diff < 1e-6, loss_diff
  assert psum_vs_merge < 1e-6 and merge_vs_one < 1e-6, (psum_vs_merge, merge_vs_one)
  assert reduce_vs_merge == 0.0, reduce_vs_merge
  print(
    f"RESULT loss_rel_diff={loss_diff:.3e} psum_vs_merge={psum_vs_merge:.3e} "
    f"merge_vs_one_pass={merge_vs_one:.3e} metric={float(summed):.8f}"
  )


if __name__ == "__main__":
  main()
