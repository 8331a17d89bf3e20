"""top_k_labels and TopKMetric against NumPy.

* top_k_labels equals a full argsort of the dense scores (ties to the lower
  id), for tiles that divide C, that do not, narrower than k, with and
  without bias, jitted and eager; with -inf, nan and -0.0 scores (rows of
  -inf only, fewer finite scores than k) it returns real ids in NumPy's
  order, nan ranked as -inf;
* TopKMetric equals a float64 per-row loop (tests/_reference.py), with
  masks, repeated and padded positives, rows without positives;
* merge / reduce / psum of states equal one update over all the rows; an
  empty state gives 0; the state is a scan carry and donatable;
* a state's static tag names the metric and ks that made it: a metric with
  other ks (same shapes) or a BCE metric refuses it, also under jit; the
  tag survives psum, scan, vmap, donation, pickle and flax serialization;
* bad arguments raise errors naming them.
"""

from __future__ import annotations

import pickle

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import bce_jax
from tests import _reference as ref


def _dense_top_k(h, w, b, k):
  scores = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
  if b is not None:
    scores = scores + np.asarray(b, np.float64)
  ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, ids, axis=1), ids


def _ranked_reference(scores, k):
  """Stable argsort, best first, with nan ranked as -inf (the documented order)."""
  scores = np.asarray(scores, np.float64)
  ids = np.argsort(-np.where(np.isnan(scores), -np.inf, scores), axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, ids, axis=1), ids


def _data(rows, labels, dim, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(rows, dim)).astype(np.float32)
  w = rng.normal(size=(labels, dim)).astype(np.float32)
  b = rng.normal(size=labels).astype(np.float32)
  return h, w, b


class TopKLabelsTest(parameterized.TestCase):
  @parameterized.parameters(
    (None, 1, True), (None, 5, False), (1, 5, True), (3, 5, True), (16, 1, False), (500, 5, True)
  )
  def test_equals_dense_argsort(self, block, k, bias):
    h, w, b = _data(6, 50, 4)
    b = b if bias else None
    fn = jax.jit(lambda h, w, b: bce_jax.top_k_labels(h, w, k, bias=b, block_size=block))
    scores, ids = fn(h, w, b)
    want_scores, want_ids = _dense_top_k(h, w, b, k)
    self.assertEqual((scores.dtype, ids.dtype), (jnp.float32, jnp.int32))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)

  def test_ties_go_to_the_lower_id_and_k_equals_c(self):
    h = np.ones((2, 1), np.float32)
    w = np.array([[1.0], [2.0], [1.0], [2.0], [1.0]], np.float32)
    for block in (None, 1, 2):
      _, ids = bce_jax.top_k_labels(h, w, 5, block_size=block)  # eager
      np.testing.assert_array_equal(ids, [[1, 3, 0, 2, 4]] * 2)

  @parameterized.product(
    scenario=("all_neg_inf", "two_finite", "mixed"), block=(None, 1, 2, 7), jit=(True, False)
  )
  def test_inf_nan_and_signed_zero_scores(self, scenario, block, jit):
    inf, nan = np.inf, np.nan
    bias = {
      "all_neg_inf": [-inf] * 9,
      "two_finite": [-inf, -inf, 0.5, -inf, -inf, -inf, -2.0, -inf, -inf],
      "mixed": [-inf, 0.0, -0.0, nan, -inf, 0.0, inf, -inf, nan],
    }[scenario]
    bias = np.array(bias, np.float32)
    # Exact scores: row 0 is h * w + bias, row 1 the bias alone.
    h = np.array([[1.0], [0.0]], np.float32)
    w = np.array([[1], [2], [0], [1], [3], [0], [2], [1], [0]], np.float32)
    dense = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T + bias
    for k in (1, 4, 9):
      fn = lambda h, w, b, k=k: bce_jax.top_k_labels(h, w, k, bias=b, block_size=block)
      scores, ids = (jax.jit(fn) if jit else fn)(h, w, bias)
      want_scores, want_ids = _ranked_reference(dense, k)
      np.testing.assert_array_equal(ids, want_ids, err_msg=f"k={k}")
      np.testing.assert_array_equal(scores, want_scores, err_msg=f"k={k}")

  @hypothesis.settings(max_examples=8)
  @hypothesis.given(
    rows=st.integers(1, 5),
    labels=st.integers(1, 40),
    k=st.integers(1, 6),
    block=st.integers(1, 50),
    seed=st.integers(0, 999),
  )
  def test_any_shape(self, rows, labels, k, block, seed):
    k = min(k, labels)
    h, w, b = _data(rows, labels, 3, seed)
    _, ids = jax.jit(lambda h, w, b: bce_jax.top_k_labels(h, w, k, bias=b, block_size=block))(
      h, w, b
    )
    np.testing.assert_array_equal(ids, _dense_top_k(h, w, b, k)[1])

  @parameterized.named_parameters(
    ("k_big", {"k": 11}, ValueError, r"`k` must be in \[1, C\] = \[1, 10\]"),
    ("k_zero", {"k": 0}, ValueError, "`k`"),
    ("k_float", {"k": 2.0}, TypeError, "`k` must be an int"),
    ("w_shape", {"w": np.zeros((10, 2), np.float32)}, ValueError, "`h` and `w`"),
    ("bias", {"bias": np.zeros(3, np.float32)}, ValueError, "`bias`"),
    ("block", {"block_size": 0}, ValueError, "`block_size`"),
  )
  def test_bad_argument(self, change, error, message):
    kwargs = {"h": np.zeros((4, 3), np.float32), "w": np.zeros((10, 3), np.float32), "k": 2}
    kwargs.update(change)
    with self.assertRaisesRegex(error, message):
      bce_jax.top_k_labels(kwargs.pop("h"), kwargs.pop("w"), kwargs.pop("k"), **kwargs)


