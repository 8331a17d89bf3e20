"""The loss object: Keras seed values, reductions, weights, masks, config, pytree.

The numerics run under ``jax.jit``; :class:`EagerDispatchTest` calls the loss
once without it and compares with the jitted result. Configs run eagerly.
"""

import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import bce_jax
from tests import _reference as ref

F32_EPS = float(np.finfo(np.float32).eps)
SEED_TRUE = jnp.array([[0.0, 1.0], [0.0, 0.0]])
SEED_PRED = jnp.array([[0.6, 0.4], [0.4, 0.6]])
# The R page's logits examples.
R_TRUE = jnp.array([0.0, 1.0, 0.0, 0.0])
R_LOGITS = jnp.array([-18.6, 0.51, 2.94, -12.8])


@jax.jit
def _call(loss, *args, **kwargs):
  """Calls `loss` under jit; the loss object is a static pytree (no leaves)."""
  return loss(*args, **kwargs)


class SeedValuesTest(parameterized.TestCase):
  def test_keras_loss_page(self):
    bce = bce_jax.BinaryCrossentropy()
    self.assertEqual(f"{_call(bce, SEED_TRUE, SEED_PRED):.3f}", "0.815")
    weighted = _call(bce, SEED_TRUE, SEED_PRED, sample_weight=jnp.array([1, 0]))
    self.assertEqual(f"{weighted:.3f}", "0.458")
    total = _call(bce_jax.BinaryCrossentropy(reduction="sum"), SEED_TRUE, SEED_PRED)
    self.assertEqual(f"{total:.3f}", "1.630")
    none = _call(bce_jax.BinaryCrossentropy(reduction=None), SEED_TRUE, SEED_PRED)
    np.testing.assert_array_equal(np.round(np.asarray(none, np.float64), 3), [0.916, 0.714])

  def test_r_page_logits_examples(self):
    bce = bce_jax.BinaryCrossentropy(from_logits=True)
    # Example 1: one sample of four values; example 2: two samples of two.
    np.testing.assert_allclose(float(_call(bce, R_TRUE, R_LOGITS)), 0.865458, atol=5e-7)
    y2, x2 = R_TRUE.reshape(2, 2), R_LOGITS.reshape(2, 2)
    np.testing.assert_allclose(float(_call(bce, y2, x2)), 0.865458, atol=5e-7)
    weighted = _call(bce, y2, x2, sample_weight=jnp.array([0.8, 0.2]))
    np.testing.assert_allclose(float(weighted), 0.2436386, atol=5e-8)
    total = _call(bce_jax.BinaryCrossentropy(from_logits=True, reduction="sum"), y2, x2)
    np.testing.assert_allclose(float(total), 1.730916, atol=5e-7)
    none = _call(bce_jax.BinaryCrossentropy(from_logits=True, reduction=None), y2, x2)
    np.testing.assert_allclose(np.asarray(none), [0.23515666, 1.4957594], atol=5e-8)


def _per_sample_case(rng, shape, from_logits):
  y = rng.integers(0, 2, shape).astype(np.float32)
  x = rng.normal(0, 3, shape) if from_logits else rng.uniform(0.01, 0.99, shape)
  return y, x.astype(np.float32)


