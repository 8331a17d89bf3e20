"""Eager calls: one jitted callable per configuration, checked as it is traced.

An eager call with jax arrays goes straight to a jitted callable; its
argument checks run when that callable is traced, once per input signature.
These tests show that it gives the same values as the first, checked, call
and as the jitted call (to the bit or within 1 ulp), for every input dtype,
weight and mask, that a bad call raises the same error every time (even
after good calls of the same object, the metric's states included), that a
plan made while tracing holds no tracer, and that the x64 mode is part of
the plan.
"""

import copy
import dataclasses
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import bce_jax
from tests import _reference as ref

F32_EPS = float(np.finfo(np.float32).eps)


def _case(seed, shape=(6, 4)):
  rng = np.random.default_rng(seed)
  y = jnp.asarray(rng.random(shape) < 0.5, jnp.float32)
  x = jnp.asarray(3.0 * rng.standard_normal(shape), jnp.float32)
  return y, x


_CALLS = {
  "loss": lambda y, x: bce_jax.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)(y, x),
  "loss_pos_weight": lambda y, x: bce_jax.BinaryCrossentropy(
    from_logits=True, pos_weight=(0.5, 1.0, 2.0, 1.5)
  )(y, x),
  "function": lambda y, x: bce_jax.binary_crossentropy(y, x, True, 0.1),
  "elementwise": lambda y, x: bce_jax.binary_crossentropy_elementwise(y, x, True, 0.1),
  "focal_function": lambda y, x: bce_jax.binary_focal_crossentropy(y, x, from_logits=True),
  "focal_loss": lambda y, x: bce_jax.BinaryFocalCrossentropy(from_logits=True)(y, x),
}


class PlannedCallTest(parameterized.TestCase):
  @parameterized.named_parameters(*_CALLS.items())
  def test_planned_calls_equal_the_checked_and_jitted_ones(self, call):
    y, x = _case(0)
    first, second = call(y, x), call(y, x)  # the second call is planned
    jitted = jax.jit(call)(y, x)
    chex.assert_trees_all_equal(first, second)
    self.assertEqual(first.dtype, jitted.dtype)
    np.testing.assert_allclose(np.asarray(second), np.asarray(jitted), rtol=2 * F32_EPS)

  def test_planned_values_match_the_reference(self):
    y, x = _case(1)
    bce = bce_jax.BinaryCrossentropy(from_logits=True, label_smoothing=0.2, pos_weight=2.0)
    want = ref.elementwise(np.asarray(y), np.asarray(x), True, 0.2, pos_weight=2.0).mean()
    for _ in range(3):
      np.testing.assert_allclose(float(bce(y, x)), want, rtol=4 * F32_EPS)

  def test_metric_update_is_planned_and_exact(self):
    y, x = _case(2)
    m = bce_jax.BinaryCrossentropyMetric(from_logits=True, label_smoothing=0.1)
    w = jnp.asarray(np.linspace(0.0, 2.0, 6), jnp.float32)
    state = m.init()
    for _ in range(3):
      state = m.update(state, y, x, w)
    self.assertEqual(state.metric, m.init().metric)
    jitted = m.init()
    for _ in range(3):
      jitted = jax.jit(m.update)(jitted, y, x, w)
    chex.assert_trees_all_equal(state, jitted)
    want = ref.elementwise(np.asarray(y), np.asarray(x), True, 0.1).mean(-1)
    want = float((want * np.asarray(w)).sum() / np.asarray(w).sum())
    np.testing.assert_allclose(float(m.result(state)), want, rtol=8 * F32_EPS)