def _ranked(rows, labels, k, seed):
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.permutation(labels)[:k] for _ in range(rows)]).astype(np.int32)
  positives = rng.integers(-1, labels, (rows, 4)).astype(np.int32)
  positives[0] = -1  # a row without positives
  positives[1, :2] = ids[1, 0]  # a repeated positive, ranked first
  return ids, positives


class TopKMetricTest(parameterized.TestCase):
  METRIC = bce_jax.TopKMetric(ks=(1, 3, 5))

  def _close(self, got, want):
    self.assertEqual(sorted(got), sorted(want))
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)

  @parameterized.parameters(False, True)
  def test_equals_reference(self, masked):
    ids, positives = _ranked(40, 12, 5, seed=1)
    mask = np.random.default_rng(2).uniform(size=40) < 0.6 if masked else None
    m = self.METRIC
    state = jax.jit(m.update)(m.init(), ids, positives, mask)
    self._close(m.result(state), ref.top_k_metrics(ids, positives, m.ks, mask))

  def test_empty_is_zero_and_empty_batch_adds_nothing(self):
    m = self.METRIC
    empty = m.update(m.init(), np.zeros((0, 5), np.int32), np.zeros((0, 2), np.int32))
    for value in list(m.result(m.init()).values()) + list(m.result(empty).values()):
      self.assertEqual(float(value), 0.0)

  def test_merge_reduce_scan_and_psum_equal_one_update(self):
    m = self.METRIC
    ids, positives = _ranked(48, 30, 5, seed=3)
    whole = m.result(m.update(m.init(), ids, positives))
    parts = [m.update(m.init(), ids[i : i + 12], positives[i : i + 12]) for i in range(0, 48, 12)]
    self._close(m.result(m.merge(*parts)), whole)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts)
    self._close(m.result(jax.jit(m.reduce)(stacked)), whole)

    def step(state, batch):
      return m.update(state, *batch), None

    batches = (ids.reshape(4, 12, 5), positives.reshape(4, 12, 4))
    scanned = jax.jit(lambda: jax.lax.scan(step, m.init(), batches)[0])()
    self._close(m.result(scanned), whole)
    summed = jax.vmap(
      lambda i, p: jax.lax.psum(m.update(m.init(), i, p), "rows"), axis_name="rows"
    )(*batches)
    self._close(m.result(jax.tree_util.tree_map(lambda a: a[0], summed)), whole)

  def test_donatable_and_config(self):
    m = self.METRIC
    leaves = jax.tree_util.tree_leaves(m.init())
    self.assertLen({id(a) for a in leaves}, len(leaves))
    jax.jit(m.update, donate_argnums=0)(m.init(), *_ranked(4, 8, 5, 0))
    self.assertEqual(m.get_config(), {"ks": [1, 3, 5], "name": "top_k"})
    self.assertEqual(bce_jax.TopKMetric.from_config(m.get_config()), m)
    self.assertEqual(bce_jax.TopKMetric(ks=3).ks, (3,))

  def test_bad_arguments(self):
    m = self.METRIC
    ids, positives = _ranked(4, 8, 5, 0)
    with self.assertRaisesRegex(ValueError, "`ids` must have at least 5 columns"):
      m.update(m.init(), ids[:, :3], positives)
    with self.assertRaisesRegex(TypeError, "`ids` must be an integer"):
      m.update(m.init(), ids.astype(np.float32), positives)
    with self.assertRaisesRegex(ValueError, "same number of rows"):
      m.update(m.init(), ids, positives[:3])
    with self.assertRaisesRegex(ValueError, r"`mask` must have shape \[batch\]=\(4,\)"):
      m.update(m.init(), ids, positives, np.ones(3, bool))
    with self.assertRaisesRegex(TypeError, "`mask` must be a bool array.*float32"):
      m.update(m.init(), ids, positives, np.ones(4, np.float32))
    with self.assertRaisesRegex(ValueError, r"`state.precision` must be float32 of shape \(4,\)"):
      bce_jax.TopKMetric(ks=(1, 2, 3, 4)).result(m.init())
    with self.assertRaisesRegex(TypeError, "`state` must be a bce_jax.TopKState"):
      m.result(bce_jax.BinaryCrossentropyMetric().init())
    with self.assertRaisesRegex(ValueError, "`ks`"):
      bce_jax.TopKMetric(ks=(0, 1))
    with self.assertRaisesRegex(ValueError, "`ks`"):
      bce_jax.TopKMetric(ks=())
    for ks in ((1.5,), ("1",), (True,)):
      with self.assertRaisesRegex(TypeError, "`ks` must be an int"):
        bce_jax.TopKMetric(ks=ks)


