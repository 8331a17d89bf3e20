"""The streaming metric: Keras seed values, weights, scan/vmap/psum, reduce, accuracy, config.

The numerics run under ``jax.jit``. Eagerly: :class:`EagerDispatchTest` (each
method once, compared with its jitted result), the errors raised at the entry
(:class:`StateStructureTest`, :class:`ReduceErrorsTest`) and the configs.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import zlib

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

import bce_jax
from tests import _host_devices
from tests import _reference as ref

F32_EPS = float(np.finfo(np.float32).eps)
SEED_TRUE = jnp.array([[0.0, 1.0], [0.0, 0.0]])
SEED_PRED = jnp.array([[0.6, 0.4], [0.4, 0.6]])
# Printed on the Keras metric page (tf.keras.metrics.BinaryCrossentropy).
KERAS_SEED = 0.81492424
KERAS_SEED_WEIGHTED = 0.9162905

Metric = bce_jax.BinaryCrossentropyMetric


# The methods under jit, the metric a static argument (a pytree with no leaves):
# compiled once per configuration and shape, shared by every test.
@jax.jit
def _init(metric):
  return metric.init()


@jax.jit
def _update(metric, state, *args):
  return metric.update(state, *args)


@jax.jit
def _merge(metric, *states):
  return metric.merge(*states)


@jax.jit
def _reduce(metric, states):
  return metric.reduce(states)


@jax.jit
def _result(metric, state):
  return metric.result(state)


def _count(state):
  """The count the state holds, `count + count_err`, summed exactly in float64."""
  return float(np.float64(state.count) + np.float64(state.count_err))


def _total(state):
  return float(np.float64(state.total) + np.float64(state.total_err))


def _batch(rng, shape, from_logits):
  y = rng.integers(0, 2, shape).astype(np.float32)
  x = rng.normal(0, 3, shape) if from_logits else rng.uniform(0.01, 0.99, shape)
  return y, x.astype(np.float32)


def _ref_per_sample(y, x, metric):
  """Per-sample losses of `metric` on one batch, in float64."""
  elements = ref.elementwise(
    y,
    x,
    from_logits=metric.from_logits,
    label_smoothing=metric.label_smoothing,
    pos_weight=None if metric.pos_weight is None else np.asarray(metric.pos_weight),
  )
  return ref.mean_over(elements, metric.axis)


def _ref_weight(shape, sample_weight, mask):
  """The reference's effective per-sample weight (sample weight times mask), or None."""
  if sample_weight is None and mask is None:
    return None
  w = np.ones(shape) if sample_weight is None else ref.expand_weight(sample_weight, shape)
  if mask is not None:
    w = w * ref.expand_weight(mask, shape)
  return w


def _stack(states):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def _unstack(states, n):
  return [jax.tree_util.tree_map(lambda x, i=i: x[i], states) for i in range(n)]


class SeedValuesTest(parameterized.TestCase):
  def test_keras_metric_page(self):
    m = Metric()
    value = _result(m, _update(m, m.init(), SEED_TRUE, SEED_PRED))
    weighted = _result(m, _update(m, m.init(), SEED_TRUE, SEED_PRED, jnp.array([1, 0])))
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual(value.shape, ())
    # Keras' printed float32 values carry a rounding error of ~2.5 ulp.
    np.testing.assert_allclose(float(value), KERAS_SEED, rtol=4 * F32_EPS)
    np.testing.assert_allclose(float(weighted), KERAS_SEED_WEIGHTED, rtol=4 * F32_EPS)
    # ... and bce_jax is within float32 rounding of the float64 truth.
    per_sample = ref.mean_over(ref.elementwise(SEED_TRUE, SEED_PRED), -1)
    np.testing.assert_allclose(float(value), per_sample.mean(), rtol=2 * F32_EPS)
    np.testing.assert_allclose(float(weighted), per_sample[0], rtol=2 * F32_EPS)

  def test_keras_streaming_two_updates(self):
    # Two updates, then the weighted one on top: Keras' running mean.
    m = Metric()
    state = _update(m, m.init(), SEED_TRUE, SEED_PRED)
    state = _update(m, state, SEED_TRUE, SEED_PRED, jnp.array([1.0, 0.0]))
    per_sample = ref.mean_over(ref.elementwise(SEED_TRUE, SEED_PRED), -1)
    expected = ref.metric_result([(per_sample, None), (per_sample, np.array([1.0, 0.0]))])
    np.testing.assert_allclose(float(_result(m, state)), expected, rtol=2 * F32_EPS)
    self.assertEqual(_count(state), 3.0)


_CONFIGS = {
  "probs": {},
  "logits_smoothing_posweight": {"from_logits": True, "label_smoothing": 0.2, "pos_weight": 2.0},
}


# "last_axis": a rank-1 weight of another length than the batch weights the last
# axis (README, "Rules worth knowing", `sample_weight`).
_WEIGHT_KINDS = ["none", "scalar", "batch", "full", "column", "trailing_one", "last_axis"]


