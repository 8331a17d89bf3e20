"""Binary focal cross-entropy: Keras values, the float64 reference, calculus, the shared API."""

import functools
import json
import os

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import given
from hypothesis import strategies as st

import bce_jax
from tests import _reference as ref

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
F32_EPS = float(np.finfo(np.float32).eps)
TINY = 1e-30  # below this a float32 result may be flushed to 0 (XLA on CPU flushes denormals)
KERAS_TRUE = jnp.array([0.0, 1.0, 0.0, 0.0])
KERAS_LOGITS = jnp.array([-18.6, 0.51, 2.94, -12.8])

_mag = np.concatenate([[0.0], np.logspace(-3, 4, 57)])
GRID_X = np.concatenate([-_mag[::-1], _mag[1:]]).astype(np.float32)  # [-1e4, 1e4]
HARD = np.array([0.0, 1.0], np.float32)
SOFT = np.array([1e-6, 0.1, 0.3, 0.5, 0.8, 1 - 2**-20], np.float32)


def _grid(labels, xs=GRID_X):
  y, x = np.meshgrid(labels, xs, indexing="ij")
  return y.ravel(), x.ravel()


@functools.cache
def _elementwise(gamma, alpha=None, from_logits=True):
  """The jitted elementwise function; `alpha` None: no class balancing."""

  def f(y, x, label_smoothing=0.0):
    return bce_jax.binary_focal_crossentropy_elementwise(
      y,
      x,
      apply_class_balancing=alpha is not None,
      alpha=0.25 if alpha is None else alpha,
      gamma=gamma,
      from_logits=from_logits,
      label_smoothing=label_smoothing,
    )

  return jax.jit(f)


@functools.cache
def _calculus(gamma, alpha=None):
  """One jitted function: value, d/dx, d2/dx2 and d/dy of the logits loss, element by element."""

  def scalar(x, y, s):
    return bce_jax.binary_focal_crossentropy_elementwise(
      y[None],
      x[None],
      apply_class_balancing=alpha is not None,
      alpha=0.25 if alpha is None else alpha,
      gamma=gamma,
      from_logits=True,
      label_smoothing=s,
    )[0]

  def all_of(y, x, s):
    grads = (jax.grad(scalar), jax.hessian(scalar), jax.grad(scalar, argnums=1))
    return (jax.vmap(scalar, (0, 0, None))(x, y, s),) + tuple(
      jax.vmap(g, (0, 0, None))(x, y, s) for g in grads
    )

  return jax.jit(all_of)


def _assert_close(got, want, rtol, scale=None, atol=TINY):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want) if scale is None else scale
  assert np.all(np.isfinite(got)), got[~np.isfinite(got)]
  err = np.abs(got - want) - rtol * scale - atol
  i = int(np.argmax(err))
  assert err[i] <= 0, f"got {got[i]!r}, want {want[i]!r} (index {i}, rtol {rtol})"