class ReductionTest(parameterized.TestCase):
  @parameterized.product(
    reduction=["sum_over_batch_size", "mean", "sum", "mean_with_sample_weight", None, "none"],
    # "last_axis": a rank-1 weight of another length than the batch weights the
    # last axis (README, "Rules worth knowing", `sample_weight`).
    weight_kind=["none", "scalar", "batch", "full", "trailing_one", "last_axis"],
    use_mask=[False, True],
  )
  def test_against_reference(self, reduction, weight_kind, use_mask):
    rng = np.random.default_rng(7)
    shape = (5, 3, 4)  # per-sample losses (5, 3)
    y, x = _per_sample_case(rng, shape, from_logits=True)
    weights = {
      "none": None,
      "scalar": np.float32(0.7),
      "batch": rng.uniform(0, 2, (5,)).astype(np.float32),
      "full": rng.uniform(0, 2, (5, 3)).astype(np.float32),
      "trailing_one": rng.uniform(0, 2, (5, 3, 1)).astype(np.float32),
      "last_axis": rng.uniform(0, 2, (3,)).astype(np.float32),
    }[weight_kind]
    mask = rng.uniform(size=(5, 3)) > 0.3 if use_mask else None
    bce = bce_jax.BinaryCrossentropy(from_logits=True, reduction=reduction, label_smoothing=0.1)
    got = _call(bce, y, x, sample_weight=weights, mask=mask)
    per_sample = ref.mean_over(ref.elementwise(y, x, True, 0.1), -1)
    keras_reduction = "sum_over_batch_size" if reduction == "mean" else reduction
    want = ref.reduce(per_sample, keras_reduction, weights, mask)
    self.assertEqual(got.shape, np.shape(want))
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=32 * F32_EPS, atol=1e-7)

  def test_batch_weights_weight_rows_even_when_batch_equals_time(self):
    # Keras 3 would broadcast [B] against the trailing T axis here.
    rng = np.random.default_rng(8)
    y, x = _per_sample_case(rng, (4, 4, 3), from_logits=True)
    w = np.array([1.0, 0.0, 2.0, 0.5], np.float32)
    got = _call(bce_jax.BinaryCrossentropy(from_logits=True, reduction=None), y, x, sample_weight=w)
    per_sample = ref.mean_over(ref.elementwise(y, x, True), -1)
    np.testing.assert_allclose(np.asarray(got), per_sample * w[:, None], rtol=8 * F32_EPS)

  def test_mean_with_sample_weight_divides_by_broadcast_weights(self):
    rng = np.random.default_rng(9)
    y, x = _per_sample_case(rng, (3, 5, 2), from_logits=False)
    w = np.array([1.0, 2.0, 3.0], np.float32)
    bce = bce_jax.BinaryCrossentropy(reduction="mean_with_sample_weight")
    per_sample = ref.mean_over(ref.elementwise(y, x), -1)  # (3, 5)
    want = (per_sample * w[:, None]).sum() / (w.sum() * 5)  # Keras 3: / w.sum()
    np.testing.assert_allclose(float(_call(bce, y, x, sample_weight=w)), want, rtol=8 * F32_EPS)

  def test_scalar_weight_scales(self):
    y, x = _per_sample_case(np.random.default_rng(10), (6, 2), from_logits=True)
    bce = bce_jax.BinaryCrossentropy(from_logits=True)
    np.testing.assert_allclose(
      float(_call(bce, y, x, sample_weight=2.5)), 2.5 * float(_call(bce, y, x)), rtol=4 * F32_EPS
    )

  @parameterized.parameters("sum_over_batch_size", "sum", "mean_with_sample_weight")
  def test_empty_batch_is_zero(self, reduction):
    bce = bce_jax.BinaryCrossentropy(reduction=reduction)
    out = _call(bce, np.zeros((0, 3)), np.zeros((0, 3)), sample_weight=np.zeros((0,)))
    self.assertEqual(float(out), 0.0)
    self.assertEqual(float(_call(bce, np.zeros((0, 3)), np.zeros((0, 3)))), 0.0)

  def test_empty_batch_none_is_empty_array(self):
    out = _call(bce_jax.BinaryCrossentropy(reduction=None), np.zeros((0, 3)), np.zeros((0, 3)))
    self.assertEqual(out.shape, (0,))


class MaskTest(parameterized.TestCase):
  def test_mean_over_unmasked_entries(self):
    y, x = _per_sample_case(np.random.default_rng(11), (6, 4), from_logits=True)
    mask = np.array([True, False, True, True, False, True])
    bce = bce_jax.BinaryCrossentropy(from_logits=True)
    got = _call(bce, y, x, mask=mask)
    per_sample = ref.mean_over(ref.elementwise(y, x, True), -1)
    np.testing.assert_allclose(float(got), per_sample[mask].mean(), rtol=8 * F32_EPS)

  @parameterized.parameters("sum_over_batch_size", "sum", "mean_with_sample_weight")
  def test_all_masked_is_zero_not_nan(self, reduction):
    y, x = _per_sample_case(np.random.default_rng(12), (3, 2), from_logits=True)
    bce = bce_jax.BinaryCrossentropy(from_logits=True, reduction=reduction)
    got = _call(bce, y, x, mask=np.zeros(3, bool))
    self.assertEqual(float(got), 0.0)

  def test_masked_entries_contribute_nothing_even_if_not_finite(self):
    y = np.array([[1.0], [0.0], [1.0]], np.float32)
    x = np.array([[0.3], [np.nan], [-2.0]], np.float32)
    mask = np.array([True, False, True])
    got = _call(bce_jax.BinaryCrossentropy(from_logits=True), y, x, mask=mask)
    want = ref.elementwise(y[[0, 2], 0], x[[0, 2], 0], True).mean()
    np.testing.assert_allclose(float(got), want, rtol=8 * F32_EPS)

  def test_mask_and_weights_combine(self):
    y, x = _per_sample_case(np.random.default_rng(13), (5, 3), from_logits=True)
    mask = np.array([True, True, False, True, False])
    w = np.arange(1, 6, dtype=np.float32)
    bce = bce_jax.BinaryCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
    per_sample = ref.mean_over(ref.elementwise(y, x, True), -1)
    want = (per_sample * w)[mask].sum() / w[mask].sum()
    got = _call(bce, y, x, sample_weight=w, mask=mask)
    np.testing.assert_allclose(float(got), want, rtol=8 * F32_EPS)

  def test_gradient_is_zero_on_masked_entries(self):
    y, x = _per_sample_case(np.random.default_rng(14), (4, 1), from_logits=True)
    mask = np.array([True, False, True, False])
    bce = bce_jax.BinaryCrossentropy(from_logits=True)
    grad = jax.jit(jax.grad(lambda x: bce(y, x, mask=mask)))(x)
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
    want = ref.grad_logits(y, x)[mask] / mask.sum()
    np.testing.assert_allclose(np.asarray(grad)[mask], want, rtol=8 * F32_EPS)


