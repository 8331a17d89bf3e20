"""The pairwise sigmoid loss on its Pallas kernel path, and how that path is chosen.

* ``implementation="pallas"`` (the kernels in interpret mode on CPU) against
  the float64 reference: the value and the gradients in x, y, scale and
  bias, for a B that is no multiple of the kernel's blocks, with
  ``positives``, with a row ``mask`` over nan rows, float32 and bfloat16,
  jitted and eager, both derivative schedules, inside ``shard_map``;
* the choice at lowering time: a program lowered for CUDA holds the Triton
  kernels, one lowered for CPU does not, nor one with
  ``implementation="xla"``; the XLA path's tiles follow the backend;
* ``precision`` and ``implementation`` on the function and the loss
  object, and their errors.
"""

from __future__ import annotations

import functools
import json
import textwrap
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import PartitionSpec as P

import bce_jax
from bce_jax import _pairwise
from bce_jax._tiles import pallas_triton
from tests import _host_devices, _reference

SCALE, BIAS = 3.0, -2.0
TOL = {"float32": 2e-6, "bfloat16": 5e-3, "float16": 2e-3}
needs_triton = absltest.skipUnless(
  pallas_triton.available(), "this jax has no jax.experimental.pallas.triton"
)


def interpreted():
  """The kernels run in Pallas's interpreter (public ``interpret=True``)."""
  return mock.patch.object(pallas_triton, "_INTERPRET", True)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _data(batch, dim, *, seed=0, ids=False, masked=False):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(batch, dim)) / np.sqrt(dim)).astype(np.float32)
  y = (x + rng.normal(size=(batch, dim)) / np.sqrt(dim)).astype(np.float32)
  positives = rng.integers(0, max(batch // 3, 1), batch).astype(np.int32) if ids else None
  mask = rng.random(batch) > 0.25 if masked else None
  if masked:
    x[~mask], y[~mask] = np.nan, np.nan
  return x, y, positives, mask


def _want(x, y, positives, mask):
  """(value, dx, dy, dscale, dbias) of the mean over included rows, float64."""
  batch = x.shape[0]
  ids = np.arange(batch) if positives is None else positives
  out = _reference.bilinear_sweep(x, y, SCALE, BIAS, ids[:, None] == ids[None, :], mask, mask)
  count = batch if mask is None else int(np.sum(mask))
  return (
    np.sum(out["loss"]) / count,
    out["da"] / count,
    out["db"] / count,
    out["dscale"] / count,
    np.sum(out["dbias"]) / count,
  )


@functools.cache
def _value_and_grads(implementation, jit=True, **kw):
  def loss(x, y, scale, bias, positives, mask):
    return bce_jax.pairwise_sigmoid_loss(
      x,
      y,
      scale=scale,
      bias=bias,
      positives=positives,
      mask=mask,
      implementation=implementation,
      **kw,
    )

  run = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
  return jax.jit(run) if jit else run


@needs_triton
class KernelAgainstReferenceTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("odd_f32", 37, 16, False, False, "float32"),
    ("ids_bf16", 37, 16, True, False, "bfloat16"),
    ("mask_nan_f32", 45, 24, True, True, "float32"),
    ("mask_nan_bf16", 29, 16, False, True, "bfloat16"),
    ("ids_f16", 37, 16, True, False, "float16"),
  )
  def test_value_and_four_gradients(self, batch, dim, ids, masked, dtype):
    x, y, positives, mask = _data(batch, dim, ids=ids, masked=masked)
    xs, ys = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    precision = "highest" if dtype == "float32" else None
    with interpreted():
      value, grads = _value_and_grads("pallas", precision=precision)(
        xs, ys, jnp.float32(SCALE), jnp.float32(BIAS), positives, mask
      )
    want = _want(np.asarray(xs, np.float64), np.asarray(ys, np.float64), positives, mask)
    self.assertLess(_rel(value, want[0]), TOL[dtype])
    for name, got, w in zip(("dx", "dy", "dscale", "dbias"), grads, want[1:]):
      self.assertTrue(np.all(np.isfinite(np.asarray(got, np.float32))), name)
      self.assertLess(_rel(got, w), TOL[dtype], name)
    self.assertEqual(grads[0].dtype, xs.dtype)

  def test_recompute_schedule_and_eager(self):
    x, y, positives, mask = _data(37, 16, ids=True, masked=True)
    args = (jnp.asarray(x), jnp.asarray(y), jnp.float32(SCALE), jnp.float32(BIAS), positives, mask)
    with interpreted():
      fused = _value_and_grads("pallas")(*args)
      with mock.patch.object(_pairwise, "_MODE", "recompute"):
        recompute = _value_and_grads("pallas", jit=False)(*args)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(recompute)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  def test_equals_xla_path(self):
    x, y, positives, _ = _data(37, 16, ids=True)
    args = (jnp.asarray(x), jnp.asarray(y), jnp.float32(SCALE), jnp.float32(BIAS), positives, None)
    with interpreted():
      kernel = _value_and_grads("pallas", precision="highest")(*args)
    xla = _value_and_grads("xla", precision="highest")(*args)
    for a, b in zip(jax.tree.leaves(kernel), jax.tree.leaves(xla)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)

  def test_inside_shard_map(self):
    # Pallas's interpreter rejects check_vma; the CUDA lowering test keeps it.
    mesh = jax.make_mesh((1,), ("data",))
    x, y, positives, mask = _data(29, 16, ids=True, masked=True)

    def ring(x, y, scale, bias, ids, mask):
      return bce_jax.pairwise_sigmoid_loss(
        x,
        y,
        scale=scale,
        bias=bias,
        positives=ids,
        mask=mask,
        axis_name="data",
        implementation="pallas",
      )

    mapped = jax.shard_map(
      ring,
      mesh=mesh,
      in_specs=(P("data"),) * 2 + (P(), P()) + (P("data"),) * 2,
      out_specs=P(),
      check_vma=False,
    )
    rows = P("data")
    put = lambda a, spec=rows: jax.device_put(jnp.asarray(a), jax.NamedSharding(mesh, spec))
    with interpreted():
      value, grads = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2, 3)))(
        put(x),
        put(y),
        put(np.float32(SCALE), P()),
        put(np.float32(BIAS), P()),
        put(positives),
        put(mask),
      )
    want = _want(x, y, positives, mask)
    self.assertLess(_rel(value, want[0]), 1e-5)
    for got, w in zip(grads, want[1:]):
      self.assertLess(_rel(got, w), 1e-4)


