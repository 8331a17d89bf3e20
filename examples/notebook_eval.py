"""Evaluate a model over a whole data set in one jitted ``lax.scan``.

The pattern for a notebook cell: cut the data into fixed-size batches (the
last one padded and masked), and carry a ``BinaryCrossentropyMetric`` state
through ``jax.lax.scan``, so the whole pass compiles to one loop on the
device. The result is compared with a one-shot computation over all the data
and with a float64 NumPy reference. Run::

  python examples/notebook_eval.py
  python examples/notebook_eval.py --fast
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import bce_jax

metric = bce_jax.BinaryCrossentropyMetric(from_logits=True)


def predict(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """A logistic-regression "model": one logit per sample, shape [batch, 1]."""
  return x @ params["w"] + params["b"]


def to_batches(array: np.ndarray, batch_size: int) -> np.ndarray:
  """[n, ...] -> [num_batches, batch_size, ...], zero-padded at the end."""
  num_batches = -(-len(array) // batch_size)
  pad = num_batches * batch_size - len(array)
  padded = np.pad(array, [(0, pad)] + [(0, 0)] * (array.ndim - 1))
  return padded.reshape((num_batches, batch_size) + array.shape[1:])


@jax.jit
def evaluate(params, x_batches, y_batches, mask_batches) -> bce_jax.MetricState:
  """One pass over the batches; the metric state is the scan carry."""

  def step(state, batch):
    x, y, mask = batch
    return metric.update(state, y, predict(params, x), mask=mask), None

  state, _ = jax.lax.scan(step, metric.init(), (x_batches, y_batches, mask_batches))
  return state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", type=int, default=1_000_037)
  parser.add_argument("--batch-size", type=int, default=4096)
  parser.add_argument("--fast", action="store_true", help="a small data set, for tests")
  args = parser.parse_args()
  samples = 10_037 if args.fast else args.samples

  # A synthetic data set: labels drawn from a "true" logistic model, and a
  # slightly different model to evaluate.
  rng = np.random.default_rng(0)
  features = 16
  x = rng.normal(size=(samples, features)).astype(np.float32)
  true_w = rng.normal(size=(features, 1)).astype(np.float32)
  y = (rng.uniform(size=samples) < 1 / (1 + np.exp(-(x @ true_w)[:, 0]))).astype(np.float32)
  params = {
    "w": jnp.asarray(true_w + 0.3 * rng.normal(size=true_w.shape).astype(np.float32)),
    "b": jnp.zeros((1,), jnp.float32),
  }

  mask = np.ones(samples, bool)
  batches = [to_batches(a, args.batch_size) for a in (x, y, mask)]
  print(
    f"{samples} samples in {batches[0].shape[0]} batches of {args.batch_size} "
    f"(last one padded with {batches[0].shape[0] * args.batch_size - samples} masked rows)"
  )

  state = evaluate(params, *batches)
  streamed = float(metric.result(state))

  # One shot: every sample at once, through the metric and through the loss.
  logits = predict(params, x)
  one_shot_metric = float(metric.result(metric.update(metric.init(), y, logits)))
  one_shot_loss = float(bce_jax.BinaryCrossentropy(from_logits=True)(y, logits))
  # float64 reference: softplus(x) - x * y, averaged.
  z = np.asarray(logits, np.float64)[:, 0]
  reference = float(np.mean(np.logaddexp(0.0, z) - z * y))

  def rel(a: float) -> float:
    return abs(a - reference) / reference

  print(f"scan over batches   {streamed:.8f}   count {float(state.count + state.count_err):.0f}")
  print(f"one-shot metric     {one_shot_metric:.8f}")
  print(f"one-shot loss       {one_shot_loss:.8f}")
  print(f"float64 reference   {reference:.8f}")
  scan_vs_one_shot = abs(streamed - one_shot_metric) / one_shot_metric
  print(
    f"relative diff: scan vs one-shot {scan_vs_one_shot:.2e}, scan vs float64 "
    f"{rel(streamed):.2e}, one-shot vs float64 {rel(one_shot_metric):.2e}"
  )
  assert scan_vs_one_shot < 1e-5 and rel(streamed) < 1e-5, (scan_vs_one_shot, rel(streamed))
  print(
    f"RESULT scan={streamed:.8f} one_shot={one_shot_metric:.8f} reference={reference:.8f} "
    f"scan_rel_err={rel(streamed):.3e}"
  )


if __name__ == "__main__":
  main()