class RandomBatchesTest(parameterized.TestCase):
  @parameterized.product(
    # For [B] per-sample losses "full" is "batch" and "trailing_one" is "column".
    per_sample_and_weight=[("B", k) for k in ("none", "scalar", "batch", "column")]
    + [("BT", k) for k in _WEIGHT_KINDS],
    use_mask=[False, True],
  )
  def test_against_reference(self, per_sample_and_weight, use_mask):
    per_sample, weight_kind = per_sample_and_weight
    # Each configuration meets every weight kind, with and without a mask.
    config = list(_CONFIGS)[(_WEIGHT_KINDS.index(weight_kind) + use_mask + (per_sample == "B")) % 2]
    m = Metric(**_CONFIGS[config])
    rng = np.random.default_rng(zlib.crc32(f"{per_sample}{weight_kind}{use_mask}{config}".encode()))
    shape = (4, 3) if per_sample == "B" else (4, 5, 3)
    ps_shape = shape[:-1]
    state, batches = m.init(), []
    for _ in range(2):  # two updates: the state accumulates across batches
      y, x = _batch(rng, shape, m.from_logits)
      sw = {
        "none": None,
        "scalar": np.float32(rng.uniform(0.2, 2)),
        "batch": rng.uniform(0, 2, ps_shape[:1]),
        "full": rng.uniform(0, 2, ps_shape),
        "column": rng.uniform(0, 2, (ps_shape[0], 1)),
        "trailing_one": rng.uniform(0, 2, ps_shape + (1,)),
        "last_axis": rng.uniform(0, 2, ps_shape[1:]),
      }[weight_kind]
      sw = None if sw is None else np.asarray(sw, np.float32)
      mask = rng.uniform(size=ps_shape) > 0.3 if use_mask else None
      state = _update(m, state, y, x, sw, mask)
      batches.append((_ref_per_sample(y, x, m), _ref_weight(ps_shape, sw, mask)))
    expected = ref.metric_result(batches)
    np.testing.assert_allclose(float(_result(m, state)), expected, rtol=8 * F32_EPS)
    expected_count = sum(
      len(ps) if w is None else w.sum() / np.prod(ps.shape[1:]) for ps, w in batches
    )
    np.testing.assert_allclose(_count(state), expected_count, rtol=4 * F32_EPS)

  @parameterized.named_parameters(
    ("middle_axis", (4, 3, 5), 1),
    ("two_axes", (4, 3, 5), (1, 2)),
    ("negative_pair", (4, 2, 3, 5), (-1, -3)),
  )
  def test_axis(self, shape, axis):
    m = Metric(from_logits=True, axis=axis)
    rng = np.random.default_rng(3)
    y, x = _batch(rng, shape, True)
    per_sample = _ref_per_sample(y, x, m)
    sw = rng.uniform(0, 2, per_sample.shape).astype(np.float32)
    state = _update(m, m.init(), y, x, sw)
    expected = ref.metric_result([(per_sample, sw)])
    np.testing.assert_allclose(float(_result(m, state)), expected, rtol=8 * F32_EPS)

  def test_batch_weight_weights_rows_when_batch_equals_time(self):
    # [B] weights on [B, T] per-sample losses weight rows, also when B == T.
    m = Metric(from_logits=True)
    y, x = _batch(np.random.default_rng(12), (3, 3, 2), True)
    w = np.array([0.0, 1.0, 3.0], np.float32)
    state = _update(m, m.init(), y, x, w)
    per_sample = _ref_per_sample(y, x, m)
    expected = ref.metric_result([(per_sample, np.broadcast_to(w[:, None], (3, 3)))])
    np.testing.assert_allclose(float(_result(m, state)), expected, rtol=8 * F32_EPS)
    self.assertEqual(_count(state), 4.0)

  @parameterized.named_parameters(("B", (6, 3)), ("BT", (6, 4, 3)))
  def test_scalar_weight_counts_every_sample(self, shape):
    # A scalar weight w adds w * B to the count (Keras 3 adds w): the README,
    # "Rules worth knowing", `sample_weight` and "Differences from Keras 3";
    # the BinaryCrossentropyMetric docstring.
    m = Metric()
    y, x = _batch(np.random.default_rng(0), shape, False)
    weighted = _update(m, m.init(), y, x, 0.5)
    self.assertEqual(_count(weighted), 0.5 * shape[0])
    self.assertEqual(_count(_update(m, weighted, y, x, jnp.float32(2.0))), 2.5 * shape[0])
    # A uniform weight cancels in the mean.
    plain = _update(m, m.init(), y, x)
    self.assertEqual(_count(plain), shape[0])
    np.testing.assert_allclose(
      float(_result(m, weighted)), float(_result(m, plain)), rtol=2 * F32_EPS
    )

  def test_y_true_column_against_flat_predictions(self):
    # [B, 1] labels with [B] predictions: B samples of one element, not [B, B].
    m = Metric()
    rng = np.random.default_rng(5)
    y, x = _batch(rng, (5, 1), False)
    state = _update(m, m.init(), y, x[:, 0])
    self.assertEqual(_count(state), 5.0)
    np.testing.assert_allclose(
      float(_result(m, state)), ref.elementwise(y, x).mean(), rtol=4 * F32_EPS
    )