@needs_triton
class SixteenBitResidualsTest(parameterized.TestCase):
  """16-bit embeddings on the kernels: ``dL/dx`` and ``dL/dy`` are kept
  between the passes in the embeddings' dtype (the kernels' float32 sums
  scaled by ``s / count`` and rounded once), half the float32 bytes."""

  @parameterized.parameters(
    ("bfloat16", False, 2), ("bfloat16", True, 2), ("float16", True, 2), ("float32", True, 4)
  )
  def test_residual_bytes(self, dtype, masked, itemsize):
    batch, dim = 256, 64
    x, y, positives, mask = _data(batch, dim, ids=masked, masked=masked)
    loss = lambda x, y, s, b: bce_jax.pairwise_sigmoid_loss(
      x, y, scale=s, bias=b, positives=positives, mask=mask, implementation="pallas"
    )
    args = (jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.float32(SCALE), jnp.float32(BIAS))
    with interpreted():
      _, vjp = jax.vjp(loss, *args)
    kept = [a for a in jax.tree.leaves(vjp) if isinstance(a, jax.Array)]
    wide = [a for a in kept if a.shape == (batch, dim)]
    self.assertLen(wide, 2)  # dL/dx and dL/dy
    self.assertEqual({a.dtype.itemsize for a in wide}, {itemsize})
    # Nothing else of that size: the scalars of dL/dscale, dL/dbias, the count.
    total = sum(a.nbytes for a in kept)
    self.assertBetween(total, 2 * batch * dim * itemsize, 2 * batch * dim * itemsize + 64)

  def test_no_float32_rows_by_dim_lowered_for_cuda(self):
    # value_and_grad at B = 8192, D = 512 lowered for CUDA: with bfloat16
    # embeddings no float32 [B, D] tensor is in the program (the kernels write
    # the derivatives in bfloat16); with float32 ones there are. Below 8192
    # rows the row kernel splits its walk into column chunks, whose float32
    # partial sums (at most 64 MiB) are added, then rounded.
    batch, dim = 8192, 512

    def lowered(dtype):
      loss = lambda *a: bce_jax.pairwise_sigmoid_loss(a[0], a[1], scale=a[2], bias=a[3])
      emb, scalar = jax.ShapeDtypeStruct((batch, dim), dtype), jax.ShapeDtypeStruct((), jnp.float32)
      traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(
        emb, emb, scalar, scalar
      )
      try:
        return traced.lower(lowering_platforms=("cuda",)).as_text()
      except Exception as error:  # noqa: BLE001 - a CPU-only jaxlib may not lower for CUDA
        self.skipTest(f"this jaxlib cannot lower for cuda: {error!r:.200}")

    wide = f"x{batch}x{dim}xf32>"
    float32 = lowered(jnp.float32)
    self.assertGreater(float32.count(wide), 0)  # the test can tell
    text = lowered(jnp.bfloat16)
    self.assertIn("xla.gpu.triton", text)
    self.assertEqual(text.count(wide), 0)
    self.assertGreater(text.count(f"x{batch}x{dim}xbf16>"), 0)

  @parameterized.parameters("bfloat16", "float16")
  def test_cotangent_other_than_one(self, dtype):
    # The kept derivatives are those of the mean; the backward pass scales
    # them by the caller's cotangent (jax.vjp with 3, jax.grad of 2 * loss).
    x, y, positives, mask = _data(45, 16, ids=True, masked=True)
    xs, ys = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    loss = lambda x, y, s, b: bce_jax.pairwise_sigmoid_loss(
      x, y, scale=s, bias=b, positives=positives, mask=mask, implementation="pallas"
    )
    args = (xs, ys, jnp.float32(SCALE), jnp.float32(BIAS))
    with interpreted():
      _, vjp = jax.vjp(loss, *args)
      three = vjp(jnp.float32(3.0))
      two = jax.jit(jax.grad(lambda *a: 2 * loss(*a), argnums=(0, 1, 2, 3)))(*args)
    want = _want(np.asarray(xs, np.float64), np.asarray(ys, np.float64), positives, mask)
    for factor, grads in ((3.0, three), (2.0, two)):
      for name, got, w in zip(("dx", "dy", "dscale", "dbias"), grads, want[1:]):
        self.assertFalse(np.any(np.isnan(np.asarray(got, np.float32))), name)
        self.assertLess(_rel(got, factor * w), TOL[dtype], f"{factor} {name}")


