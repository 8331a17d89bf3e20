"""The streaming metric: Keras seed values, weights, scan/vmap/psum, accuracy, config."""

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
from tests import _reference as ref

F32_EPS = float(np.finfo(np.float32).eps)
SEED_TRUE = jnp.array([[0.0, 1.0], [0.0, 0.0]])
SEED_PRED = jnp.array([[0.6, 0.4], [0.4, 0.6]])
# Printed on the Keras metric page (tf.keras.metrics.BinaryCrossentropy).
KERAS_SEED = 0.81492424
KERAS_SEED_WEIGHTED = 0.9162905

Metric = bce_jax.BinaryCrossentropyMetric


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
      y, x, from_logits=metric.from_logits, label_smoothing=metric.label_smoothing,
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


class SeedValuesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_keras_metric_page(self):
    m = Metric()
    update, result = self.variant(m.update), self.variant(m.result)
    value = result(update(m.init(), SEED_TRUE, SEED_PRED))
    weighted = result(update(m.init(), SEED_TRUE, SEED_PRED, jnp.array([1, 0])))
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual(value.shape, ())
    # Keras' printed float32 values carry a rounding error of ~2.5 ulp.
    np.testing.assert_allclose(float(value), KERAS_SEED, rtol=4 * F32_EPS)
    np.testing.assert_allclose(float(weighted), KERAS_SEED_WEIGHTED, rtol=4 * F32_EPS)
    # ... and bce_jax is within float32 rounding of the float64 truth.
    per_sample = ref.mean_over(ref.elementwise(SEED_TRUE, SEED_PRED), -1)
    np.testing.assert_allclose(float(value), per_sample.mean(), rtol=2 * F32_EPS)
    np.testing.assert_allclose(float(weighted), per_sample[0], rtol=2 * F32_EPS)

  @chex.variants(with_jit=True, without_jit=True)
  def test_keras_streaming_two_updates(self):
    # Two updates, then the weighted one on top: Keras' running mean.
    m = Metric()
    update = self.variant(m.update)
    state = update(m.init(), SEED_TRUE, SEED_PRED)
    state = update(state, SEED_TRUE, SEED_PRED, jnp.array([1.0, 0.0]))
    per_sample = ref.mean_over(ref.elementwise(SEED_TRUE, SEED_PRED), -1)
    expected = ref.metric_result([(per_sample, None), (per_sample, np.array([1.0, 0.0]))])
    np.testing.assert_allclose(float(self.variant(m.result)(state)), expected, rtol=2 * F32_EPS)
    self.assertEqual(_count(state), 3.0)


_CONFIGS = {
    "probs": dict(),
    "logits_smoothing_posweight": dict(from_logits=True, label_smoothing=0.2, pos_weight=2.0),
}


_WEIGHT_KINDS = ["none", "scalar", "batch", "full", "column", "trailing_one"]


class RandomBatchesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
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
    update = self.variant(m.update)
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
      }[weight_kind]
      sw = None if sw is None else np.asarray(sw, np.float32)
      mask = rng.uniform(size=ps_shape) > 0.3 if use_mask else None
      state = update(state, y, x, sw, mask)
      batches.append((_ref_per_sample(y, x, m), _ref_weight(ps_shape, sw, mask)))
    expected = ref.metric_result(batches)
    np.testing.assert_allclose(float(self.variant(m.result)(state)), expected, rtol=8 * F32_EPS)
    expected_count = sum(
        len(ps) if w is None else w.sum() / np.prod(ps.shape[1:]) for ps, w in batches)
    np.testing.assert_allclose(_count(state), expected_count, rtol=4 * F32_EPS)

  @chex.variants(with_jit=True, without_jit=True)
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
    state = self.variant(m.update)(m.init(), y, x, sw)
    expected = ref.metric_result([(per_sample, sw)])
    np.testing.assert_allclose(float(m.result(state)), expected, rtol=8 * F32_EPS)

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_weight_weights_rows_when_batch_equals_time(self):
    # [B] weights on [B, T] per-sample losses weight rows, also when B == T.
    m = Metric(from_logits=True)
    y, x = _batch(np.random.default_rng(12), (3, 3, 2), True)
    w = np.array([0.0, 1.0, 3.0], np.float32)
    state = self.variant(m.update)(m.init(), y, x, w)
    per_sample = _ref_per_sample(y, x, m)
    expected = ref.metric_result([(per_sample, np.broadcast_to(w[:, None], (3, 3)))])
    np.testing.assert_allclose(float(m.result(state)), expected, rtol=8 * F32_EPS)
    self.assertEqual(_count(state), 4.0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("B", (6, 3)), ("BT", (6, 4, 3)))
  def test_scalar_weight_counts_every_sample(self, shape):
    # SPEC: a scalar weight w adds w * B to the count (Keras 3 adds w).
    m = Metric()
    y, x = _batch(np.random.default_rng(0), shape, False)
    update = self.variant(m.update)
    weighted = update(m.init(), y, x, 0.5)
    self.assertEqual(_count(weighted), 0.5 * shape[0])
    self.assertEqual(_count(update(weighted, y, x, jnp.float32(2.0))), 2.5 * shape[0])
    # A uniform weight cancels in the mean.
    plain = update(m.init(), y, x)
    self.assertEqual(_count(plain), shape[0])
    np.testing.assert_allclose(
        float(m.result(weighted)), float(m.result(plain)), rtol=2 * F32_EPS)

  @chex.variants(with_jit=True, without_jit=True)
  def test_y_true_column_against_flat_predictions(self):
    # [B, 1] labels with [B] predictions: B samples of one element, not [B, B].
    m = Metric()
    rng = np.random.default_rng(5)
    y, x = _batch(rng, (5, 1), False)
    state = self.variant(m.update)(m.init(), y, x[:, 0])
    self.assertEqual(_count(state), 5.0)
    np.testing.assert_allclose(
        float(m.result(state)), ref.elementwise(y, x).mean(), rtol=4 * F32_EPS)


class TransformationsTest(chex.TestCase):

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
      loop_state = m.update(loop_state, y, x, w)
    expected = ref.metric_result(
        [(_ref_per_sample(y, x, m), w) for y, x, w in zip(ys, xs, weights)])
    # Fused and op-by-op sums round differently; the double-float values agree.
    np.testing.assert_allclose(_total(scan_state), _total(loop_state), rtol=2 * F32_EPS)
    np.testing.assert_allclose(_count(scan_state), _count(loop_state), rtol=2 * F32_EPS)
    np.testing.assert_allclose(float(m.result(scan_state)), expected, rtol=8 * F32_EPS)
    np.testing.assert_allclose(float(m.result(loop_state)), expected, rtol=8 * F32_EPS)
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
          [(_ref_per_sample(ys[b, s], xs[b, s], m), None) for b in range(2)])
      np.testing.assert_allclose(float(results[s]), expected, rtol=8 * F32_EPS)
    merged = jax.vmap(m.merge)(states, states)
    np.testing.assert_allclose(jax.vmap(m.result)(merged), results, rtol=2 * F32_EPS)

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
    shard_states = jax.vmap(lambda y, x: m.update(m.init(), y, x))(ys, xs)
    summed = jax.vmap(lambda s: jax.lax.psum(s, "shards"), axis_name="shards")(shard_states)
    merged = m.merge(*_unstack(shard_states, 4))
    expected = ref.metric_result([(_ref_per_sample(y, x, m), None) for y, x in zip(ys, xs)])
    for value in jax.vmap(m.result)(summed):
      np.testing.assert_allclose(float(value), float(m.result(merged)), rtol=1e-6)
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
        shards = [m.update(m.init(), y[i:i + 4], x[i:i + 4], w[i:i + 4]) for i in range(0, 16, 4)]
        merged = m.merge(*shards)
        print(json.dumps({"psum": float(m.result(summed)), "merge": float(m.result(merged)),
                          "y": y.tolist(), "x": x.tolist(), "w": w.tolist()}))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    m = Metric(from_logits=True)
    y, x, w = (np.asarray(out[k], np.float32) for k in ("y", "x", "w"))
    expected = ref.metric_result([(_ref_per_sample(y, x, m), w)])
    np.testing.assert_allclose(out["psum"], out["merge"], rtol=1e-6)
    np.testing.assert_allclose(out["psum"], expected, rtol=1e-6)