class PosWeightTest(parameterized.TestCase):
  def test_vector_pos_weight_over_last_axis(self):
    y, x = _per_sample_case(np.random.default_rng(15), (4, 3), from_logits=True)
    bce = bce_jax.BinaryCrossentropy(from_logits=True, pos_weight=(0.5, 1.0, 3.0), reduction=None)
    want = ref.mean_over(ref.elementwise(y, x, True, pos_weight=np.array([0.5, 1.0, 3.0])), -1)
    np.testing.assert_allclose(np.asarray(_call(bce, y, x)), want, rtol=8 * F32_EPS)

  def test_pos_weight_gradient_is_weighted_sigmoid_difference(self):
    y = np.array([[1.0], [0.0], [1.0]], np.float32)
    x = np.array([[0.0], [1.0], [-2.0]], np.float32)
    bce = bce_jax.BinaryCrossentropy(from_logits=True, pos_weight=2.0, reduction="sum")
    grad = jax.jit(jax.grad(lambda x: bce(y, x)))(x)
    np.testing.assert_allclose(
      np.asarray(grad), ref.grad_logits(y, x, pos_weight=2.0), rtol=8 * F32_EPS
    )

  @parameterized.product(
    focal=(False, True),
    pos_weight=(0.1, (0.1, 1 / 3, 2.7)),
    inputs=("jax", "numpy"),  # jax arrays take the eager callable; NumPy arrays the checked call
  )
  def test_configured_pos_weight_keeps_float64_under_x64(self, focal, pos_weight, inputs):
    # The configured pos_weight is cast to the call's compute dtype: float64 for
    # float64 inputs under x64 (0.1 rounded to float32 would err by ~1.5e-8), and
    # float32 for float32 inputs, whose values are those of x64 off to the bit.
    rng = np.random.default_rng(21)
    y = (rng.random((6, 3)) < 0.5).astype(np.float64)
    x = 3.0 * rng.standard_normal((6, 3))
    if focal:
      loss = bce_jax.BinaryFocalCrossentropy(from_logits=True, gamma=1.5, pos_weight=pos_weight)
      want = ref.focal_elementwise(y, x, True, gamma=1.5, pos_weight=np.asarray(pos_weight))
    else:
      loss = bce_jax.BinaryCrossentropy(from_logits=True, pos_weight=pos_weight)
      want = ref.elementwise(y, x, True, pos_weight=np.asarray(pos_weight))
    want = want.mean()
    as_input = jnp.asarray if inputs == "jax" else np.asarray
    y32, x32 = (as_input(a.astype(np.float32)) for a in (y, x))
    before = [loss(y32, x32), _call(loss, y32, x32)]
    with jax.enable_x64(True):
      y64, x64 = (as_input(a) for a in (y, x))
      for call in (loss, functools.partial(_call, loss)):
        got = call(y64, x64)
        self.assertEqual(got.dtype, jnp.float64)
        np.testing.assert_allclose(float(got), want, rtol=1e-15)
        chex.assert_trees_all_equal(call(y32, x32), before[call is not loss])
    chex.assert_trees_all_equal([loss(y32, x32), _call(loss, y32, x32)], before)


