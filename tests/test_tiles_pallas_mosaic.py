"""The Mosaic-GPU tile sweep in Mosaic-GPU interpret mode on CPU, and lowered for CUDA.

* the kernels' softplus and sigmoid (no ``log1p``, no ``custom_jvp``)
  against float64 over logits from -100 to 100;
* :func:`pallas_mosaic.sweep` in interpret mode against
  :func:`tests._reference.bilinear_sweep`: row loss sums and the four
  derivatives, for sizes that are no multiple of the 64-row blocks, both
  positives rules (ids in one and in two parts), excluded rows and columns
  holding nan, scalar and per-column bias, bfloat16 and float16, ``D`` in
  one and in two chunks; the value-only call gives the same loss;
* with a factor and 16-bit outputs, ``g b`` and ``g^T a`` bit-equal to the
  same kernels' float32 sums times the factor, rounded once (one and two
  warpgroups), and the float32 ``gdot`` row sums against float64;
* ``pairwise_sigmoid_loss(implementation="mosaic")`` in interpret mode: the
  value and the gradients in x, y, scale and bias against float64, with
  ``positives`` and a row mask over nan rows, under ``jax.jit``;
* the two-warpgroup kernels (``warpgroups=2``) the same way, in a child
  process with 4 host devices (the interpreter's three threads starve on
  the 2 XLA host threads of a 2-core machine): both rules, masks over nan,
  bfloat16 and float16, odd ``D``, value only, and the loss at ``D = 320``,
  where they are the default;
* inside ``shard_map`` (one device, ``check_vma=False``) the kernels give
  the XLA path's value and gradients;
* lowered for CUDA on this CPU: one Mosaic-GPU call a kernel, no
  ``[B, C]``-sized buffer, at B = 130 and at D = 512 (two warpgroups by
  default, one in two chunks), and at B = 65,536, D = 512; the default
  (None) still lowers to the Triton kernels; bfloat16 ``value_and_grad``
  at B = 8192, D = 512 has no float32 ``[B, D]`` tensor;
* what the kernels refuse (float32, precision above DEFAULT, ``"lists"``,
  the linear BCE, no GPU), with clear errors.

Interpret mode runs every grid step as host callbacks: the shapes are tiny.
"""

from __future__ import annotations

import functools
import json
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import PartitionSpec as P

import bce_jax
from bce_jax._tiles import backend, pallas_mosaic, pallas_mosaic_kernel
from tests import _host_devices, _mosaic_gpu, _reference