# Zero or at least 1e-3: XLA flushes subnormal products to zero on CPU.
_weights = st.one_of(st.just(0.0), st.floats(float(np.float32(1e-3)), 4, width=32))
_labels = hnp.arrays(np.float32, st.tuples(st.integers(0, 4), st.just(3)),
                     elements=st.sampled_from([0.0, 1.0, 0.25]))


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
  cuts = sorted(draw(st.lists(st.integers(0, rows), min_size=n_shards - 1,
                              max_size=n_shards - 1)))
  bounds = list(zip([0] + cuts, cuts + [rows]))
  return (y, x, w), [(y[a:b], x[a:b], w[a:b]) for a, b in bounds]


class MergeTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.m = Metric(from_logits=True)
    self.update = jax.jit(self.m.update)
    self.merge = jax.jit(self.m.merge)
    self.result = jax.jit(self.m.result)

  def _states(self, batches):
    return [self.update(self.m.init(), y, x, w) for y, x, w in batches]

  @given(_streams(3))
  def test_associative(self, batches):
    a, b, c = self._states(batches)
    left = self.merge(self.merge(a, b), c)
    right = self.merge(a, self.merge(b, c))
    np.testing.assert_allclose(_count(left), _count(right), rtol=4 * F32_EPS**2)
    np.testing.assert_allclose(_total(left), _total(right), rtol=2 * F32_EPS, atol=1e-30)
    np.testing.assert_allclose(
        float(self.result(left)), float(self.result(right)), rtol=4 * F32_EPS)

  @given(_streams(2))
  def test_commutative(self, batches):
    a, b = self._states(batches)
    # Two-sum is exact in either order, so the merged states agree bit for bit.
    chex.assert_trees_all_equal(self.merge(a, b), self.merge(b, a))

  @given(_sharded_dataset())
  def test_shards_merge_to_the_whole_dataset(self, dataset):
    (y, x, w), shards = dataset
    merged = self.merge(*self._states(shards))
    whole = self.update(self.m.init(), y, x, w)
    np.testing.assert_allclose(_count(merged), w.sum(dtype=np.float64), rtol=2 * F32_EPS)
    np.testing.assert_allclose(_count(merged), _count(whole), rtol=2 * F32_EPS)
    expected = ref.metric_result([(_ref_per_sample(y, x, self.m), w)])
    np.testing.assert_allclose(float(self.result(merged)), expected, rtol=8 * F32_EPS, atol=0)
    np.testing.assert_allclose(
        float(self.result(merged)), float(self.result(whole)), rtol=8 * F32_EPS)

  @chex.variants(with_jit=True, without_jit=True)
  def test_merge_many_states(self):
    m = self.m
    rng = np.random.default_rng(4)
    batches = [_batch(rng, (n, 3), True) for n in (1, 2, 3, 5, 7)]
    states = [m.update(m.init(), y, x) for y, x in batches]
    merged = self.variant(m.merge)(*states)
    expected = ref.metric_result([(_ref_per_sample(y, x, m), None) for y, x in batches])
    np.testing.assert_allclose(float(m.result(merged)), expected, rtol=8 * F32_EPS)
    self.assertEqual(_count(merged), 18.0)
    # Merging the empty state is the identity.
    chex.assert_trees_all_equal(self.variant(m.merge)(states[0], m.init()), states[0])