class ChecksStillRunTest(parameterized.TestCase):
  def test_a_bad_shape_after_good_calls_raises_every_time(self):
    y, x = _case(3)
    bce = bce_jax.BinaryCrossentropy(from_logits=True)
    bce(y, x)
    bce(y, x)
    for _ in range(2):
      with self.assertRaisesRegex(ValueError, "`y_true` and `y_pred` must have the same shape"):
        bce(y[:, :3], x)
      with self.assertRaisesRegex(ValueError, "`sample_weight` with shape"):
        bce(y, x, sample_weight=jnp.ones((5,)))

  def test_a_bad_dtype_after_good_calls_raises(self):
    y, x = _case(4)
    bce = bce_jax.BinaryCrossentropy(from_logits=True)
    mask = jnp.ones((6,), bool)
    bce(y, x, mask=mask)
    with self.assertRaisesRegex(TypeError, "`mask` must be a boolean array"):
      bce(y, x, mask=mask.astype(jnp.float32))
    with self.assertRaisesRegex(TypeError, "`y_pred` has complex dtype"):
      bce(y, x.astype(jnp.complex64))

  @parameterized.parameters(1.0, True)
  def test_an_axis_equal_to_a_valid_int_is_refused_after_good_calls(self, axis):
    y, p = jnp.zeros((2, 3)), jnp.full((2, 3), 0.3)
    bce_jax.binary_crossentropy(y, p, axis=1)
    bce_jax.binary_crossentropy(y, p, axis=1)  # planned
    for fn in (bce_jax.binary_crossentropy, bce_jax.binary_focal_crossentropy):
      with self.assertRaisesRegex(TypeError, "`axis` must be an int"):
        fn(y, p, axis=axis)
      with self.assertRaisesRegex(TypeError, "`axis` must be an int"):
        fn(jnp.zeros((2, 3, 4)), jnp.full((2, 3, 4), 0.3), axis=(axis, 2))

  def test_function_options_are_checked_every_time(self):
    y, x = _case(5)
    bce_jax.binary_crossentropy(y, x, True, 0.1)
    for _ in range(2):
      with self.assertRaisesRegex(ValueError, "`label_smoothing` must be in"):
        bce_jax.binary_crossentropy(y, x, True, 1.5)
      with self.assertRaisesRegex(ValueError, "`axis` 2 is out of range"):
        bce_jax.binary_crossentropy(y, x, True, 0.1, axis=2)
    # An axis given as a list is not hashable: it is checked, not planned.
    got = bce_jax.binary_crossentropy(y, x, True, 0.1, axis=[0, 1])
    np.testing.assert_allclose(
      float(got), float(bce_jax.binary_crossentropy(y, x, True, 0.1, axis=(0, 1))), rtol=0
    )

  def test_metric_refuses_foreign_and_malformed_states_after_updates(self):
    y, x = _case(6)
    m = bce_jax.BinaryCrossentropyMetric(from_logits=True)
    other = bce_jax.BinaryCrossentropyMetric(from_logits=False)
    state = m.update(m.init(), y, x)
    state = m.update(state, y, x)
    with self.assertRaisesRegex(ValueError, "`state` was made by"):
      m.update(other.init(), y, x)
    bad = bce_jax.MetricState(state.sums[None], metric=state.metric)
    with self.assertRaisesRegex(ValueError, r"`state.sums` must be a float32 array of shape \[4\]"):
      m.update(bad, y, x)


class PlanContextTest(parameterized.TestCase):
  def test_a_plan_made_while_tracing_holds_no_tracer(self):
    y, x = _case(7, (3, 5))
    bce = bce_jax.BinaryCrossentropy(from_logits=True, label_smoothing=0.3, pos_weight=1.5)
    # Concrete arrays closed over by a traced function: the first call, and
    # the plan, are made while tracing.
    traced = jax.jit(lambda: bce(y, x))()
    with jax.checking_leaks():
      eager = bce(y, x)
    np.testing.assert_allclose(float(eager), float(traced), rtol=2 * F32_EPS)
    self.assertIsInstance(eager, jax.Array)

  def test_x64_mode_is_part_of_the_plan(self):
    y, x = _case(8)
    bce = bce_jax.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)
    self.assertEqual(bce(y, x).dtype, jnp.float32)
    with jax.enable_x64(True):
      x64 = np.asarray(x, np.float64)
      got = bce(jnp.asarray(y, jnp.float64), jnp.asarray(x64))
      self.assertEqual(got.dtype, jnp.float64)
      want = ref.elementwise(np.asarray(y, np.float64), x64, True, 0.1).mean()
      np.testing.assert_allclose(float(got), want, rtol=1e-13)
    self.assertEqual(bce(y, x).dtype, jnp.float32)