SCALE, BIAS = 3.0, -2.0
# 16-bit inputs are rounded before the reference sees them; what is left is
# g rounded to 16 bits for the gradients' MMA (bfloat16: 8 bits of mantissa).
TOL = {"bfloat16": 5e-3, "float16": 1e-3}
needs_interpret = absltest.skipUnless(_mosaic_gpu.available(), _mosaic_gpu.WHY)
needs_mosaic = absltest.skipUnless(
  pallas_mosaic.available(),
  "the Mosaic kernels need jax >= 0.10's jax.experimental.pallas.mosaic_gpu",
)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _case(rows, cols, dim, rule, dtype, *, masked=False, per_column=False, parts=1, seed=0):
  """16-bit inputs of one sweep, their options and the float64 reference's answer."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(rows, dim)) / np.sqrt(dim)
  b = rng.normal(size=(cols, dim)) / np.sqrt(dim)
  b[: min(rows, cols)] += a[: min(rows, cols)]  # positive pairs that score high
  kw: dict = {}
  if rule == "diagonal":
    positive = np.arange(rows)[:, None] == np.arange(cols)[None, :]
  else:
    row_ids, col_ids = rng.integers(0, 3, (rows, parts)), rng.integers(0, 3, (cols, parts))
    positive = (row_ids[:, None, :] == col_ids[None, :, :]).all(axis=2)
    if parts == 1:
      row_ids, col_ids = row_ids[:, 0], col_ids[:, 0]
    kw.update(row_ids=jnp.asarray(row_ids, jnp.int32), col_ids=jnp.asarray(col_ids, jnp.int32))
  bias = rng.normal(size=cols).astype(np.float32) - 2 if per_column else np.float32(BIAS)
  a_in, b_in = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
  row_ok = col_ok = None
  if masked:
    row_ok, col_ok = rng.random(rows) > 0.25, rng.random(cols) > 0.25
    a_in = jnp.where(row_ok[:, None], a_in, jnp.nan)
    b_in = jnp.where(col_ok[:, None], b_in, jnp.nan)
    kw.update(row_mask=jnp.asarray(row_ok), col_mask=jnp.asarray(col_ok))
  want = _reference.bilinear_sweep(
    np.asarray(jnp.nan_to_num(a_in), np.float64),
    np.asarray(jnp.nan_to_num(b_in), np.float64),
    SCALE,
    bias,
    positive,
    row_ok,
    col_ok,
  )
  if not per_column:
    want["dbias"] = want["dbias"].sum()
  return (a_in, b_in, jnp.float32(SCALE), jnp.asarray(bias)), kw, want


FACTOR = 3.0 / 67  # s / count: not a power of two, so the rounding is seen


def _scaled_against_float32(args, kw, want, rule, **options):
  """:func:`pallas_mosaic.parts` with ``factor=FACTOR`` and 16-bit outputs
  against the same kernels' float32 sums (factor 1), multiplied by FACTOR
  in float32 and rounded once: whether ``g b`` and ``g^T a`` agree bit for
  bit, and the relative error of the float32 ``gdot_rows`` against float64
  (``<a_i, da_i> / s``); and the float32 parts."""
  a, b, scale, bias = args

  @jax.jit
  def run(a, b, scale, bias, kw):
    common = dict(rule=rule, interpret=_mosaic_gpu.PARAMS, **options, **kw)
    wide = pallas_mosaic.parts(a, b, scale, bias, out_dtype=jnp.float32, **common)
    narrow = pallas_mosaic.parts(a, b, scale, bias, out_dtype=a.dtype, factor=FACTOR, **common)
    return wide, narrow

  wide, narrow = run(a, b, scale, bias, kw)
  out = {}
  for name in ("g_b", "gt_a"):
    rounded = (wide[name] * jnp.float32(FACTOR)).astype(a.dtype)
    out[name + "_dtype"] = narrow[name].dtype == a.dtype
    out[name + "_bit_equal"] = bool(
      np.array_equal(rounded.view(jnp.uint16), narrow[name].view(jnp.uint16))
    )
    out[name + "_rounded"] = bool(np.any(rounded != wide[name]))  # the test can tell
  out["sums_equal"] = all(
    bool(np.array_equal(wide[n], narrow[n])) for n in ("loss", "g_rows", "gdot_rows", "g_cols")
  )
  a64 = np.asarray(jnp.nan_to_num(a), np.float64)
  out["gdot_rows"] = _rel(narrow["gdot_rows"], np.sum(a64 * want["da"], axis=1) / SCALE)
  return out, wide


@functools.cache
def _sweep(rule, grads=True, chunk=None, block_other=64):
  def run(a, b, scale, bias, kw):
    return pallas_mosaic.sweep(
      a,
      b,
      scale,
      bias,
      rule=rule,
      grads=grads,
      chunk=chunk,
      block_other=block_other,
      interpret=_mosaic_gpu.PARAMS,
      **kw,
    )

  return jax.jit(run)


class ElementwiseTest(parameterized.TestCase):
  def test_against_float64(self):
    # Beyond |z| = 80 the smaller results fall below float32's normal range.
    z = np.concatenate([np.linspace(-80, 80, 16001), np.geomspace(1e-30, 1, 301)])
    z = np.concatenate([z, -z]).astype(np.float32)
    zd = z.astype(np.float64)
    for positive in (False, True):
      loss, g = pallas_mosaic_kernel.elementwise(jnp.asarray(z), jnp.full(z.shape, positive))
      w = -zd if positive else zd
      want_loss = np.logaddexp(0.0, w)
      want_g = -_reference.sigmoid(-zd) if positive else _reference.sigmoid(zd)
      loss_err = np.abs(np.asarray(loss, np.float64) - want_loss) / want_loss
      g_err = np.abs(np.asarray(g, np.float64) - want_g) / np.maximum(np.abs(want_g), 1e-300)
      self.assertLess(float(np.max(loss_err)), 1e-6, f"loss, positive={positive}")
      # relative to g itself, also where it is far below 1 (t / (1 + t))
      self.assertLess(float(np.max(g_err)), 1e-6, f"g, positive={positive}")


@needs_interpret
class AgainstReferenceTest(parameterized.TestCase):
  @parameterized.named_parameters(
    # name, rows, cols, dim, rule, dtype, masked, per-column bias, id parts, chunk, other block
    ("diagonal_odd_bf16", 67, 67, 64, "diagonal", "bfloat16", False, False, 1, None, 64),
    ("diagonal_masked_f16", 67, 67, 64, "diagonal", "float16", True, False, 1, None, 64),
    ("ids_masked_bf16_two_chunks", 45, 70, 128, "ids", "bfloat16", True, True, 1, 64, 64),
    ("ids_two_parts_f16_other_32", 70, 40, 40, "ids", "float16", False, True, 2, None, 32),
  )
  def test_values_and_derivatives(
    self, rows, cols, dim, rule, dtype, masked, per_column, parts, chunk, block_other
  ):
    args, kw, want = _case(
      rows, cols, dim, rule, dtype, masked=masked, per_column=per_column, parts=parts
    )
    got = _sweep(rule, chunk=chunk, block_other=block_other)(*args, kw)
    for name, value in want.items():
      self.assertEqual(got[name].dtype, jnp.float32, name)
      self.assertEqual(got[name].shape, np.shape(value), name)
      self.assertTrue(np.all(np.isfinite(got[name])), name)
      self.assertLess(_rel(got[name], value), TOL[dtype], name)

  def test_scaled_outputs_round_once(self):
    # The kernels multiply their float32 g b and g^T a by the factor, then
    # cast once: bit-equal to their own float32 sums scaled and rounded
    # (same products in the same order). The row sums do not move, and
    # gdot comes from float32 g and dot products. Masked nan rows, two
    # chunks of D.
    args, kw, want = _case(40, 40, 128, "ids", "bfloat16", masked=True, per_column=True)
    out, _ = _scaled_against_float32(args, kw, want, "ids", chunk=64, warpgroups=1)
    for name, ok in out.items():
      if name == "gdot_rows":
        self.assertLess(ok, 1e-5, name)
      else:
        self.assertTrue(ok, name)

  def test_value_only_equals_value_with_derivatives(self):
    args, kw, want = _case(67, 67, 64, "diagonal", "bfloat16", masked=True)
    alone = _sweep("diagonal", grads=False)(*args, kw)
    self.assertEqual(set(alone), {"loss"})
    np.testing.assert_allclose(alone["loss"], _sweep("diagonal")(*args, kw)["loss"], rtol=1e-6)
    self.assertLess(_rel(alone["loss"], want["loss"]), 1e-5)


@needs_interpret
class LossTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("positives_masked_bf16", True, True, "bfloat16"),
    ("diagonal_f16", False, False, "float16"),
  )
  def test_value_and_grad(self, ids, masked, dtype):
    rng = np.random.default_rng(3)
    batch, dim = 67, 64
    x = rng.normal(size=(batch, dim)) / 8
    y = x + rng.normal(size=(batch, dim)) / 8
    positives = rng.integers(0, 20, batch).astype(np.int32) if ids else None
    mask = rng.random(batch) > 0.25 if masked else None
    x_in, y_in = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    if masked:
      x_in = jnp.where(mask[:, None], x_in, jnp.nan)
      y_in = jnp.where(mask[:, None], y_in, jnp.nan)

    def loss(x, y, scale, bias):
      return bce_jax.pairwise_sigmoid_loss(
        x, y, scale=scale, bias=bias, positives=positives, mask=mask, implementation="mosaic"
      )

    with _mosaic_gpu.interpreted():
      value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
        x_in, y_in, jnp.float32(SCALE), jnp.float32(BIAS)
      )
    labels = np.arange(batch) if positives is None else positives
    out = _reference.bilinear_sweep(
      np.asarray(jnp.nan_to_num(x_in), np.float64),
      np.asarray(jnp.nan_to_num(y_in), np.float64),
      SCALE,
      BIAS,
      labels[:, None] == labels[None, :],
      mask,
      mask,
    )
    count = batch if mask is None else int(mask.sum())
    self.assertLess(abs(float(value) - out["loss"].sum() / count), 1e-5 * abs(float(value)))
    wants = (out["da"], out["db"], out["dscale"], out["dbias"].sum())
    for name, got, want in zip(("dx", "dy", "dscale", "dbias"), grads, wants):
      self.assertTrue(np.all(np.isfinite(np.asarray(got, np.float32))), name)
      self.assertLess(_rel(got, np.asarray(want) / count), 2 * TOL[dtype], name)


@needs_interpret
class ShardMapTest(absltest.TestCase):
  def test_inside_shard_map_equals_xla(self):
    # One device: GPU interpret mode hangs with two host devices (jax 0.10.2);
    # the ring's later steps are the "ids" rule, tested above.
    mesh = jax.make_mesh((1,), ("data",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(67, 64)) / 8, jnp.bfloat16)
    y = jnp.asarray(x + rng.normal(size=(67, 64)) / 8, jnp.bfloat16)
    mask = rng.random(67) > 0.2
    x = jnp.where(mask[:, None], x, jnp.nan)

    def loss(x, y, s, b, mask, implementation, axis_name):
      return bce_jax.pairwise_sigmoid_loss(
        x, y, scale=s, bias=b, mask=mask, implementation=implementation, axis_name=axis_name
      )

    rows = P("data")
    mapped = jax.shard_map(
      lambda *a: loss(*a, "mosaic", "data"),
      mesh=mesh,
      out_specs=P(),
      check_vma=False,  # Pallas's interpreter rejects check_vma
      in_specs=(rows, rows, P(), P(), rows),
    )
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
    args = (jnp.float32(SCALE), jnp.float32(BIAS))
    put = lambda a, spec=rows: jax.device_put(jnp.asarray(a), jax.NamedSharding(mesh, spec))
    scalars = [put(a, P()) for a in args]
    with _mosaic_gpu.interpreted():
      got = grad(mapped)(put(x), put(y), *scalars, put(mask))
    want = grad(lambda *a: loss(*a, "xla", None))(x, y, *args, mask)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      self.assertTrue(np.all(np.isfinite(np.asarray(g, np.float32))))
      self.assertLess(_rel(np.asarray(g, np.float32), np.asarray(w, np.float32)), 1e-2)


# The two-warpgroup kernels in interpret mode, in a child process with 4 host
# devices: with the 2 XLA host threads of a 2-core machine, the interpreter's
# three threads (two consumers and the TMA producer) starve and hang (jax
# 0.10.2), so the child also runs under a timeout. It prints, per case, the
# relative error of each output against float64.
_TWO_WARPGROUPS = """
import json
import jax, jax.numpy as jnp, numpy as np
import bce_jax
from bce_jax._tiles import pallas_mosaic
from tests import _host_devices, _mosaic_gpu, _reference
from tests.test_tiles_pallas_mosaic import _case, _rel, _scaled_against_float32, SCALE, BIAS

