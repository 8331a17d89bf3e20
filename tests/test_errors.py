"""Bad input: every mistake raises a clear error naming the argument.

README, "Rules worth knowing", Errors: wrong shapes, options or dtypes raise
`ValueError`/`TypeError` at trace time, naming the argument, what was received
and what was expected.

Shape, dtype and configuration errors are checked jitted (they must raise
while tracing) and eager. Value errors are opt-in through `bce_jax.checked`.
"""

import functools
import json
import re

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax.experimental import checkify

import bce_jax
from tests import _reference as ref

B, T, D = 4, 3, 2  # batch, time, last axis; all different so no shape is ambiguous


def _inputs(shape, from_logits=False, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, shape).astype(np.float32)
  x = rng.normal(0, 2, shape) if from_logits else rng.uniform(0.05, 0.95, shape)
  return jnp.asarray(y), jnp.asarray(x, jnp.float32)


def _function(y_true, y_pred, **kwargs):
  return bce_jax.binary_crossentropy(y_true, y_pred, **kwargs)


def _elementwise(y_true, y_pred, **kwargs):
  return bce_jax.binary_crossentropy_elementwise(y_true, y_pred, **kwargs)


def _loss(y_true, y_pred, sample_weight=None, mask=None, **config):
  return bce_jax.BinaryCrossentropy(**config)(y_true, y_pred, sample_weight, mask)


def _metric(y_true, y_pred, sample_weight=None, mask=None, **config):
  m = bce_jax.BinaryCrossentropyMetric(**config)
  return m.result(m.update(m.init(), y_true, y_pred, sample_weight, mask))


APIS = {"function": _function, "elementwise": _elementwise, "loss": _loss, "metric": _metric}
WEIGHTED_APIS = ("loss", "metric")


def _shape(shape):
  return re.escape(str(tuple(shape)))


class _ErrorTestCase(chex.TestCase):
  def assert_raises_traced(self, error, pattern, api, y_true, y_pred, **kwargs):
    """`api` raises `error` matching `pattern`, run through the test's variant.

    Arrays (also `sample_weight`, `mask`, `pos_weight` arrays) are passed as
    arguments, so under jit they are tracers and the error must come at trace
    time; everything else is closed over, so that values that are not JAX
    types reach bce_jax rather than jax.jit's own argument check.
    """
    fn = APIS[api]
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    with self.assertRaisesRegex(error, pattern):
      if all(isinstance(a, jax.Array) for a in (y_true, y_pred)):
        self.variant(lambda y, p, arrays: fn(y, p, **arrays, **static))(y_true, y_pred, arrays)
      else:
        self.variant(lambda: fn(y_true, y_pred, **kwargs))()


class ShapeErrorsTest(_ErrorTestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
    api=list(APIS),
    shapes=[
      ((B,), (B, 2)),  # an extra axis of size 2 is not squeezable
      ((B, 2), (B,)),
      ((B, 1, 1), (B,)),  # ranks differ by two
      ((B,), (B, 1, 1)),
      ((B, T), (T, B)),
      ((B, D), (B + 1, D)),
      ((1, D), (B, D)),  # never broadcast
      ((B, T, D), (B, T, 1)),
    ],
  )
  def test_mismatched_y_true_y_pred(self, api, shapes):
    y_shape, p_shape = shapes
    pattern = rf"y_true.*{_shape(y_shape)}.*y_pred.*{_shape(p_shape)}"
    self.assert_raises_traced(ValueError, pattern, api, jnp.zeros(y_shape), jnp.full(p_shape, 0.5))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(column_side=["y_true", "y_pred"])
  def test_column_against_flat_gives_per_sample_b(self, column_side):
    # [B] against [B, 1] is accepted and means B samples: never [B, B].
    y, p = _inputs((B, 1))
    if column_side == "y_true":
      args = (y, p[:, 0])
    else:
      args = (y[:, 0], p)
    expected = ref.elementwise(y, p)[:, 0]
    per_sample = self.variant(_function)(*args)
    chex.assert_shape(per_sample, (B,))
    np.testing.assert_allclose(per_sample, expected, rtol=4 * np.finfo(np.float32).eps)
    elements = self.variant(_elementwise)(*args)
    chex.assert_shape(elements, (B, 1))
    losses = self.variant(lambda y, p: _loss(y, p, reduction=None))(*args)
    chex.assert_shape(losses, (B,))
    np.testing.assert_allclose(
      self.variant(_metric)(*args), expected.mean(), rtol=4 * np.finfo(np.float32).eps
    )