class KerasValuesTest(chex.TestCase):
  """The values printed on the Keras 3 pages, hard-coded (keras.io/api/losses/
  probabilistic_losses/#binaryfocalcrossentropy-class and the docstring of
  keras.losses.binary_focal_crossentropy, keras 3.15 src/losses/losses.py)."""

  def test_loss_class_examples(self):
    def call(y, x, sample_weight=None, **options):
      return bce_jax.BinaryFocalCrossentropy(from_logits=True, **options)(y, x, sample_weight)

    y2, x2 = KERAS_TRUE.reshape(2, 2), KERAS_LOGITS.reshape(2, 2)
    w = jnp.array([0.8, 0.2])
    for want, (y, x, weight, options) in {
      "0.691": (KERAS_TRUE, KERAS_LOGITS, None, {"gamma": 2}),
      "0.510": (KERAS_TRUE, KERAS_LOGITS, None, {"gamma": 2, "apply_class_balancing": True}),
      "0.647": (y2, x2, None, {"gamma": 3}),
      "0.482": (y2, x2, None, {"gamma": 3, "apply_class_balancing": True}),
      "0.133": (y2, x2, w, {"gamma": 3}),
      "0.097": (y2, x2, w, {"gamma": 3, "apply_class_balancing": True}),
      "1.222": (y2, x2, None, {"gamma": 4, "reduction": "sum"}),
      "0.914": (y2, x2, None, {"gamma": 4, "reduction": "sum", "apply_class_balancing": True}),
    }.items():
      self.assertEqual(f"{call(y, x, weight, **options):.3f}", want, options)
    none = call(y2, x2, gamma=5, reduction=None)
    np.testing.assert_array_equal(np.round(np.asarray(none, np.float64), 4), [0.0017, 1.1561])
    none = call(y2, x2, gamma=5, reduction=None, apply_class_balancing=True)
    # The page prints 0.8670; Keras 3.15 itself computes 0.86707646 (the truth 0.8670769).
    np.testing.assert_allclose(np.asarray(none), [0.0004, 0.8670], atol=1e-4)

  def test_function_example(self):
    y, p = [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]]
    focal = np.asarray(bce_jax.binary_focal_crossentropy(y, p, gamma=2), np.float64)
    np.testing.assert_array_equal(np.round(focal, 3), [0.330, 0.206])
    # The page's "compare with binary_crossentropy" values are the BCE's: gamma = 0.
    bce = np.asarray(bce_jax.binary_focal_crossentropy(y, p, gamma=0), np.float64)
    np.testing.assert_array_equal(np.round(bce, 3), [0.916, 0.714])
    # Its ratios [0.360, 0.289] are those of the printed, rounded values.
    np.testing.assert_array_equal(
      np.round(np.round(focal, 3) / np.round(bce, 3), 3), [0.360, 0.289]
    )

  def test_against_keras_on_moderate_inputs(self):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
      import keras
    except ImportError:
      self.skipTest("keras is not installed")
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 1, (6, 5)).astype(np.float32)
    x = rng.normal(0, 3, (6, 5)).astype(np.float32)
    p = jax.nn.sigmoid(x)
    for gamma, balance, smoothing, from_logits in [
      (2.0, False, 0.0, True),
      (0.5, True, 0.1, True),
      (3.7, True, 0.0, False),
      (0.0, False, 0.2, False),
    ]:
      options = {
        "apply_class_balancing": balance,
        "alpha": 0.3,
        "gamma": gamma,
        "from_logits": from_logits,
        "label_smoothing": smoothing,
      }
      preds = x if from_logits else p
      want = keras.losses.binary_focal_crossentropy(y, preds, **options)
      got = bce_jax.binary_focal_crossentropy(y, preds, **options)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, err_msg=options)


class AgainstReferenceTest(parameterized.TestCase):
  @parameterized.parameters(*((g, None) for g in GAMMAS), (0.5, 0.25), (5.0, 0.25))
  def test_logits_value_and_derivatives(self, gamma, alpha):
    calculus = _calculus(gamma, alpha)
    for labels, smoothing in ((HARD, 0.0), (SOFT, 0.0), (HARD, 0.1)):
      y, x = _grid(labels)
      value, grad, hess, grad_y = (np.asarray(a) for a in calculus(y, x, smoothing))
      want = ref.focal_elementwise(y, x, True, smoothing, gamma, alpha)
      # Smoothed labels are rounded to float32 first; the reference smooths in float64.
      rtol = 8 * F32_EPS * (1 + gamma) if smoothing == 0 else 2e-6 * (1 + gamma)
      _assert_close(value, want, rtol)
      want_grad, want_hess = ref.focal_derivatives_logits(y, x, smoothing, gamma, alpha)
      scale = ref.focal_gradient_scale(y, x, smoothing, gamma, alpha)
      _assert_close(grad, want_grad, rtol, scale)
      self.assertTrue(np.all(np.isfinite(hess)))
      moderate = np.abs(x) <= 30
      hess_scale = np.abs(want_hess) + 1e-3 * scale  # the Hessian's own zeros
      _assert_close(hess[moderate], want_hess[moderate], 3e-5, hess_scale[moderate])
      if smoothing == 0:
        self.assertTrue(np.all(np.isfinite(grad_y)))
        want, scale = ref.focal_grad_labels_logits(y, x, gamma, alpha)
        moderate = np.abs(x) <= 100
        _assert_close(grad_y[moderate], want[moderate], 1e-5, scale[moderate])

  @parameterized.parameters(*GAMMAS)
  def test_probabilities(self, gamma):
    f = functools.partial(_elementwise(gamma, 0.25, from_logits=False).__wrapped__)
    y, p = _grid(np.concatenate([HARD, SOFT]), np.array([0, 1e-9, 1e-7, 0.01, 0.3, 0.5, 0.9, 1]))
    p = p.astype(np.float32)

    def all_of(p):
      total = lambda p: f(y, p).sum()
      return f(y, p), jax.grad(total)(p), jax.hessian(total)(p)

    value, grad, hess = jax.jit(all_of)(p)
    _assert_close(value, ref.focal_elementwise(y, p, False, 0.0, gamma, 0.25), 1e-6)
    want, scale = ref.focal_grad_probs(y, p, 0.0, gamma, 0.25)
    # At the clip the derivative is taken at the clipped value (finite for gamma < 1 too).
    _assert_close(grad, want, 2e-6, scale)
    self.assertTrue(np.all(np.isfinite(np.asarray(hess))))