out = {}
cases = {  # rows, cols, dim, rule, dtype, masked, per-column bias, id parts
  "ids_masked_bf16_d128": (45, 70, 128, "ids", "bfloat16", True, True, 1),
  "ids_two_parts_f16_odd_d": (70, 40, 40, "ids", "float16", False, True, 2),
}
for name, (rows, cols, dim, rule, dtype, masked, per_column, parts) in cases.items():
  args, kw, want = _case(rows, cols, dim, rule, dtype, masked=masked, per_column=per_column, parts=parts)
  run = jax.jit(lambda a, b, s, c, kw, grads=True: pallas_mosaic.sweep(
    a, b, s, c, rule=rule, grads=grads, warpgroups=2, interpret=_mosaic_gpu.PARAMS, **kw),
    static_argnames="grads")
  if masked:  # the raw parts (float32, and scaled to 16 bits: one rounding), one call
    scaled, raw = _scaled_against_float32(args, kw, want, rule, warpgroups=2)
    got = {"loss": raw["loss"], "da": SCALE * raw["g_b"], "db": SCALE * raw["gt_a"],
           "dscale": jnp.sum(raw["gdot_rows"]), "dbias": raw["g_cols"]}
  else:
    got = run(*args, kw)
  out[name] = {n: _rel(got[n], v) for n, v in want.items()}
  out[name].update({n + "_finite": bool(np.all(np.isfinite(got[n]))) for n in want})
  if masked:
    out[name]["value_only"] = _rel(run(*args, kw, grads=False)["loss"], want["loss"])
    out[name].update({"scaled_" + n: v for n, v in scaled.items()})