_WEIGHT_SHAPE_CASES = [
  # (input shape, per-sample loss shape, weight shape)
  ((B, D), (B,), (B + 1,)),
  ((B, D), (B,), (1, B)),
  ((B, D), (B,), (B, 2)),
  ((B, T, D), (B, T), (B, T + 1)),
  # Rank 1 of a length that is neither the batch nor the last axis. (Length T is
  # broadcast over the last axis, as in NumPy: see test_rank1_over_last_axis_broadcasts.)
  ((B, T, D), (B, T), (T + 2,)),
  ((B, T, D), (B, T), (T, B)),
  ((B, T, D), (B, T), (B, T, 2)),
]


class WeightAndMaskErrorsTest(_ErrorTestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=WEIGHTED_APIS, case=_WEIGHT_SHAPE_CASES, arg=["sample_weight", "mask"])
  def test_weight_or_mask_does_not_broadcast(self, api, case, arg):
    in_shape, loss_shape, w_shape = case
    y, p = _inputs(in_shape)
    value = jnp.ones(w_shape, bool if arg == "mask" else jnp.float32)
    pattern = rf"`{arg}` with shape {_shape(w_shape)}.*{_shape(loss_shape)}"
    self.assert_raises_traced(ValueError, pattern, api, y, p, **{arg: value})

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=WEIGHTED_APIS, arg=["sample_weight", "mask"])
  def test_rank1_over_last_axis_broadcasts(self, api, arg):
    # README, `sample_weight`: "a shape that broadcasts to the per-sample losses"; a
    # rank-1 weight whose length is not the batch is broadcast on the last axis as in
    # NumPy (`weight_shape` in bce_jax/_validate.py): (T,) against [B, T] is (1, T).
    y, p = _inputs((B, T, D))
    value = jnp.array([True, False, True]) if arg == "mask" else jnp.array([0.5, 0.0, 2.0])
    f = self.variant(lambda y, p, v: APIS[api](y, p, **{arg: v}))
    got = f(y, p, value)
    np.testing.assert_array_equal(got, f(y, p, value[None, :]))
    per_sample = ref.mean_over(ref.elementwise(y, p), -1)  # [B, T]
    weights = np.broadcast_to(np.asarray(value, np.float64), (B, T))
    if api == "loss":
      expected = ref.reduce(per_sample, "sum_over_batch_size", **{arg: np.asarray(value)})
    else:
      expected = ref.metric_result([(per_sample, weights)])
    np.testing.assert_allclose(got, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=WEIGHTED_APIS)
  def test_rank1_of_batch_length_weights_rows(self, api):
    # README: shape [batch] weights whole samples, also for [batch, T] losses, even
    # when batch == T (where the NumPy rule would weight the last axis instead).
    y, p = _inputs((T, T, D))
    w = jnp.array([0.5, 0.0, 2.0])
    f = self.variant(lambda y, p, w: APIS[api](y, p, sample_weight=w))
    np.testing.assert_array_equal(f(y, p, w), f(y, p, w[:, None]))
    self.assertNotEqual(float(f(y, p, w)), float(f(y, p, w[None, :])))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=WEIGHTED_APIS, dtype=["float32", "int32", "uint8"])
  def test_mask_must_be_bool(self, api, dtype):
    y, p = _inputs((B, D))
    self.assert_raises_traced(
      TypeError, rf"`mask`.*bool.*{dtype}", api, y, p, mask=jnp.ones((B,), dtype)
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=WEIGHTED_APIS, kind=["complex", "string", "str_array", "object_array"])
  def test_sample_weight_must_be_real(self, api, kind):
    weight = {
      "complex": np.ones(B, np.complex64),
      "string": "ones",
      "str_array": np.array(["1"] * B),
      "object_array": np.array([1.0, None, 1.0, 1.0], dtype=object),
    }[kind]
    y, p = _inputs((B, D))
    fn = APIS[api]
    with self.assertRaisesRegex(TypeError, "`sample_weight`"):
      self.variant(lambda: fn(y, p, sample_weight=weight))()


