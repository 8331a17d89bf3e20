"""Regression tests for the edges of focal, BCE, the metric state and the loss objects.

Each class pins one defect found by an adversarial probe: the focal label
gradient near logit 0, `pos_weight` at infinite logits, focal second
derivatives at huge logits, metric states of other metrics, the error
messages of the focal entry points, checkpoints of a metric state, and
Keras's `dtype` argument.
"""

import dataclasses
import functools
import pickle
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import bce_jax
from tests import _reference as ref

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
F32_MAX = float(np.finfo(np.float32).max)
_MODES = (("eager", False), ("jit", True))


def _maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


def _focal_label_grad_f64(y, x, gamma):
  """d/dy of ``P**gamma BCE`` for logits, in float64, with ``1 - 2p = -tanh(x / 2)``."""
  y, x = np.float64(y), np.float64(x)
  p = 1 / (1 + np.exp(-x))
  big_p = y * (1 - p) + (1 - y) * p
  bce = y * np.logaddexp(0, -x) + (1 - y) * np.logaddexp(0, x)
  return gamma * big_p ** (gamma - 1) * -np.tanh(x / 2) * bce + big_p**gamma * -x


class FocalLabelGradientNearZeroTest(parameterized.TestCase):
  """d loss / d y_true keeps its digits where ``1 - 2p`` is tiny."""

  def test_reference_matches_float64_finite_difference(self):
    # The analytic reference against a central difference of the float64 focal
    # value, at logits where the derivative is large enough for a difference.
    for gamma in (2.0, 0.5):
      for x in (0.5, -1.0, 2.0):
        for y in (0.25, 0.5):
          h = 1e-5

          def value(y, x=x, gamma=gamma):
            return ref.focal_elementwise(y, np.float64(x), from_logits=True, gamma=gamma)

          fd = (value(np.float64(y + h)) - value(np.float64(y - h))) / (2 * h)
          np.testing.assert_allclose(fd, _focal_label_grad_f64(y, x, gamma), rtol=1e-7)

  @parameterized.product(gamma=(2.0, 0.5), sign=(1.0, -1.0), use_jit=(False, True))
  def test_within_1e6_of_float64(self, gamma, sign, use_jit):
    def loss(y, x):
      return bce_jax.binary_focal_crossentropy_elementwise(y, x, gamma=gamma, from_logits=True)

    grad = _maybe_jit(jax.vmap(jax.grad(loss)), use_jit)
    xs = sign * np.array([1e-6, 3e-5, 1e-4, 1e-6, 3e-5, 1e-4, 1e-4], np.float32)
    ys = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.3], np.float32)
    got = np.asarray(grad(jnp.asarray(ys), jnp.asarray(xs)), np.float64)
    want = np.array([_focal_label_grad_f64(y, np.float64(x), gamma) for y, x in zip(ys, xs)])
    np.testing.assert_allclose(got, want, rtol=1e-6)


