"""The eager-call table: small batches called from Python without ``jax.jit``.

This is the cost a notebook user pays per call, dominated by Python and
dispatch. The baseline is a hand-written BCE formula under ``jax.jit``
called from Python: one dispatch of one compiled function, the least an
eager call of a loss can cost. ``jit(x.sum())`` shows bare dispatch.
Every other row calls bce_jax's public API as is (or a peer, for context).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import peers
import timing

import bce_jax

SHAPES = ((256,), (32, 8))
BASELINE = "jit(BCE formula)"
CALLS_PER_SAMPLE = 200


@jax.jit
def _hand_bce(y, x):
  """The mean BCE over the last axis, from logits, as a user writes it."""
  return jnp.mean(jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x))), axis=-1)


def calls(shape: tuple[int, ...], seed: int = 0) -> dict[str, Callable[[], object]]:
  """Name -> a callable making one eager call on a `shape` batch and waiting for it.

  Rows whose name starts with ``peer:`` are context, not bce_jax.
  """
  rng = np.random.default_rng(seed)
  x = jnp.asarray(3.0 * rng.standard_normal(shape), jnp.float32)
  y = jnp.asarray(rng.random(shape) < 0.5, jnp.float32)
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
  optax, keras = peers.get("optax"), peers.get("keras")
  if optax is not None:
    out["peer: optax, mean(-1)"] = timing.blocking(
      lambda: optax.sigmoid_binary_cross_entropy(x, y).mean(-1)
    )
  if keras is not None:
    keras_loss = keras.losses.BinaryCrossentropy(from_logits=True)
    out["peer: keras loss object"] = timing.blocking(keras_loss, y, x)
  return out


def run(repeats: int, on_shape: Callable[[dict], None] | None = None) -> list[dict]:
  """Times every call on every shape.

  Args:
    repeats: samples per call (each of `CALLS_PER_SAMPLE` calls).
    on_shape: called with each shape's record as soon as it is measured.

  Returns:
    One record per shape: ``shape``, ``calls_per_sample`` and ``rows``
    (``call``, ``us_per_call``, ``iqr_us``, ``ratio_to_baseline``, ``peer``).
  """
  records = []
  for shape in SHAPES:
    timings = timing.time_interleaved(calls(shape), repeats, warmup=3, inner=CALLS_PER_SAMPLE)
    base = timings[BASELINE].median
    rows = [
      {
        "call": name,
        "us_per_call": t.median * 1e6,
        "iqr_us": [q * 1e6 for q in t.iqr],
        "ratio_to_baseline": t.median / base,
        "peer": name.startswith("peer:"),
      }
      for name, t in timings.items()
    ]
    record = {"shape": list(shape), "calls_per_sample": CALLS_PER_SAMPLE, "rows": rows}
    records.append(record)
    if on_shape is not None:
      on_shape(record)
  return records