class ConfigurationErrorsTest(_ErrorTestCase):
  @parameterized.parameters("avg", "SUM", "sum_over_batch", 1, "")
  def test_unknown_reduction(self, reduction):
    with self.assertRaisesRegex(ValueError, rf"`reduction`.*{re.escape(repr(reduction))}"):
      bce_jax.BinaryCrossentropy(reduction=reduction)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=["function", "elementwise"], value=[-0.1, 1.5, float("nan")])
  def test_label_smoothing_out_of_range_in_functions(self, api, value):
    y, p = _inputs((B, D))
    self.assert_raises_traced(
      ValueError, r"`label_smoothing`.*\[0, 1\]", api, y, p, label_smoothing=value
    )

  @parameterized.product(
    cls=[bce_jax.BinaryCrossentropy, bce_jax.BinaryCrossentropyMetric],
    value=[-0.1, 1.5, float("nan"), float("inf")],
  )
  def test_label_smoothing_out_of_range_in_objects(self, cls, value):
    with self.assertRaisesRegex(ValueError, r"`label_smoothing`.*\[0, 1\]"):
      cls(label_smoothing=value)

  # Each configuration field of the objects, given a value of the wrong type:
  # a TypeError naming the field. Strings are refused, never parsed (the `pos_weight`
  # check in bce_jax/_validate.py: "Strings and bools are refused, not parsed").
  @parameterized.named_parameters(
    (f"{cls.__name__}_{name}_{i}", cls, name, value, pattern)
    for cls in (bce_jax.BinaryCrossentropy, bce_jax.BinaryCrossentropyMetric)
    for i, (name, value, pattern) in enumerate(
      [
        *(("label_smoothing", v, r"`label_smoothing`") for v in ("0.1x", None, [0.1], "0.1")),
        *(("pos_weight", v, r"`pos_weight`") for v in ("heavy", "2", ["1", "2"])),
        *(("axis", v, r"`axis`.*int") for v in (1.0, "1", (0, 1.5), True, None, ())),
        *(("from_logits", v, r"`from_logits`.*bool") for v in ("yes", 1, None)),
        ("name", 3, r"`name`"),
      ]
    )
  )
  def test_config_of_wrong_type_in_objects(self, cls, name, value, pattern):
    with self.assertRaisesRegex(TypeError, pattern):
      cls(**{name: value})

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=["function", "elementwise"])
  def test_label_smoothing_string_in_functions(self, api):
    # bce_jax's own message (with the argument in backticks), not jax.jit's.
    y, p = _inputs((B, D))
    self.assert_raises_traced(TypeError, r"`label_smoothing`", api, y, p, label_smoothing="0.1")

  @parameterized.product(
    api=["function", "elementwise", "loss", "metric"], value=[True, np.bool_(False)]
  )
  def test_label_smoothing_bool_rejected(self, api, value):
    # A bool is an int to Python, but True as "smoothing 1.0" is a mistake.
    y, p = _inputs((B, D))
    with self.assertRaisesRegex(TypeError, r"`label_smoothing`.*bool"):
      APIS[api](y, p, label_smoothing=value)

  @parameterized.product(api=["function", "elementwise"], shape=[(1,), (D,), (B, D)])
  def test_traced_label_smoothing_must_be_a_scalar(self, api, shape):
    # Traced smoothing of shape (D,) would otherwise broadcast over the labels.
    y, p = _inputs((B, D))
    f = jax.jit(lambda s: APIS[api](y, p, label_smoothing=s))
    with self.assertRaisesRegex(TypeError, r"`label_smoothing`.*scalar.*" + _shape(shape)):
      f(jnp.full(shape, 0.1))

  @parameterized.parameters(jnp.int32, jnp.bool_)
  def test_traced_label_smoothing_dtype(self, dtype):
    y, p = _inputs((B, D))
    f = jax.jit(lambda s: bce_jax.binary_crossentropy(y, p, label_smoothing=s))
    if dtype == jnp.bool_:
      with self.assertRaisesRegex(TypeError, r"`label_smoothing`.*bool"):
        f(jnp.asarray(True))
    else:  # an integer 0 or 1 is a valid smoothing
      np.testing.assert_allclose(
        f(jnp.asarray(1, dtype)), bce_jax.binary_crossentropy(y, p, label_smoothing=1.0)
      )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("function",), ("loss",), ("metric",))
  def test_axis_empty_tuple(self, api):
    # Averaging over no axis is the elementwise function; an empty tuple is
    # refused the same way by the functions and the objects.
    y, p = _inputs((B, D))
    self.assert_raises_traced(
      TypeError, r"`axis`.*non-empty tuple.*binary_crossentropy_elementwise", api, y, p, axis=()
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((-1,), (0,))
  def test_axis_with_scalar_inputs(self, axis):
    y, p = jnp.float32(1.0), jnp.float32(0.3)
    self.assert_raises_traced(
      ValueError, r"`axis` .*scalar \(rank-0\) inputs", "function", y, p, axis=axis
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=["function", "loss", "metric"], axis=[2, -3, (0, 2), (1, -1), (0, 0)])
  def test_axis_out_of_range_or_repeated(self, api, axis):
    y, p = _inputs((B, D))  # rank 2
    self.assert_raises_traced(
      ValueError,
      r"`axis`.*(out of range for inputs of rank 2|more than once)",
      api,
      y,
      p,
      axis=axis,
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((1.0,), ("1",), ((0, 1.5),), (True,), (None,))
  def test_axis_not_an_int_in_function(self, axis):
    y, p = _inputs((B, D))
    self.assert_raises_traced(TypeError, r"`axis`.*int", "function", y, p, axis=axis)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=["function", "elementwise"], shape=[(D + 1,), (D, D), (B, D, 1)])
  def test_pos_weight_wrong_shape_in_functions(self, api, shape):
    # The message states the rule (PyTorch's, for BCEWithLogitsLoss): any shape that
    # broadcasts to the element losses without changing their shape.
    y, p = _inputs((B, D))
    pattern = (
      rf"`pos_weight` with shape {_shape(shape)} does not broadcast to the element losses "
      rf"of shape {_shape((B, D))} without changing it"
    )
    self.assert_raises_traced(ValueError, pattern, api, y, p, pos_weight=jnp.ones(shape))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=["function", "elementwise"], shape=[(), (D,), (1, D), (B, 1), (B, D)])
  def test_pos_weight_broadcastable_shapes_accepted(self, api, shape):
    # binary_crossentropy_elementwise docstring: "a scalar or any shape that broadcasts to
    # the element losses without changing their shape (as PyTorch's BCEWithLogitsLoss)".
    y, x = _inputs((B, D), from_logits=True)
    w = jnp.asarray(np.random.default_rng(3).uniform(0.5, 3.0, shape), jnp.float32)
    got = self.variant(lambda y, x, w: APIS[api](y, x, from_logits=True, pos_weight=w))(y, x, w)
    expected = ref.elementwise(y, x, from_logits=True, pos_weight=np.asarray(w))
    if api == "function":
      expected = expected.mean(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)

  @parameterized.product(
    cls=[bce_jax.BinaryCrossentropy, bce_jax.BinaryCrossentropyMetric],
    value=[2.0, (1.0, 2.0), ((1.0, 2.0),), ((1.0,), (2.0,), (0.5,), (3.0,)), [[1.0, 2.0]] * B],
  )
  def test_pos_weight_nested_tuples_in_objects(self, cls, value):
    # The objects take `pos_weight` as (nested) tuples of any broadcasting shape; the
    # config round-trips through JSON.
    obj = cls(from_logits=True, pos_weight=value)
    self.assertEqual(cls.from_config(json.loads(json.dumps(obj.get_config()))), obj)
    y, x = _inputs((B, D), from_logits=True)
    expected = ref.elementwise(y, x, from_logits=True, pos_weight=np.asarray(value)).mean()
    got = (
      obj(y, x) if cls is bce_jax.BinaryCrossentropy else obj.result(obj.update(obj.init(), y, x))
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
    api=WEIGHTED_APIS, value=[(1.0,) * (D + 1), ((1.0,) * (D + 1),), ((1.0,) * D,) * (B + 1)]
  )
  def test_pos_weight_wrong_length_at_call(self, api, value):
    # A configured shape that does not fit the call's element losses is refused at call time.
    y, p = _inputs((B, D))
    shape = np.shape(value)
    self.assert_raises_traced(
      ValueError,
      rf"`pos_weight` with shape {_shape(shape)}.*{_shape((B, D))}",
      api,
      y,
      p,
      pos_weight=value,
    )

  @parameterized.product(
    cls=[bce_jax.BinaryCrossentropy, bce_jax.BinaryCrossentropyMetric],
    # Nested values are valid shapes now (test_pos_weight_nested_tuples_in_objects); their
    # entries are still checked.
    value=[-1.0, float("nan"), float("inf"), (1.0, -0.5), [[1.0, -2.0]], ((1.0,), (np.inf,))],
  )
  def test_pos_weight_bad_in_objects(self, cls, value):
    with self.assertRaisesRegex(ValueError, r"`pos_weight`"):
      cls(pos_weight=value)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(api=["function", "elementwise"], value=["yes", 1, None])
  def test_from_logits_not_bool_in_functions(self, api, value):
    y, p = _inputs((B, D))
    self.assert_raises_traced(TypeError, r"`from_logits`.*bool", api, y, p, from_logits=value)


