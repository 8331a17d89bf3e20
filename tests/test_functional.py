"""The pure functions against the seed values, the float64 reference and calculus.

The numerics run under ``jax.jit``; :class:`EagerDispatchTest` calls each
function once without it and compares with the jitted result.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax.test_util import check_grads

import bce_jax
from tests import _reference as ref

F32_EPS = float(np.finfo(np.float32).eps)
SEED_TRUE = [[0.0, 1.0], [0.0, 0.0]]
SEED_PRED = [[0.6, 0.4], [0.4, 0.6]]

# Jitted once per shape, dtype and static option, reused across tests.
_bce = jax.jit(bce_jax.binary_crossentropy, static_argnames=("from_logits", "axis"))
_elementwise = jax.jit(bce_jax.binary_crossentropy_elementwise, static_argnames=("from_logits",))


def _rng(seed=0):
  return np.random.default_rng(seed)


def _random_case(rng, shape, from_logits, soft_labels=True):
  y = rng.uniform(0, 1, shape) if soft_labels else rng.integers(0, 2, shape)
  if from_logits:
    x = rng.normal(0, 4, shape)
  else:
    x = rng.uniform(0, 1, shape)
  return y.astype(np.float32), x.astype(np.float32)


class SeedValuesTest(parameterized.TestCase):
  def test_function_seed(self):
    loss = jax.jit(bce_jax.binary_crossentropy)(jnp.array(SEED_TRUE), jnp.array(SEED_PRED))
    self.assertEqual(loss.shape, (2,))
    self.assertEqual(loss.dtype, jnp.float32)
    np.testing.assert_array_equal(np.round(np.asarray(loss, np.float64), 3), [0.916, 0.714])

  def test_function_seed_integer_labels(self):
    # The seed passes y_true as Python ints (closed over: they stay Python ints).
    loss = jax.jit(lambda: bce_jax.binary_crossentropy([[0, 1], [0, 0]], SEED_PRED))()
    np.testing.assert_array_equal(np.round(np.asarray(loss, np.float64), 3), [0.916, 0.714])

  def test_r_page_float64_values(self):
    # The R page prints the float64 result: tf.Tensor([0.91629073 0.71355818]).
    with jax.enable_x64(True):
      loss = jax.jit(bce_jax.binary_crossentropy)(
        np.array(SEED_TRUE, np.float64), np.array(SEED_PRED, np.float64)
      )
      self.assertEqual(loss.dtype, jnp.float64)
      np.testing.assert_allclose(np.asarray(loss), [0.91629073, 0.71355818], atol=5e-9)


class AgainstReferenceTest(parameterized.TestCase):
  @parameterized.product(
    shape=[(7,), (7, 1), (5, 3), (4, 3, 6)],
    from_logits=[False, True],
    label_smoothing=[0.0, 0.2],
    use_pos_weight=[False, True],
  )
  def test_mean_over_last_axis(self, shape, from_logits, label_smoothing, use_pos_weight):
    rng = _rng(hash((shape, from_logits)) % 2**32)
    y, x = _random_case(rng, shape, from_logits)
    pos_weight = np.float32(0.7) if use_pos_weight else None
    fn = jax.jit(
      functools.partial(
        bce_jax.binary_crossentropy,
        from_logits=from_logits,
        label_smoothing=label_smoothing,
      )
    )
    got = fn(y, x, pos_weight=pos_weight)
    want = ref.mean_over(ref.elementwise(y, x, from_logits, label_smoothing, pos_weight), -1)
    self.assertEqual(got.shape, want.shape)
    np.testing.assert_allclose(np.asarray(got), want, rtol=16 * F32_EPS, atol=1e-7)

  @parameterized.parameters((0,), (1,), (-2,), ((0, 2),), ((1, -1),), ((0, 1, 2),))
  def test_axes(self, axis):
    y, x = _random_case(_rng(1), (3, 4, 5), from_logits=True)
    got = _bce(y, x, from_logits=True, axis=axis)
    want = ref.mean_over(ref.elementwise(y, x, True), axis)
    self.assertEqual(got.shape, want.shape)
    np.testing.assert_allclose(np.asarray(got), want, rtol=16 * F32_EPS, atol=1e-7)

  @parameterized.product(from_logits=[False, True], label_smoothing=[0.0, 0.3])
  def test_elementwise(self, from_logits, label_smoothing):
    y, x = _random_case(_rng(2), (6, 5), from_logits)
    pos_weight = np.linspace(0.5, 2.0, 5).astype(np.float32)  # per last-axis entry
    fn = jax.jit(
      functools.partial(
        bce_jax.binary_crossentropy_elementwise,
        from_logits=from_logits,
        label_smoothing=label_smoothing,
      )
    )
    got = fn(y, x, pos_weight=pos_weight)
    want = ref.elementwise(y, x, from_logits, label_smoothing, pos_weight)
    self.assertEqual(got.shape, (6, 5))
    np.testing.assert_allclose(np.asarray(got), want, rtol=16 * F32_EPS, atol=1e-7)

  def test_logits_accuracy_over_wide_range(self):
    # Labels in {0, 1}, logits in [-100, 100]: a few ulps from float64, in
    # both tails. Values under 2**-120 are held to an absolute 2**-120
    # instead: XLA's exp on CPU flushes and approximates results near float32's
    # subnormal range, where a relative error means nothing.
    x = np.linspace(-100, 100, 200_001).astype(np.float32)
    floor = 2.0**-120

    @jax.jit
    def loss_and_grad(y, x):
      def total(x):
        return bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True).sum()

      loss = bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True)
      return loss, jax.grad(total)(x)

    for label in (0.0, 1.0):
      y = np.full_like(x, label)
      loss, grad = (np.asarray(a) for a in loss_and_grad(y, x))
      for name, got, want in (
        ("loss", loss, ref.elementwise(y, x, True)),
        ("grad", grad, ref.grad_logits(y, x)),
      ):
        normal = np.abs(want) >= floor
        rel = np.abs(got - want)[normal] / np.abs(want)[normal]
        self.assertLess(rel.max(), 2 * F32_EPS, msg=f"{name}, y={label}")
        self.assertLessEqual(np.abs(got - want)[~normal].max(initial=0), floor)

  def test_soft_labels_do_not_cancel(self):
    # max(x,0) - x*y + log1p(exp(-|x|)) loses ~1e-5 here to cancellation.
    y = np.float32(0.99)
    x = np.float32(100.0)
    got = float(_elementwise(y, x, from_logits=True))
    want = float(ref.elementwise(y, x, True))
    self.assertAlmostEqual(got / want, 1.0, delta=4 * F32_EPS)

  def test_probability_clip_matches_keras(self):
    p = np.array([0.0, 1e-9, 1e-7, 0.3, 1 - 1e-7, 1.0], np.float32)
    for label in (0.0, 1.0):
      y = np.full_like(p, label)
      got = np.asarray(_elementwise(y, p))
      # The clip bounds are Keras's. Keras rounds 1 - p to float32 before the
      # log (at y = 0, p <= 1e-7 it prints 1.19e-7); bce_jax takes log1p(-p)
      # (1.0e-7, as the float64 reference). Either is within an ulp of 1.
      np.testing.assert_allclose(got, ref.elementwise(y, p), rtol=4 * F32_EPS, atol=F32_EPS)

  def test_small_probability_keeps_its_digits(self):
    # log(1 - p) as log1p(-p): at y = 0, p <= 1e-7 the loss is 1.0e-7, not
    # Keras's 1.19e-7 (README, "Rules worth knowing", "Probabilities").
    p = np.array([0.0, 1e-9, 1e-7, 3e-7, 1e-5], np.float32)
    y = np.zeros_like(p)
    got = np.asarray(_elementwise(y, p))
    np.testing.assert_allclose(got, ref.elementwise(y, p), rtol=4 * F32_EPS)
    np.testing.assert_allclose(got[:3], 1e-7, rtol=4 * F32_EPS)


class ShapeAndDtypeTest(parameterized.TestCase):
  def test_rank_one_against_trailing_one_is_per_sample(self):
    y = np.array([1.0, 0.0, 1.0], np.float32)
    p = np.array([[0.9], [0.2], [0.3]], np.float32)
    fn = jax.jit(bce_jax.binary_crossentropy)
    for a, b in ((y, p), (p, y), (y[:, None], p[:, 0])):
      out = fn(a, b)
      self.assertEqual(out.shape, (3,))  # never (3, 3)
    np.testing.assert_allclose(np.asarray(fn(y, p)), ref.elementwise(y, p[:, 0]), rtol=8 * F32_EPS)
    # Equal rank-1 shapes are one sample's features, as in Keras.
    self.assertEqual(fn(y, p[:, 0]).shape, ())
    elementwise = jax.jit(bce_jax.binary_crossentropy_elementwise)
    self.assertEqual(elementwise(y, p).shape, (3, 1))

  def test_trailing_one_squeezed_for_higher_rank(self):
    y = np.ones((2, 3), np.float32)
    p = np.full((2, 3, 1), 0.5, np.float32)
    self.assertEqual(_bce(y, p).shape, (2,))
    self.assertEqual(_bce(p, y).shape, (2,))

  @parameterized.parameters(np.int32, np.int8, np.bool_, np.float16)
  def test_label_dtypes_are_cast(self, dtype):
    y = np.array([[1, 0, 1]], dtype)
    p = np.array([[0.8, 0.1, 0.6]], np.float32)
    np.testing.assert_allclose(
      np.asarray(_bce(y, p)),
      ref.mean_over(ref.elementwise(y.astype(np.float64), p), -1),
      rtol=8 * F32_EPS,
    )

  @parameterized.parameters(jnp.float16, jnp.bfloat16, jnp.float32)
  def test_low_precision_computes_and_returns_float32(self, dtype):
    y = jnp.array([1.0, 0.0, 1.0], dtype)
    x = jnp.array([2.5, -1.0, 0.5], dtype)
    out = _elementwise(y, x, from_logits=True)
    self.assertEqual(out.dtype, jnp.float32)
    # Computed from the low-precision values, in float32 or better.
    want = ref.elementwise(
      np.asarray(y.astype(jnp.float32)), np.asarray(x.astype(jnp.float32)), True
    )
    np.testing.assert_allclose(np.asarray(out), want, rtol=8 * F32_EPS)

  def test_float64_stays_float64(self):
    with jax.enable_x64(True):
      x = np.array([-3.0, 0.1, 40.0])
      y = np.array([1.0, 0.0, 0.0])
      out = _elementwise(y, x, from_logits=True)
      self.assertEqual(out.dtype, jnp.float64)
      np.testing.assert_allclose(np.asarray(out), ref.elementwise(y, x, True), rtol=1e-14)

  def test_empty_reduction_axis_gives_zero(self):
    out = _bce(np.zeros((3, 0)), np.zeros((3, 0)))
    self.assertEqual(out.shape, (3,))
    np.testing.assert_array_equal(np.asarray(out), 0.0)

  def test_empty_batch(self):
    out = _bce(np.zeros((0, 4)), np.zeros((0, 4)))
    self.assertEqual(out.shape, (0,))

  def test_vmap_matches_loop(self):
    y, x = _random_case(_rng(3), (4, 6, 5), from_logits=True)
    fn = functools.partial(bce_jax.binary_crossentropy, from_logits=True)
    batched = jax.jit(jax.vmap(fn))(y, x)
    looped = np.stack([np.asarray(jax.jit(fn)(y[i], x[i])) for i in range(4)])
    np.testing.assert_allclose(np.asarray(batched), looped, rtol=2 * F32_EPS)
    # vmap over a non-leading axis, with a per-row pos_weight
    pw = np.linspace(0.5, 1.5, 5).astype(np.float32)
    batched = jax.jit(jax.vmap(lambda a, b: fn(a, b, pos_weight=pw), in_axes=1, out_axes=1))(y, x)
    want = ref.mean_over(ref.elementwise(y, x, True, pos_weight=pw), -1)
    np.testing.assert_allclose(np.asarray(batched), want, rtol=16 * F32_EPS)


class ExtremesTest(parameterized.TestCase):
  """Finite losses and gradients at the edges, in every float dtype."""

  DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)

  def _check_finite(self, y, x, from_logits):
    def mean_loss(x, y):
      return bce_jax.binary_crossentropy(y, x, from_logits=from_logits).mean()

    loss = jax.jit(mean_loss)(x, y)
    grad_x, grad_y = jax.jit(jax.grad(mean_loss, argnums=(0, 1)))(x, y)
    self.assertTrue(np.isfinite(np.asarray(loss)).all(), msg=f"loss {x.dtype}")
    self.assertTrue(np.isfinite(np.asarray(grad_x, np.float32)).all(), msg=f"dx {x.dtype}")
    self.assertTrue(np.isfinite(np.asarray(grad_y, np.float32)).all(), msg=f"dy {x.dtype}")
    self.assertEqual(grad_x.dtype, x.dtype)
    return loss, grad_x

  @parameterized.parameters(*DTYPES)
  def test_probabilities(self, dtype):
    # 256 rows of each extreme, so a mean's 1/N brings the clip derivative
    # (about 1e7) into float16's range; see the README, "Rules worth knowing",
    # "Probabilities".
    p = jnp.array([0.0, 1e-8, 0.5, 0.9999, 1.0] * 256, dtype).reshape(-1, 1)
    for label in (0.0, 1.0):
      y = jnp.full(p.shape, label, dtype)
      self._check_finite(y, p, from_logits=False)

  @parameterized.parameters(*DTYPES)
  def test_logits(self, dtype):
    big = float(jnp.finfo(dtype).max)
    x = jnp.array([-big, -1e4, -30.0, 0.0, 30.0, 1e4, big], dtype).reshape(-1, 1)
    for label in (0.0, 0.5, 1.0):
      y = jnp.full(x.shape, label, dtype)
      self._check_finite(y, x, from_logits=True)

  def test_float32_max_logits_are_exact(self):
    big = float(np.finfo(np.float32).max)
    x = np.array([big, -big, big, -big], np.float32)
    y = np.array([1.0, 0.0, 0.0, 1.0], np.float32)
    out = np.asarray(_elementwise(y, x, from_logits=True))
    np.testing.assert_allclose(out, [0.0, 0.0, big, big], rtol=F32_EPS)

  def test_float64_max_logits(self):
    with jax.enable_x64(True):
      big = float(np.finfo(np.float64).max)
      x = np.array([big, -big, 0.0])
      out = _elementwise(np.array([0.0, 1.0, 1.0]), x, from_logits=True)
      self.assertTrue(np.isfinite(np.asarray(out)).all())
      np.testing.assert_allclose(np.asarray(out), [big, big, np.log(2.0)], rtol=1e-15)

  def test_float16_one_minus_eps_does_not_round_to_one(self):
    # Keras' JAX backend gives inf here: 1 - 1e-7 rounds to 1.0 in float16.
    y = jnp.array([0.0], jnp.float16)
    p = jnp.array([1.0], jnp.float16)
    loss = _bce(y, p)
    self.assertTrue(np.isfinite(np.asarray(loss)).all())
    np.testing.assert_allclose(np.asarray(loss), -np.log(1 - np.float32(1 - 1e-7)), rtol=1e-6)


class GradientTest(parameterized.TestCase):
  def test_logits_gradient_at_zero(self):
    # Plain autodiff of max(x, 0) - x*y + log1p(exp(-|x|)) differentiates the
    # kinks of max and |x| at exactly 0 and gets this wrong.
    y = jnp.array([0.0, 0.3, 1.0])
    grad = jax.jit(
      jax.grad(lambda x: bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True).sum())
    )(jnp.zeros(3))
    np.testing.assert_allclose(np.asarray(grad), [0.5, 0.2, -0.5], rtol=F32_EPS)

  @parameterized.product(label_smoothing=[0.0, 0.25], use_pos_weight=[False, True])
  def test_logits_gradient_hessian_and_jvp(self, label_smoothing, use_pos_weight):
    y, x = _random_case(_rng(4), (64,), from_logits=True)
    x[:3] = [0.0, 25.0, -25.0]
    pw = np.float32(1.7) if use_pos_weight else None

    def total(x):
      return bce_jax.binary_crossentropy_elementwise(
        y, x, from_logits=True, label_smoothing=label_smoothing, pos_weight=pw
      ).sum()

    tangent = np.ones_like(x)
    grad, hess, (_, jvp) = jax.jit(
      lambda x: (jax.grad(total)(x), jax.hessian(total)(x), jax.jvp(total, (x,), (tangent,)))
    )(x)
    # With soft labels the gradient is a difference of two terms and can
    # cancel; the error is bounded relative to the size of the terms.
    ys = ref.smooth(y, label_smoothing)
    w = 1.0 if pw is None else pw
    scale = (1 - ys) * ref.sigmoid(x) + w * ys * ref.sigmoid(-x.astype(np.float64))
    err = np.abs(np.asarray(grad) - ref.grad_logits(y, x, label_smoothing, pw))
    self.assertLessEqual(float((err / scale).max()), 8 * F32_EPS)
    np.testing.assert_allclose(
      np.asarray(hess),
      np.diag(ref.hess_logits(y, x, label_smoothing, pw)),
      rtol=16 * F32_EPS,
      atol=1e-30,
    )
    np.testing.assert_allclose(
      float(jvp), ref.grad_logits(y, x, label_smoothing, pw).sum(), rtol=1e-5
    )

  def test_gradient_wrt_labels_and_pos_weight(self):
    y, x = _random_case(_rng(5), (16,), from_logits=True)
    y[0], x[0] = 0.5, 0.0  # the kink of softplus' pieces

    def total(y, x, w):
      return bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True, pos_weight=w).sum()

    w = np.float32(1.3)
    gy, gw = jax.jit(jax.grad(total, argnums=(0, 2)))(y, x, w)
    x64 = x.astype(np.float64)
    sp_pos, sp_neg = np.logaddexp(0, x64), np.logaddexp(0, -x64)
    np.testing.assert_allclose(np.asarray(gy), w * sp_neg - sp_pos, rtol=16 * F32_EPS, atol=1e-6)
    np.testing.assert_allclose(float(gw), (y * sp_neg).sum(), rtol=16 * F32_EPS)
    # the mixed second derivative d2/dx dy = -(sigmoid(x) + w sigmoid(-x))
    mixed = jax.jit(jax.jacfwd(jax.grad(total, argnums=0), argnums=1))(y, x, w)
    want = -(ref.sigmoid(x) + w * ref.sigmoid(-x64))
    np.testing.assert_allclose(np.diag(np.asarray(mixed)), want, rtol=16 * F32_EPS)

  def test_check_grads_second_order(self):
    y, x = _random_case(_rng(6), (5,), from_logits=True)
    y64, x64 = y.astype(np.float64), x.astype(np.float64)
    with jax.enable_x64(True):
      for from_logits, pred in ((True, x64), (False, 0.05 + 0.9 * ref.sigmoid(x64))):
        fn = functools.partial(
          bce_jax.binary_crossentropy_elementwise,
          from_logits=from_logits,
          label_smoothing=0.1,
          pos_weight=np.float64(0.8),
        )
        check_grads(
          jax.jit(fn), (y64, pred), order=2, modes=("fwd", "rev"), eps=1e-6, atol=1e-5, rtol=1e-5
        )

  def test_probability_gradient_at_the_clip(self):
    # Keras returns 0 here: a confidently wrong prediction stops learning.
    p = jnp.array([0.0, 1.0, 1e-9, 1.0 - 1e-9, 0.3])
    y = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0])
    grad = jax.jit(jax.grad(lambda p: bce_jax.binary_crossentropy_elementwise(y, p).sum()))(p)
    want = ref.grad_probs(np.asarray(y), np.asarray(p))
    np.testing.assert_allclose(np.asarray(grad), want, rtol=8 * F32_EPS)
    self.assertLess(float(grad[0]), -1e6)  # pushes p up, strongly
    self.assertGreater(float(grad[1]), 1e6)  # pushes p down

  def test_probability_hessian_is_finite(self):
    p = jnp.array([0.0, 0.2, 1.0])
    y = jnp.array([1.0, 0.4, 0.0])
    hess = jax.jit(jax.hessian(lambda p: bce_jax.binary_crossentropy_elementwise(y, p).sum()))(p)
    self.assertTrue(np.isfinite(np.asarray(hess)).all())
    np.testing.assert_allclose(float(hess[1, 1]), 0.4 / 0.2**2 + 0.6 / 0.8**2, rtol=8 * F32_EPS)


class EagerDispatchTest(parameterized.TestCase):
  """Each public function called eagerly once: the same values as under jit."""

  @parameterized.parameters(False, True)
  def test_binary_crossentropy(self, from_logits):
    y, x = _random_case(_rng(7), (4, 3, 5), from_logits)
    pw = np.linspace(0.5, 2.0, 5).astype(np.float32)
    kwargs = {"from_logits": from_logits, "label_smoothing": 0.1, "axis": (1, 2)}
    eager = bce_jax.binary_crossentropy(y, x, **kwargs, pos_weight=pw)
    jitted = jax.jit(lambda y, x, pw: bce_jax.binary_crossentropy(y, x, **kwargs, pos_weight=pw))
    want = jitted(y, x, pw)
    self.assertEqual(eager.shape, want.shape)
    self.assertEqual(eager.dtype, want.dtype)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(want), rtol=2 * F32_EPS)

  @parameterized.parameters(False, True)
  def test_binary_crossentropy_elementwise(self, from_logits):
    y, x = _random_case(_rng(8), (6, 5), from_logits)
    pw = np.float32(1.5)
    eager = bce_jax.binary_crossentropy_elementwise(y, x, from_logits, 0.2, pos_weight=pw)
    fn = functools.partial(
      bce_jax.binary_crossentropy_elementwise, from_logits=from_logits, label_smoothing=0.2
    )
    want = jax.jit(fn)(y, x, pos_weight=pw)
    self.assertEqual(eager.shape, want.shape)
    self.assertEqual(eager.dtype, want.dtype)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(want), rtol=2 * F32_EPS)

  def test_gradient(self):
    y, x = _random_case(_rng(9), (8, 3), from_logits=True)

    def total(x):
      return bce_jax.binary_crossentropy(y, x, from_logits=True).sum()

    np.testing.assert_allclose(
      np.asarray(jax.grad(total)(x)), np.asarray(jax.jit(jax.grad(total))(x)), rtol=2 * F32_EPS
    )
