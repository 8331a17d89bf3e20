"""The Pallas-Triton tile sweep in interpret mode on CPU, against float64.

* row loss sums and the four derivatives (``da``, ``db``, ``dscale``,
  ``dbias``) against :func:`tests._reference.bilinear_sweep`, for every
  positives rule, float32 and bfloat16, sizes that are not multiples of the
  blocks, excluded rows and columns holding nan, scalar and per-column bias;
* the value-only call gives the same loss; jitted and eager agree;
* a hypothesis property: with the symmetric rules, swapping ``a`` and ``b``
  swaps ``da`` and ``db`` and keeps the rest;
* ``da_dtype``/``db_dtype`` with ``da_scale``/``db_scale``: the kernels
  write the scaled derivatives in bfloat16 (the float32 sums cast once, the
  partial sums of column chunks and of the XLA tail added in float32), as
  accurate against float64 as the float32 outputs rounded once;
* the program cross-lowered for CUDA holds one Triton kernel call per
  sweep (two with the derivatives), and with bfloat16 derivatives no
  float32 ``[B, D]`` buffer: half the bytes a caller keeps;
* bad configurations and inputs raise.

Shapes are small: each kernel shape compiles once, and interpret mode runs
the grid as a loop.
"""

from __future__ import annotations

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from bce_jax._tiles import pallas_triton, pallas_triton_config
from tests import _reference

SCALE, BIAS = 3.0, -2.0
HIGHEST = jax.lax.Precision.HIGHEST
# float32: row sums of up to 50 terms and gradients, against float64. bfloat16:
# the inputs are rounded before the reference sees them, so what is left is
# g rounded to bfloat16 for the two gradient dots (8 bits of mantissa).
TOL = {"float32": 2e-6, "bfloat16": 5e-3}
needs_triton = absltest.skipUnless(
  pallas_triton.available(), "this jax has no jax.experimental.pallas.triton"
)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _case(rows, cols, dim, rule, *, seed=0, masked=False, per_column=False):
  """Inputs of one sweep and the float64 reference's answer."""
  rng = np.random.default_rng(seed)
  a = (rng.normal(size=(rows, dim)) / np.sqrt(dim)).astype(np.float32)
  b = (rng.normal(size=(cols, dim)) / np.sqrt(dim)).astype(np.float32)
  b[: min(rows, cols)] += a[: min(rows, cols)]  # positive pairs that score high
  kw: dict = {}
  if rule == "diagonal":
    positive = np.arange(rows)[:, None] == np.arange(cols)[None, :]
  elif rule == "ids":
    row_ids, col_ids = rng.integers(0, 5, rows), rng.integers(0, 5, cols)
    kw = {"row_ids": jnp.asarray(row_ids, jnp.int32), "col_ids": jnp.asarray(col_ids, jnp.int32)}
    positive = row_ids[:, None] == col_ids[None, :]
  else:  # lists: 3 ids a row, with -1 padding and a repeated id
    lists = rng.integers(0, cols, (rows, 3))
    lists[::4, 2] = -1
    lists[1::4, 1] = lists[1::4, 0]
    kw = {"lists": jnp.asarray(lists, jnp.int32)}
    positive = (lists[:, :, None] == np.arange(cols)[None, None, :]).any(axis=1)
  bias = rng.normal(size=cols).astype(np.float32) - 2 if per_column else np.float32(BIAS)
  row_ok = col_ok = None
  if masked:
    row_ok, col_ok = rng.random(rows) > 0.25, rng.random(cols) > 0.25
    a[~row_ok], b[~col_ok] = np.nan, np.nan
    kw.update(row_mask=jnp.asarray(row_ok), col_mask=jnp.asarray(col_ok))
  return a, b, bias, kw, (positive, row_ok, col_ok)


@functools.cache
def _sweep(rule, block, grads=True, jit=True, precision=HIGHEST):
  def run(a, b, scale, bias, kw):
    config = pallas_triton_config.Config(block_rows=block, block_cols=block)
    return pallas_triton.sweep(
      a,
      b,
      scale,
      bias,
      rule=rule,
      grads=grads,
      precision=precision,
      config=config,
      interpret=True,
      **kw,
    )

  return jax.jit(run) if jit else run