class DtypeErrorsTest(_ErrorTestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
    api=list(APIS),
    arg=["y_true", "y_pred"],
    kind=["complex", "complex_scalar", "string", "str_array", "object_array"],
  )
  def test_non_real_input(self, api, arg, kind):
    good = np.full((B, D), 0.5, np.float32)
    bad = {
      "complex": good.astype(np.complex64),
      "complex_scalar": 0.5 + 0.5j,
      "string": "0.5",
      "str_array": good.astype(str),
      "object_array": good.astype(object),
    }[kind]
    y_true, y_pred = (bad, good) if arg == "y_true" else (good, bad)
    if kind == "complex_scalar":  # keep the shapes compatible
      y_true, y_pred = (bad, 0.5) if arg == "y_true" else (0.5, bad)
    self.assert_raises_traced(TypeError, rf"`{arg}`", api, y_true, y_pred)


def _primitives(jaxpr, acc=None):
  """Every primitive name in `jaxpr`, including nested jaxprs (jit, custom_jvp, ...)."""
  acc = set() if acc is None else acc
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    acc.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          _primitives(sub, acc)
  return acc


def _defining_eqns(jaxpr):
  return {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}


def _conds(jaxpr, acc=None):
  """`(predicate is a fallback test, number of branches)` for every `cond`, nested too.

  The predicate is followed back through casts and `reduce_or` (``jnp.any``) to what
  made it. A fallback test: ``jnp.isnan(v)`` (``ne(v, v)``), ``jnp.isinf`` (a nested
  jit), ``~jnp.isfinite`` (``not``), or the platform index of
  ``lax.platform_dependent`` (a layout chosen at lowering, not a check).
  """
  acc = [] if acc is None else acc
  inner = getattr(jaxpr, "jaxpr", jaxpr)
  defining = _defining_eqns(inner)
  for eqn in inner.eqns:
    if eqn.primitive.name == "cond":
      source = defining.get(eqn.invars[0])
      while source is not None and source.primitive.name in ("convert_element_type", "reduce_or"):
        source = defining.get(source.invars[0])
      name = None if source is None else source.primitive.name
      is_isnan = name == "ne" and source.invars[0] is source.invars[1]
      is_isinf = name in ("jit", "pjit") and source.params.get("name") == "isinf"
      is_fallback = is_isnan or is_isinf or name in ("not", "platform_index")
      acc.append((is_fallback, len(eqn.params["branches"])))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          _conds(sub, acc)
  return acc