class PosWeightAtInfiniteLogitsTest(parameterized.TestCase):
  """The exact value at an infinite logit follows `pos_weight` and smoothing."""

  @parameterized.named_parameters(*_MODES)
  def test_zero_pos_weight_at_minus_inf_is_zero(self, use_jit):
    f = _maybe_jit(
      functools.partial(bce_jax.binary_crossentropy_elementwise, from_logits=True), use_jit
    )
    y = jnp.array([1.0])
    at_inf = f(y, jnp.array([-jnp.inf]), pos_weight=0.0)
    at_huge = f(y, jnp.array([-1e30]), pos_weight=0.0)
    np.testing.assert_array_equal(np.asarray(at_inf), [0.0])
    np.testing.assert_array_equal(np.asarray(at_inf), np.asarray(at_huge))

  @parameterized.named_parameters(*_MODES)
  def test_per_class_pos_weight_and_smoothing(self, use_jit):
    y = jnp.array([[1.0, 1.0, 0.0, 1.0]])
    x = jnp.array([[-jnp.inf, -jnp.inf, -jnp.inf, jnp.inf]])
    w = jnp.array([0.0, 2.0, 0.0, 0.0])

    def f(y, x, smoothing):
      return bce_jax.binary_crossentropy_elementwise(y, x, True, smoothing, pos_weight=w)

    f = _maybe_jit(f, use_jit)
    np.testing.assert_array_equal(np.asarray(f(y, x, 0.0)), [[0.0, np.inf, 0.0, 0.0]])
    # Smoothed labels: the negative term meets +inf, the weightless positive one -inf.
    smoothed = f(y, x, 0.2)
    np.testing.assert_array_equal(np.asarray(smoothed), [[0.0, np.inf, 0.0, np.inf]])

  @parameterized.product(gamma=(0.0, 2.0), use_jit=(False, True))
  def test_reductions_and_focal(self, gamma, use_jit):
    # 4096 entries take the fast sum and its fallback; one holds -inf with pos_weight 0.
    y = jnp.ones((64, 64))
    x = jnp.full((64, 64), 3.0).at[5, 7].set(-jnp.inf)
    want = np.asarray(
      bce_jax.BinaryCrossentropy(from_logits=True, pos_weight=0.0)(y, x.at[5, 7].set(-1e30))
    )
    for loss in (
      bce_jax.BinaryCrossentropy(from_logits=True, pos_weight=0.0),
      bce_jax.BinaryFocalCrossentropy(gamma=gamma, from_logits=True, pos_weight=0.0),
    ):
      got = _maybe_jit(loss, use_jit)(y, x)
      self.assertTrue(np.isfinite(got))
      if isinstance(loss, bce_jax.BinaryCrossentropy):
        self.assertEqual(float(got), float(want))
      grad = _maybe_jit(jax.grad(lambda x, loss=loss: loss(y, x)), use_jit)(x)
      self.assertTrue(np.all(np.isfinite(np.asarray(grad))))
    for focal in (bce_jax.binary_focal_crossentropy_elementwise,):
      got = focal(
        jnp.array([1.0]), jnp.array([-jnp.inf]), gamma=gamma, from_logits=True, pos_weight=0.0
      )
      np.testing.assert_array_equal(np.asarray(got), [0.0])


class FocalSecondDerivativeAtHugeLogitsTest(parameterized.TestCase):
  """d2 loss / dx2 is finite at every finite logit, reverse-over-reverse too."""

  @parameterized.product(
    gamma=GAMMAS,
    options=(
      {},
      {"pos_weight": 2.0},
      {"apply_class_balancing": True, "pos_weight": 0.5},
    ),
  )
  def test_finite_and_equal_across_routes(self, gamma, options):
    mags = np.array([1e30, 1e38, 3e38, F32_MAX, 200.0, 60.0], np.float32)
    x = np.concatenate([mags, -mags, mags, -mags])
    y = np.repeat(np.array([0.0, 0.0, 1.0, 1.0], np.float32), mags.size)

    def total(x):
      return jnp.sum(
        bce_jax.binary_focal_crossentropy_elementwise(
          y, x, gamma=gamma, from_logits=True, **options
        )
      )

    first = jax.grad(total)
    rev_rev = jax.jit(jax.grad(lambda x: jnp.sum(first(x))))(x)
    fwd_rev = jax.jit(lambda x: jax.jvp(first, (x,), (jnp.ones_like(x),))[1])(x)
    # d/dy of d/dx: bounded, as the logit derivative is.
    mixed = jax.jit(
      jax.grad(
        lambda y_: jnp.sum(
          jax.grad(
            lambda x_: jnp.sum(
              bce_jax.binary_focal_crossentropy_elementwise(
                y_, x_, gamma=gamma, from_logits=True, **options
              )
            )
          )(x)
        )
      )
    )(jnp.asarray(y))
    for name, value in (("rev_rev", rev_rev), ("fwd_rev", fwd_rev), ("mixed", mixed)):
      self.assertTrue(np.all(np.isfinite(np.asarray(value))), f"{name}: {value}")
    np.testing.assert_allclose(np.asarray(rev_rev), np.asarray(fwd_rev), rtol=1e-6, atol=1e-30)

  def test_issue_example(self):
    def f(x):
      return bce_jax.binary_focal_crossentropy_elementwise(
        jnp.float32(0.0), x, gamma=5.0, from_logits=True
      )

    x = jnp.float32(1e38)
    self.assertEqual(float(jax.grad(jax.grad(f))(x)), float(jax.hessian(f)(x)))
    self.assertTrue(np.isfinite(float(jax.grad(jax.grad(f))(x))))


