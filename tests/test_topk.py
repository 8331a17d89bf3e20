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
* bad arguments raise errors naming them.
"""

from __future__ import annotations

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


if __name__ == "__main__":
  absltest.main()