class ExtremesTest(parameterized.TestCase):
  def test_saturated_wrong_logit_is_exact(self):
    # Keras clips sigmoid(-100) to 1e-7 and gives 16.1; the loss is 100.
    loss = bce_jax.binary_focal_crossentropy_elementwise(
      jnp.ones(2), jnp.array([-100.0, -1e4]), from_logits=True
    )
    np.testing.assert_array_equal(np.asarray(loss), [100.0, 1e4])

  @parameterized.parameters(*GAMMAS, 0.7)
  def test_finite_at_saturated_logits(self, gamma):
    y, x = _grid(HARD, np.array([-1e4, -100, 100, 1e4], np.float32))
    for derivative in _calculus(gamma)(y, x, 0.0):
      self.assertTrue(np.all(np.isfinite(np.asarray(derivative))))

  def test_hessian_of_the_loss_object_is_finite(self):
    y, x = _grid(HARD, np.array([-1e4, -100, -1, 0, 1, 100, 1e4], np.float32))
    loss = bce_jax.BinaryFocalCrossentropy(gamma=0.5, from_logits=True)
    hessian = jax.jit(jax.hessian(lambda x: loss(y, x)))(x)
    self.assertTrue(np.all(np.isfinite(np.asarray(hessian))))

  def test_infinite_logits_are_exact(self):
    y = jnp.array([0.0, 1.0, 0.0, 1.0, 0.3, 0.3])
    x = jnp.array([np.inf, np.inf, -np.inf, -np.inf, np.inf, -np.inf])
    # Class 0 has weight 1 - alpha = 0: its infinite loss at +inf is 0.
    options = {"gamma": 0.5, "apply_class_balancing": True, "alpha": 1.0, "from_logits": True}
    loss = bce_jax.BinaryFocalCrossentropy(reduction=None, **options)
    got = loss(y[:, None], x[:, None])
    np.testing.assert_array_equal(np.asarray(got), [0, 0, 0, np.inf, np.inf, np.inf])
    got = bce_jax.binary_focal_crossentropy_elementwise(y, x, gamma=2.0, from_logits=True)
    np.testing.assert_array_equal(np.asarray(got), [np.inf, 0, 0, np.inf, np.inf, np.inf])
    mean = bce_jax.BinaryFocalCrossentropy(**options)
    grad = jax.grad(lambda x: mean(y, x))(x)
    self.assertTrue(np.all(np.isfinite(np.asarray(grad))))

  def test_gamma_zero_is_the_bce_bit_for_bit(self):
    y, x = _grid(np.concatenate([HARD, SOFT]))
    cases = ((True, x, None), (True, x, 0.7), (False, np.asarray(jax.nn.sigmoid(x)), 0.7))
    for from_logits, preds, pos_weight in cases:
      options = {"from_logits": from_logits, "pos_weight": pos_weight}
      focal = functools.partial(bce_jax.binary_focal_crossentropy_elementwise, gamma=0.0, **options)
      bce = functools.partial(bce_jax.binary_crossentropy_elementwise, **options)

      def both(y, p, f):
        return f(y, p), jax.grad(lambda p: f(y, p).sum())(p)

      chex.assert_trees_all_equal(
        jax.jit(both, static_argnums=2)(y, preds, focal),
        jax.jit(both, static_argnums=2)(y, preds, bce),
      )