# Four host devices: the ring with the kernels (interpreted; check_vma off, as
# Pallas's interpreter needs) against one device, float32 and bfloat16.
_RING_SCRIPT = textwrap.dedent(
  """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import bce_jax
    from bce_jax._tiles import pallas_triton

    pallas_triton._INTERPRET = True
    mesh = jax.make_mesh((4,), ("data",))
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(76, 16)) / 4).astype(np.float32)  # 19 rows a device
    y = (x + rng.normal(size=(76, 16)) / 4).astype(np.float32)
    mask = rng.random(76) > 0.2
    x[~mask] = np.nan
    out = {}
    for dtype in ("float32", "bfloat16"):
      xs, ys = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
      for ids in (None, rng.integers(0, 20, 76).astype(np.int32)):
        def loss(x, y, s, b, ids, mask, impl, axis_name):
          return bce_jax.pairwise_sigmoid_loss(
            x, y, scale=s, bias=b, positives=ids, mask=mask, implementation=impl,
            axis_name=axis_name)

        ring = lambda *a: loss(*a, "pallas", "data")
        spec = P("data")
        mapped = jax.shard_map(ring, mesh=mesh, out_specs=P(), check_vma=False,
                               in_specs=(spec, spec, P(), P(), None if ids is None else spec, spec))
        grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
        put = lambda a: None if a is None else jax.device_put(a, NamedSharding(mesh, spec))
        args = (jnp.float32(3.0), jnp.float32(-2.0))
        with jax.set_mesh(mesh):
          got = grad(mapped)(put(xs), put(ys), *args, put(ids), put(mask))
        # bfloat16: against one device on the kernels (their 16-bit g in the
        # gradient dots), each derivative rounded once on both.
        one = "xla" if dtype == "float32" else "pallas"
        want = grad(lambda *a: loss(*a, one, None))(xs, ys, *args, ids, mask)
        wide = lambda a: np.asarray(jnp.asarray(a, jnp.float32))
        rel = lambda a, b: float(np.max(np.abs(wide(a) - wide(b)))
                                 / max(float(np.max(np.abs(wide(b)))), 1e-30))
        leaves = list(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        same = all(a.dtype == b.dtype for a, b in leaves)
        out[f"{dtype}/{ids is not None}"] = max(rel(a, b) for a, b in leaves) if same else 1.0
    print(json.dumps(out))
  """
)