@needs_triton
class AgainstReferenceTest(parameterized.TestCase):
  @parameterized.named_parameters(
    # name, rows, cols, dim, rule, dtype, masked, per-column bias, block
    ("diagonal_odd_f32", 37, 37, 24, "diagonal", "float32", False, False, 16),
    ("diagonal_masked_bf16", 37, 37, 24, "diagonal", "bfloat16", True, False, 16),
    ("ids_masked_f32", 45, 30, 20, "ids", "float32", True, False, 16),
    ("ids_bf16", 20, 33, 16, "ids", "bfloat16", False, False, 16),
    ("lists_column_bias_f32", 21, 50, 24, "lists", "float32", True, True, 16),
    ("lists_column_bias_bf16", 21, 50, 24, "lists", "bfloat16", False, True, 32),
  )
  def test_values_and_derivatives(self, rows, cols, dim, rule, dtype, masked, per_column, block):
    a, b, bias, kw, (positive, row_ok, col_ok) = _case(
      rows, cols, dim, rule, masked=masked, per_column=per_column
    )
    a_in, b_in = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    # bfloat16 at the default precision: g rounded to bfloat16 for the
    # gradient dots, the fast path on a GPU.
    precision = HIGHEST if dtype == "float32" else None
    got = _sweep(rule, block, precision=precision)(
      a_in, b_in, jnp.float32(SCALE), jnp.asarray(bias), kw
    )
    want = _reference.bilinear_sweep(
      np.asarray(a_in, np.float64),
      np.asarray(b_in, np.float64),
      SCALE,
      bias,
      positive,
      row_ok,
      col_ok,
    )
    if not per_column:
      want["dbias"] = want["dbias"].sum()
    for name, value in want.items():
      self.assertEqual(got[name].dtype, jnp.float32, name)
      self.assertEqual(got[name].shape, np.shape(value), name)
      self.assertTrue(np.all(np.isfinite(got[name])), name)
      self.assertLess(_rel(got[name], value), TOL[dtype], name)

  def test_bfloat16_at_highest_precision_keeps_g_in_float32(self):
    a, b, bias, kw, (positive, row_ok, col_ok) = _case(37, 37, 24, "diagonal", masked=True)
    a_in, b_in = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    got = _sweep("diagonal", 16)(a_in, b_in, jnp.float32(SCALE), jnp.asarray(bias), kw)
    want = _reference.bilinear_sweep(
      np.asarray(a_in, np.float64),
      np.asarray(b_in, np.float64),
      SCALE,
      bias,
      positive,
      row_ok,
      col_ok,
    )
    for name in ("da", "db"):
      self.assertLess(_rel(got[name], want[name]), TOL["float32"], name)

  def test_derivatives_alone(self):
    # The recompute schedule asks for the derivatives without the loss.
    a, b, bias, kw, _ = _case(37, 29, 16, "ids", masked=True)
    args = (jnp.asarray(a), jnp.asarray(b), jnp.float32(SCALE), jnp.asarray(bias))
    both = pallas_triton.parts(*args, rule="ids", interpret=True, **kw)
    alone = pallas_triton.parts(*args, rule="ids", value=False, interpret=True, **kw)
    self.assertEqual(set(both) - set(alone), {"loss"})
    for name in alone:
      np.testing.assert_allclose(alone[name], both[name], rtol=1e-6, err_msg=name)

  def test_ids_in_two_parts(self):
    # 64-bit ids as two int32 halves: positive only where both halves agree.
    rng = np.random.default_rng(1)
    a, b, bias, _, _ = _case(29, 29, 16, "diagonal")
    high, low = rng.integers(0, 2, (2, 29)), rng.integers(0, 3, (2, 29))
    kw = {
      "row_ids": jnp.asarray(np.stack([high[0], low[0]], 1), jnp.int32),
      "col_ids": jnp.asarray(np.stack([high[1], low[1]], 1), jnp.int32),
    }
    positive = (high[0][:, None] == high[1][None, :]) & (low[0][:, None] == low[1][None, :])
    got = _sweep("ids", 16)(
      jnp.asarray(a), jnp.asarray(b), jnp.float32(SCALE), jnp.asarray(bias), kw
    )
    want = _reference.bilinear_sweep(a, b, SCALE, bias, positive)
    want["dbias"] = want["dbias"].sum()
    for name, value in want.items():
      self.assertLess(_rel(got[name], value), TOL["float32"], name)

  def test_value_only_equals_value_with_derivatives(self):
    a, b, bias, kw, _ = _case(37, 29, 16, "ids", masked=True)
    args = (jnp.asarray(a), jnp.asarray(b), jnp.float32(SCALE), jnp.asarray(bias), kw)
    alone = _sweep("ids", 16, grads=False)(*args)
    self.assertEqual(set(alone), {"loss"})
    np.testing.assert_allclose(alone["loss"], _sweep("ids", 16)(*args)["loss"], rtol=1e-6)

  def test_eager_equals_jitted(self):
    a, b, bias, kw, _ = _case(37, 37, 24, "diagonal")
    args = (jnp.asarray(a), jnp.asarray(b), jnp.float32(SCALE), jnp.asarray(bias), kw)
    eager, jitted = _sweep("diagonal", 16, jit=False)(*args), _sweep("diagonal", 16)(*args)
    for name in jitted:
      np.testing.assert_allclose(eager[name], jitted[name], rtol=1e-6, atol=1e-7, err_msg=name)