labels_st = hnp.arrays(np.float32, 8, elements=st.floats(0, 1, width=32))
logits_st = hnp.arrays(np.float32, 8, elements=st.floats(-200, 200, width=32))
gamma_st = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.7])
_BCE = jax.jit(functools.partial(bce_jax.binary_crossentropy_elementwise, from_logits=True))


class PropertiesTest(absltest.TestCase):
  @given(labels_st, logits_st, gamma_st, st.booleans())
  def test_non_negative(self, y, x, gamma, balance):
    f = _elementwise(gamma, 0.25 if balance else None)
    self.assertTrue(np.all(np.asarray(f(y, x)) >= 0))

  @given(labels_st, logits_st, st.sampled_from([None, 0.3]))
  def test_gamma_zero_is_class_balanced_bce(self, y, x, alpha):
    got = _elementwise(0.0, alpha)(y, x)
    c = 1.0 if alpha is None else alpha * y + (1 - alpha) * (1 - y)
    want = c * _BCE(y, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2 * F32_EPS, atol=0)

  @given(
    hnp.arrays(np.bool_, 8),
    logits_st,
    st.sampled_from([(0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 5.0)]),
  )
  def test_non_increasing_in_gamma_for_hard_labels(self, y, x, gammas):
    lower, higher = (np.asarray(_elementwise(g)(y, x)) for g in gammas)
    self.assertTrue(np.all(higher <= lower))