class TransformationsTest(parameterized.TestCase):
  def _data(self, n_batches=6, shape=(4, 3), seed=0):
    rng = np.random.default_rng(seed)
    ys, xs = zip(*[_batch(rng, shape, True) for _ in range(n_batches)])
    return np.stack(ys), np.stack(xs)

  def test_scan_equals_loop_equals_reference(self):
    m = Metric(from_logits=True, label_smoothing=0.1)
    ys, xs = self._data()
    weights = np.random.default_rng(1).uniform(0, 2, ys.shape[:2]).astype(np.float32)

    @jax.jit
    def scanned(ys, xs, ws):
      def body(state, batch):
        return m.update(state, *batch), None

      return jax.lax.scan(body, m.init(), (ys, xs, ws))[0]

    scan_state = scanned(ys, xs, weights)
    loop_state = m.init()
    for y, x, w in zip(ys, xs, weights):
      loop_state = _update(m, loop_state, y, x, w)
    expected = ref.metric_result(
      [(_ref_per_sample(y, x, m), w) for y, x, w in zip(ys, xs, weights)]
    )
    # One scan and separate updates may round differently; the double-float values agree.
    np.testing.assert_allclose(_total(scan_state), _total(loop_state), rtol=2 * F32_EPS)
    np.testing.assert_allclose(_count(scan_state), _count(loop_state), rtol=2 * F32_EPS)
    np.testing.assert_allclose(float(_result(m, scan_state)), expected, rtol=8 * F32_EPS)
    np.testing.assert_allclose(float(_result(m, loop_state)), expected, rtol=8 * F32_EPS)
    np.testing.assert_allclose(_count(scan_state), weights.sum(dtype=np.float64), rtol=F32_EPS)

  def test_vmap_over_streams(self):
    m = Metric(from_logits=True)
    n_streams = 3
    ys, xs = self._data(n_batches=2 * n_streams)
    ys, xs = ys.reshape((2, n_streams) + ys.shape[1:]), xs.reshape((2, n_streams) + xs.shape[1:])
    states = _stack([m.init()] * n_streams)
    update = jax.jit(jax.vmap(m.update))
    for y, x in zip(ys, xs):  # two batches per stream
      states = update(states, y, x)
    chex.assert_shape(states.total, (n_streams,))
    results = jax.jit(jax.vmap(m.result))(states)
    for s in range(n_streams):
      expected = ref.metric_result(
        [(_ref_per_sample(ys[b, s], xs[b, s], m), None) for b in range(2)]
      )
      np.testing.assert_allclose(float(results[s]), expected, rtol=8 * F32_EPS)
    merged_results = jax.jit(lambda s: jax.vmap(m.result)(jax.vmap(m.merge)(s, s)))(states)
    np.testing.assert_allclose(merged_results, results, rtol=2 * F32_EPS)

  def test_jit_init_update_merge_result(self):
    m = Metric()
    init, update = jax.jit(m.init), jax.jit(m.update)
    merge, result = jax.jit(m.merge), jax.jit(m.result)
    self.assertEqual(float(result(init())), 0.0)
    a = update(init(), SEED_TRUE[:1], SEED_PRED[:1])
    b = update(init(), SEED_TRUE[1:], SEED_PRED[1:])
    np.testing.assert_allclose(float(result(merge(a, b))), KERAS_SEED, rtol=4 * F32_EPS)
    chex.assert_trees_all_equal_shapes_and_dtypes(init(), merge(a, b))

  def test_psum_under_vmap_axis_name(self):
    m = Metric(from_logits=True)
    ys, xs = self._data(n_batches=4, seed=2)
    shard_states = jax.jit(jax.vmap(lambda y, x: m.update(m.init(), y, x)))(ys, xs)

    @jax.jit
    def summed_results(states):
      summed = jax.vmap(lambda s: jax.lax.psum(s, "shards"), axis_name="shards")(states)
      return jax.vmap(m.result)(summed)

    merged = _merge(m, *_unstack(shard_states, 4))
    expected = ref.metric_result([(_ref_per_sample(y, x, m), None) for y, x in zip(ys, xs)])
    for value in summed_results(shard_states):
      np.testing.assert_allclose(float(value), float(_result(m, merged)), rtol=1e-6)
      np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    self.assertEqual(_count(merged), 16.0)

  def test_psum_inside_shard_map_on_four_devices(self):
    # The test process may have one CPU device; split the host into four.
    script = textwrap.dedent("""
        import json
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import PartitionSpec as P
        import bce_jax
        assert len(jax.devices()) == 4, jax.devices()
        m = bce_jax.BinaryCrossentropyMetric(from_logits=True)
        rng = np.random.default_rng(11)
        y = rng.integers(0, 2, (16, 3)).astype(np.float32)
        x = rng.normal(0, 3, (16, 3)).astype(np.float32)
        w = rng.uniform(0, 2, (16,)).astype(np.float32)
        mesh = jax.make_mesh((4,), ("d",))
        def per_shard(y, x, w):
          return jax.lax.psum(m.update(m.init(), y, x, w), "d")
        f = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("d"), P("d"), P("d")),
                                  out_specs=P()))
        sharded = jax.sharding.NamedSharding(mesh, P("d"))
        summed = f(*(jax.device_put(a, sharded) for a in (y, x, w)))
        update, merge, result = jax.jit(m.update), jax.jit(m.merge), jax.jit(m.result)
        shards = [update(m.init(), y[i:i + 4], x[i:i + 4], w[i:i + 4]) for i in range(0, 16, 4)]
        merged = merge(*shards)
        print(json.dumps({"psum": float(result(summed)), "merge": float(result(merged)),
                          "y": y.tolist(), "x": x.tolist(), "w": w.tolist()}))
    """)
    env = dict(
      os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
      [sys.executable, "-c", script],
      check=False,
      capture_output=True,
      text=True,
      env=env,
      timeout=120,
      cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    m = Metric(from_logits=True)
    y, x, w = (np.asarray(out[k], np.float32) for k in ("y", "x", "w"))
    expected = ref.metric_result([(_ref_per_sample(y, x, m), w)])
    np.testing.assert_allclose(out["psum"], out["merge"], rtol=1e-6)
    np.testing.assert_allclose(out["psum"], expected, rtol=1e-6)

  def test_vmap_over_a_batch_axis_sharded_on_an_explicit_mesh(self):
    # Per-shard states from vmap over a leading axis sharded on an Explicit mesh:
    # a batch's total is batched (sharded), an unweighted count is not, and the
    # state's one array holds both.
    script = textwrap.dedent("""
        import json
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        import bce_jax
        m = bce_jax.BinaryCrossentropyMetric(from_logits=True)
        rng = np.random.default_rng(5)
        y = rng.integers(0, 2, (4, 3, 2)).astype(np.float32)
        x = rng.normal(0, 3, (4, 3, 2)).astype(np.float32)
        mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Explicit,))
        out = {"y": y.tolist(), "x": x.tolist()}
        with jax.set_mesh(mesh):
          ys, xs = (jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (y, x))
          for key, weight in (("plain", None), ("weighted", jnp.float32(2.0))):
            per_shard = jax.jit(jax.vmap(lambda a, b: m.update(m.init(), a, b, weight)))(ys, xs)
            out[key] = per_shard.sums.tolist()
            out[key + "_result"] = float(m.result(m.reduce(per_shard)))
        print(json.dumps(out))
    """)
    proc = _host_devices.run(script, devices=4, timeout=120)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    m = Metric(from_logits=True)
    y, x = (np.asarray(out[k], np.float32) for k in ("y", "x"))
    expected = ref.metric_result([(_ref_per_sample(y[i], x[i], m), None) for i in range(4)])
    for key, weight in (("plain", 1.0), ("weighted", 2.0)):
      sums = np.asarray(out[key])
      self.assertEqual(sums.shape, (4, 4))
      np.testing.assert_array_equal(sums[:, 2], 3 * weight)
      np.testing.assert_allclose(out[key + "_result"], expected, rtol=1e-6)


# Zero or at least 1e-3: XLA flushes subnormal products to zero on CPU.
_weights = st.one_of(st.just(0.0), st.floats(float(np.float32(1e-3)), 4, width=32))
_labels = hnp.arrays(
  np.float32, st.tuples(st.integers(0, 4), st.just(3)), elements=st.sampled_from([0.0, 1.0, 0.25])
)


@st.composite
def _streams(draw, n):
  """`n` batches of [b, 3] labels and logits, b in 0..4, with positive weights."""
  out = []
  for _ in range(n):
    y = draw(_labels)
    x = draw(hnp.arrays(np.float32, y.shape, elements=st.floats(-30, 30, width=32)))
    w = draw(hnp.arrays(np.float32, y.shape[:1], elements=_weights))
    out.append((y, x, w))
  return out


@st.composite
def _sharded_dataset(draw, rows=8, n_shards=4):
  """A dataset of `rows` [3]-samples cut into `n_shards` shards, some maybe empty."""
  y = draw(hnp.arrays(np.float32, (rows, 3), elements=st.sampled_from([0.0, 1.0, 0.25])))
  x = draw(hnp.arrays(np.float32, (rows, 3), elements=st.floats(-30, 30, width=32)))
  w = draw(hnp.arrays(np.float32, (rows,), elements=_weights))
  cuts = sorted(draw(st.lists(st.integers(0, rows), min_size=n_shards - 1, max_size=n_shards - 1)))
  bounds = list(zip([0] + cuts, cuts + [rows]))
  return (y, x, w), [(y[a:b], x[a:b], w[a:b]) for a, b in bounds]


class MergeTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.m = Metric(from_logits=True)

  def _states(self, batches):
    return [_update(self.m, self.m.init(), y, x, w) for y, x, w in batches]

  @given(_streams(3))
  def test_associative(self, batches):
    m = self.m
    a, b, c = self._states(batches)
    left = _merge(m, _merge(m, a, b), c)
    right = _merge(m, a, _merge(m, b, c))
    np.testing.assert_allclose(_count(left), _count(right), rtol=4 * F32_EPS**2)
    np.testing.assert_allclose(_total(left), _total(right), rtol=2 * F32_EPS, atol=1e-30)
    np.testing.assert_allclose(float(_result(m, left)), float(_result(m, right)), rtol=4 * F32_EPS)

  @given(_streams(2))
  def test_commutative(self, batches):
    a, b = self._states(batches)
    # Two-sum is exact in either order, so the merged states agree bit for bit.
    chex.assert_trees_all_equal(_merge(self.m, a, b), _merge(self.m, b, a))

  @given(_sharded_dataset())
  def test_shards_merge_to_the_whole_dataset(self, dataset):
    m = self.m
    (y, x, w), shards = dataset
    merged = _merge(m, *self._states(shards))
    whole = _update(m, m.init(), y, x, w)
    np.testing.assert_allclose(_count(merged), w.sum(dtype=np.float64), rtol=2 * F32_EPS)
    np.testing.assert_allclose(_count(merged), _count(whole), rtol=2 * F32_EPS)
    expected = ref.metric_result([(_ref_per_sample(y, x, m), w)])
    np.testing.assert_allclose(float(_result(m, merged)), expected, rtol=8 * F32_EPS, atol=0)
    np.testing.assert_allclose(
      float(_result(m, merged)), float(_result(m, whole)), rtol=8 * F32_EPS
    )

  def test_merge_many_states(self):
    m = self.m
    rng = np.random.default_rng(4)
    batches = [_batch(rng, (n, 3), True) for n in (1, 2, 3, 5, 7)]
    states = [_update(m, m.init(), y, x) for y, x in batches]
    merged = _merge(m, *states)
    expected = ref.metric_result([(_ref_per_sample(y, x, m), None) for y, x in batches])
    np.testing.assert_allclose(float(_result(m, merged)), expected, rtol=8 * F32_EPS)
    self.assertEqual(_count(merged), 18.0)
    # Merging the empty state is the identity.
    chex.assert_trees_all_equal(_merge(m, states[0], m.init()), states[0])


class ReduceTest(parameterized.TestCase):
  """`reduce` of stacked states: a loop of merges, one pass over all the data."""

  def setUp(self):
    super().setUp()
    self.m = Metric(from_logits=True, label_smoothing=0.1)

  def _data(self, k, seed):
    rng = np.random.default_rng(seed)
    ys, xs = _batch(rng, (k, 4, 3), True)
    ws = rng.uniform(0, 2, (k, 4)).astype(np.float32)
    return ys, xs, ws

  def _stacked(self, source, ys, xs, ws):
    """The states of each batch alone, stacked on axis 0, and the running state."""
    m = self.m

    def one(y, x, w):
      return m.update(m.init(), y, x, w)

    if source == "vmap":
      return jax.jit(jax.vmap(one))(ys, xs, ws), None

    # A scan that keeps its per-step states: each step's state is an output.
    def body(running, batch):
      step = one(*batch)
      return m.merge(running, step), step

    running, steps = jax.jit(lambda *a: jax.lax.scan(body, m.init(), a))(ys, xs, ws)
    return steps, running

  def _check_one_pass(self, reduced, ys, xs, ws):
    """`reduced` against one update over all the data, and the float64 reference."""
    m = self.m
    k = ys.shape[0]
    whole = _update(
      m, m.init(), *(a.reshape((k * a.shape[1],) + a.shape[2:]) for a in (ys, xs, ws))
    )
    np.testing.assert_allclose(_count(reduced), ws.sum(dtype=np.float64), rtol=2 * F32_EPS)
    np.testing.assert_allclose(_count(reduced), _count(whole), rtol=2 * F32_EPS)
    np.testing.assert_allclose(_total(reduced), _total(whole), rtol=4 * F32_EPS)
    expected = ref.metric_result([(_ref_per_sample(y, x, m), w) for y, x, w in zip(ys, xs, ws)])
    np.testing.assert_allclose(float(_result(m, reduced)), expected, rtol=8 * F32_EPS)
    np.testing.assert_allclose(
      float(_result(m, reduced)), float(_result(m, whole)), rtol=8 * F32_EPS
    )

  @parameterized.product(source=["vmap", "scan"], k=[2, 7])
  def test_equals_merges_and_one_pass(self, source, k):
    m = self.m
    ys, xs, ws = self._data(k, seed=k)
    stacked, running = self._stacked(source, ys, xs, ws)
    chex.assert_shape(stacked.total, (k,))
    reduced = _reduce(m, stacked)
    chex.assert_trees_all_equal_shapes_and_dtypes(reduced, m.init())
    states = _unstack(stacked, k)
    # merge(states[0], ..., states[K-1]), as the docstring says, and a loop of pairwise merges.
    chex.assert_trees_all_equal(reduced, _merge(m, *states))
    looped = states[0]
    for state in states[1:]:
      looped = _merge(m, looped, state)
    chex.assert_trees_all_equal(reduced, looped)
    if running is not None:  # the scan's own running merge, from the empty state
      np.testing.assert_allclose(_total(reduced), _total(running), rtol=2 * F32_EPS)
      np.testing.assert_allclose(_count(reduced), _count(running), rtol=2 * F32_EPS)
    self._check_one_pass(reduced, ys, xs, ws)

  @parameterized.parameters("vmap", "scan")
  def test_one_state(self, source):
    m = self.m
    ys, xs, ws = self._data(1, seed=10)
    stacked, _ = self._stacked(source, ys, xs, ws)
    chex.assert_shape(stacked.total, (1,))
    reduced = _reduce(m, stacked)
    chex.assert_trees_all_equal(reduced, _unstack(stacked, 1)[0])
    chex.assert_trees_all_equal(reduced, _update(m, m.init(), ys[0], xs[0], ws[0]))
    self._check_one_pass(reduced, ys, xs, ws)

  def test_empty_states_in_the_stack(self):
    m = self.m
    ys, xs, ws = self._data(3, seed=11)
    states = [_update(m, m.init(), y, x, w) for y, x, w in zip(ys, xs, ws)]
    stacked = _stack([m.init(), states[0], m.init(), states[1], states[2], m.init()])
    chex.assert_trees_all_equal(_reduce(m, stacked), _merge(m, *states))
    chex.assert_trees_all_equal(_reduce(m, _stack([m.init()] * 3)), m.init())
    self.assertEqual(float(_result(m, _reduce(m, _stack([m.init()] * 3)))), 0.0)

  def test_jittable(self):
    m = self.m
    ys, xs, ws = self._data(5, seed=12)

    @jax.jit
    def evaluate(ys, xs, ws):  # vmap, reduce and result in one program
      stacked = jax.vmap(lambda y, x, w: m.update(m.init(), y, x, w))(ys, xs, ws)
      return m.result(m.reduce(stacked)), m.reduce(stacked)

    value, reduced = evaluate(ys, xs, ws)
    stacked, _ = self._stacked("vmap", ys, xs, ws)
    chex.assert_trees_all_close(reduced, _reduce(m, stacked), rtol=2 * F32_EPS)
    np.testing.assert_allclose(float(value), float(_result(m, reduced)), rtol=F32_EPS)
    self._check_one_pass(reduced, ys, xs, ws)
    # Equal configurations share one compilation.
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def reduce_step(metric, states):
      return metric.reduce(states)

    for _ in range(3):
      reduce_step(Metric(from_logits=True, label_smoothing=0.1), stacked)
    chex.clear_trace_counter()


class AccuracyAtScaleTest(parameterized.TestCase):
  def test_1e8_samples_match_float64_reference(self):
    batch, steps = 999, 100_101  # 100,000,899 samples
    m = Metric(from_logits=True)
    y, x = _batch(np.random.default_rng(8), (batch, 1), True)
    y, x = jnp.asarray(y), jnp.asarray(x)

    @jax.jit
    def stream():
      def body(carry, _):
        state, naive_total, naive_count = carry
        state = m.update(state, y, x)
        # The negative control: a plain float32 running sum and count.
        naive_total = naive_total + jnp.sum(bce_jax.binary_crossentropy(y, x, True))
        naive_count = naive_count + batch
        return (state, naive_total, naive_count), None

      init = (m.init(), jnp.float32(0), jnp.float32(0))
      return jax.lax.scan(body, init, None, length=steps)[0]

    state, naive_total, naive_count = stream()
    expected = ref.metric_result([(_ref_per_sample(y, x, m), None)])  # every batch alike
    self.assertEqual(_count(state), float(batch * steps))
    np.testing.assert_allclose(float(_result(m, state)), expected, rtol=1e-6)
    # The plain accumulator drifts by far more, so the check above means something.
    naive = float(naive_total) / float(naive_count)
    self.assertGreater(abs(naive / expected - 1), 1e-5)

  @parameterized.parameters(False, True)
  def test_configured_pos_weight_is_used_whole_for_float64_inputs(self, use_jit):
    # Under x64 a metric's pos_weight reaches float64 inputs unrounded; the
    # double-float total then keeps the digits that a float32 0.3 loses.
    rng = np.random.default_rng(30)
    y = (rng.random((64, 5)) < 0.5).astype(np.float64)
    x = 3.0 * rng.standard_normal((64, 5))
    m = Metric(from_logits=True, pos_weight=0.3)
    update = jax.jit(m.update) if use_jit else m.update
    with jax.enable_x64(True):
      state = update(m.init(), jnp.asarray(y), jnp.asarray(x))
    want = ref.elementwise(y, x, True, pos_weight=np.float64(0.3)).mean(-1).sum()
    rounded = ref.elementwise(y, x, True, pos_weight=np.float64(np.float32(0.3))).mean(-1).sum()
    self.assertGreater(abs(rounded / want - 1), 1e-9)  # what a float32 weight would give
    np.testing.assert_allclose(_total(state), want, rtol=1e-11)

  def test_count_does_not_stall_past_2_24(self):
    m = Metric(from_logits=True)
    y, x = np.ones((1, 1), np.float32), np.full((1, 1), -0.5, np.float32)
    state = _update(m, m.init(), y, x, jnp.float32(2.0**24))
    self.assertEqual(_count(state), 2.0**24)
    small_x = np.full((1, 1), 7.0, np.float32)  # a loss of ~1e-3, well below total's ulp
    for _ in range(101):
      state = _update(m, state, y, small_x)
    self.assertEqual(_count(state), 2.0**24 + 101)
    big = float(ref.elementwise(y, x, from_logits=True)[0, 0])
    small = float(ref.elementwise(y, small_x, from_logits=True)[0, 0])
    expected_total = 2.0**24 * big + 101 * small
    np.testing.assert_allclose(_total(state), expected_total, rtol=2 * F32_EPS)
    np.testing.assert_allclose(
      float(_result(m, state)), expected_total / (2.0**24 + 101), rtol=2 * F32_EPS
    )
    # A plain float32 count stalls: 2**24 + 1 rounds back to 2**24.
    naive = np.float32(2.0**24)
    for _ in range(101):
      naive = naive + np.float32(1)
    self.assertEqual(float(naive), 2.0**24)


class EmptyTest(parameterized.TestCase):
  def test_empty_state_result_is_zero(self):
    m = Metric()
    value = _result(m, _init(m))
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual(float(value), 0.0)  # not nan

  @parameterized.named_parameters(("B", (0, 3)), ("BT", (0, 4, 3)))
  def test_empty_batch_changes_nothing(self, shape):
    m = Metric()
    empty_y, empty_x = np.zeros(shape, np.float32), np.full(shape, 0.5, np.float32)
    from_empty = _update(m, m.init(), empty_y, empty_x)
    self.assertEqual(float(_result(m, from_empty)), 0.0)
    self.assertEqual(_count(from_empty), 0.0)
    seeded = _update(m, m.init(), SEED_TRUE, SEED_PRED)
    chex.assert_trees_all_equal(_update(m, seeded, empty_y, empty_x), seeded)
    chex.assert_trees_all_equal(
      _update(m, seeded, empty_y, empty_x, np.zeros(shape[:-1], np.float32)), seeded
    )

  def test_all_masked_or_zero_weighted_batch(self):
    m = Metric(from_logits=True)
    y, x = _batch(np.random.default_rng(9), (4, 5, 3), True)
    x[0, 0, 0] = np.inf  # masked entries contribute nothing, even a non-finite loss
    y[0, 0, 0] = 0.0
    masked = _update(m, m.init(), y, x, None, np.zeros((4, 5), bool))
    self.assertEqual(float(_result(m, masked)), 0.0)
    self.assertEqual(_count(masked), 0.0)
    seeded = _update(m, m.init(), SEED_TRUE, SEED_PRED)
    np.testing.assert_allclose(
      float(_result(m, _update(m, seeded, y, x, None, np.zeros((4, 1), bool)))),
      float(_result(m, seeded)),
      rtol=F32_EPS,
    )
    zero_weight = _update(m, seeded, y[1:], x[1:], np.zeros(3, np.float32))
    np.testing.assert_allclose(
      float(_result(m, zero_weight)), float(_result(m, seeded)), rtol=F32_EPS
    )


class PackedSumsTest(parameterized.TestCase):
  """The state is one float32 array ``(total, total_err, count, count_err)``; the
  four names are read-only views of it."""

  def _assert_views(self, state):
    sums = np.asarray(state.sums)
    for i, name in enumerate(("total", "total_err", "count", "count_err")):
      view = getattr(state, name)
      self.assertEqual(view.dtype, jnp.float32)
      np.testing.assert_array_equal(np.asarray(view), sums[..., i])

  def test_views_equal_the_packed_entries(self):
    m = Metric(from_logits=True)
    rng = np.random.default_rng(21)
    y, x = _batch(rng, (6, 3), True)
    state = m.update(m.init(), y, x)
    chex.assert_shape(state.sums, (4,))
    self.assertEqual(state.sums.dtype, jnp.float32)
    self.assertEqual(float(state.count), 6.0)
    np.testing.assert_allclose(_total(state), ref.elementwise(y, x, True).mean(-1).sum(), 1e-6)
    self._assert_views(state)
    self._assert_views(m.merge(state, state))
    # Stacked: leading axes on `sums`, and on every view.
    stacked = _stack([state, m.init(), state])
    chex.assert_shape((stacked.sums, stacked.total, stacked.count_err), ((3, 4), (3,), (3,)))
    self._assert_views(stacked)
    # Inside jit and vmap the views are traced slices of `sums`.
    count = jax.jit(lambda s: s.count + s.count_err)(state)
    np.testing.assert_array_equal(np.asarray(count), np.asarray(state.sums[2] + state.sums[3]))
    totals = jax.vmap(lambda s: s.total)(stacked)
    np.testing.assert_array_equal(np.asarray(totals), np.asarray(stacked.sums[:, 0]))

  def test_one_leaf_whatever_the_method(self):
    m = Metric()
    a = _update(m, m.init(), SEED_TRUE, SEED_PRED)
    states = {
      "init": m.init(),
      "update": m.update(m.init(), SEED_TRUE, SEED_PRED),
      "jit_update": a,
      "merge": m.merge(a, a),
      "reduce": m.reduce(_stack([a, a])),
    }
    for name, state in states.items():
      with self.subTest(name):
        leaves = jax.tree_util.tree_leaves(state)
        self.assertLen(leaves, 1)
        self.assertIs(leaves[0], state.sums)
        chex.assert_shape(state.sums, (4,))

  def test_views_are_read_only(self):
    state = Metric().init()
    for name in ("total", "total_err", "count", "count_err"):
      with self.assertRaises(AttributeError):
        setattr(state, name, jnp.float32(1))
    with self.assertRaises(TypeError):  # no longer fields: build a state from `sums`
      bce_jax.MetricState(*(jnp.float32(0) for _ in range(4)))  # type: ignore[misc]


@dataclasses.dataclass(frozen=True)
class _LookAlike:
  sums: jax.Array


jax.tree_util.register_dataclass(_LookAlike)


def _state(sums):
  """A hand-built state of this metric holding `sums`."""
  return bce_jax.MetricState(sums, metric=Metric().init().metric)


_BAD_STATES = {
  # kind: (state, error, message pattern with {arg} for the argument's name)
  "dict": (
    {"sums": jnp.array([1.0, 0.0, 2.0, 0.0], jnp.float32)},
    TypeError,
    r"`{arg}` must be a bce_jax.MetricState.*dict",
  ),
  "tuple": (
    (jnp.float32(1), jnp.float32(0), jnp.float32(2), jnp.float32(0)),
    TypeError,
    r"`{arg}` must be a bce_jax.MetricState.*tuple",
  ),
  "other_dataclass": (
    _LookAlike(jnp.array([1.0, 0.0, 2.0, 0.0], jnp.float32)),
    TypeError,
    r"`{arg}` must be a bce_jax.MetricState.*_LookAlike",
  ),
  "three_sums": (
    _state(jnp.zeros(3)),
    ValueError,
    r"`{arg}\.sums` must be a float32 array of shape \[4\].*got shape \(3,\)",
  ),
  "scalar_sums": (
    _state(jnp.float32(0)),
    ValueError,
    r"`{arg}\.sums` must be a float32 array of shape \[4\].*got shape \(\)",
  ),
  "stacked_sums": (
    _state(jnp.zeros((2, 4))),
    ValueError,
    r"`{arg}\.sums` must be a float32 array of shape \[4\].*got shape \(2, 4\).*reduce\(\)",
  ),
  "int_sums": (
    _state(jnp.zeros(4, jnp.int32)),
    ValueError,
    r"`{arg}\.sums` must be a float32 array of shape \[4\].*int32",
  ),
  "float16_sums": (
    _state(jnp.zeros(4, jnp.float16)),
    ValueError,
    r"`{arg}\.sums` must be a float32 array of shape \[4\].*float16",
  ),
}


def _pattern(template, arg):
  return template.replace("{arg}", re.escape(arg))


# Errors are raised at the entry, in Python: checked eagerly and while tracing.
_MODES = (("eager", False), ("jit", True))


def _maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


class StateStructureTest(parameterized.TestCase):
  @parameterized.named_parameters(
    *[(f"{k}_{mode}", k, use_jit) for k in _BAD_STATES for mode, use_jit in _MODES]
  )
  def test_update_rejects(self, kind, use_jit):
    bad, error, template = _BAD_STATES[kind]
    with self.assertRaisesRegex(error, _pattern(template, "state")):
      _maybe_jit(Metric().update, use_jit)(bad, SEED_TRUE, SEED_PRED)

  @parameterized.named_parameters(
    *[(f"{k}_{mode}", k, use_jit) for k in _BAD_STATES for mode, use_jit in _MODES]
  )
  def test_result_rejects(self, kind, use_jit):
    bad, error, template = _BAD_STATES[kind]
    with self.assertRaisesRegex(error, _pattern(template, "state")):
      _maybe_jit(Metric().result, use_jit)(bad)

  @parameterized.named_parameters(
    *[(f"{k}_{mode}", k, use_jit) for k in _BAD_STATES for mode, use_jit in _MODES]
  )
  def test_merge_rejects(self, kind, use_jit):
    bad, error, template = _BAD_STATES[kind]
    m = Metric()
    merge = _maybe_jit(m.merge, use_jit)
    with self.assertRaisesRegex(error, _pattern(template, "state")):
      merge(bad, m.init())
    with self.assertRaisesRegex(error, _pattern(template, "others[1]")):
      merge(m.init(), m.init(), bad)

  def test_python_sums_rejected_eagerly(self):
    m = Metric()
    tag = m.init().metric
    for sums, kind in ((1.0, "float"), ([1.0, 0.0, 2.0, 0.0], "list")):
      with self.assertRaisesRegex(
        ValueError, rf"`state\.sums` must be a float32 array.*got a {kind}\."
      ):
        m.result(bce_jax.MetricState(sums, metric=tag))  # type: ignore[arg-type]

  def test_merge_needs_two_states(self):
    m = Metric()
    with self.assertRaisesRegex(TypeError, r"merge\(\).*state"):
      m.merge(m.init())


def _stacked_state(shape, dtype=jnp.float32):
  """A MetricState whose `sums` has the given shape."""
  return bce_jax.MetricState(jnp.zeros(shape, dtype), metric=Metric().init().metric)


_BAD_STACKS = {
  # kind: (stack, error, message pattern)
  "k_zero": (_stacked_state((0, 4)), ValueError, r"reduce\(\) needs at least one.*K = 0"),
  "one_state": (
    _stacked_state((4,)),
    ValueError,
    r"`states\.sums` must be a float32 array of shape \[K, 4\].*shape \(4,\)",
  ),
  "three_sums": (
    _stacked_state((2, 3)),
    ValueError,
    r"`states\.sums` must be a float32 array of shape \[K, 4\].*shape \(2, 3\)",
  ),
  "rank_three": (
    _stacked_state((2, 3, 4)),
    ValueError,
    r"`states\.sums` must be a float32 array of shape \[K, 4\].*shape \(2, 3, 4\)",
  ),
  "int_sums": (
    _stacked_state((2, 4), dtype=jnp.int32),
    ValueError,
    r"`states\.sums` must be a float32 array of shape \[K, 4\].*int32",
  ),
  "not_a_state": (
    {"total": jnp.zeros(2)},
    TypeError,
    r"`states` must be a bce_jax.MetricState.*dict",
  ),
}


class ReduceErrorsTest(parameterized.TestCase):
  @parameterized.named_parameters(
    *[(f"{k}_{mode}", k, use_jit) for k in _BAD_STACKS for mode, use_jit in _MODES]
  )
  def test_bad_stack(self, kind, use_jit):
    bad, error, pattern = _BAD_STACKS[kind]
    with self.assertRaisesRegex(error, pattern):
      _maybe_jit(Metric().reduce, use_jit)(bad)


class ConfigTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("default", {}),
    (
      "everything",
      {
        "from_logits": True,
        "label_smoothing": 0.1,
        "name": "val_bce",
        "axis": (1, 2),
        "pos_weight": (1.0, 2.5),
      },
    ),
    ("scalar_pos_weight", {"pos_weight": 3.0, "axis": 1}),
  )
  def test_json_round_trip(self, kwargs):
    m = Metric(**kwargs)
    config = json.loads(json.dumps(m.get_config()))
    back = Metric.from_config(config)
    self.assertEqual(back, m)
    self.assertEqual(hash(back), hash(m))
    self.assertEqual(back.get_config(), config)

  def test_keras_config_keys(self):
    keras = {"name": "bce", "dtype": "float32", "from_logits": True, "label_smoothing": 0.1}
    expected = Metric(from_logits=True, label_smoothing=0.1, name="bce")
    self.assertEqual(Metric.from_config(keras), expected)
    serialized = {
      "module": "keras.metrics",
      "class_name": "BinaryCrossentropy",
      "config": keras,
      "registered_name": None,
    }
    self.assertEqual(Metric.from_config(serialized), expected)
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}}
    self.assertEqual(Metric.from_config({**keras, "dtype": policy}), expected)

  @parameterized.named_parameters(
    ("reduction", {"from_logits": True, "reduction": "sum"}, "reduction"),
    ("misspelled", {"from_logit": True}, "from_logit"),
  )
  def test_unknown_keys_rejected(self, config, key):
    with self.assertRaisesRegex(ValueError, rf"[Uu]nknown.*'{key}'"):
      Metric.from_config(config)

  def test_unsupported_dtype_rejected(self):
    with self.assertRaisesRegex(ValueError, "dtype"):
      Metric.from_config({"dtype": "float16", "from_logits": True})

  def test_static_hashable_pytree(self):
    a, b = Metric(from_logits=True, label_smoothing=0.1), Metric(True, 0.1)
    c = Metric(from_logits=True, label_smoothing=0.2)
    self.assertEqual(jax.tree_util.tree_leaves(a), [])
    self.assertEqual(a, b)
    self.assertEqual(hash(a), hash(b))
    self.assertNotEqual(a, c)
    self.assertEqual(jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b))
    self.assertNotEqual(jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(c))
    with self.assertRaises(dataclasses.FrozenInstanceError):
      a.from_logits = False  # type: ignore[misc]

  def test_equal_configs_do_not_retrace(self):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(metric, state, y, x):
      return metric.update(state, y, x)

    state = Metric(from_logits=True).init()
    for _ in range(3):  # a fresh but equal metric object each time
      state = step(Metric(from_logits=True, name="m"), state, SEED_TRUE, SEED_PRED)
    self.assertEqual(_count(state), 6.0)
    # A different configuration (here only the name, so the state still fits)
    # is a different static value and does retrace.
    with self.assertRaises(AssertionError):
      step(Metric(from_logits=True, name="other"), state, SEED_TRUE, SEED_PRED)