@needs_triton
class SixteenBitDerivativesTest(parameterized.TestCase):
  """``da_dtype`` and ``db_dtype``: ``c g b`` and ``c g^T a`` written in bfloat16."""

  @parameterized.named_parameters(
    # name, rows, cols, dim, rule, column chunks, unpadded columns (an XLA tail)
    ("written_once", 37, 37, 24, "diagonal", 1, False),
    ("column_chunks", 21, 50, 24, "ids", 3, False),
    ("xla_tail", 21, 50, 16, "lists", 1, True),
  )
  def test_equal_float32_sums_cast_once(self, rows, cols, dim, rule, chunks, unpadded):
    a, b, bias, kw, (positive, _, _) = _case(rows, cols, dim, rule)
    a_in, b_in = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    config = pallas_triton_config.Config(block_rows=16, block_cols=16, col_chunks=chunks)
    args = (a_in, b_in, jnp.float32(SCALE), jnp.asarray(bias))
    common = dict(rule=rule, config=config, unpadded_columns=unpadded, interpret=True, **kw)
    run = jax.jit(lambda *a: pallas_triton.parts(*a, **common))
    wide = run(*args)
    c = jnp.float32(SCALE)
    narrow = jax.jit(
      lambda *a: pallas_triton.parts(
        *a, da_scale=c, db_scale=c, da_dtype=jnp.bfloat16, db_dtype=jnp.bfloat16, **common
      )
    )(*args)
    want = _reference.bilinear_sweep(
      np.asarray(a_in, np.float64), np.asarray(b_in, np.float64), SCALE, bias, positive
    )
    for name, ref_name in (("g_b", "da"), ("gt_a", "db")):
      self.assertEqual(narrow[name].dtype, jnp.bfloat16, name)
      # The same float32 sums, scaled and rounded once.
      np.testing.assert_array_equal(narrow[name], (c * wide[name]).astype(jnp.bfloat16), name)
      self.assertLess(_rel(narrow[name], want[ref_name]), TOL["bfloat16"], name)
    for name in ("loss", "g_rows", "g_cols", "gdot_rows"):
      np.testing.assert_array_equal(narrow[name], wide[name], name)

  def test_no_float32_rows_by_dim_buffer_for_cuda(self):
    # Rows x D = 4096 x 512 in one chunk (a big batch), lowered for CUDA: the
    # derivatives a caller keeps are bfloat16, half the float32 bytes.
    rows, dim = 4096, 512
    x = jax.ShapeDtypeStruct((rows, dim), jnp.bfloat16)
    config = pallas_triton_config.Config(block_rows=64, block_cols=64, col_chunks=1)

    def run(a, b, **kw):
      out = pallas_triton.parts(a, b, jnp.float32(SCALE), jnp.float32(BIAS), config=config, **kw)
      return out["g_b"], out["gt_a"]

    c = jnp.float32(SCALE)
    narrow = functools.partial(
      run, da_scale=c, db_scale=c, da_dtype=jnp.bfloat16, db_dtype=jnp.bfloat16
    )
    texts = {}
    for name, fn in (("float32", run), ("bfloat16", narrow)):
      try:
        texts[name] = jax.jit(fn).trace(x, x).lower(lowering_platforms=("cuda",)).as_text()
      except Exception as error:  # noqa: BLE001 - a CPU-only jaxlib may not lower for CUDA
        self.skipTest(f"this jaxlib cannot lower Pallas-Triton for CUDA: {error!r:.200}")
    kept = lambda text, dtype: text.count(f"{rows}x{dim}x{dtype}>")
    self.assertGreater(kept(texts["float32"], "f32"), 0)  # the test can tell
    self.assertEqual(kept(texts["bfloat16"], "f32"), 0)
    self.assertGreater(kept(texts["bfloat16"], "bf16"), 0)