class AccuracyAtScaleTest(chex.TestCase):

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
    np.testing.assert_allclose(float(m.result(state)), expected, rtol=1e-6)
    # The plain accumulator drifts by far more, so the check above means something.
    naive = float(naive_total) / float(naive_count)
    self.assertGreater(abs(naive / expected - 1), 1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_count_does_not_stall_past_2_24(self):
    m = Metric(from_logits=True)
    update = self.variant(m.update)
    y, x = np.ones((1, 1), np.float32), np.full((1, 1), -0.5, np.float32)
    state = update(m.init(), y, x, jnp.float32(2.0**24))
    self.assertEqual(_count(state), 2.0**24)
    small_x = np.full((1, 1), 7.0, np.float32)  # a loss of ~1e-3, well below total's ulp
    for _ in range(101):
      state = update(state, y, small_x)
    self.assertEqual(_count(state), 2.0**24 + 101)
    big = float(ref.elementwise(y, x, from_logits=True)[0, 0])
    small = float(ref.elementwise(y, small_x, from_logits=True)[0, 0])
    expected_total = 2.0**24 * big + 101 * small
    np.testing.assert_allclose(_total(state), expected_total, rtol=2 * F32_EPS)
    np.testing.assert_allclose(
        float(m.result(state)), expected_total / (2.0**24 + 101), rtol=2 * F32_EPS)
    # A plain float32 count stalls: 2**24 + 1 rounds back to 2**24.
    naive = np.float32(2.0**24)
    for _ in range(101):
      naive = naive + np.float32(1)
    self.assertEqual(float(naive), 2.0**24)


class EmptyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_empty_state_result_is_zero(self):
    m = Metric()
    value = self.variant(m.result)(self.variant(m.init)())
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual(float(value), 0.0)  # not nan

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("B", (0, 3)), ("BT", (0, 4, 3)))
  def test_empty_batch_changes_nothing(self, shape):
    m = Metric()
    update = self.variant(m.update)
    empty_y, empty_x = np.zeros(shape, np.float32), np.full(shape, 0.5, np.float32)
    from_empty = update(m.init(), empty_y, empty_x)
    self.assertEqual(float(m.result(from_empty)), 0.0)
    self.assertEqual(_count(from_empty), 0.0)
    seeded = update(m.init(), SEED_TRUE, SEED_PRED)
    chex.assert_trees_all_equal(update(seeded, empty_y, empty_x), seeded)
    chex.assert_trees_all_equal(
        update(seeded, empty_y, empty_x, np.zeros(shape[:-1], np.float32)), seeded)

  @chex.variants(with_jit=True, without_jit=True)
  def test_all_masked_or_zero_weighted_batch(self):
    m = Metric(from_logits=True)
    update = self.variant(m.update)
    y, x = _batch(np.random.default_rng(9), (4, 5, 3), True)
    x[0, 0, 0] = np.inf  # masked entries contribute nothing, even a non-finite loss
    y[0, 0, 0] = 0.0
    masked = update(m.init(), y, x, None, np.zeros((4, 5), bool))
    self.assertEqual(float(m.result(masked)), 0.0)
    self.assertEqual(_count(masked), 0.0)
    seeded = update(m.init(), SEED_TRUE, SEED_PRED)
    np.testing.assert_allclose(
        float(m.result(update(seeded, y, x, None, np.zeros((4, 1), bool)))),
        float(m.result(seeded)), rtol=F32_EPS)
    zero_weight = update(seeded, y[1:], x[1:], np.zeros(3, np.float32))
    np.testing.assert_allclose(float(m.result(zero_weight)), float(m.result(seeded)), rtol=F32_EPS)


@dataclasses.dataclass(frozen=True)
class _LookAlike:
  total: jax.Array
  total_err: jax.Array
  count: jax.Array
  count_err: jax.Array


jax.tree_util.register_dataclass(_LookAlike)


