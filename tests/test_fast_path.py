"""The fast path of the kernel: inputs large enough to take it, against float64.

Inputs of fewer than ``_kernel._FAST_MIN_SIZE`` elements take the safe path
alone, so most tests (small shapes) exercise that one. Here every shape has
at least that many elements: the fast sums (flattened, grouped, wide rows),
their nan fallback, and the derivative on every layout and path, checked
against the float64 reference with float32 tolerances.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import bce_jax
from bce_jax import _kernel
from tests import _reference as ref

MIN = _kernel._FAST_MIN_SIZE
SHAPES = {
  "flat": (MIN,),
  "column": (MIN, 1),
  "narrow": (MIN // 8, 8),
  "odd_rows": (MIN // 8 + 3, 8),  # no divisor of the rows groups them
  "wide": (MIN // 128, 128),
  "sequence": (MIN // 64, 8, 8),
}
REDUCTIONS = ("sum_over_batch_size", "mean_with_sample_weight", "none")  # "sum" shares "total"
RTOL = 2e-5  # float32 sums of ~1e4 terms in another order


def _data(shape, seed=0, probs=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 4, shape).astype(np.float32)
  y = (rng.random(shape) < 0.4).astype(np.float32)
  if probs:
    x = np.asarray(ref.sigmoid(x), np.float32)
  per_sample = shape[:-1] if len(shape) > 1 else ()
  w = rng.random(per_sample).astype(np.float32) if per_sample else np.float32(0.7)
  m = rng.random(per_sample) < 0.8 if per_sample else np.asarray(True)
  return x, y, w, m


def _ref_loss(y, x, reduction, w=None, m=None, from_logits=True):
  per_sample = ref.mean_over(ref.elementwise(y, x, from_logits=from_logits), -1)
  return ref.reduce(per_sample, reduction, w, m)


def _ref_grad(y, x, reduction, w=None, m=None):
  """d loss / d logits in float64 by the chain rule through the reduction."""
  shape = x.shape
  per_sample = shape[:-1]
  weight = np.ones(per_sample) if w is None else ref.expand_weight(w, per_sample)
  keep = np.ones(per_sample, bool) if m is None else ref.expand_weight(m, per_sample)
  coef = np.where(keep, weight, 0.0) / shape[-1]
  if reduction == "sum_over_batch_size":
    coef = coef / max(keep.sum(), 1)
  elif reduction == "mean_with_sample_weight":
    coef = coef / np.where(keep, weight, 0.0).sum()
  grad = ref.grad_logits(y, x) * coef[..., None]
  return np.where(keep[..., None], grad, 0.0)


class FastPathTest(parameterized.TestCase):
  @parameterized.product(layout=list(SHAPES), reduction=REDUCTIONS, weighting=["w", "m", "wm"])
  def test_value_and_grad_against_float64(self, layout, reduction, weighting):
    shape = SHAPES[layout]
    if len(shape) == 1:
      self.skipTest("rank-1 inputs have a scalar per-sample loss")
    x, y, w, m = _data(shape)
    w = w if "w" in weighting else None
    m = m if "m" in weighting else None
    loss = bce_jax.BinaryCrossentropy(from_logits=True, reduction=reduction)

    def f(x):
      out = loss(y, x, sample_weight=w, mask=m)
      return jnp.sum(out), out

    (_, value), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(x))
    want_grad = _ref_grad(y, x, reduction if reduction != "none" else "sum", w, m)
    np.testing.assert_allclose(value, _ref_loss(y, x, reduction, w, m), rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)

  @parameterized.named_parameters(*[(k, v) for k, v in SHAPES.items()])
  def test_unweighted_forward_and_metric(self, shape):
    x, y, _, _ = _data(shape)
    want = ref.elementwise(y, x, from_logits=True).mean()
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    np.testing.assert_allclose(jax.jit(loss)(y, x), want, rtol=RTOL)
    metric = bce_jax.BinaryCrossentropyMetric(from_logits=True)
    state = jax.jit(metric.update)(metric.init(), y, x)
    np.testing.assert_allclose(metric.result(state), want, rtol=RTOL)

  @parameterized.named_parameters(*[(k, v) for k, v in SHAPES.items()])
  def test_probabilities(self, shape):
    x, y, _, _ = _data(shape, probs=True)
    x.reshape(-1)[:3] = [1.7, -0.5, 1.0]  # outside [0, 1] and at the clip
    want = ref.elementwise(y, x).mean()
    np.testing.assert_allclose(jax.jit(bce_jax.BinaryCrossentropy())(y, x), want, rtol=RTOL)

  @parameterized.named_parameters(*[(k, v) for k, v in SHAPES.items() if len(v) > 1])
  def test_nan_padding_takes_the_fallback(self, shape):
    x, y, w, m = _data(shape)
    m[0] = False
    x[0], y[0] = np.nan, np.nan  # padding rows full of nan
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    value, grad = jax.jit(jax.value_and_grad(lambda x: loss(y, x, sample_weight=w, mask=m)))(x)
    clean_x, clean_y = np.where(np.isnan(x), 0, x), np.where(np.isnan(y), 0, y)
    np.testing.assert_allclose(
      value, _ref_loss(clean_y, clean_x, "sum_over_batch_size", w, m), rtol=RTOL
    )
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_array_equal(grad[0], 0.0)

  @parameterized.named_parameters(*[(k, v) for k, v in SHAPES.items()])
  def test_infinite_logits_take_the_fallback(self, shape):
    x, y, _, _ = _data(shape)
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    flat_x[:2], flat_y[:2] = [np.inf, -np.inf], [1.0, 0.0]  # matched: loss 0
    want = ref.elementwise(y, np.clip(x, -1e4, 1e4), from_logits=True).mean()
    got = jax.jit(bce_jax.BinaryCrossentropy(from_logits=True))(y, x)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    flat_y[0] = 0.0  # now a mismatch: the loss is +inf, exactly
    self.assertEqual(float(jax.jit(bce_jax.BinaryCrossentropy(from_logits=True))(y, x)), np.inf)

  @parameterized.named_parameters(*[(k, v) for k, v in SHAPES.items()])
  def test_bfloat16_is_computed_in_float32(self, shape):
    x, y, _, _ = _data(shape)
    xb = jnp.asarray(x, jnp.bfloat16)
    want = ref.elementwise(y, np.asarray(xb, np.float32), from_logits=True).mean()
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    got = jax.jit(loss)(jnp.asarray(y, jnp.bfloat16), xb)
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=RTOL)

  def test_large_inputs_compile_the_fallback_small_ones_do_not(self):
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    for n, has_cond in ((MIN, True), (MIN // 2, False)):
      x = jnp.zeros((n // 8, 8))
      text = jax.jit(loss).lower(x, x).compile().as_text()
      self.assertEqual("conditional(" in text, has_cond, msg=n)


if __name__ == "__main__":
  absltest.main()