@needs_triton
class SymmetryTest(parameterized.TestCase):
  @hypothesis.settings(max_examples=4)
  @hypothesis.given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 20.0))
  def test_swapping_rows_and_columns(self, seed, scale):
    # Fixed shapes: one compilation for all examples.
    a, b, _, _, _ = _case(24, 24, 16, "diagonal", seed=seed)
    run = _sweep("diagonal", 16)
    s, bias = jnp.float32(scale), jnp.float32(BIAS)
    ab, ba = (
      run(jnp.asarray(a), jnp.asarray(b), s, bias, {}),
      run(jnp.asarray(b), jnp.asarray(a), s, bias, {}),
    )
    # float32 sums: an element's error scales with the largest entry (up to
    # ~30 here), not with the element itself.
    atol = 1e-6 * float(np.max(np.abs(ab["da"])))
    np.testing.assert_allclose(ab["da"], ba["db"], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(ab["db"], ba["da"], rtol=1e-5, atol=atol)
    for name in ("dscale", "dbias"):
      np.testing.assert_allclose(ab[name], ba[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.sum(ab["loss"]), np.sum(ba["loss"]), rtol=1e-5)


@needs_triton
class CudaLoweringTest(parameterized.TestCase):
  """The kernels lower to Triton calls in a program built for CUDA (on CPU:
  Triton's own compilation to PTX happens only on a GPU)."""

  @parameterized.parameters(("diagonal", True), ("ids", True), ("lists", False))
  def test_one_triton_call_per_kernel(self, rule, grads):
    a, b, bias, kw, _ = _case(40, 24, 32, rule, masked=True, per_column=True)

    def run(a, b, bias):
      return pallas_triton.sweep(a, b, jnp.float32(SCALE), bias, rule=rule, grads=grads, **kw)

    args = (jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16), jnp.asarray(bias))
    try:
      lowered = jax.jit(run).trace(*args).lower(lowering_platforms=("cuda",))
    except Exception as error:  # noqa: BLE001 - a CPU-only jaxlib may not lower for CUDA
      self.skipTest(f"this jaxlib cannot lower Pallas-Triton for CUDA: {error!r:.200}")
    self.assertEqual(lowered.as_text().count("xla.gpu.triton"), 2 if grads else 1)


@needs_triton
class ShardMapTest(parameterized.TestCase):
  """Inside ``jax.shard_map`` (a one-device mesh: the kernel is per device)."""

  def setUp(self):
    super().setUp()
    self.mesh = jax.make_mesh((1,), ("d",))
    self.a, self.b, self.bias, _, _ = _case(24, 24, 16, "diagonal")

  def _mapped(self, check_vma, **options):
    def local(a, b, s):
      out = pallas_triton.sweep(a, b, s, jnp.float32(BIAS), **options)
      # a's rows are sharded: every device adds to the derivatives of b and s.
      return out["loss"], out["da"], *jax.lax.psum((out["db"], out["dscale"]), "d")

    specs = (P("d"), P(), P())
    return jax.shard_map(
      local,
      mesh=self.mesh,
      in_specs=specs,
      out_specs=(P("d"), P("d"), P(), P()),
      check_vma=check_vma,
    )

  def test_interpreted_equals_unmapped(self):
    # Pallas's interpreter itself rejects check_vma (a dynamic_slice over
    # the grid), so this runs without it; the CUDA lowering below keeps it.
    config = pallas_triton_config.Config(16, 16)
    mapped = self._mapped(False, interpret=True, config=config)
    put = lambda x, spec: jax.device_put(jnp.asarray(x), jax.NamedSharding(self.mesh, spec))
    got = jax.jit(mapped)(put(self.a, P("d")), put(self.b, P()), put(np.float32(SCALE), P()))
    want = pallas_triton.sweep(
      jnp.asarray(self.a),
      jnp.asarray(self.b),
      jnp.float32(SCALE),
      jnp.float32(BIAS),
      interpret=True,
      config=config,
    )
    for g, name in zip(got, ("loss", "da", "db", "dscale")):
      np.testing.assert_allclose(g, want[name], rtol=1e-6, atol=1e-7, err_msg=name)

  def test_lowers_for_cuda_with_check_vma(self):
    def typed(spec):
      return jax.ShapeDtypeStruct(
        (24, 16), jnp.bfloat16, sharding=jax.NamedSharding(self.mesh, spec)
      )

    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=jax.NamedSharding(self.mesh, P()))
    traced = jax.jit(self._mapped(True)).trace(typed(P("d")), typed(P()), scale)
    try:
      lowered = traced.lower(lowering_platforms=("cuda",))
    except Exception as error:  # noqa: BLE001 - a CPU-only jaxlib may not lower for CUDA
      self.skipTest(f"this jaxlib cannot lower Pallas-Triton for CUDA: {error!r:.200}")
    self.assertIn("xla.gpu.triton", lowered.as_text())