class PytreeAndConfigTest(parameterized.TestCase):
  def test_no_leaves_hashable_equal(self):
    a = bce_jax.BinaryCrossentropy(from_logits=True, axis=(1, 2), pos_weight=[1.0, 2.0])
    b = bce_jax.BinaryCrossentropy(from_logits=True, axis=[1, 2], pos_weight=(1.0, 2.0))
    self.assertEqual(jax.tree_util.tree_leaves(a), [])
    self.assertEqual(a, b)
    self.assertEqual(hash(a), hash(b))
    self.assertEqual(bce_jax.BinaryCrossentropy(reduction="mean"), bce_jax.BinaryCrossentropy())
    with self.assertRaises(dataclasses.FrozenInstanceError):
      a.from_logits = False  # type: ignore[misc]

  def test_passing_through_jit_does_not_retrace(self):
    y, x = _per_sample_case(np.random.default_rng(16), (4, 2), from_logits=True)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(loss, y, x):
      return loss(y, x)

    for _ in range(3):
      step(bce_jax.BinaryCrossentropy(from_logits=True, label_smoothing=0.1), y, x)
    chex.clear_trace_counter()

  def test_closure_in_jit(self):
    bce = bce_jax.BinaryCrossentropy(from_logits=True)
    y, x = _per_sample_case(np.random.default_rng(17), (4, 2), from_logits=True)
    np.testing.assert_allclose(
      float(jax.jit(lambda x: bce(y, x))(x)), float(bce(y, x)), rtol=F32_EPS
    )

  def test_config_round_trip_through_json(self):
    loss = bce_jax.BinaryCrossentropy(
      from_logits=True,
      label_smoothing=0.2,
      axis=(1, 2),
      reduction=None,
      name="bce",
      pos_weight=(0.5, 2.0),
    )
    config = json.loads(json.dumps(loss.get_config()))
    self.assertEqual(bce_jax.BinaryCrossentropy.from_config(config), loss)
    self.assertEqual(
      set(config), {"from_logits", "label_smoothing", "axis", "reduction", "name", "pos_weight"}
    )

  def test_keras_config_keys(self):
    keras_config = {
      "name": "binary_crossentropy",
      "reduction": "sum_over_batch_size",
      "dtype": "float32",
      "from_logits": True,
      "label_smoothing": 0.1,
      "axis": -1,
    }
    loss = bce_jax.BinaryCrossentropy.from_config(keras_config)
    self.assertEqual(loss, bce_jax.BinaryCrossentropy(from_logits=True, label_smoothing=0.1))
    wrapped = {"class_name": "BinaryCrossentropy", "config": dict(keras_config, reduction="auto")}
    self.assertEqual(bce_jax.BinaryCrossentropy.from_config(wrapped), loss)
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}}
    self.assertEqual(bce_jax.BinaryCrossentropy.from_config(dict(keras_config, dtype=policy)), loss)

  def test_config_errors(self):
    with self.assertRaisesRegex(ValueError, "Unknown config keys.*from_logit"):
      bce_jax.BinaryCrossentropy.from_config({"from_logit": True})
    with self.assertRaisesRegex(ValueError, "dtype"):
      bce_jax.BinaryCrossentropy.from_config({"dtype": "float16"})
    with self.assertRaisesRegex(TypeError, "config"):
      bce_jax.BinaryCrossentropy.from_config(["from_logits"])


class TrainingTest(parameterized.TestCase):
  """The loss drives an optimizer: the gradient is usable end to end."""

  def test_logistic_regression_converges(self):
    rng = np.random.default_rng(18)
    features = rng.normal(size=(256, 3)).astype(np.float32)
    true_w = np.array([2.0, -1.0, 0.5], np.float32)
    labels = (features @ true_w > 0).astype(np.float32)[:, None]
    bce = bce_jax.BinaryCrossentropy(from_logits=True)

    @jax.jit
    def step(w):
      loss, grad = jax.value_and_grad(lambda w: bce(labels, features @ w[:, None]))(w)
      return w - 1.0 * grad, loss

    w = jnp.zeros(3)
    losses = []
    for _ in range(200):
      w, loss = step(w)
      losses.append(float(loss))
    self.assertLess(losses[-1], 0.2 * losses[0])
    cos = float(w @ true_w / (jnp.linalg.norm(w) * np.linalg.norm(true_w)))
    self.assertGreater(cos, 0.95)


class EagerDispatchTest(parameterized.TestCase):
  """The loss called eagerly: the same values as under jit."""

  @parameterized.parameters("sum_over_batch_size", "sum", "mean_with_sample_weight", None)
  def test_call(self, reduction):
    rng = np.random.default_rng(19)
    y, x = _per_sample_case(rng, (5, 3, 4), from_logits=True)
    w = rng.uniform(0, 2, (5,)).astype(np.float32)
    mask = rng.uniform(size=(5, 3)) > 0.3
    bce = bce_jax.BinaryCrossentropy(
      from_logits=True, label_smoothing=0.1, reduction=reduction, pos_weight=(0.5, 1.0, 2.0, 1.5)
    )
    eager = bce(y, x, sample_weight=w, mask=mask)
    jitted = _call(bce, y, x, sample_weight=w, mask=mask)
    self.assertEqual(eager.shape, jitted.shape)
    self.assertEqual(eager.dtype, jitted.dtype)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=2 * F32_EPS)

  def test_gradient(self):
    y, x = _per_sample_case(np.random.default_rng(20), (6, 2), from_logits=False)
    bce = bce_jax.BinaryCrossentropy()
    grad = jax.grad(lambda x: bce(y, x))
    np.testing.assert_allclose(np.asarray(grad(x)), np.asarray(jax.jit(grad)(x)), rtol=2 * F32_EPS)