class TopKStateTagTest(parameterized.TestCase):
  M13, M25 = bce_jax.TopKMetric(ks=(1, 3)), bce_jax.TopKMetric(ks=(2, 5))

  def _state(self, m):
    return m.update(m.init(), *_ranked(8, 12, 5, seed=4))

  @parameterized.parameters(True, False)
  def test_other_ks_is_refused(self, jit):
    m, other = self.M13, self._state(self.M25)  # same shapes, other ks
    wrap = jax.jit if jit else (lambda f: f)
    made_by = r"`{}` was made by TopKMetric\(ks=\(2, 5\)\), not by this metric, TopKMetric"
    ids, positives = _ranked(8, 12, 5, seed=5)
    calls = (
      ("state", lambda: wrap(m.update)(other, ids, positives)),
      ("state", lambda: wrap(m.result)(other)),
      ("others\\[0\\]", lambda: wrap(m.merge)(m.init(), other)),
      ("states", lambda: wrap(m.reduce)(jax.tree_util.tree_map(lambda a: a[None], other))),
    )
    for argname, call in calls:
      with self.assertRaisesRegex(ValueError, made_by.format(argname)):
        call()
    # The name labels a metric in logs: a renamed or rebuilt metric accepts the state.
    renamed = bce_jax.TopKMetric(ks=(2, 5), name="val_top_k")
    rebuilt = bce_jax.TopKMetric.from_config(self.M25.get_config())
    for metric in (renamed, rebuilt):
      self.assertEqual(metric.result(other), self.M25.result(other))

  def test_state_of_another_metric_class_is_refused(self):
    bce = bce_jax.BinaryCrossentropyMetric()
    with self.assertRaisesRegex(TypeError, "`state` must be a bce_jax.MetricState"):
      bce.result(self._state(self.M13))
    with self.assertRaisesRegex(TypeError, "`state` must be a bce_jax.TopKState"):
      self.M13.result(bce.init())
    hand = bce_jax.TopKState(*jax.tree_util.tree_leaves(self.M13.init()))
    with self.assertRaisesRegex(ValueError, "made by no metric"):
      self.M13.result(hand)

  def test_tag_is_static_through_transforms(self):
    m = self.M13
    state = self._state(m)
    self.assertLen(jax.tree_util.tree_leaves(state), 6)
    self.assertNotEqual(
      jax.tree_util.tree_structure(state), jax.tree_util.tree_structure(self.M25.init())
    )
    ids, positives = _ranked(8, 12, 5, seed=6)
    parts = [m.update(m.init(), ids[i : i + 4], positives[i : i + 4]) for i in (0, 4)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts)
    summed = jax.vmap(lambda s: jax.lax.psum(s, "i"), axis_name="i")(stacked)
    batched = jax.vmap(lambda i, p: m.update(m.init(), i, p))(
      ids.reshape(2, 4, 5), positives.reshape(2, 4, 4)
    )
    scanned = jax.lax.scan(
      lambda s, b: (m.update(s, *b), None),
      m.init(),
      (ids.reshape(2, 4, 5), positives.reshape(2, 4, 4)),
    )[0]
    donated = jax.jit(m.update, donate_argnums=0)(m.init(), ids, positives)
    whole = m.result(m.update(m.init(), ids, positives))
    for got in (summed, batched, scanned, donated):
      self.assertEqual(got.metric, state.metric)
    self.assertEqual(m.result(jax.tree_util.tree_map(lambda a: a[0], summed)), whole)
    self.assertEqual(m.result(jax.jit(m.reduce)(batched)), whole)
    self.assertEqual(m.result(scanned), whole)

  def test_pickle(self):
    state = self._state(self.M13)
    back = pickle.loads(pickle.dumps(state))
    self.assertEqual(back.metric, state.metric)
    self.assertEqual(self.M13.result(back), self.M13.result(state))

  def test_flax_serialization(self):
    try:
      from flax import serialization
    except ImportError:
      self.skipTest("flax is not installed (it is in the examples extra)")
    state = self._state(self.M13)  # made with flax loaded: registered
    saved = serialization.to_bytes({"step": 3, "top_k": state})
    restored = serialization.from_bytes({"step": 0, "top_k": self.M13.init()}, saved)["top_k"]
    self.assertIsInstance(restored, bce_jax.TopKState)
    self.assertEqual(restored.metric, state.metric)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
      np.testing.assert_array_equal(a, b)
    self.M13.update(restored, *_ranked(4, 12, 5, seed=7))  # it keeps working
    self.assertIn("metric", serialization.to_state_dict(state))
    with self.assertRaisesRegex(ValueError, r"saved state was made by TopKMetric\(ks=\(1, 3\)\)"):
      serialization.from_bytes(self.M25.init(), serialization.to_bytes(state))


if __name__ == "__main__":
  absltest.main()