def _state(**fields):
  base = dict(total=jnp.float32(1), total_err=jnp.float32(0), count=jnp.float32(2),
              count_err=jnp.float32(0))
  return bce_jax.MetricState(**{**base, **fields})


_BAD_STATES = {
    # kind: (state, error, message pattern with {arg} for the argument's name)
    "dict": ({"total": jnp.float32(1), "total_err": jnp.float32(0), "count": jnp.float32(2),
              "count_err": jnp.float32(0)}, TypeError,
             r"`{arg}` must be a bce_jax.MetricState.*dict"),
    "tuple": ((jnp.float32(1), jnp.float32(0), jnp.float32(2), jnp.float32(0)), TypeError,
              r"`{arg}` must be a bce_jax.MetricState.*tuple"),
    "other_dataclass": (_LookAlike(jnp.float32(1), jnp.float32(0), jnp.float32(2),
                                   jnp.float32(0)), TypeError,
                        r"`{arg}` must be a bce_jax.MetricState.*_LookAlike"),
    "vector_field": (_state(total=jnp.zeros(3)), ValueError,
                     r"`{arg}\.total` must be a float32 scalar.*shape \(3,\)"),
    "int_field": (_state(count=jnp.int32(2)), ValueError,
                  r"`{arg}\.count` must be a float32 scalar.*int32"),
    "float16_field": (_state(count_err=jnp.float16(0)), ValueError,
                      r"`{arg}\.count_err` must be a float32 scalar.*float16"),
}


def _pattern(template, arg):
  return template.replace("{arg}", re.escape(arg))


class StateStructureTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(k, k) for k in _BAD_STATES])
  def test_update_rejects(self, kind):
    bad, error, template = _BAD_STATES[kind]
    with self.assertRaisesRegex(error, _pattern(template, "state")):
      self.variant(Metric().update)(bad, SEED_TRUE, SEED_PRED)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(k, k) for k in _BAD_STATES])
  def test_result_rejects(self, kind):
    bad, error, template = _BAD_STATES[kind]
    with self.assertRaisesRegex(error, _pattern(template, "state")):
      self.variant(Metric().result)(bad)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(k, k) for k in _BAD_STATES])
  def test_merge_rejects(self, kind):
    bad, error, template = _BAD_STATES[kind]
    m = Metric()
    merge = self.variant(m.merge)
    with self.assertRaisesRegex(error, _pattern(template, "state")):
      merge(bad, m.init())
    with self.assertRaisesRegex(error, _pattern(template, "others[1]")):
      merge(m.init(), m.init(), bad)

  def test_python_float_fields_rejected_eagerly(self):
    m = Metric()
    with self.assertRaisesRegex(ValueError, r"`state\.total` must be a float32 scalar"):
      m.result(bce_jax.MetricState(1.0, 0.0, 2.0, 0.0))

  def test_merge_needs_two_states(self):
    m = Metric()
    with self.assertRaisesRegex(TypeError, r"merge\(\).*state"):
      m.merge(m.init())


class ConfigTest(chex.TestCase):

  @parameterized.named_parameters(
      ("default", {}),
      ("everything", dict(from_logits=True, label_smoothing=0.1, name="val_bce", axis=(1, 2),
                          pos_weight=(1.0, 2.5))),
      ("scalar_pos_weight", dict(pos_weight=3.0, axis=1)),
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
    serialized = {"module": "keras.metrics", "class_name": "BinaryCrossentropy",
                  "config": keras, "registered_name": None}
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

    state = Metric().init()
    for _ in range(3):  # a fresh but equal metric object each time
      state = step(Metric(from_logits=True, name="m"), state, SEED_TRUE, SEED_PRED)
    self.assertEqual(_count(state), 6.0)
    # A different configuration is a different static value and does retrace.
    with self.assertRaises(AssertionError):
      step(Metric(from_logits=False), state, SEED_TRUE, SEED_PRED)