_BAD_VALUES = {
  # name: (api subset, from_logits, what to corrupt, bad value, pattern)
  "y_pred_above_one": (APIS, False, "y_pred", 1.5, r"^y_pred .*\[0, 1\]"),
  "y_pred_negative": (("function", "loss"), False, "y_pred", -0.25, r"^y_pred .*\[0, 1\]"),
  "y_pred_nan_prob": (("elementwise", "metric"), False, "y_pred", np.nan, r"^y_pred contains nan"),
  "y_pred_nan_logit": (("function", "loss"), True, "y_pred", np.nan, r"^y_pred contains nan"),
  "y_true_above_one": (APIS, True, "y_true", 2.0, r"^y_true .*\[0, 1\]"),
  "y_true_negative": (("elementwise", "metric"), False, "y_true", -1.0, r"^y_true .*\[0, 1\]"),
  "y_true_nan": (APIS, True, "y_true", np.nan, r"^y_true contains nan"),
  "sample_weight_negative": (WEIGHTED_APIS, True, "sample_weight", -0.5, r"^sample_weight .*>= 0"),
  "sample_weight_nan": (
    WEIGHTED_APIS,
    True,
    "sample_weight",
    np.nan,
    r"^sample_weight contains nan",
  ),
  "pos_weight_negative": (
    ("function", "elementwise"),
    True,
    "pos_weight",
    -2.0,
    r"^pos_weight .*>= 0",
  ),
  "pos_weight_nan": (
    ("function", "elementwise"),
    True,
    "pos_weight",
    np.nan,
    r"^pos_weight contains nan",
  ),
}
_BAD_VALUE_CASES = [(api, name) for name, spec in _BAD_VALUES.items() for api in spec[0]]
# Every (api, bad value) pair, alternately through checked(f) and
# checked(jax.jit(f)), so each api meets both.
_BAD_VALUE_RUNS = [
  (api, name, [a for a, _ in _BAD_VALUE_CASES[:i]].count(api) % 2 == 1)
  for i, (api, name) in enumerate(_BAD_VALUE_CASES)
]
_BAD_VALUE_RUNS = [(f"{a}_{n}_{'jit' if j else 'eager'}", a, n, j) for a, n, j in _BAD_VALUE_RUNS]


@functools.cache
def _caller(api, from_logits, extra):
  """`api` as a function of positional arrays; one per signature, so jit caches hit."""
  fn = APIS[api]

  def call(y_true, y_pred, *rest):
    return fn(y_true, y_pred, from_logits=from_logits, **dict(zip(extra, rest)))

  return call


@functools.cache
def _jitted_caller(api, from_logits, extra):
  return jax.jit(_caller(api, from_logits, extra))