class SmoothingConstantTest(parameterized.TestCase):
  """The label smoothing is a constant of an eager call's program, not an argument."""

  def test_an_unweighted_eager_call_dispatches_only_its_inputs(self):
    y, x = _case(9)
    bce = bce_jax.BinaryCrossentropy(from_logits=True, label_smoothing=0.25)
    bce(y, x), bce(y, x)
    entry = bce_jax._eager._EAGER[(bce, False, False)]  # the configuration's callable, x64 off
    lowered = entry.call.lower(y, x, entry.pos_weight, None, None)
    # y_true and y_pred: no array for the smoothing (None leaves no parameter).
    self.assertEqual(len(jax.tree.leaves(lowered.args_info)), 2)

  @parameterized.product(
    smoothing=(0.1, 1 / 3, 0.999), dtype=(jnp.float32, jnp.bfloat16, jnp.float16)
  )
  def test_eager_values_equal_the_checked_ones_to_the_bit(self, smoothing, dtype):
    y, x, w, _ = _weighted_case(10, (6, 5), dtype)
    p = jax.nn.sigmoid(x)
    metric = bce_jax.BinaryCrossentropyMetric(label_smoothing=smoothing)
    calls = (
      lambda: bce_jax.BinaryCrossentropy(from_logits=True, label_smoothing=smoothing)(y, x, w),
      lambda: bce_jax.binary_crossentropy(y, p, label_smoothing=smoothing),
      lambda: bce_jax.binary_focal_crossentropy_elementwise(
        y, x, from_logits=True, label_smoothing=smoothing
      ),
      lambda: metric.update(metric.init(), y, p, w),
    )
    for call in calls:
      first, second, third = call(), call(), call()  # checked, then eager
      chex.assert_trees_all_equal(first, second, third)


def _weighted_case(seed, shape, dtype):
  rng = np.random.default_rng(seed)
  y = jnp.asarray(rng.random(shape) < 0.5, dtype)
  x = jnp.asarray(3.0 * rng.standard_normal(shape), dtype)
  w = jnp.asarray(rng.random(shape[0]), jnp.float32)
  m = jnp.asarray(np.arange(shape[0]) % 3 != 1)
  return y, x, w, m


def _assert_within_one_ulp(got, want):
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_array_max_ulp(got, want, maxulp=1)


_OBJECTS = {
  "bce": bce_jax.BinaryCrossentropy(from_logits=True),
  "bce_probabilities": bce_jax.BinaryCrossentropy(label_smoothing=0.1),
  "focal": bce_jax.BinaryFocalCrossentropy(from_logits=True, gamma=1.5),
  "bce_per_sample": bce_jax.BinaryCrossentropy(from_logits=True, reduction=None),
}


class SignatureTest(parameterized.TestCase):
  """One object called with every signature in turn: each is its own compiled program."""

  @parameterized.named_parameters(*_OBJECTS.items())
  def test_each_signature_equals_its_jitted_call(self, loss):
    signatures = (
      ((6, 4), jnp.float32, ()),
      ((6, 4), jnp.bfloat16, ("sample_weight",)),
      ((6, 2, 3), jnp.float32, ("mask",)),
      ((6, 4), jnp.float32, ("sample_weight", "mask")),
    )
    jitted_loss = jax.jit(lambda y, x, kw: loss(y, x, **kw))
    for shape, dtype, names in signatures:
      y, x, w, m = _weighted_case(1, shape, dtype)
      if not loss.from_logits:
        x = jax.nn.sigmoid(x)
      kw = {name: {"sample_weight": w, "mask": m}[name] for name in names}
      first, second = loss(y, x, **kw), loss(y, x, **kw)  # checked, then eager
      jitted = jitted_loss(y, x, kw)
      chex.assert_trees_all_equal(first, second)
      self.assertEqual(second.dtype, jitted.dtype)
      _assert_within_one_ulp(second, jitted)

  def test_functions_per_dtype_equal_their_jitted_calls(self):
    calls = [
      lambda y, x: bce_jax.binary_crossentropy(y, x, from_logits=True),
      lambda y, x: bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True),
      lambda y, x: bce_jax.binary_focal_crossentropy_elementwise(y, x, True, 0.3, 1.0, True),
    ]
    for dtype in (jnp.float32, jnp.bfloat16):
      y, x, _, _ = _weighted_case(2, (5, 3), dtype)
      for call in calls:
        eager = [call(y, x) for _ in range(2)]
        chex.assert_trees_all_equal(*eager)
        _assert_within_one_ulp(eager[1], jax.jit(call)(y, x))

  def test_numpy_inputs_are_checked_and_give_the_same_values(self):
    y, x, w, _ = _weighted_case(3, (4, 5), jnp.float32)
    bce = bce_jax.BinaryCrossentropy(from_logits=True)
    eager = bce(y, x, w)
    bce(y, x, w)
    with_numpy = bce(np.asarray(y), np.asarray(x), np.asarray(w))
    chex.assert_trees_all_equal(eager, with_numpy)
    with self.assertRaisesRegex(ValueError, "`sample_weight` with shape"):
      bce(np.asarray(y), np.asarray(x), np.ones(3, np.float32))

  def test_the_same_shapes_in_another_dtype_are_checked_again(self):
    y, x = _case(4)
    bce = bce_jax.BinaryCrossentropy(from_logits=True)
    mask = jnp.ones((6,), bool)
    for _ in range(2):
      bce(y, x, mask=mask)
    for _ in range(2):
      with self.assertRaisesRegex(TypeError, "`mask` must be a boolean array"):
        bce(y, x, mask=jnp.ones((6,), jnp.int32))
      with self.assertRaisesRegex(TypeError, "`y_true` has complex dtype"):
        bce(y.astype(jnp.complex64), x, mask=mask)

  def test_a_weight_after_unweighted_calls_is_checked(self):
    y, x = _case(5)
    bce = bce_jax.BinaryCrossentropy(from_logits=True)
    bce(y, x)
    bce(y, x)
    for _ in range(2):
      with self.assertRaisesRegex(ValueError, "`mask` with shape"):
        bce(y, x, mask=jnp.ones((4, 6), bool))
      with self.assertRaisesRegex(TypeError, "`sample_weight` has complex dtype"):
        bce(y, x, sample_weight=jnp.ones((6,), jnp.complex64))

  def test_elementwise_shapes_are_checked_after_good_calls(self):
    y, x = _case(6)
    for _ in range(2):
      bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True)
    for _ in range(2):
      with self.assertRaisesRegex(ValueError, "`y_true` and `y_pred` must have the same shape"):
        bce_jax.binary_crossentropy_elementwise(y[:, :2], x, from_logits=True)