# the loss at D = 320 (two warpgroups by default): the diagonal rule, nan-masked rows
rng = np.random.default_rng(3)
x = rng.normal(size=(45, 320)) / 16
y = x + rng.normal(size=(45, 320)) / 16
mask = rng.random(45) > 0.25
x_in = jnp.where(mask[:, None], jnp.asarray(x, jnp.bfloat16), jnp.nan)
y_in = jnp.where(mask[:, None], jnp.asarray(y, jnp.bfloat16), jnp.nan)
loss = lambda x, y, s, b: bce_jax.pairwise_sigmoid_loss(
  x, y, scale=s, bias=b, mask=mask, implementation="mosaic")
calls = []
two = pallas_mosaic._kernel2.call
pallas_mosaic._kernel2.call = lambda *a: calls.append(1) or two(*a)
with _mosaic_gpu.interpreted():
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
    x_in, y_in, jnp.float32(SCALE), jnp.float32(BIAS))
ref = _reference.bilinear_sweep(
  np.asarray(jnp.nan_to_num(x_in), np.float64), np.asarray(jnp.nan_to_num(y_in), np.float64),
  SCALE, BIAS, np.eye(45, dtype=bool), mask, mask)
count = int(mask.sum())
wants = (ref["loss"].sum(), ref["da"], ref["db"], ref["dscale"], ref["dbias"].sum())
out["loss_d320"] = {n: _rel(g, np.asarray(w) / count)
                    for n, g, w in zip(("value", "dx", "dy", "dscale", "dbias"), (value, *grads), wants)}