@needs_triton
class RingTest(absltest.TestCase):
  def test_four_devices_equal_one(self):
    proc = _host_devices.run(_RING_SCRIPT, devices=4, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertLen(errors, 4)
    for name, error in errors.items():
      # bfloat16: 16-bit derivatives on both paths, each rounded once
      self.assertLess(error, 1e-5 if name.startswith("float32") else TOL["bfloat16"], name)


@needs_triton
class SelectionTest(parameterized.TestCase):
  """Chosen when the program is lowered: the kernels for CUDA, XLA elsewhere."""

  def _lowered(self, platform, batch=64, dim=32, dtype=jnp.bfloat16, **kw):
    def step(x, y, s, b):
      loss = lambda *a: bce_jax.pairwise_sigmoid_loss(a[0], a[1], scale=a[2], bias=a[3], **kw)
      return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, y, s, b)

    emb = jax.ShapeDtypeStruct((batch, dim), dtype)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    traced = jax.jit(step).trace(emb, emb, scalar, scalar)
    try:
      return traced.lower(lowering_platforms=(platform,)).as_text()
    except Exception as error:  # noqa: BLE001 - a CPU-only jaxlib may not lower for CUDA
      self.skipTest(f"this jaxlib cannot lower for {platform}: {error!r:.200}")

  @parameterized.parameters(("pallas", True, False), ("xla", False, True), (None, True, True))
  def test_traced_branches(self, implementation, kernel, choice):
    # Traced, before lowering: "pallas" holds the kernels alone; "xla" the
    # tiles, whose size the platform chooses; None the kernels or tiles.
    x = jnp.ones((37, 16))
    loss = lambda x: bce_jax.pairwise_sigmoid_loss(
      x, x, scale=1.0, bias=0.0, implementation=implementation
    )
    with interpreted():
      text = str(jax.make_jaxpr(jax.grad(loss))(x))
    self.assertEqual("pallas_call" in text, kernel)
    self.assertEqual("platform_index" in text, choice)

  def test_kernel_for_cuda_only(self):
    self.assertIn("xla.gpu.triton", self._lowered("cuda"))
    self.assertNotIn("xla.gpu.triton", self._lowered("cpu"))

  def test_xla_when_asked(self):
    self.assertNotIn("xla.gpu.triton", self._lowered("cuda", implementation="xla"))

  def test_with_positives_and_mask(self):
    def step(x, y, ids, mask):
      loss = lambda x, y: bce_jax.pairwise_sigmoid_loss(
        x, y, scale=10.0, bias=-10.0, positives=ids, mask=mask
      )
      return jax.value_and_grad(loss, argnums=(0, 1))(x, y)

    emb = jax.ShapeDtypeStruct((37, 16), jnp.float32)
    traced = jax.jit(step).trace(
      emb, emb, jax.ShapeDtypeStruct((37,), jnp.int32), jax.ShapeDtypeStruct((37,), jnp.bool_)
    )
    self.assertIn("xla.gpu.triton", traced.lower(lowering_platforms=("cuda",)).as_text())

  @parameterized.parameters(None, "highest")
  def test_precision_reaches_the_xla_tiles(self, precision):
    text = self._lowered("cpu", dtype=jnp.float32, precision=precision)
    self.assertEqual("HIGHEST" in text, precision == "highest")

  @parameterized.parameters(("cpu", 512), ("cuda", 8192))
  def test_xla_tiles_follow_the_backend(self, platform, block):
    text = self._lowered(platform, batch=16384, dim=8, dtype=jnp.float32, implementation="xla")
    self.assertIn(f"tensor<{block}x{block}xf32>", text)


class ArgumentsTest(parameterized.TestCase):
  def test_unknown_implementation(self):
    x = jnp.ones((4, 2))
    with self.assertRaisesRegex(ValueError, "`implementation`.*'cudnn'"):
      bce_jax.pairwise_sigmoid_loss(x, x, scale=1.0, bias=0.0, implementation="cudnn")

  def test_pallas_needs_a_gpu(self):
    if jax.default_backend() == "gpu":
      self.skipTest("a GPU is here")
    x = jnp.ones((4, 2))
    with self.assertRaisesRegex(ValueError, "`implementation`='pallas'.*GPU"):
      bce_jax.pairwise_sigmoid_loss(x, x, scale=1.0, bias=0.0, implementation="pallas")

  def test_bad_precision(self):
    x = jnp.ones((4, 2))
    with self.assertRaisesRegex(ValueError, "`precision`"):
      bce_jax.pairwise_sigmoid_loss(x, x, scale=1.0, bias=0.0, precision="ultra")

  def test_loss_object_round_trips(self):
    loss = bce_jax.PairwiseSigmoidLoss(implementation="xla", precision="highest")
    config = loss.get_config()
    self.assertEqual((config["implementation"], config["precision"]), ("xla", "highest"))
    self.assertEqual(bce_jax.PairwiseSigmoidLoss.from_config(config), loss)
    x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    want = bce_jax.pairwise_sigmoid_loss(x, x, scale=10.0, bias=-5.0)
    np.testing.assert_allclose(loss(x, x, 10.0, -5.0), want, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