# ---------------------------------------------------------------------------
# Metric states know their metric.

BCE_M = bce_jax.BinaryCrossentropyMetric(from_logits=True)
FOCAL_M = bce_jax.BinaryFocalCrossentropyMetric(from_logits=True)
FOCAL3_M = bce_jax.BinaryFocalCrossentropyMetric(from_logits=True, gamma=3.0)
Y = jnp.array([[1.0, 0.0], [0.0, 1.0]])
X = jnp.array([[0.3, -2.0], [1.5, 0.2]])


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BinaryCrossentropyMetric(bce_jax.BinaryCrossentropyMetric):
  """A user's metric named as a bce_jax one, measuring something else (the focal loss)."""

  def formula(self):
    return FOCAL_M.formula()


# Defined outside bce_jax: its states' tag names its module.
LOOKALIKE_M = BinaryCrossentropyMetric(from_logits=True)


def _stack(*states):
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)


class ForeignStatesTest(parameterized.TestCase):
  @parameterized.named_parameters(*_MODES)
  def test_every_method_refuses_another_metrics_state(self, use_jit):
    bce_state = BCE_M.update(BCE_M.init(), Y, X)
    focal_state = FOCAL_M.update(FOCAL_M.init(), Y, X)
    focal3_state = FOCAL3_M.update(FOCAL3_M.init(), Y, X)
    calls = {
      "merge": lambda: _maybe_jit(FOCAL_M.merge, use_jit)(focal_state, bce_state),
      "merge_gamma": lambda: _maybe_jit(FOCAL_M.merge, use_jit)(focal_state, focal3_state),
      "update": lambda: _maybe_jit(FOCAL_M.update, use_jit)(bce_state, Y, X),
      "result": lambda: _maybe_jit(FOCAL3_M.result, use_jit)(focal_state),
      "reduce": lambda: _maybe_jit(BCE_M.reduce, use_jit)(_stack(focal_state, focal_state)),
    }
    for name, call in calls.items():
      with self.subTest(name), self.assertRaisesRegex(ValueError, r"was made by .*Metric\("):
        call()

  def test_message_names_both_configurations(self):
    a = FOCAL_M.init()
    with self.assertRaisesRegex(ValueError, r"`others\[0\]`.*gamma=3\.0.*gamma=2\.0"):
      FOCAL_M.merge(a, FOCAL3_M.init())

  @parameterized.named_parameters(*_MODES)
  def test_a_class_named_as_a_bce_jax_metric_is_another_metric(self, use_jit):
    bce_state = BCE_M.update(BCE_M.init(), Y, X)
    own_state = LOOKALIKE_M.update(LOOKALIKE_M.init(), Y, X)
    self.assertNotEqual(own_state.metric, bce_state.metric)
    bare = re.escape(bce_state.metric)
    qualified = re.escape(own_state.metric)
    self.assertStartsWith(own_state.metric, f"{__name__}.BinaryCrossentropyMetric(")
    # bce_jax's state refused by the lookalike: the message names both tags and the fix.
    calls = (
      ("state", lambda: _maybe_jit(LOOKALIKE_M.update, use_jit)(bce_state, Y, X)),
      ("state", lambda: _maybe_jit(LOOKALIKE_M.result, use_jit)(bce_state)),
      ("state", lambda: _maybe_jit(LOOKALIKE_M.merge, use_jit)(bce_state, own_state)),
      ("others[0]", lambda: _maybe_jit(LOOKALIKE_M.merge, use_jit)(own_state, bce_state)),
      ("states", lambda: _maybe_jit(LOOKALIKE_M.reduce, use_jit)(_stack(bce_state, bce_state))),
    )
    for argname, call in calls:
      refused = rf"`{re.escape(argname)}` was made by {bare}, not by this metric, {qualified}"
      with (
        self.subTest(argname),
        self.assertRaisesRegex(ValueError, rf"{refused}.*another module.*init\(\)"),
      ):
        call()
    # And the other way: bce_jax's metric refuses the lookalike's state.
    with self.assertRaisesRegex(ValueError, rf"`others\[0\]` was made by {qualified}, not by"):
      _maybe_jit(BCE_M.merge, use_jit)(bce_state, own_state)
    with self.assertRaisesRegex(ValueError, rf"`state` was made by {qualified}, not by"):
      _maybe_jit(BCE_M.update, use_jit)(own_state, Y, X)
    # Each keeps working on its own states.
    np.testing.assert_array_equal(
      np.asarray(_maybe_jit(LOOKALIKE_M.merge, use_jit)(own_state, own_state).sums),
      np.asarray(FOCAL_M.merge(*[FOCAL_M.update(FOCAL_M.init(), Y, X)] * 2).sums),
    )

  def test_state_built_by_hand_is_refused(self):
    state = bce_jax.MetricState(jnp.zeros(4, jnp.float32))
    with self.assertRaisesRegex(ValueError, r"`state` was made by no metric.*built by hand"):
      BCE_M.result(state)

  def test_same_configuration_is_accepted(self):
    state = BCE_M.update(BCE_M.init(), Y, X)
    renamed = bce_jax.BinaryCrossentropyMetric(from_logits=True, name="val_bce")
    rebuilt = bce_jax.BinaryCrossentropyMetric.from_config(BCE_M.get_config())
    np.testing.assert_allclose(float(renamed.result(state)), float(BCE_M.result(state)))
    merged = rebuilt.merge(state, renamed.update(renamed.init(), Y, X))
    np.testing.assert_allclose(float(BCE_M.result(merged)), float(BCE_M.result(state)), rtol=1e-7)

  def test_negative_zero_options_are_the_same_configuration(self):
    # -0.0 == 0.0, so the metrics are equal (one jit cache entry as static
    # arguments): their states must be interchangeable too.
    pairs = [
      (bce_jax.BinaryCrossentropyMetric(label_smoothing=-0.0), bce_jax.BinaryCrossentropyMetric()),
      (
        bce_jax.BinaryCrossentropyMetric(pos_weight=(-0.0, 1.0)),
        bce_jax.BinaryCrossentropyMetric(pos_weight=(0.0, 1.0)),
      ),
      (
        bce_jax.BinaryFocalCrossentropyMetric(alpha=-0.0, gamma=-0.0),
        bce_jax.BinaryFocalCrossentropyMetric(alpha=0.0, gamma=0.0),
      ),
    ]
    init = jax.jit(lambda metric: metric.init(), static_argnums=0)
    for negative, positive in pairs:
      with self.subTest(repr(positive)):
        self.assertEqual(negative, positive)
        self.assertEqual(repr(negative), repr(positive))
        self.assertEqual(negative.init().metric, positive.init().metric)
        state = init(positive)
        np.testing.assert_array_equal(init(negative).sums, state.sums)
        negative.result(positive.update(state, Y, X))

  def test_tag_is_static_not_a_leaf(self):
    state = FOCAL_M.init()
    self.assertLen(jax.tree_util.tree_leaves(state), 1)
    self.assertNotEqual(
      jax.tree_util.tree_structure(state), jax.tree_util.tree_structure(BCE_M.init())
    )
    # psum of states in a named vmap keeps the tag and equals merge.
    states = _stack(*(FOCAL_M.update(FOCAL_M.init(), Y[i : i + 1], X[i : i + 1]) for i in range(2)))
    summed = jax.vmap(lambda s: jax.lax.psum(s, "i"), axis_name="i")(states)
    self.assertEqual(summed.metric, state.metric)
    one = jax.tree_util.tree_map(lambda a: a[0], summed)
    np.testing.assert_allclose(
      float(FOCAL_M.result(one)), float(FOCAL_M.result(FOCAL_M.update(state, Y, X))), rtol=1e-6
    )
    # A scan carry and a donated state keep it too.
    scanned, _ = jax.lax.scan(
      lambda s, yx: (FOCAL_M.update(s, yx[0][None], yx[1][None]), None), state, (Y, X)
    )
    self.assertEqual(scanned.metric, state.metric)
    donated = jax.jit(FOCAL_M.update, donate_argnums=0)(FOCAL_M.init(), Y, X)
    self.assertEqual(donated.metric, state.metric)