def _value_case(api, name, jit=False):
  """`(fn, args)` for `api` with one bad value as described by `_BAD_VALUES[name]`."""
  _, from_logits, target, value, _ = _BAD_VALUES[name]
  y, p = (np.array(a) for a in _inputs((B, D), from_logits))
  args = {"y_true": y, "y_pred": p}
  if api in WEIGHTED_APIS:
    args["sample_weight"] = np.ones(B, np.float32)
  if target == "pos_weight":
    args["pos_weight"] = np.ones(D, np.float32)
  args[target][1] = value  # one bad row (or entry) among good ones
  extra = tuple(k for k in args if k not in ("y_true", "y_pred"))
  fn = (_jitted_caller if jit else _caller)(api, from_logits, extra)
  return fn, tuple(jnp.asarray(a) for a in args.values())


class CheckedTest(chex.TestCase):
  @parameterized.named_parameters(*_BAD_VALUE_RUNS)
  def test_bad_values_raise_naming_the_argument(self, api, name, jit_inside):
    fn, args = _value_case(api, name, jit=jit_inside)
    with self.assertRaisesRegex(bce_jax.ValueCheckError, _BAD_VALUES[name][-1]):
      bce_jax.checked(fn)(*args)

  @parameterized.named_parameters(*[(f"{a}_{n}", a, n) for a, n in _BAD_VALUE_CASES])
  def test_bad_values_compute_unchecked(self, api, name):
    # The default path has no checks: the same values just compute.
    fn, args = _value_case(api, name)
    jax.block_until_ready(fn(*args))

  @parameterized.product(api=list(APIS), jit_inside=[False, True])
  def test_good_values_pass_unchanged(self, api, jit_inside):
    from_logits = jit_inside
    y, p = _inputs((B, T, D), from_logits, seed=1)
    fn = APIS[api]
    kwargs = {"from_logits": from_logits, "label_smoothing": 0.1}
    if api in WEIGHTED_APIS:
      kwargs["sample_weight"] = jnp.linspace(0.0, 2.0, B)
    f = lambda y, p: fn(y, p, **kwargs)
    f = jax.jit(f) if jit_inside else f
    chex.assert_trees_all_equal(bce_jax.checked(f)(y, p), f(y, p))

  def test_loss_object_checked_directly(self):
    bce = bce_jax.BinaryCrossentropy(reduction="sum")
    y, p = _inputs((B, D))
    safe = bce_jax.checked(bce)
    w = jnp.linspace(0.5, 1.5, B)
    np.testing.assert_array_equal(safe(y, p, sample_weight=w), bce(y, p, sample_weight=w))
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^sample_weight contains nan"):
      safe(y, p, sample_weight=w.at[0].set(jnp.nan))
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^y_pred .*\[0, 1\]"):
      safe(y, p.at[1, 1].set(-0.5), mask=jnp.ones(B, bool))

  def test_metric_update_checked(self):
    m = bce_jax.BinaryCrossentropyMetric()
    y, p = _inputs((B, D))
    update = bce_jax.checked(jax.jit(m.update))
    state = update(m.init(), y, p, jnp.ones(B))
    chex.assert_trees_all_equal(state, jax.jit(m.update)(m.init(), y, p, jnp.ones(B)))
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^y_pred .*\[0, 1\]"):
      update(state, y, p + 1.0)
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^y_true .*\[0, 1\]"):
      update(state, y - 1.0, p)
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^sample_weight .*>= 0"):
      update(state, y, p, -jnp.ones(B))

  @parameterized.product(api=["loss", "metric"], from_logits=[False, True])
  def test_masked_padding_is_not_checked(self, api, from_logits):
    # Padding under a mask commonly holds a label of -1 or a nan prediction;
    # the value checks look only at what the mask keeps (README, `mask`: "Under
    # bce_jax.checked, masked samples are not value-checked"). The checks change
    # nothing: the checked value is the unchecked one.
    y, p = _inputs((B, T, D), from_logits)
    mask = jnp.array([True, True, False, True])
    y_pad = y.at[2].set(-1.0)
    p_pad = p.at[2].set(jnp.nan)
    f = jax.jit(functools.partial(APIS[api], from_logits=from_logits))
    chex.assert_trees_all_equal(
      bce_jax.checked(f)(y_pad, p_pad, mask=mask), f(y_pad, p_pad, mask=mask)
    )
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^y_true .*\[-1\.0*, 1\.0*\]"):
      bce_jax.checked(f)(y_pad, p_pad, mask=mask.at[2].set(True))
    # A per-element mask (over the losses [B, T] with axis=-1) works alike.
    mask_bt = jnp.ones((B, T), bool).at[1, 2].set(False)
    y_pad = y.at[1, 2, 0].set(2.0)
    chex.assert_trees_all_equal(
      bce_jax.checked(f)(y_pad, p, mask=mask_bt), f(y_pad, p, mask=mask_bt)
    )
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^y_true"):
      bce_jax.checked(f)(y_pad, p, mask=mask_bt.at[1, 2].set(True))
    # The weight of a masked sample is padding too: a negative one is not reported.
    w = jnp.ones(B).at[2].set(-1.0)
    chex.assert_trees_all_equal(bce_jax.checked(f)(y, p, w, mask=mask), f(y, p, w, mask=mask))
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^sample_weight .*>= 0"):
      bce_jax.checked(f)(y, p, w, mask=mask.at[2].set(True))

  @parameterized.product(api=["loss", "metric"], from_logits=[False, True])
  def test_masked_padding_does_not_change_the_value(self, api, from_logits):
    # Loss.__call__ docstring: masked entries "contribute exactly 0 to the value and
    # every derivative, whatever they hold". So the value with padding is the value of
    # the same batch with ordinary numbers in the masked places, bit for bit.
    y, p = _inputs((B, T, D), from_logits)
    mask = jnp.array([True, True, False, True])
    f = jax.jit(functools.partial(APIS[api], from_logits=from_logits))
    clean = f(y, p, mask=mask)
    chex.assert_trees_all_equal(f(y.at[2].set(-1.0), p.at[2].set(jnp.nan), mask=mask), clean)
    mask_bt = jnp.ones((B, T), bool).at[1, 2].set(False)
    chex.assert_trees_all_equal(f(y.at[1, 2, 0].set(2.0), p, mask=mask_bt), f(y, p, mask=mask_bt))

  @parameterized.named_parameters(("nan", float("nan")), ("above_one", 1.5), ("negative", -0.5))
  def test_traced_label_smoothing_is_checked(self, value):
    # The pure functions take `label_smoothing` as data (it may be traced, e.g.
    # annealed inside a jitted step); then only a value check can see it.
    y, p = _inputs((B, D))
    f = jax.jit(lambda y, p, s: bce_jax.binary_crossentropy(y, p, label_smoothing=s))
    np.testing.assert_array_equal(
      bce_jax.checked(f)(y, p, 0.1), bce_jax.binary_crossentropy(y, p, label_smoothing=0.1)
    )
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^label_smoothing"):
      bce_jax.checked(f)(y, p, value)

  def _train_step(self):
    loss = bce_jax.BinaryCrossentropy()  # probabilities, so a bad model can leave [0, 1]

    def step(params, x, y, sample_weight):
      def objective(params):
        return loss(y, x @ params["w"] + params["b"], sample_weight=sample_weight)

      return jax.value_and_grad(objective)(params)

    params = {"w": jnp.array([0.1, -0.2]), "b": jnp.array(0.5)}
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (B, D)), jnp.float32)
    y = jnp.array([[1.0], [0.0], [1.0], [0.0]])
    return step, params, x, y, jnp.ones(B)

  def test_train_step(self):
    step, params, x, y, w = self._train_step()
    jitted = jax.jit(step)
    safe = bce_jax.checked(jitted)
    chex.assert_trees_all_equal(safe(params, x, y, w), jitted(params, x, y, w))
    big = {"w": params["w"] * 10, "b": params["b"]}  # predictions outside [0, 1]
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^y_pred .*\[0, 1\]"):
      safe(big, x, y, w)
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^y_true .*\[0, 1\]"):
      safe(params, x, y.at[0, 0].set(jnp.nan), w)
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^sample_weight .*>= 0"):
      safe(params, x, y, w.at[2].set(-1.0))

  def test_jitted_then_checked_still_checks(self):
    step, params, x, y, w = self._train_step()
    jitted = jax.jit(step)
    bad = {"w": params["w"] * 10, "b": params["b"]}
    unchecked = jitted(bad, x, y, w)  # traced and cached without checks
    self.assertTrue(np.isfinite(unchecked[0]))
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^y_pred"):
      bce_jax.checked(jitted)(bad, x, y, w)
    # ... and the plain function stays unchecked afterwards.
    chex.assert_trees_all_equal(jitted(bad, x, y, w), unchecked)

  def test_unchecked_path_has_no_checks_and_only_the_nan_fallback_branch(self):
    # bce_jax/_checked.py: off by default, the value checks cost nothing, "no check, no
    # branch is traced". The reduction itself has one scalar `lax.cond` of its own
    # (bce_jax/_kernel.py: on inputs large enough for the fast path, the fast sum is
    # taken again on the safe path only when it is nan). So "no branch" is asserted of
    # the value checks: no `check` primitive and no loop anywhere, and every `cond` is
    # a fallback (a two-way branch on `isnan` of the fast sum, or on its overflow) or
    # the platform's layout (lax.platform_dependent), with no check inside (the walk
    # covers the branches).
    y, p = _inputs((B, T, D))
    y_big, p_big = _inputs((4096, 8))  # 32768 elements: the fast path and its cond
    m = bce_jax.BinaryCrossentropyMetric()
    step, params, x, y_step, w = self._train_step()

    def loss(y, p):
      return _loss(y, p, sample_weight=jnp.ones(len(y)), mask=jnp.ones(y.shape[:-1], bool))

    def update(y, p):
      return m.update(m.init(), y, p, jnp.ones(len(y)))

    traces = {
      "function": jax.make_jaxpr(_function)(y, p),
      "elementwise": jax.make_jaxpr(_elementwise)(y, p),
      "loss": jax.make_jaxpr(loss)(y, p),
      "metric": jax.make_jaxpr(update)(y, p),
      "train_step": jax.make_jaxpr(step)(params, x, y_step, w),
      "function_large": jax.make_jaxpr(_function)(y_big, p_big),
      "loss_large": jax.make_jaxpr(loss)(y_big, p_big),
      "metric_large": jax.make_jaxpr(update)(y_big, p_big),
      "grad_large": jax.make_jaxpr(jax.grad(loss, argnums=1))(y_big, p_big),
    }
    for name, jaxpr in traces.items():
      prims = _primitives(jaxpr)
      self.assertIn("log", prims, name)  # the walk reaches inside the nested jits
      self.assertEmpty(prims & {"check", "while"}, name)
      conds = _conds(jaxpr)
      if name.endswith("_large"):
        self.assertNotEmpty(conds, name)  # the walk finds the fallback
      for predicate_is_isnan, n_branches in conds:
        self.assertTrue(predicate_is_isnan, name)
        self.assertEqual(n_branches, 2, name)

    # The walk would find a check if there were one.
    def with_check(x):
      checkify.check(jnp.all(x > 0), "x must be positive")
      return bce_jax.binary_crossentropy(x, x)

    self.assertIn("check", _primitives(jax.make_jaxpr(with_check)(p)))

  @parameterized.named_parameters(("jit", jax.jit), ("vmap", jax.vmap), ("grad", jax.grad))
  def test_transforming_checked_is_refused(self, transform):
    y, p = _inputs((B, D))
    safe = bce_jax.checked(lambda p: jnp.sum(bce_jax.binary_crossentropy(y, p)))
    self.assertEqual(float(safe(p)), float(jnp.sum(bce_jax.binary_crossentropy(y, p))))
    with self.assertRaisesRegex(TypeError, r"checked\(jax\.jit\(f\)\)"):
      transform(safe)(jnp.stack([p, p]) if transform is jax.vmap else p)