class ConfigTest(parameterized.TestCase):
  @parameterized.parameters(
    {"block_rows": 48}, {"block_cols": 8}, {"num_warps": 3}, {"num_stages": 0}
  )
  def test_bad_config(self, **kw):
    with self.assertRaisesRegex(ValueError, f"`{next(iter(kw))}`"):
      pallas_triton_config.Config(**kw)

  @parameterized.parameters((1, 16), (16, 16), (17, 32), (512, 512), (513, 1024))
  def test_padded_dim(self, dim, padded):
    self.assertEqual(pallas_triton_config.padded_dim(dim), padded)

  @parameterized.parameters((1, 1, 1), (37, 100_000, 512), (65_536, 65_536, 512))
  def test_choose_gives_valid_blocks(self, rows, cols, dim):
    config = pallas_triton_config.choose(rows, cols, dim)
    self.assertLessEqual(config.block_rows, max(16, rows * 2))
    self.assertEqual(config.num_warps, 8 if dim >= 256 else 4)


@needs_triton
class ErrorsTest(parameterized.TestCase):
  def test_float64_is_refused(self):
    a = np.zeros((4, 4))
    with self.assertRaisesRegex(NotImplementedError, "float64"):
      pallas_triton.sweep(a, a, 1.0, 0.0, interpret=True)

  def test_unknown_rule(self):
    a = jnp.zeros((4, 4))
    with self.assertRaisesRegex(ValueError, "positives rule 'eye'"):
      pallas_triton.sweep(a, a, 1.0, 0.0, rule="eye", interpret=True)

  @parameterized.parameters(("ids", "row_ids"), ("lists", "lists"))
  def test_missing_ids(self, rule, name):
    a = jnp.zeros((4, 4))
    with self.assertRaisesRegex(ValueError, name):
      pallas_triton.sweep(a, a, 1.0, 0.0, rule=rule, interpret=True)


if __name__ == "__main__":
  absltest.main()