out["loss_d320"]["two_warpgroup_kernels"] = len(calls)
print("RESULT" + json.dumps(out))
"""


@needs_interpret
class TwoWarpgroupsTest(absltest.TestCase):
  def test_against_float64_in_a_child_process(self):
    proc = _host_devices.run(_TWO_WARPGROUPS, devices=4, timeout=240)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = json.loads(proc.stdout.split("RESULT")[-1])
    self.assertEqual(set(out), {"ids_masked_bf16_d128", "ids_two_parts_f16_odd_d", "loss_d320"})
    for case, errors in out.items():
      tol = TOL["float16" if "_f16_" in case else "bfloat16"] * (2 if case == "loss_d320" else 1)
      for name, err in errors.items():
        if name == "two_warpgroup_kernels":  # the default at D = 320
          self.assertEqual(err, 2)
        elif name.endswith("_finite") or (
          name.startswith("scaled_") and name != "scaled_gdot_rows"
        ):
          self.assertTrue(err, f"{case}: {name}")
        elif name == "scaled_gdot_rows":
          self.assertLess(err, 1e-5, f"{case}: {name}")
        else:
          self.assertLess(
            err, 1e-5 if name in ("loss", "value", "value_only") else tol, f"{case}: {name}"
          )


def _lowered(f, *args) -> str:
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _kernel_calls(text: str) -> int:
  return len(re.findall(r"custom_call @mosaic_gpu", text))


@needs_mosaic
class CudaLoweringTest(parameterized.TestCase):
  def _sweep_text(self, rows, dim, grads, **kw):
    a = jax.ShapeDtypeStruct((rows, dim), jnp.bfloat16)
    return _lowered(lambda a, b: pallas_mosaic.sweep(a, b, SCALE, BIAS, grads=grads, **kw), a, a)

  @parameterized.named_parameters(("value", False, 1), ("value_and_grads", True, 2))
  def test_one_mosaic_call_a_kernel_and_no_tile(self, grads, calls):
    text = self._sweep_text(130, 64, grads)
    self.assertEqual(_kernel_calls(text), calls)
    # padded to 192 rows; no buffer holds B x C pairs
    self.assertNotRegex(text, r"tensor<(130|192)x(130|192)x")

  @parameterized.named_parameters(
    ("two_warpgroups_default", None, 64, 2),
    ("one_warpgroup_two_chunks", 1, 64, 0),
    ("one_warpgroup_other_32", 1, 32, 0),
  )
  def test_wide_rows(self, warpgroups, block_other, two):
    # D = 512: two consumer warpgroups hold half of D each (the default), or
    # one holds half in each of two chunks; both kernels lower (the lowering
    # checks shared memory: one stage with 64 rows of the other side, two
    # with 32).
    kernel2 = pallas_mosaic._kernel2
    with mock.patch.object(kernel2, "call", wraps=kernel2.call) as calls:
      text = self._sweep_text(256, 512, True, block_other=block_other, warpgroups=warpgroups)
    self.assertEqual(calls.call_count, two)
    self.assertEqual(_kernel_calls(text), 2)
    self.assertNotRegex(text, r"tensor<256x256x")

  def test_two_warpgroups_at_the_target_size(self):
    # B = 65,536, D = 512, bfloat16 (lowering only): no [B, C] buffer.
    text = self._sweep_text(65536, 512, True, out_dtype=jnp.bfloat16)
    self.assertEqual(_kernel_calls(text), 2)
    self.assertNotRegex(text, r"tensor<65536x65536x")

  def test_loss_chooses_the_kernels(self):
    x = jax.ShapeDtypeStruct((130, 64), jnp.bfloat16)

    def vag(implementation):
      loss = functools.partial(
        bce_jax.pairwise_sigmoid_loss, scale=3.0, bias=-2.0, implementation=implementation
      )
      return _lowered(jax.value_and_grad(loss, argnums=(0, 1)), x, x)

    # The GPU check is RefusalTest's: here the routing alone, lowered on a CPU.
    with mock.patch.object(backend, "check_pallas"):
      mosaic = vag("mosaic")
    self.assertEqual(_kernel_calls(mosaic), 2)  # the row kernel gives the value too
    self.assertEqual(_kernel_calls(vag(None)), 0)  # the default stays on Triton until measured

  def test_no_float32_rows_by_dim(self):
    # bfloat16 value_and_grad at B = 8192, D = 512 (two warpgroups): the
    # kernels write s / count g y and g^T x in bfloat16 and give the float32
    # gdot row sums, so no float32 [B, D] tensor is in the program.
    batch, dim = 8192, 512
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.bfloat16)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    loss = lambda x, y, s, b: bce_jax.pairwise_sigmoid_loss(
      x, y, scale=s, bias=b, implementation="mosaic"
    )
    with mock.patch.object(backend, "check_pallas"):
      text = _lowered(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), emb, emb, scalar, scalar)
    self.assertEqual(_kernel_calls(text), 2)
    self.assertGreater(text.count(f"{batch}x{dim}xbf16>"), 0)  # the test can tell
    self.assertEqual(text.count(f"{batch}x{dim}xf32>"), 0)

  @parameterized.named_parameters(("one_warpgroup", 64), ("two_warpgroups", 320))
  def test_inside_shard_map_with_check_vma(self, dim):
    # Interpret mode takes no check_vma; the kernels' outputs must still
    # carry the mesh axes for the ring to type-check.
    mesh = jax.make_mesh((1,), ("data",))
    rows, whole = jax.NamedSharding(mesh, P("data")), jax.NamedSharding(mesh, P())

    def loss(x, y, s, b, mask):
      return bce_jax.pairwise_sigmoid_loss(
        x, y, scale=s, bias=b, mask=mask, implementation="mosaic", axis_name="data"
      )

    mapped = jax.shard_map(
      loss, mesh=mesh, out_specs=P(), in_specs=(P("data"),) * 2 + (P(), P(), P("data"))
    )
    x = jax.ShapeDtypeStruct((67, dim), jnp.bfloat16, sharding=rows)
    s = jax.ShapeDtypeStruct((), jnp.float32, sharding=whole)
    mask = jax.ShapeDtypeStruct((67,), jnp.bool_, sharding=rows)
    kernel2 = pallas_mosaic._kernel2
    with (
      mock.patch.object(backend, "check_pallas"),
      mock.patch.object(kernel2, "call", wraps=kernel2.call) as two,
    ):
      text = _lowered(jax.value_and_grad(mapped, argnums=(0, 1, 2, 3)), x, x, s, s, mask)
    self.assertEqual(_kernel_calls(text), 2)
    self.assertEqual(two.call_count, 2 if dim > 256 else 0)


@needs_mosaic
class RefusalTest(parameterized.TestCase):
  def test_float32_and_high_precision(self):
    x = jnp.ones((8, 64), jnp.float32)
    with self.assertRaisesRegex(ValueError, "float16 or bfloat16 embeddings, not float32"):
      bce_jax.pairwise_sigmoid_loss(x, x, scale=1.0, bias=0.0, implementation="mosaic")
    with self.assertRaisesRegex(ValueError, "not precision=HIGHEST"):
      bce_jax.pairwise_sigmoid_loss(
        x.astype(jnp.bfloat16),
        x.astype(jnp.bfloat16),
        scale=1.0,
        bias=0.0,
        precision="highest",
        implementation="mosaic",
      )

  def test_needs_a_gpu(self):
    x = jnp.ones((8, 64), jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "'mosaic' cannot run: they need a GPU"):
      bce_jax.pairwise_sigmoid_loss(x, x, scale=1.0, bias=0.0, implementation="mosaic")

  def test_too_wide_for_shared_memory(self):
    x = jnp.ones((8, 768), jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "D = 768 needs more than 227 KiB"):
      pallas_mosaic.parts(x, x, 1.0, 0.0)

  def test_two_warpgroups_limits(self):
    x = jnp.ones((8, 576), jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "`warpgroups=2` takes D up to 512.*got D = 576"):
      pallas_mosaic.parts(x, x, 1.0, 0.0, warpgroups=2)
    with self.assertRaisesRegex(ValueError, "no `chunk`.*chunk=64"):
      pallas_mosaic.parts(x[:, :128], x[:, :128], 1.0, 0.0, warpgroups=2, chunk=64)
    with self.assertRaisesRegex(ValueError, "`warpgroups` must be 1 or 2; got 3"):
      pallas_mosaic.parts(x, x, 1.0, 0.0, warpgroups=3)

  def test_lists_rule_and_linear_bce(self):
    x = jnp.ones((8, 64), jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "unknown positives rule 'lists'"):
      pallas_mosaic.parts(x, x, 1.0, 0.0, rule="lists")
    with self.assertRaisesRegex(ValueError, "`implementation` must be one of"):
      bce_jax.linear_binary_crossentropy(
        x, x, jnp.zeros((8, 1), jnp.int32), implementation="mosaic"
      )

  def test_loss_object_takes_the_name(self):
    loss = bce_jax.PairwiseSigmoidLoss(implementation="mosaic")
    self.assertEqual(loss.get_config()["implementation"], "mosaic")
    with self.assertRaisesRegex(ValueError, "`implementation` must be one of"):
      bce_jax.PairwiseSigmoidLoss(implementation="mosaik")


if __name__ == "__main__":
  absltest.main()