class SharedApiTest(chex.TestCase):
  def _case(self, rng, shape=(4, 3)):
    return rng.integers(0, 2, shape).astype(np.float32), rng.normal(0, 3, shape).astype(np.float32)

  @parameterized.parameters(
    ("sum_over_batch_size", False, False),
    ("sum_over_batch_size", True, True),
    ("sum", True, False),
    ("mean_with_sample_weight", True, True),
    (None, False, True),
  )
  def test_reductions_weights_masks(self, reduction, weighted, masked):
    y, x = self._case(np.random.default_rng(1))
    w = np.array([0.5, 2.0, 0.0, 1.0], np.float32) if weighted else None
    mask = np.array([True, False, True, True]) if masked else None
    loss = bce_jax.BinaryFocalCrossentropy(
      gamma=1.5, from_logits=True, reduction=reduction, apply_class_balancing=True
    )
    per_sample = ref.mean_over(ref.focal_elementwise(y, x, True, 0.0, 1.5, 0.25), -1)
    want = ref.reduce(per_sample, reduction, w, mask)
    np.testing.assert_allclose(np.asarray(loss(y, x, sample_weight=w, mask=mask)), want, rtol=3e-6)

  def test_nan_padding_under_mask_has_finite_gradients(self):
    y = jnp.array([[1.0, 0.0], [jnp.nan, -1.0]])
    x = jnp.array([[2.0, -3.0], [jnp.nan, jnp.inf]])
    mask = jnp.array([True, False])
    loss = bce_jax.BinaryFocalCrossentropy(gamma=0.5, from_logits=True)
    value, grad = jax.jit(jax.value_and_grad(lambda x: loss(y, x, mask=mask)))(x)
    want = ref.focal_elementwise(y[:1], x[:1], True, 0.0, 0.5).mean()
    np.testing.assert_allclose(float(value), want, rtol=2e-6)
    self.assertTrue(np.all(np.isfinite(np.asarray(grad))))
    np.testing.assert_array_equal(np.asarray(grad[1]), [0.0, 0.0])

  def test_pos_weight_multiplies_the_positive_bce_term(self):
    y, x = _grid(SOFT, GRID_X[::8])
    got = bce_jax.binary_focal_crossentropy_elementwise(
      y, x, gamma=2.0, from_logits=True, pos_weight=3.0
    )
    _assert_close(got, ref.focal_elementwise(y, x, True, 0.0, 2.0, None, 3.0), 1e-6)

  def test_metric_streams_the_loss(self):
    y, x = self._case(np.random.default_rng(2), (6, 3))
    m = bce_jax.BinaryFocalCrossentropyMetric(gamma=2.0, from_logits=True)
    state = m.update(m.update(m.init(), y[:2], x[:2]), y[2:], x[2:])
    want = bce_jax.BinaryFocalCrossentropy(gamma=2.0, from_logits=True)(y, x)
    np.testing.assert_allclose(float(m.result(state)), float(want), rtol=1e-6)

  def test_checked_flags_bad_probabilities(self):
    loss = bce_jax.checked(bce_jax.BinaryFocalCrossentropy())
    with self.assertRaises(bce_jax.ValueCheckError):
      loss(jnp.array([[1.0]]), jnp.array([[1.5]]))

  def test_config_round_trip(self):
    loss = bce_jax.BinaryFocalCrossentropy(
      apply_class_balancing=True, alpha=0.4, gamma=1.5, axis=(1, 2), pos_weight=2.0
    )
    config = json.loads(json.dumps(loss.get_config()))
    self.assertEqual(bce_jax.BinaryFocalCrossentropy.from_config(config), loss)
    self.assertEqual(hash(bce_jax.BinaryFocalCrossentropy.from_config(config)), hash(loss))
    metric = bce_jax.BinaryFocalCrossentropyMetric(gamma=3.0)
    self.assertEqual(bce_jax.BinaryFocalCrossentropyMetric.from_config(metric.get_config()), metric)

  def test_keras_config(self):
    # keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=3.0,
    # from_logits=True).get_config() under keras 3.15.
    keras_config = {
      "name": "binary_focal_crossentropy",
      "reduction": "sum_over_batch_size",
      "from_logits": True,
      "label_smoothing": 0.0,
      "axis": -1,
      "apply_class_balancing": True,
      "alpha": 0.25,
      "gamma": 3.0,
    }
    want = bce_jax.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=3.0, from_logits=True)
    self.assertEqual(bce_jax.BinaryFocalCrossentropy.from_config(keras_config), want)
    wrapped = {
      "module": "keras.losses",
      "class_name": "BinaryFocalCrossentropy",
      "config": dict(keras_config, dtype="float32"),
    }
    self.assertEqual(bce_jax.BinaryFocalCrossentropy.from_config(wrapped), want)

  @parameterized.parameters(
    ("gamma", -0.5, ValueError),
    ("gamma", float("inf"), ValueError),
    ("gamma", "2", TypeError),
    ("alpha", 1.5, ValueError),
    ("alpha", -0.1, ValueError),
    ("alpha", "0.25", TypeError),
    ("apply_class_balancing", "yes", TypeError),
  )
  def test_bad_options_name_the_argument(self, name, value, error):
    with self.assertRaisesRegex(error, f"`{name}`"):
      bce_jax.BinaryFocalCrossentropy(**{name: value})
    with self.assertRaisesRegex(error, f"`{name}`"):
      bce_jax.binary_focal_crossentropy([[1.0]], [[0.5]], **{name: value})
    with self.assertRaisesRegex(error, f"`{name}`"):
      bce_jax.BinaryFocalCrossentropyMetric(**{name: value})
    with self.assertRaisesRegex(TypeError, "`gamma`"):
      jax.jit(lambda g: bce_jax.binary_focal_crossentropy([[1.0]], [[0.5]], gamma=g))(2.0)


class HloTest(absltest.TestCase):
  def test_forward_costs_what_the_bce_costs(self):
    if jax.default_backend() != "cpu":
      self.skipTest("op counts are for XLA on CPU")
    x = y = jnp.zeros(1 << 16)
    ops = ("exponential(", "log-plus-one(", "log(", "sqrt(", "power(")

    def count(loss):
      text = jax.jit(lambda x: loss(y, x)).lower(x).compile().as_text()
      return {op: text.count(op) for op in ops}

    bce = count(bce_jax.BinaryCrossentropy(from_logits=True))
    self.assertEqual(count(bce_jax.BinaryFocalCrossentropy(gamma=2.0, from_logits=True)), bce)
    half = count(bce_jax.BinaryFocalCrossentropy(gamma=0.5, from_logits=True))
    self.assertEqual(half, dict(bce, **{"sqrt(": half["sqrt("]}))


if __name__ == "__main__":
  absltest.main()