class MetricEagerTest(parameterized.TestCase):
  def _states(self):
    y, x, w, m = _weighted_case(7, (6, 4), jnp.float32)
    metric = bce_jax.BinaryFocalCrossentropyMetric(from_logits=True)
    state = metric.init()
    for kw in ({}, {"sample_weight": w}, {"mask": m}, {}):
      state = metric.update(state, y, x, **kw)
    return metric, state, (y, x, w, m)

  def test_eager_methods_equal_jitted_ones(self):
    metric, state, (y, x, w, m) = self._states()
    jitted = metric.init()
    for kw in ({}, {"sample_weight": w}, {"mask": m}, {}):
      jitted = jax.jit(lambda s, y, x, kw: metric.update(s, y, x, **kw))(jitted, y, x, kw)
    chex.assert_trees_all_equal(state, jitted)
    self.assertEqual(jax.tree_util.tree_structure(state), jax.tree_util.tree_structure(jitted))
    chex.assert_trees_all_equal(metric.merge(state, state), jax.jit(metric.merge)(state, state))
    chex.assert_trees_all_equal(metric.result(state), jax.jit(metric.result)(state))

  def test_an_eager_state_is_an_ordinary_state(self):
    metric, state, _ = self._states()
    self.assertIs(type(state), bce_jax.MetricState)
    self.assertEqual(state.metric, metric.init().metric)
    chex.assert_trees_all_equal(pickle.loads(pickle.dumps(state)), state)
    replaced = dataclasses.replace(state, sums=state.sums.at[3].set(0))
    self.assertEqual(float(replaced.count_err), 0.0)
    with self.assertRaises(dataclasses.FrozenInstanceError):
      state.sums = jnp.zeros(4)  # type: ignore[misc]
    with self.assertRaises(AttributeError):  # a view of `sums`, not a field
      state.total = jnp.float32(0)  # type: ignore[misc]

  def test_eager_update_and_merge_return_one_array(self):
    # One output array per call: jax's dispatch pays for each output.
    metric, state, (y, x, w, m) = self._states()
    for kw in ({}, {"sample_weight": w}, {"mask": m}):
      with self.subTest(**{k: True for k in kw}):
        updated = [metric.update(state, y, x, **kw) for _ in range(2)]  # checked, then eager
        for out in updated:
          self.assertLen(jax.tree_util.tree_leaves(out), 1)
          self.assertIs(type(out.sums), type(y))
          chex.assert_shape(out.sums, (4,))
    for others in ((state,), (state, state)):
      merged = [metric.merge(state, *others) for _ in range(2)]
      for out in merged:
        self.assertLen(jax.tree_util.tree_leaves(out), 1)
        chex.assert_shape(out.sums, (4,))

  def test_malformed_states_are_refused_every_time_by_every_method(self):
    metric, state, (y, x, _, _) = self._states()
    metric.merge(state, state)
    metric.result(state)
    bad_shape = dataclasses.replace(state, sums=state.sums[:3])
    bad_dtype = dataclasses.replace(state, sums=state.sums.astype(jnp.int32))
    shape_error = r"`{}.sums` must be a float32 array of shape \[4\].*got shape \(3,\)"
    dtype_error = r"`{}.sums` must be a float32 array of shape \[4\].*dtype int32"
    for _ in range(2):
      with self.assertRaisesRegex(ValueError, shape_error.format("state")):
        metric.update(bad_shape, y, x)
      with self.assertRaisesRegex(ValueError, dtype_error.format("state")):
        metric.update(bad_dtype, y, x)
      with self.assertRaisesRegex(ValueError, shape_error.format(r"others\[1\]")):
        metric.merge(state, state, bad_shape)
      with self.assertRaisesRegex(ValueError, dtype_error.format("state")):
        metric.merge(bad_dtype, state)
      with self.assertRaisesRegex(ValueError, shape_error.format("state")):
        metric.result(bad_shape)
      with self.assertRaisesRegex(ValueError, "`y_true` and `y_pred` must have the same shape"):
        metric.update(state, y[:, :3], x)

  def test_a_used_metric_equals_a_fresh_one(self):
    # Eager calls keep the state's tag on the metric object: not a field.
    metric, state, _ = self._states()
    fresh = bce_jax.BinaryFocalCrossentropyMetric(from_logits=True)
    self.assertEqual(metric, fresh)
    self.assertEqual(hash(metric), hash(fresh))
    self.assertEqual(metric.get_config(), fresh.get_config())
    self.assertEqual(repr(metric), repr(fresh))
    self.assertEqual(dataclasses.asdict(metric), dataclasses.asdict(fresh))
    # Nor in the instance dict, pickles or copies: what they hold does not depend
    # on whether the metric was used, and the fields rebuild it.
    self.assertEqual(vars(metric), vars(fresh))
    self.assertEqual(type(metric)(**vars(metric)), fresh)
    self.assertEqual(pickle.dumps(metric), pickle.dumps(fresh))
    for duplicate in (copy.copy(metric), copy.deepcopy(metric)):
      self.assertEqual(vars(duplicate), vars(fresh))
      self.assertEqual(duplicate.init().metric, state.metric)
    copied = pickle.loads(pickle.dumps(metric))
    self.assertEqual(copied, fresh)
    chex.assert_trees_all_equal(copied.merge(state, state), fresh.merge(state, state))
    renamed = dataclasses.replace(metric, gamma=3.0)
    with self.assertRaisesRegex(ValueError, "was made by"):
      renamed.result(state)

  def test_a_subclass_of_the_same_name_gets_its_own_eager_callable(self):
    # Its eager callable is its own: keyed by its class as well as its tag (which
    # names its module, so differs from the parent's; the parent's states are refused).
    focal = bce_jax.BinaryFocalCrossentropyMetric(from_logits=True)

    @jax.tree_util.register_static
    @dataclasses.dataclass(frozen=True)
    class BinaryCrossentropyMetric(bce_jax.BinaryCrossentropyMetric):
      def formula(self):
        return focal.formula()

    y, x, _, _ = _weighted_case(9, (6, 4), jnp.float32)
    parent = bce_jax.BinaryCrossentropyMetric(from_logits=True)
    child = BinaryCrossentropyMetric(from_logits=True)
    for _ in range(2):
      bce_state = parent.update(parent.init(), y, x)
      child_state = child.update(child.init(), y, x)
    chex.assert_trees_all_equal(child_state.sums, focal.update(focal.init(), y, x).sums)
    self.assertGreater(float(bce_state.total), float(child_state.total))
    self.assertStartsWith(child_state.metric, f"{__name__}.MetricEagerTest.")
    self.assertEndsWith(child_state.metric, f".<locals>.{bce_state.metric}")
    with self.assertRaisesRegex(ValueError, "another module"):
      child.update(bce_state, y, x)

  def test_a_state_of_another_configuration_is_refused_after_updates(self):
    _, state, (y, x, _, _) = self._states()
    other = bce_jax.BinaryFocalCrossentropyMetric(from_logits=True, gamma=3.0)
    for _ in range(2):
      with self.assertRaisesRegex(ValueError, "was made by"):
        other.update(state, y, x)
      with self.assertRaisesRegex(ValueError, "was made by"):
        other.merge(other.init(), state)
      with self.assertRaisesRegex(ValueError, "was made by"):
        other.result(state)
