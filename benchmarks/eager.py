"""The eager-call table: small batches called from Python without ``jax.jit``.

This is the cost a notebook user pays per call, dominated by Python and
dispatch. The baseline is a hand-written BCE formula under ``jax.jit``
called from Python: one dispatch of one compiled function, the least an
eager call of a loss can cost. ``jit(x.sum())`` shows bare dispatch.
Every other row calls bce_jax's public API as is (or a peer, for context).

Besides float32 inputs, each shape has variant blocks (bfloat16 inputs,
``[B]`` sample weights, a ``[B]`` mask), each against its own baseline: the
same hand-written formula, jitted, on the same inputs (weighted or masked as
the loss weights or masks them). A row's ratio is to the baseline of its
block.

Run alone for the table, best of N interleaved samples in a new random order
each round (the figure to quote on a shared machine, where other work only
ever adds time)::

  PYTHONPATH=. python benchmarks/eager.py --repeats 200 --inner 20 --stat best
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import peers
import timing

import bce_jax

SHAPES = ((256,), (32, 8), (4, 8, 8))
BASELINE = "jit(BCE formula)"
CALLS_PER_SAMPLE = 200
# Variant blocks per shape: inputs in bfloat16, `[B]` sample weights, a `[B]` mask.
VARIANTS = ("bfloat16", "weights [B]", "mask [B]")


@jax.jit
def _hand_bce(y, x):
  """The mean BCE over the last axis, from logits, as a user writes it."""
  return jnp.mean(jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x))), axis=-1)


def _per_sample(y, x):
  x = x.astype(jnp.float32)
  return jnp.mean(jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x))), axis=-1)


def _rows_of(w, losses):
  """`[B]` weights or mask against `[B, ...]` per-sample losses."""
  return w.reshape(w.shape + (1,) * (losses.ndim - 1))


@jax.jit
def _hand_weighted(y, x, w):
  """Keras's "sum_over_batch_size" of `[B]`-weighted per-sample losses."""
  losses = _per_sample(y, x)
  return jnp.mean(losses * _rows_of(w, losses))


@jax.jit
def _hand_masked(y, x, m):
  """The mean of the per-sample losses the `[B]` mask keeps."""
  losses = _per_sample(y, x)
  keep = jnp.broadcast_to(_rows_of(m, losses), losses.shape)
  return jnp.sum(jnp.where(keep, losses, 0)) / jnp.sum(keep)


def _inputs(shape: tuple[int, ...], seed: int, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(3.0 * rng.standard_normal(shape), dtype)
  y = jnp.asarray(rng.random(shape) < 0.5, dtype)
  return rng, y, x


def calls(
  shape: tuple[int, ...], seed: int = 0, with_peers: bool = True
) -> dict[str, Callable[[], object]]:
  """Name -> a callable making one eager call on a `shape` batch and waiting for it.

  Rows whose name starts with ``peer:`` are context, not bce_jax.
  """
  _, y, x = _inputs(shape, seed)
  loss = bce_jax.BinaryCrossentropy(from_logits=True)
  metric = bce_jax.BinaryCrossentropyMetric(from_logits=True)
  state = jax.block_until_ready(metric.update(metric.init(), y, x))
  bare = jax.jit(lambda y, x: x.sum())
  out = {
    BASELINE: timing.blocking(_hand_bce, y, x),
    "jit(x.sum())": timing.blocking(bare, y, x),
    "binary_crossentropy": timing.blocking(
      lambda: bce_jax.binary_crossentropy(y, x, from_logits=True)
    ),
    "binary_crossentropy_elementwise": timing.blocking(
      lambda: bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True)
    ),
    "BinaryCrossentropy()(y, x)": timing.blocking(loss, y, x),
    "metric.update": timing.blocking(metric.update, state, y, x),
    "metric.merge": timing.blocking(metric.merge, state, state),
    "metric.result": timing.blocking(metric.result, state),
  }
  if hasattr(bce_jax, "binary_focal_crossentropy"):
    out["binary_focal_crossentropy"] = timing.blocking(
      lambda: bce_jax.binary_focal_crossentropy(y, x, from_logits=True)
    )
  if hasattr(bce_jax, "BinaryFocalCrossentropy"):
    focal = bce_jax.BinaryFocalCrossentropy(from_logits=True)
    out["BinaryFocalCrossentropy()(y, x)"] = timing.blocking(focal, y, x)
  optax, keras = (peers.get("optax"), peers.get("keras")) if with_peers else (None, None)
  if optax is not None:
    out["peer: optax, mean(-1)"] = timing.blocking(
      lambda: optax.sigmoid_binary_cross_entropy(x, y).mean(-1)
    )
  if keras is not None:
    keras_loss = keras.losses.BinaryCrossentropy(from_logits=True)
    out["peer: keras loss object"] = timing.blocking(keras_loss, y, x)
  return out


