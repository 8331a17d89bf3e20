"""Properties that hold for every input, checked with hypothesis, under ``jax.jit``."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import bce_jax
from tests import _reference as ref

F32_EPS = float(np.finfo(np.float32).eps)
F32_MAX = float(np.finfo(np.float32).max)

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)
# Labels below float32's smallest normal are left out: XLA on CPU flushes
# subnormals to 0, so a label of 6e-39 is computed as 0 (the reference flushes
# its results the same way, but not its inputs).
labels_elem = st.floats(0.0, 1.0, width=32).filter(lambda v: v == 0 or v >= 2.0**-126)
logits_elem = st.one_of(
  st.floats(-50.0, 50.0, width=32),
  st.floats(-F32_MAX, F32_MAX, width=32),
  st.sampled_from([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 1e4, -1e4]),
)
probs_elem = st.one_of(st.floats(0.0, 1.0, width=32), st.sampled_from([0.0, 1e-8, 1.0, 0.9999999]))
smoothing = st.sampled_from([0.0, 0.1, 0.5, 1.0])


@st.composite
def logit_cases(draw, elements=logits_elem):
  shape = draw(shapes)
  y = draw(hnp.arrays(np.float32, shape, elements=labels_elem))
  x = draw(hnp.arrays(np.float32, shape, elements=elements))
  return y, x


# jitted once per shape and flag, reused across examples
_elementwise = jax.jit(bce_jax.binary_crossentropy_elementwise, static_argnums=(2, 3))


@jax.jit
def _grad_logits(y, x):
  return jax.grad(lambda x: bce_jax.binary_crossentropy_elementwise(y, x, True).sum())(x)


@jax.jit
def _grad_probs(y, p):
  return jax.grad(lambda p: bce_jax.binary_crossentropy_elementwise(y, p).sum())(p)


@jax.jit(static_argnums=(2,))
def _shapes_case(y, x, from_logits):
  """The per-sample losses, their mean over every non-batch axis, the element losses."""
  axes = tuple(range(1, y.ndim))
  return (
    bce_jax.binary_crossentropy(y, x, from_logits=from_logits),
    bce_jax.binary_crossentropy(y, x, from_logits, axis=axes),
    bce_jax.binary_crossentropy_elementwise(y, x, from_logits),
  )


@jax.jit
def _loss_and_per_sample(y, x):
  per_sample = bce_jax.binary_crossentropy(y, x, from_logits=True)
  return bce_jax.BinaryCrossentropy(from_logits=True)(y, x), jnp.mean(per_sample)


@given(logit_cases(), smoothing)
def test_logits_loss_nonnegative_finite_and_accurate(case, s):
  y, x = case
  loss = np.asarray(_elementwise(y, x, True, s))
  assert np.all(np.isfinite(loss)) and np.all(loss >= 0)
  want = ref.elementwise(y, x, True, s)
  # Both terms are non-negative: no cancellation, a relative bound holds.
  np.testing.assert_allclose(loss, want, rtol=8 * F32_EPS, atol=2.0**-120)


@given(logit_cases(elements=probs_elem), smoothing)
def test_probability_loss_nonnegative_and_finite(case, s):
  y, p = case
  loss = np.asarray(_elementwise(y, p, False, s))
  assert np.all(np.isfinite(loss)) and np.all(loss >= 0)


@given(logit_cases(), smoothing)
def test_symmetry_of_labels_and_logits(case, s):
  y, x = case
  flipped = np.asarray(_elementwise(1 - y, -x, True, s), np.float64)
  loss = np.asarray(_elementwise(y, x, True, s), np.float64)
  # 1 - y and the smoothed labels are rounded to float32: an absolute label
  # error of up to ~eps, which d loss / d y = -x turns into |x| * eps.
  bound = 8 * F32_EPS * np.abs(loss) + 2 * F32_EPS * (np.abs(x.astype(np.float64)) + 1)
  assert np.all(np.abs(loss - flipped) <= bound), np.max(np.abs(loss - flipped) / bound)


@given(logit_cases(elements=st.floats(-30.0, 30.0, width=32)))
def test_gradient_is_sigmoid_minus_label(case):
  y, x = case
  grad = _grad_logits(y, x)
  want = ref.sigmoid(x) - y.astype(np.float64)
  # |sigmoid(x) - y| can be tiny by cancellation; the error is measured on
  # the scale of its terms.
  np.testing.assert_allclose(np.asarray(grad), want, rtol=0, atol=4 * F32_EPS)


@given(logit_cases(elements=probs_elem))
def test_probability_gradient_has_the_right_sign(case):
  y, p = case
  grad = np.asarray(_grad_probs(y, p))
  assert np.all(np.isfinite(grad))
  pc = np.clip(p.astype(np.float64), 1e-7, float(np.float32(1 - 1e-7)))
  # The loss falls as p moves toward y: the derivative has the sign of p - y.
  strict = np.abs(pc - y) > 1e-3
  assert np.all(np.sign(grad[strict]) == np.sign((pc - y)[strict]))


@given(
  hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4),
  st.sampled_from([jnp.float16, jnp.bfloat16, jnp.float32]),
  st.booleans(),
)
def test_shapes_and_dtypes(shape, dtype, from_logits):
  rng = np.random.default_rng(len(shape))
  y = jnp.asarray(rng.integers(0, 2, shape), dtype)
  x = jnp.asarray(rng.uniform(0.0, 1.0, shape), dtype)
  out, whole, elements = _shapes_case(y, x, from_logits)
  assert out.shape == shape[:-1]
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  # Each axis subset averages the same element losses.
  np.testing.assert_allclose(
    np.asarray(whole),
    np.asarray(elements).reshape(shape[0], -1).mean(1),
    rtol=8 * F32_EPS,
    atol=1e-7,
  )


@given(logit_cases(elements=st.floats(-20.0, 20.0, width=32)))
def test_loss_object_mean_equals_mean_of_function(case):
  y, x = case
  if y.ndim < 2:
    y, x = y[:, None], x[:, None]
  loss, mean_per_sample = _loss_and_per_sample(y, x)
  # Two float32 sums of the same n terms in different orders: each is within
  # (n - 1) eps of the exact sum (relative to the sum of |terms|, which equals
  # the sum here: losses are >= 0).
  rtol = max(4, y.size - 1) * F32_EPS
  np.testing.assert_allclose(float(loss), float(mean_per_sample), rtol=rtol, atol=1e-7)
