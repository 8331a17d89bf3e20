"""Linear BCE over a label space, against a float64 dense reference.

* value and gradients in h, w and bias against the dense formula
  (tests/_reference.py), for tiles that divide C, that do not, and wider
  than C, with and without bias and mask, "sum" and "mean";
* masked rows holding nan: exactly zero gradients, nothing in dw or dbias;
* repeated and padded ids count once; an id outside [0, C) matches nothing
  and ``bce_jax.checked`` reports it;
* "mean" equals ``BinaryCrossentropy(from_logits=True)`` on dense logits;
* bfloat16 inputs, float64 inputs, eager calls, hypothesis over shapes;
* the compiled value_and_grad at B = 1024, C = 670,091, D = 128 needs at
  most one W-sized buffer plus 64 MiB of temporaries, and the default tile
  is chosen per platform when lowering (CPU and a cross-lowered CUDA);
* bad arguments raise errors naming them; the loss object's config.

Numerics run under ``jax.jit``.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import bce_jax
from bce_jax._tiles import xla
from tests import _reference as ref

# float32 against float64: sums of up to a few thousand terms; gradients
# relative to their largest entry.
VALUE_RTOL, GRAD_TOL = 3e-6, 3e-6


def _data(rows, labels, dim, k=3, seed=0, bias=True, dtype=np.float32):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(rows, dim)).astype(dtype)
  w = (rng.normal(size=(labels, dim)) / np.sqrt(dim)).astype(dtype)
  b = rng.normal(size=labels).astype(dtype) if bias else None
  pos = rng.integers(-1, labels, (rows, k)).astype(np.int32)  # -1: padding
  return h, w, b, pos


@functools.cache
def _vag(block=None, reduction="sum", precision=None, implementation=None):
  def loss(h, w, b, pos, mask):
    return bce_jax.linear_binary_crossentropy(
      h,
      w,
      pos,
      bias=b,
      mask=mask,
      label_reduction=reduction,
      block_size=block,
      precision=precision,
      implementation=implementation,
    )

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


class AgainstReferenceTest(parameterized.TestCase):
  @parameterized.parameters(
    # (rows, labels, dim), tile width (None: the default), label reduction
    ((1, 1, 1), None, "sum"),
    ((1, 1, 1), 4, "mean"),
    ((5, 37, 4), 1, "sum"),
    ((5, 37, 4), 7, "mean"),  # 5 whole tiles and one of 2 labels
    ((5, 37, 4), 37, "sum"),  # one tile, exactly C
    ((16, 300, 8), None, "mean"),
    ((16, 300, 8), 64, "sum"),
    ((16, 300, 8), 1000, "sum"),  # wider than C
  )
  def test_value_and_gradients(self, shape, block, reduction):
    h, w, b, pos = _data(*shape)
    value, grads = _vag(block, reduction)(h, w, b, pos, None)
    want = ref.linear_bce(h, w, pos, b, label_reduction=reduction)
    self.assertLess(_rel(value, want[0]), VALUE_RTOL)
    for got, expected in zip(grads, want[1:]):
      self.assertLess(_rel(got, expected), GRAD_TOL)

  def test_no_bias(self):
    h, w, _, pos = _data(6, 50, 4, bias=False)
    loss = lambda h, w: bce_jax.linear_binary_crossentropy(h, w, pos, block_size=16)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, w)
    want = ref.linear_bce(h, w, pos)
    self.assertLess(_rel(value, want[0]), VALUE_RTOL)
    self.assertLess(_rel(grads[0], want[1]), GRAD_TOL)
    self.assertLess(_rel(grads[1], want[2]), GRAD_TOL)

  @parameterized.parameters("sum", "mean")
  def test_masked_nan_rows_get_zero_gradients(self, reduction):
    h, w, b, pos = _data(9, 40, 5, seed=3)
    mask = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1], bool)
    padded = h.copy()
    padded[~mask] = np.nan
    value, (dh, dw, db) = _vag(16, reduction)(padded, w, b, pos, mask)
    want = ref.linear_bce(h[mask], w, pos[mask], b, label_reduction=reduction)
    self.assertLess(_rel(value, want[0]), VALUE_RTOL)
    np.testing.assert_array_equal(np.asarray(dh)[~mask], 0.0)
    self.assertLess(_rel(np.asarray(dh)[mask], want[1]), GRAD_TOL)
    self.assertLess(_rel(dw, want[2]), GRAD_TOL)
    self.assertLess(_rel(db, want[3]), GRAD_TOL)

  def test_no_included_row_is_zero(self):
    h, w, b, pos = _data(3, 10, 2)
    mask = np.zeros(3, bool)
    value, grads = _vag(4)(np.full_like(h, np.nan), w, b, pos, mask)
    self.assertEqual(float(value), 0.0)
    for g in grads:
      np.testing.assert_array_equal(g, 0.0)

  def test_repeated_padded_and_out_of_range_ids(self):
    h, w, b, _ = _data(3, 12, 4)
    pos = np.array([[2, 2, -1, 5], [-1, -1, -1, -1], [11, 0, 11, -1]], np.int32)
    value, grads = _vag(5)(h, w, b, pos, None)
    want = ref.linear_bce(h, w, pos, b)
    self.assertLess(_rel(value, want[0]), VALUE_RTOL)
    for got, expected in zip(grads, want[1:]):
      self.assertLess(_rel(got, expected), GRAD_TOL)
    # An id >= C matches no label (as its dense row would be all zeros) ...
    bad = pos.copy()
    bad[1, 0] = 12
    self.assertLess(_rel(_vag(5)(h, w, b, bad, None)[0], want[0]), VALUE_RTOL)
    # ... and checked() reports it.
    loss = lambda h, p: bce_jax.linear_binary_crossentropy(h, w, p, bias=b)
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"`positives`.*\[0, 12\)"):
      bce_jax.checked(jax.jit(loss))(h, bad)
    self.assertTrue(np.isfinite(float(bce_jax.checked(jax.jit(loss))(h, pos))))

  def test_no_positives_column(self):
    h, w, b, _ = _data(4, 9, 3)
    pos = np.zeros((4, 0), np.int32)
    value, grads = _vag(4)(h, w, b, pos, None)
    want = ref.linear_bce(h, w, pos, b)
    self.assertLess(_rel(value, want[0]), VALUE_RTOL)
    self.assertLess(_rel(grads[1], want[2]), GRAD_TOL)

  def test_mean_equals_dense_binary_crossentropy(self):
    h, w, b, pos = _data(8, 70, 6, seed=5)
    value = _vag(16, "mean")(h, w, b, pos, None)[0]
    logits = h @ w.T + b
    dense = bce_jax.BinaryCrossentropy(from_logits=True)(ref.dense_labels(pos, 70), logits)
    np.testing.assert_allclose(value, dense, rtol=2e-6)

  def test_eager_equals_jit(self):
    h, w, b, pos = _data(5, 33, 4, seed=2)
    eager = bce_jax.linear_binary_crossentropy(h, w, pos, bias=b, block_size=8)
    grads = jax.grad(
      lambda h, w: bce_jax.linear_binary_crossentropy(h, w, pos, bias=b, block_size=8), (0, 1)
    )(h, w)
    value, jit_grads = _vag(8)(h, w, b, pos, None)
    np.testing.assert_allclose(eager, value, rtol=1e-6)
    for a, c in zip(grads, jit_grads):
      np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)

  def test_loss_object_and_config(self):
    h, w, b, pos = _data(5, 33, 4, seed=2)
    loss = bce_jax.LinearBinaryCrossentropy(label_reduction="mean", block_size=8)
    want = ref.linear_bce(h, w, pos, b, label_reduction="mean")[0]
    self.assertLess(_rel(jax.jit(loss)(h, w, pos, b), want), VALUE_RTOL)
    config = loss.get_config()
    self.assertEqual(
      config,
      {
        "label_reduction": "mean",
        "block_size": 8,
        "axis_name": None,
        "precision": None,
        "implementation": None,
      },
    )
    self.assertEqual(bce_jax.LinearBinaryCrossentropy.from_config(config), loss)
    self.assertEmpty(jax.tree_util.tree_leaves(loss))
    self.assertEqual(
      bce_jax.LinearBinaryCrossentropy(precision=jax.lax.Precision.HIGHEST).precision, "highest"
    )

  def test_precision_is_passed_to_every_dot(self):
    h, w, b, pos = _data(4, 20, 3)
    text = _vag(8, "sum", "highest").lower(h, w, b, pos, None).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    self.assertLen(dots, 6, text)  # 3 matmuls, in the loop body and the last tile
    for line in dots:
      self.assertIn("HIGHEST", line)

  def test_bfloat16_inputs(self):
    h, w, b, pos = _data(8, 100, 16, seed=4)
    hb, wb, bb = (jnp.asarray(a, jnp.bfloat16) for a in (h, w, b))
    value, grads = _vag(32)(hb, wb, bb, pos, None)
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual([g.dtype for g in grads], [jnp.bfloat16] * 3)
    rounded = [np.asarray(a, np.float32) for a in (hb, wb, bb)]
    want = ref.linear_bce(rounded[0], rounded[1], pos, rounded[2])
    self.assertLess(_rel(value, want[0]), 1e-5)  # the dots accumulate in float32
    for got, expected in zip(grads, want[1:]):
      self.assertLess(_rel(got, expected), 2e-2)  # g rounded to bfloat16 for the matmuls

  def test_float64(self):
    with jax.enable_x64(True):
      h, w, b, pos = _data(6, 30, 4, dtype=np.float64)
      value, grads = _vag(7)(h, w, b, pos, None)
      self.assertEqual(value.dtype, jnp.float64)
      want = ref.linear_bce(h, w, pos, b)
      self.assertLess(_rel(value, want[0]), 1e-12)
      for got, expected in zip(grads, want[1:]):
        self.assertLess(_rel(got, expected), 1e-12)

  @hypothesis.settings(max_examples=10)
  @hypothesis.given(
    rows=st.integers(1, 9),
    labels=st.integers(1, 60),
    dim=st.integers(1, 6),
    k=st.integers(0, 4),
    block=st.integers(1, 70),
    seed=st.integers(0, 2**16),
  )
  def test_any_shape(self, rows, labels, dim, k, block, seed):
    h, w, b, pos = _data(rows, labels, dim, k=k, seed=seed)
    mask = np.random.default_rng(seed).uniform(size=rows) < 0.7
    value, grads = _vag(block, "mean")(h, w, b, pos, mask)
    want = ref.linear_bce(h, w, pos, b, mask=mask, label_reduction="mean")
    np.testing.assert_allclose(value, want[0], rtol=VALUE_RTOL, atol=1e-7)
    for got, expected in zip(grads, want[1:]):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


class SweepTest(parameterized.TestCase):
  """The tile sweep's other options: a scale, a scalar bias, the "diagonal" and
  "ids" rules, row offsets, and the derivatives-only ("skip loss") sweep."""

  @parameterized.parameters("diagonal", "ids")
  def test_scale_scalar_bias_and_rules(self, rule):
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(11, 3))
    ids_a, ids_b = rng.integers(0, 3, 6), rng.integers(0, 3, 11)
    scale, bias, offset = 1.5, -0.7, 4
    if rule == "diagonal":
      pos = (np.arange(6)[:, None] + offset) == np.arange(11)[None, :]
    else:
      pos = ids_a[:, None] == ids_b[None, :]
    dots = a @ b.T
    logits = scale * dots + bias
    losses = ref.elementwise(pos, logits, from_logits=True)
    g = ref.grad_logits(pos, logits)
    kw = {"row_ids": jnp.asarray(ids_a), "col_ids": jnp.asarray(ids_b)} if rule == "ids" else {}
    sweep = jax.jit(
      lambda a, b, s, c, value: xla.sweep(
        a, b, c, rule=rule, block=4, scale=s, row_offset=offset, grads=True, value=value, **kw
      ),
      static_argnums=4,
    )
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    out = sweep(f32(a), f32(b), f32(scale), f32(bias), True)
    self.assertLess(_rel(out["loss"], losses.sum(1)), VALUE_RTOL)
    want = {
      "da": scale * g @ b,
      "db": scale * g.T @ a,
      "dbias": g.sum(),
      "dscale": np.sum(g * dots),
    }
    for name, expected in want.items():
      self.assertLess(_rel(out[name], expected), GRAD_TOL, name)
    skip = sweep(f32(a), f32(b), f32(scale), f32(bias), False)
    np.testing.assert_array_equal(skip["loss"], 0.0)
    for name in want:
      np.testing.assert_array_equal(skip[name], out[name])


class MemoryTest(absltest.TestCase):
  def test_temporaries_fit_one_w_sized_buffer_and_64_mib(self):
    rows, labels, dim = 1024, 670_091, 128
    s = jax.ShapeDtypeStruct
    args = (
      s((rows, dim), jnp.float32),
      s((labels, dim), jnp.float32),
      s((labels,), jnp.float32),
      s((rows, 8), jnp.int32),
      None,
    )
    compiled = _vag(None).lower(*args).compile()  # compiled, never run
    temp = compiled.memory_analysis().temp_size_in_bytes
    self.assertLessEqual(temp, labels * dim * 4 + (64 << 20), temp)  # dense logits: 2.7 GB


class DefaultBlockTest(absltest.TestCase):
  """The default tile width of the XLA tiles is chosen per platform when the
  program is lowered (on CUDA, ``implementation="xla"``: the default there
  is the kernels, tests/test_tiles_pallas_linear.py)."""

  def _text(self, platform):
    rows, labels, dim = 1024, 100_000, 8
    args = (
      jnp.zeros((rows, dim)),
      jnp.zeros((labels, dim)),
      jnp.zeros(labels),
      jnp.zeros((rows, 2), jnp.int32),
      None,
    )
    run = _vag(None, implementation="xla")
    return run.trace(*args).lower(lowering_platforms=(platform,)).as_text()

  def test_cpu_and_cuda_tiles(self):
    self.assertEqual(xla.default_block("cpu", 1024), 2048)
    self.assertEqual(xla.default_block("cuda", 1024), 32768)
    for platform, block in (("cpu", 2048), ("cuda", 32768)):
      with self.subTest(platform=platform):
        text = self._text(platform)
        self.assertIn(f"tensor<1024x{block}xf32>", text)
        other = 32768 if block == 2048 else 2048
        self.assertNotIn(f"tensor<1024x{other}xf32>", text)

  def test_top_k_tiles(self):
    h, w = jnp.zeros((1024, 8)), jnp.zeros((100_000, 8))
    fn = jax.jit(lambda h, w: bce_jax.top_k_labels(h, w, 5))
    for platform, block in (("cpu", 2048), ("cuda", 32768)):
      with self.subTest(platform=platform):
        text = fn.trace(h, w).lower(lowering_platforms=(platform,)).as_text()
        self.assertIn(f"tensor<1024x{block}xf32>", text)

  def test_block_clamped(self):
    self.assertEqual(xla.default_block("cpu", 1 << 30), 128)
    self.assertEqual(xla.default_block("cuda", 1), 1 << 17)
    self.assertEqual(xla.default_block("tpu", 1024), 8192)


class ErrorTest(parameterized.TestCase):
  H, W, P = np.zeros((4, 3), np.float32), np.zeros((10, 3), np.float32), np.zeros((4, 2), np.int32)

  @parameterized.named_parameters(
    ("h_rank", {"h": np.zeros(3, np.float32)}, ValueError, r"`h` must have shape \[batch, dim\]"),
    ("h_int", {"h": np.zeros((4, 3), np.int32)}, TypeError, "`h` must be a float"),
    ("w_rank", {"w": np.zeros(3, np.float32)}, ValueError, r"`w` must have shape \[labels, dim\]"),
    ("dims", {"w": np.zeros((10, 2), np.float32)}, ValueError, "`h` and `w`.*last dimension"),
    ("bias_shape", {"bias": np.zeros(9, np.float32)}, ValueError, r"`bias`.*\(10,\)"),
    ("bias_int", {"bias": np.zeros(10, np.int32)}, TypeError, "`bias` must be a float"),
    ("pos_rank", {"positives": np.zeros(4, np.int32)}, ValueError, r"`positives`.*\[batch, K\]"),
    ("pos_rows", {"positives": np.zeros((3, 2), np.int32)}, ValueError, r"`positives`.*\(4, K\)"),
    ("pos_float", {"positives": np.zeros((4, 2))}, TypeError, "`positives` must be an integer"),
    ("mask_dtype", {"mask": np.ones(4)}, TypeError, "`mask` must be a bool"),
    ("mask_shape", {"mask": np.ones(3, bool)}, ValueError, r"`mask`.*\(4,\)"),
    ("reduction", {"label_reduction": "avg"}, ValueError, "`label_reduction`.*'avg'"),
    ("block_zero", {"block_size": 0}, ValueError, "`block_size` must be >= 1"),
    ("block_float", {"block_size": 2.0}, TypeError, "`block_size`"),
    ("precision", {"precision": "fast"}, ValueError, "`precision`"),
    ("axis_unbound", {"axis_name": "labels"}, ValueError, "`axis_name` 'labels' is not bound"),
    ("axis_type", {"axis_name": 3}, TypeError, "`axis_name`"),
  )
  def test_bad_argument(self, change, error, message):
    kwargs = {"h": self.H, "w": self.W, "positives": self.P}
    kwargs.update(change)
    h, w, p = kwargs.pop("h"), kwargs.pop("w"), kwargs.pop("positives")
    with self.assertRaisesRegex(error, message):
      bce_jax.linear_binary_crossentropy(h, w, p, **kwargs)
    with self.assertRaisesRegex(error, message):  # while tracing, too
      jax.jit(lambda h, w: bce_jax.linear_binary_crossentropy(h, w, p, **kwargs))(h, w)

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "`label_reduction`"):
      bce_jax.LinearBinaryCrossentropy(label_reduction="none")
    with self.assertRaisesRegex(ValueError, "`block_size`"):
      bce_jax.LinearBinaryCrossentropy(block_size=-1)
    with self.assertRaisesRegex(ValueError, "`precision`"):
      bce_jax.LinearBinaryCrossentropy(precision="best")


if __name__ == "__main__":
  absltest.main()