def variant_calls(
  shape: tuple[int, ...], variant: str, seed: int = 0
) -> tuple[str, dict[str, Callable[[], object]]] | None:
  """The block of one variant: its baseline's name and its calls (None where it does not apply).

  `[B]` weights and masks need per-sample losses with a batch axis (rank >= 2).
  """
  if variant != "bfloat16" and len(shape) < 2:
    return None
  rng, y, x = _inputs(shape, seed, jnp.bfloat16 if variant == "bfloat16" else jnp.float32)
  loss = bce_jax.BinaryCrossentropy(from_logits=True)
  focal = bce_jax.BinaryFocalCrossentropy(from_logits=True)
  metric = bce_jax.BinaryCrossentropyMetric(from_logits=True)
  if variant == "bfloat16":
    kw: dict = {}
    base = (f"{BASELINE}, bfloat16", timing.blocking(_hand_bce, y, x))
  elif variant == "weights [B]":
    kw = {"sample_weight": jnp.asarray(rng.random(shape[0]), jnp.float32)}
    base = (f"{BASELINE}, {variant}", timing.blocking(_hand_weighted, y, x, kw["sample_weight"]))
  else:
    kw = {"mask": jnp.asarray(np.arange(shape[0]) % 4 != 3)}
    base = (f"{BASELINE}, {variant}", timing.blocking(_hand_masked, y, x, kw["mask"]))
  state = jax.block_until_ready(metric.update(metric.init(), y, x, **kw))
  out = {
    base[0]: base[1],
    f"BinaryCrossentropy()(y, x), {variant}": timing.blocking(lambda: loss(y, x, **kw)),
    f"BinaryFocalCrossentropy()(y, x), {variant}": timing.blocking(lambda: focal(y, x, **kw)),
    f"metric.update, {variant}": timing.blocking(lambda: metric.update(state, y, x, **kw)),
  }
  if variant == "bfloat16":
    out[f"binary_crossentropy, {variant}"] = timing.blocking(
      lambda: bce_jax.binary_crossentropy(y, x, from_logits=True)
    )
  return base[0], out


def _time_shuffled(calls: dict, repeats: int, inner: int, seed: int = 0) -> dict:
  """As :func:`timing.time_interleaved`, with the calls in a new random order each repeat.

  In a fixed order a call always follows the same one, and on this 2-core
  machine some calls (the metric's, with four outputs) slowed the call after
  them; a shuffled order spreads that over every call.
  """
  for call in calls.values():
    for _ in range(3):
      call()
  samples: dict[str, list[float]] = {name: [] for name in calls}
  order = list(calls)
  rng = np.random.default_rng(seed)
  gc.collect()
  gc.disable()
  try:
    for _ in range(repeats):
      rng.shuffle(order)
      for name in order:
        call = calls[name]
        start = time.perf_counter()
        for _ in range(inner):
          call()
        samples[name].append((time.perf_counter() - start) / inner)
  finally:
    gc.enable()
  return {name: timing.Timing(samples[name], inner) for name in calls}


def _statistic(t: timing.Timing, stat: str) -> float:
  return min(t.samples) if stat == "best" else t.median


def run(
  repeats: int,
  on_shape: Callable[[dict], None] | None = None,
  stat: str = "median",
  inner: int = CALLS_PER_SAMPLE,
  with_peers: bool = True,
  shuffle: bool = False,
) -> list[dict]:
  """Times every call on every shape, each shape's blocks interleaved in one loop.

  Args:
    repeats: samples per call (each of `CALLS_PER_SAMPLE` calls).
    on_shape: called with each shape's record as soon as it is measured.
    stat: ``"median"`` or ``"best"`` (the fastest sample) of each call's samples.
    inner: calls per sample (short samples make the best one a quiet one).
    with_peers: whether to time optax and Keras too, in a loop of their own
      with the baseline: their op-by-op calls leave threads busy that the
      next rows would wait for.
    shuffle: time the calls in a new random order each repeat (see
      :func:`_time_shuffled`) rather than in the fixed order of
      :func:`timing.time_interleaved`.

  Returns:
    One record per shape: ``shape``, ``calls_per_sample``, ``stat`` and
    ``rows`` (``call``, ``us_per_call``, ``iqr_us``, ``ratio_to_baseline``,
    ``baseline``, ``peer``).
  """
  records = []
  for shape in SHAPES:
    ours = calls(shape, with_peers=with_peers)
    peer_loop = {name: call for name, call in ours.items() if name.startswith("peer:")}
    blocks = [(BASELINE, {name: c for name, c in ours.items() if name not in peer_loop})]
    blocks += [b for b in (variant_calls(shape, v) for v in VARIANTS) if b is not None]
    every = {name: call for _, block in blocks for name, call in block.items()}
    if shuffle:
      timings = _time_shuffled(every, repeats, inner)
    else:
      timings = timing.time_interleaved(every, repeats, warmup=3, inner=inner)
    peer_timings = {}
    if peer_loop:
      peer_loop = {BASELINE: ours[BASELINE], **peer_loop}
      peer_timings = timing.time_interleaved(peer_loop, repeats, warmup=3, inner=inner)
      blocks.append((BASELINE, peer_loop))
    rows = []
    for baseline, block in blocks:
      source = peer_timings if block is peer_loop else timings
      base = _statistic(source[baseline], stat)
      for name in block:
        if block is peer_loop and name == baseline:
          continue
        t = source[name]
        rows.append(
          {
            "call": name,
            "us_per_call": _statistic(t, stat) * 1e6,
            "iqr_us": [q * 1e6 for q in t.iqr],
            "ratio_to_baseline": _statistic(t, stat) / base,
            "baseline": baseline,
            "peer": name.startswith("peer:"),
          }
        )
    record = {"shape": list(shape), "calls_per_sample": inner, "stat": stat}
    record["rows"] = rows
    records.append(record)
    if on_shape is not None:
      on_shape(record)
  return records


def main(argv: list[str] | None = None) -> int:
  import report
  import targets

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=200, help="samples per call")
  parser.add_argument("--inner", type=int, default=20, help="calls per sample")
  parser.add_argument("--stat", choices=("median", "best"), default="best")
  parser.add_argument("--peers", action="store_true", help="time optax and Keras too")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, {jax.default_backend()}; {args.stat} of {args.repeats} samples")

  def show(record: dict) -> None:
    print(report.eager_table([record]), flush=True)

  records = run(args.repeats, show, args.stat, args.inner, args.peers, shuffle=True)
  print(targets.format_targets(targets.eager_targets(records)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