@dataclasses.dataclass(frozen=True)
class _FourArrays:
  """The MetricState layout before its sums were packed into one array."""

  total: jax.Array
  total_err: jax.Array
  count: jax.Array
  count_err: jax.Array
  _: dataclasses.KW_ONLY
  metric: str | None = None


jax.tree_util.register_dataclass(
  _FourArrays, data_fields=["total", "total_err", "count", "count_err"], meta_fields=["metric"]
)


class CheckpointTest(parameterized.TestCase):
  def _state(self):
    return FOCAL_M.update(FOCAL_M.init(), Y, X)

  def _assert_same(self, restored, state):
    self.assertIsInstance(restored, bce_jax.MetricState)
    self.assertEqual(restored.metric, state.metric)
    np.testing.assert_array_equal(np.asarray(restored.sums), np.asarray(state.sums))
    for name in ("total", "total_err", "count", "count_err"):
      np.testing.assert_array_equal(
        np.asarray(getattr(restored, name)), np.asarray(getattr(state, name))
      )
    # The restored state keeps working.
    FOCAL_M.update(restored, Y, X)

  def _flax_serialization(self):
    """flax.serialization, or the test skipped where flax is not installed."""
    try:
      from flax import serialization
    except ImportError:
      self.skipTest("flax is not installed (it is in the examples extra)")
    return serialization

  def test_pickle(self):
    state = self._state()
    self._assert_same(pickle.loads(pickle.dumps(state)), state)

  def test_orbax(self):
    try:
      import orbax.checkpoint as ocp
    except ImportError:
      self.skipTest("orbax is not installed (it comes with flax, in the examples extra)")
    state = self._state()
    with tempfile.TemporaryDirectory() as tmp:
      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(f"{tmp}/state", state)
      checkpointer.wait_until_finished()
      restored = checkpointer.restore(f"{tmp}/state", FOCAL_M.init())
    self._assert_same(restored, state)

  def test_flax_bytes_and_state_dict(self):
    serialization = self._flax_serialization()
    state = self._state()
    # Inside a train-state-like dict, as Flax users save one.
    saved = serialization.to_bytes({"step": 3, "metric": state})
    restored = serialization.from_bytes({"step": 0, "metric": FOCAL_M.init()}, saved)
    self.assertEqual(restored["step"], 3)
    self._assert_same(restored["metric"], state)
    as_dict = serialization.to_state_dict(state)
    self.assertEqual(set(as_dict), {"sums", "metric"})
    self._assert_same(serialization.from_state_dict(FOCAL_M.init(), as_dict), state)
    with self.assertRaisesRegex(ValueError, r"saved state was made by .*gamma=2\.0.*gamma=3\.0"):
      serialization.from_bytes(FOCAL3_M.init(), serialization.to_bytes(state))
    with self.assertRaisesRegex(ValueError, r"state dict has the keys"):
      serialization.from_state_dict(FOCAL_M.init(), {"total": 1.0})

  def test_bce_jax_tags_are_unchanged(self):
    # Checkpoints hold these strings: a bce_jax class's tag is its bare name and
    # configuration, as it always was, so every saved state keeps restoring.
    self.assertEqual(
      BCE_M.init().metric,
      "BinaryCrossentropyMetric(from_logits=True, label_smoothing=0.0, axis=-1, pos_weight=None)",
    )
    self.assertEqual(
      FOCAL3_M.init().metric,
      "BinaryFocalCrossentropyMetric(apply_class_balancing=False, alpha=0.25, gamma=3.0, "
      "from_logits=True, label_smoothing=0.0, axis=-1, pos_weight=None)",
    )
    self.assertEqual(bce_jax.TopKMetric(ks=(1, 2)).init().metric, "TopKMetric(ks=(1, 2))")
    # A class defined elsewhere: its module and qualified name, then the same configuration.
    self.assertEqual(LOOKALIKE_M.init().metric, f"{__name__}.{BCE_M.init().metric}")

  @parameterized.named_parameters(*_MODES)
  def test_bare_tag_of_a_class_outside_bce_jax_restores_into_its_qualified_tag(self, use_jit):
    # Before tags named the module, the lookalike's states were tagged with its
    # bare class name: such a checkpoint restores into its init() and works on.
    serialization = self._flax_serialization()
    state = LOOKALIKE_M.update(LOOKALIKE_M.init(), Y, X)
    bare = BCE_M.init().metric  # the class name and configuration, no module
    saved = {"sums": np.asarray(state.sums), "metric": bare}
    restored = serialization.from_state_dict(LOOKALIKE_M.init(), saved)
    self.assertEqual(restored.metric, state.metric)
    np.testing.assert_array_equal(np.asarray(restored.sums), np.asarray(state.sums))
    packed = serialization.msgpack_serialize({"step": 3, "metric": saved})
    from_bytes = serialization.from_bytes({"step": 0, "metric": LOOKALIKE_M.init()}, packed)
    self.assertEqual(from_bytes["metric"].metric, state.metric)
    names = ("total", "total_err", "count", "count_err")
    four = {name: np.asarray(getattr(state, name)) for name in names}
    four_back = serialization.from_state_dict(LOOKALIKE_M.init(), {**four, "metric": bare})
    self.assertEqual(four_back.metric, state.metric)
    for back in (restored, from_bytes["metric"], four_back):
      np.testing.assert_array_equal(
        np.asarray(_maybe_jit(LOOKALIKE_M.update, use_jit)(back, Y, X).sums),
        np.asarray(LOOKALIKE_M.update(state, Y, X).sums),
      )
      _maybe_jit(LOOKALIKE_M.merge, use_jit)(state, back)
    # Another class name or configuration is refused, whatever the module.
    others = (
      bce_jax.BinaryCrossentropyMetric().init().metric,
      f"{__name__}.Other{bare}",
      bare.replace("(", "Two(", 1),
    )
    for tag in others:
      with self.subTest(tag), self.assertRaisesRegex(ValueError, r"saved state was made by"):
        serialization.from_state_dict(LOOKALIKE_M.init(), {**saved, "metric": tag})

  @parameterized.named_parameters(*_MODES)
  def test_restore_leaves_the_module_out_and_the_methods_do_not(self, use_jit):
    # A metric class defined in a training script is __main__.MyMetric when the
    # script runs and train.MyMetric where an evaluation imports it; a refactor
    # moves it. Its checkpoints restore by class name and configuration, and
    # take the target's tag; a metric's methods still refuse the other module.
    serialization = self._flax_serialization()
    state = LOOKALIKE_M.update(LOOKALIKE_M.init(), Y, X)
    bare = BCE_M.init().metric
    for module in ("__main__", "train", "mylib.moved.metrics"):
      moved = f"{module}.{bare}"
      with self.subTest(module):
        saved = serialization.to_bytes(dataclasses.replace(state, metric=moved))
        restored = serialization.from_bytes(LOOKALIKE_M.init(), saved)
        self.assertEqual(restored.metric, state.metric)
        np.testing.assert_array_equal(
          np.asarray(_maybe_jit(LOOKALIKE_M.update, use_jit)(restored, Y, X).sums),
          np.asarray(LOOKALIKE_M.update(state, Y, X).sums),
        )
        # And the other way: this module's checkpoint into a target of that module.
        target = dataclasses.replace(LOOKALIKE_M.init(), metric=moved)
        back = serialization.from_bytes(target, serialization.to_bytes(state))
        self.assertEqual(back.metric, moved)
        with self.assertRaisesRegex(ValueError, r"another module.*dataclasses\.replace"):
          _maybe_jit(LOOKALIKE_M.update, use_jit)(dataclasses.replace(state, metric=moved), Y, X)
        with self.assertRaisesRegex(ValueError, r"`others\[0\]` was made by .*another module"):
          _maybe_jit(LOOKALIKE_M.merge, use_jit)(state, dataclasses.replace(state, metric=moved))
    # bce_jax's own metric refuses the lookalike's states in its methods too.
    with self.assertRaisesRegex(ValueError, r"another module"):
      _maybe_jit(BCE_M.update, use_jit)(state, Y, X)

  def test_orbax_four_array_layout_restores_through_flax(self):
    # The changelog's path for an orbax checkpoint saved before the sums were packed.
    try:
      import orbax.checkpoint as ocp
      from flax import serialization
    except ImportError:
      self.skipTest("orbax and flax are not installed (they are in the examples extra)")
    state = self._state()
    names = ("total", "total_err", "count", "count_err")
    old = _FourArrays(*(getattr(state, name) for name in names), metric=state.metric)
    with tempfile.TemporaryDirectory() as tmp:
      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(f"{tmp}/state", old)
      checkpointer.wait_until_finished()
      with self.assertRaises(ValueError):  # the tree no longer matches
        checkpointer.restore(f"{tmp}/state", FOCAL_M.init())
      arrays = checkpointer.restore(f"{tmp}/state")
    self.assertEqual(set(arrays), set(names))
    tag = FOCAL_M.init().metric
    self._assert_same(
      serialization.from_state_dict(FOCAL_M.init(), {**arrays, "metric": tag}), state
    )

  def test_flax_restores_the_four_array_layout(self):
    # A checkpoint saved before the sums were packed into one array.
    serialization = self._flax_serialization()
    state = self._state()
    names = ("total", "total_err", "count", "count_err")
    old = {name: np.asarray(getattr(state, name)) for name in names}
    old["metric"] = state.metric
    self._assert_same(serialization.from_state_dict(FOCAL_M.init(), old), state)
    saved = serialization.msgpack_serialize({"step": 3, "metric": old})
    restored = serialization.from_bytes({"step": 0, "metric": FOCAL_M.init()}, saved)
    self._assert_same(restored["metric"], state)
    # States stacked for reduce(): each array [K], packed into [K, 4].
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), state, FOCAL_M.init(), state)
    old_stacked = {name: np.asarray(getattr(stacked, name)) for name in names}
    back = serialization.from_state_dict(stacked, {**old_stacked, "metric": state.metric})
    np.testing.assert_array_equal(np.asarray(back.sums), np.asarray(stacked.sums))
    self._assert_same(FOCAL_M.reduce(back), FOCAL_M.merge(state, state))
    # The tag is checked as for the packed layout, and the arrays must agree in shape.
    with self.assertRaisesRegex(ValueError, r"saved state was made by .*gamma=2\.0.*gamma=3\.0"):
      serialization.from_state_dict(FOCAL3_M.init(), old)
    with self.assertRaisesRegex(
      ValueError, r"four-array layout.*arrays of one shape.*count \(2,\)"
    ):
      serialization.from_state_dict(FOCAL_M.init(), {**old, "count": np.zeros(2, np.float32)})

  def test_flax_restore_refuses_a_shape_or_dtype_unlike_the_target(self):
    # flax.serialization restores any array into any leaf; the state checks its own.
    serialization = self._flax_serialization()
    state = self._state()
    stacked = {"sums": np.zeros((2, 4), np.float32), "metric": state.metric}
    with self.assertRaisesRegex(
      ValueError, r"`sums` has shape \(2, 4\).*target's has shape \(4,\)"
    ):
      serialization.from_state_dict(FOCAL_M.init(), stacked)
    old = {name: np.asarray(getattr(state, name)) for name in ("total", "total_err", "count")}
    old.update(count_err=np.float64(0.0), metric=state.metric)
    with self.assertRaisesRegex(ValueError, r"`sums` has shape \(4,\) and dtype float64"):
      serialization.from_state_dict(FOCAL_M.init(), old)
    target = jax.tree_util.tree_map(lambda *a: jnp.stack(a), state, state)
    back = serialization.from_state_dict(target, {**stacked, "metric": state.metric})
    self.assertEqual(back.sums.shape, (2, 4))

  def test_import_does_not_load_flax_and_late_flax_registers(self):
    try:
      import flax  # noqa: F401
    except ImportError:
      self.skipTest("flax is not installed (it is in the examples extra)")
    script = (
      "import sys, bce_jax\n"
      "assert 'flax' not in sys.modules, 'import bce_jax loaded flax'\n"
      "m = bce_jax.BinaryCrossentropyMetric()\n"
      "import flax.serialization as s\n"
      "state = m.init()\n"
      "back = s.from_bytes(m.init(), s.to_bytes(state))\n"
      "assert back.metric == state.metric\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=_ROOT)


_ROOT = str(__import__("pathlib").Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------------
# Errors.


class FocalErrorsNameTheFocalFunctionTest(parameterized.TestCase):
  @parameterized.named_parameters(*_MODES)
  def test_scalar_inputs(self, use_jit):
    focal_calls = (
      lambda y, x: bce_jax.binary_focal_crossentropy(y, x),
      lambda y, x: bce_jax.BinaryFocalCrossentropy()(y, x),
      lambda y, x: FOCAL_M.update(FOCAL_M.init(), y, x),
    )
    for call in focal_calls:
      with self.assertRaisesRegex(
        ValueError, r"scalar.*use binary_focal_crossentropy_elementwise\."
      ):
        _maybe_jit(call, use_jit)(jnp.float32(1.0), jnp.float32(0.5))
    with self.assertRaisesRegex(ValueError, r"scalar.*use binary_crossentropy_elementwise\."):
      _maybe_jit(bce_jax.binary_crossentropy, use_jit)(jnp.float32(1.0), jnp.float32(0.5))

  def test_empty_axis(self):
    for cls in (bce_jax.BinaryFocalCrossentropy, bce_jax.BinaryFocalCrossentropyMetric):
      with self.assertRaisesRegex(TypeError, r"`axis`.*binary_focal_crossentropy_elementwise"):
        cls(axis=())
    with self.assertRaisesRegex(TypeError, r"`axis`.*binary_focal_crossentropy_elementwise"):
      bce_jax.binary_focal_crossentropy(jnp.ones((2, 2)), jnp.ones((2, 2)), axis=())
    with self.assertRaisesRegex(TypeError, r"`axis`.* binary_crossentropy_elementwise"):
      bce_jax.BinaryCrossentropy(axis=())


class BoolPosWeightTest(parameterized.TestCase):
  @parameterized.named_parameters(*_MODES)
  def test_functions_refuse_bool(self, use_jit):
    y, p = jnp.array([[1.0, 0.0]]), jnp.array([[0.8, 0.3]])
    functions = (
      bce_jax.binary_crossentropy,
      bce_jax.binary_crossentropy_elementwise,
      bce_jax.binary_focal_crossentropy,
      bce_jax.binary_focal_crossentropy_elementwise,
    )
    for f in functions:
      for weight in (True, np.array([True, False])):
        with self.assertRaisesRegex(TypeError, r"`pos_weight` must be a number.*not a bool"):
          _maybe_jit(lambda y, p, f=f, weight=weight: f(y, p, pos_weight=weight), use_jit)(y, p)

  def test_objects_refuse_bool(self):
    classes = (
      bce_jax.BinaryCrossentropy,
      bce_jax.BinaryFocalCrossentropy,
      bce_jax.BinaryCrossentropyMetric,
      bce_jax.BinaryFocalCrossentropyMetric,
    )
    for cls in classes:
      for weight in (True, (True, False)):
        with self.assertRaisesRegex(TypeError, r"`pos_weight` must be a number.*not a bool"):
          cls(pos_weight=weight)


class KerasDtypeTest(parameterized.TestCase):
  @parameterized.product(
    cls=(bce_jax.BinaryCrossentropy, bce_jax.BinaryFocalCrossentropy),
    dtype=("float32", "float16", "bfloat16", jnp.float32, "mixed_float16"),
  )
  def test_refused_with_the_reason(self, cls, dtype):
    with self.assertRaisesRegex(ValueError, r"`dtype` is not supported.*float32.*Remove `dtype=`"):
      cls(from_logits=True, dtype=dtype)

  def test_none_is_the_default(self):
    for cls in (bce_jax.BinaryCrossentropy, bce_jax.BinaryFocalCrossentropy):
      loss = cls(dtype=None)
      self.assertEqual(loss, cls())
      self.assertEqual(hash(loss), hash(cls()))
      self.assertNotIn("dtype", loss.get_config())
      self.assertNotIn("dtype", repr(loss))
      keras_config = {"from_logits": True, "dtype": "float32"}
      self.assertEqual(cls.from_config(keras_config), cls(from_logits=True))
      self.assertEqual(dataclasses.replace(loss, from_logits=True), cls(from_logits=True))


if __name__ == "__main__":
  absltest.main()