class EagerDispatchTest(parameterized.TestCase):
  """Each method called eagerly once: the same state and value as under jit."""

  def _assert_same_state(self, eager, jitted):
    chex.assert_trees_all_equal_shapes_and_dtypes(eager, jitted)
    np.testing.assert_allclose(_total(eager), _total(jitted), rtol=2 * F32_EPS)
    np.testing.assert_allclose(_count(eager), _count(jitted), rtol=2 * F32_EPS)

  def test_methods(self):
    m = Metric(from_logits=True, label_smoothing=0.1, pos_weight=1.5)
    rng = np.random.default_rng(13)
    (ya, xa), (yb, xb) = _batch(rng, (5, 4, 3), True), _batch(rng, (3, 4, 3), True)
    w = rng.uniform(0, 2, (5,)).astype(np.float32)
    mask = rng.uniform(size=(5, 4)) > 0.3
    init = m.init()
    chex.assert_trees_all_equal(init, _init(m))
    a = m.update(init, ya, xa, w, mask)
    self._assert_same_state(a, _update(m, _init(m), ya, xa, w, mask))
    b = m.update(a, yb, xb)
    self._assert_same_state(b, _update(m, a, yb, xb))
    self._assert_same_state(m.merge(a, b, a), _merge(m, a, b, a))
    stacked = _stack([a, b, a])
    self._assert_same_state(m.reduce(stacked), _reduce(m, stacked))
    value = m.result(b)
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual(value.shape, ())
    np.testing.assert_allclose(float(value), float(_result(m, b)), rtol=2 * F32_EPS)
    expected = ref.metric_result(
      [
        (_ref_per_sample(ya, xa, m), _ref_weight((5, 4), w, mask)),
        (_ref_per_sample(yb, xb, m), None),
      ]
    )
    np.testing.assert_allclose(float(value), expected, rtol=8 * F32_EPS)