_E = np.ones((2, 3), np.float32)
_TILE_LOSSES = {  # the object, the function with good arrays, what a tile counts
  "pairwise": (
    bce_jax.PairwiseSigmoidLoss,
    lambda **kw: bce_jax.pairwise_sigmoid_loss(_E, _E, scale=1.0, bias=0.0, **kw),
    "rows",
  ),
  "linear": (
    bce_jax.LinearBinaryCrossentropy,
    lambda **kw: bce_jax.linear_binary_crossentropy(_E, _E, np.zeros((2, 1), np.int32), **kw),
    "labels",
  ),
}


class TileOptionsTest(parameterized.TestCase):
  """The pairwise and linear losses check their four tile options alike, as
  objects (at construction) and as functions (at the call, jitted or not)."""

  @parameterized.product(
    loss=("pairwise", "linear"),
    bad=(
      ("block_size", 0, ValueError, r"`block_size` must be >= 1 \({unit} per tile\)"),
      ("block_size", 1.5, TypeError, r"`block_size` must be an int >= 1 \({unit} per tile\)"),
      ("axis_name", 3, TypeError, "`axis_name` must be a mesh axis name"),
      ("precision", "best", ValueError, "`precision` must be None, a jax.lax.Precision"),
      ("implementation", "triton", ValueError, "`implementation` must be one of"),
    ),
  )
  def test_object_and_function_refuse_alike(self, loss, bad):
    cls, function, unit = _TILE_LOSSES[loss]
    name, value, error, pattern = bad
    pattern = pattern.format(unit=unit)
    with self.assertRaisesRegex(error, pattern):
      cls(**{name: value})
    with self.assertRaisesRegex(error, pattern):
      function(**{name: value})
    with self.assertRaisesRegex(error, pattern):
      jax.jit(lambda: function(**{name: value}))()

  @parameterized.parameters("pairwise", "linear")
  def test_object_normalizes(self, loss):
    cls = _TILE_LOSSES[loss][0]
    obj = cls(block_size=np.int64(8), axis_name=["a", "b"], precision=jax.lax.Precision.HIGHEST)
    got = (obj.block_size, type(obj.block_size), obj.axis_name, obj.precision, obj.implementation)
    self.assertEqual(got, (8, int, ("a", "b"), "highest", None))
