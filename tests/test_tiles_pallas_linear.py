"""The linear BCE on the Pallas kernels, and how that path is chosen.

* ``implementation="pallas"`` (the kernels in Pallas's interpreter on CPU)
  against the float64 dense reference: the value and the gradients in h, w
  and bias, "sum" and "mean", C no multiple of the kernel's blocks, a row
  ``mask`` over nan rows, -1 padding and repeated ids, float32 and
  bfloat16, jitted and eager, and a walk split into several column chunks
  (one of them shorter);
* label shards: four host devices under ``shard_map`` against the
  reference, and a program cross-lowered for CUDA inside ``shard_map``;
* the choice at lowering time: a program lowered for CUDA holds the Triton
  kernels, one lowered for CPU does not, nor one with
  ``implementation="xla"``; ``dW`` in bfloat16 needs no float32 copy;
* ``implementation`` on the function and the loss object, and its errors.
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
from bce_jax._tiles import pallas_triton, pallas_triton_config
from tests import _host_devices
from tests import _reference as ref

TOL = {"float32": 3e-6, "bfloat16": 1e-2}
JAX = tuple(int(p) for p in jax.__version__.split(".")[:2])
needs_triton = absltest.skipUnless(
  pallas_triton.available(), "this jax has no jax.experimental.pallas.triton"
)


def interpreted():
  """The kernels run in Pallas's interpreter (public ``interpret=True``)."""
  return mock.patch.object(pallas_triton, "_INTERPRET", True)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _data(rows, labels, dim, *, k=4, seed=0, masked=False):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(rows, dim)).astype(np.float32)
  w = (rng.normal(size=(labels, dim)) / np.sqrt(dim)).astype(np.float32)
  b = rng.normal(size=labels).astype(np.float32)
  pos = rng.integers(-1, labels, (rows, k)).astype(np.int32)  # -1: padding
  pos[:, -1] = pos[:, 0]  # a repeated id counts once
  pos[0] = -1  # a row without positives
  mask = rng.random(rows) > 0.3 if masked else None
  if masked:
    h[~mask] = np.nan
  return h, w, b, pos, mask


@functools.cache
def _vag(implementation, reduction="sum", bias=True, jit=True):
  def loss(h, w, b, pos, mask):
    return bce_jax.linear_binary_crossentropy(
      h,
      w,
      pos,
      bias=b if bias else None,
      mask=mask,
      label_reduction=reduction,
      implementation=implementation,
      precision="highest",
    )

  run = jax.value_and_grad(loss, argnums=(0, 1, 2) if bias else (0, 1))
  return jax.jit(run) if jit else run


def _check(test, got, h, w, b, pos, mask, reduction, tol):
  value, grads = got
  mask_np = np.ones(len(h), bool) if mask is None else mask
  want = ref.linear_bce(
    np.where(mask_np[:, None], np.asarray(h, np.float64), 0.0),
    np.asarray(w, np.float64),
    pos,
    None if b is None else np.asarray(b, np.float64),
    mask,
    label_reduction=reduction,
  )
  test.assertLess(_rel(value, want[0]), tol)
  for name, g, wg in zip(("dh", "dw", "dbias"), grads, want[1:]):
    test.assertTrue(np.all(np.isfinite(np.asarray(g, np.float32))), name)
    test.assertLess(_rel(g, wg), tol, name)
  if mask is not None:
    test.assertTrue(np.all(np.asarray(grads[0])[~mask] == 0))


@needs_triton
class KernelAgainstReferenceTest(parameterized.TestCase):
  # 150 labels: two 64-label blocks for the kernels and 22 labels as an XLA
  # tile (D = 16: `w` is not copied), or, at D = 24 (padded to 32), three
  # blocks, the last partly padding; 550 labels: 8 blocks in two chunks.
  @parameterized.named_parameters(
    ("sum_f32", 37, 150, 16, "sum", "float32", False),
    ("mean_mask_nan_f32", 37, 150, 24, "mean", "float32", True),
    ("sum_bf16", 20, 150, 16, "sum", "bfloat16", False),
    ("chunks_mask_nan_f32", 37, 550, 16, "sum", "float32", True),
  )
  def test_value_and_gradients(self, rows, labels, dim, reduction, dtype, masked):
    h, w, b, pos, mask = _data(rows, labels, dim, masked=masked)
    hs, ws = jnp.asarray(h, dtype), jnp.asarray(w, dtype)
    with interpreted():
      got = _vag("pallas", reduction)(hs, ws, jnp.asarray(b), pos, mask)
    _check(self, got, hs, ws, b, pos, mask, reduction, TOL[dtype])
    self.assertEqual((got[1][0].dtype, got[1][1].dtype), (hs.dtype, ws.dtype))

  def test_chunks_are_used(self):
    # The case above really splits the walk, the last chunk shorter.
    config = pallas_triton_config.choose(37, 550, 16)
    self.assertEqual((config.block_cols, config.col_chunks), (64, 2))

  @parameterized.parameters("diagonal", "ids")
  def test_unpadded_columns_other_rules(self, rule):
    # The last partial block as an XLA tile, for the pairwise rules too.
    h, w, b, _, _ = _data(20, 75, 16, seed=4)
    ids = np.arange(75, dtype=np.int32) % 7
    kw = {"row_ids": jnp.asarray(ids[:20]), "col_ids": jnp.asarray(ids)} if rule == "ids" else {}
    outs = [
      pallas_triton.parts(
        jnp.asarray(h),
        jnp.asarray(w),
        2.0,
        jnp.asarray(b),
        rule=rule,
        interpret=True,
        precision="highest",
        unpadded_columns=unpadded,
        **kw,
      )
      for unpadded in (False, True)
    ]
    for name in outs[0]:
      np.testing.assert_allclose(outs[1][name], outs[0][name], rtol=2e-6, atol=1e-6, err_msg=name)

  def test_many_chunks_equal_one(self):
    h, w, b, pos, _ = _data(16, 300, 16, seed=3)
    lists = jnp.asarray(pos)
    outs = []
    for chunks in (1, 3):  # 19 blocks of 16: chunks of 7, 7 and 5
      config = pallas_triton_config.Config(16, 16, col_chunks=chunks)
      outs.append(
        pallas_triton.sweep(
          jnp.asarray(h),
          jnp.asarray(w),
          1.0,
          jnp.asarray(b),
          rule="lists",
          lists=lists,
          config=config,
          interpret=True,
          precision="highest",
        )
      )
    want = ref.bilinear_sweep(h, w, 1.0, b, ref.dense_labels(pos, 300) > 0)
    for name in ("loss", "da", "db", "dbias"):
      np.testing.assert_allclose(outs[1][name], outs[0][name], rtol=2e-6, atol=1e-6, err_msg=name)
      self.assertLess(_rel(outs[1][name], want[name]), 3e-6, name)

  def test_eager_and_without_bias(self):
    h, w, _, pos, mask = _data(19, 70, 16, masked=True, seed=1)
    with interpreted():
      got = _vag("pallas", "mean", bias=False, jit=False)(h, w, None, pos, mask)
    _check(self, got, h, w, None, pos, mask, "mean", TOL["float32"])

  def test_equals_xla_path(self):
    h, w, b, pos, mask = _data(37, 150, 16, masked=True, seed=2)
    with interpreted():
      kernel = _vag("pallas")(h, w, b, pos, mask)
    tiles = _vag("xla")(h, w, b, pos, mask)
    for got, want in zip(jax.tree.leaves(kernel), jax.tree.leaves(tiles)):
      self.assertLess(_rel(got, want), 2e-6)


# Labels sharded over four host devices, the kernels interpreted (check_vma
# off, as Pallas's interpreter needs), against the float64 reference.
_SHARD_SCRIPT = textwrap.dedent(
  """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import bce_jax
    from bce_jax._tiles import pallas_triton
    from tests import _reference as ref

    pallas_triton._INTERPRET = True
    mesh = jax.make_mesh((4,), ("labels",))
    rng = np.random.default_rng(0)
    rows, labels, dim = 13, 4 * 70, 16  # 70 labels a device: one full block and a part
    h = rng.normal(size=(rows, dim)).astype(np.float32)
    w = (rng.normal(size=(labels, dim)) / 4).astype(np.float32)
    b = rng.normal(size=labels).astype(np.float32)
    pos = rng.integers(-1, labels, (rows, 5)).astype(np.int32)
    mask = rng.random(rows) > 0.3
    h[~mask] = np.nan

    def local(h, w, b, p, m):
      return bce_jax.linear_binary_crossentropy(
        h, w, p, bias=b, mask=m, axis_name="labels", implementation="pallas",
        precision="highest")

    mapped = jax.shard_map(local, mesh=mesh, check_vma=False, out_specs=P(),
                           in_specs=(P(), P("labels"), P("labels"), P(), P()))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    with jax.set_mesh(mesh):
      value, grads = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2)))(
        put(h, P()), put(w, P("labels")), put(b, P("labels")), put(pos, P()), put(mask, P()))
    want = ref.linear_bce(np.where(mask[:, None], h, 0), w, pos, b, mask)
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b))
                             / max(float(np.max(np.abs(b))), 1e-30))
    out = {"value": rel(value, want[0])}
    out.update({n: rel(g, x) for n, g, x in zip(("dh", "dw", "dbias"), grads, want[1:])})
    out["masked_dh_zero"] = float(not np.all(np.asarray(grads[0])[~mask] == 0))
    print(json.dumps(out))
  """
)


@needs_triton
class LabelShardsTest(absltest.TestCase):
  def test_four_devices_against_reference(self):
    proc = _host_devices.run(_SHARD_SCRIPT, devices=4, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(set(errors), {"value", "dh", "dw", "dbias", "masked_dh_zero"})
    for name, error in errors.items():
      self.assertLess(error, 3e-6, name)

  def test_lowers_for_cuda_inside_shard_map(self):
    # check_vma on: the kernels need jax >= 0.10 there, else the XLA tiles.
    mesh = jax.make_mesh((1,), ("labels",))

    def local(h, w, b, p, m):
      loss = lambda h, w, b: bce_jax.linear_binary_crossentropy(
        h, w, p, bias=b, mask=m, axis_name="labels"
      )
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(h, w, b)

    mapped = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(), P("labels"), P("labels"), P(), P()),
      out_specs=(P(), (P(), P("labels"), P("labels"))),
    )
    typed = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
      shape, dtype, sharding=jax.NamedSharding(mesh, spec)
    )
    traced = jax.jit(mapped).trace(
      typed((32, 16), jnp.bfloat16, P()),
      typed((256, 16), jnp.bfloat16, P("labels")),
      typed((256,), jnp.float32, P("labels")),
      typed((32, 3), jnp.int32, P()),
      typed((32,), jnp.bool_, P()),
    )
    try:
      text = traced.lower(lowering_platforms=("cuda",)).as_text()
    except Exception as error:  # noqa: BLE001 - a CPU-only jaxlib may not lower for CUDA
      self.skipTest(f"this jaxlib cannot lower Pallas-Triton for CUDA: {error!r:.200}")
    self.assertEqual("xla.gpu.triton" in text, JAX >= (0, 10))


@needs_triton
class SelectionTest(parameterized.TestCase):
  """Chosen when the program is lowered: the kernels for CUDA, XLA elsewhere."""

  def _lowered(self, platform, rows=32, labels=4096, dim=64, dtype=jnp.bfloat16, **kw):
    def step(h, w, b, pos):
      loss = lambda h, w, b: bce_jax.linear_binary_crossentropy(h, w, pos, bias=b, **kw)
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(h, w, b)

    traced = jax.jit(step).trace(
      jax.ShapeDtypeStruct((rows, dim), dtype),
      jax.ShapeDtypeStruct((labels, dim), dtype),
      jax.ShapeDtypeStruct((labels,), jnp.float32),
      jax.ShapeDtypeStruct((rows, 3), jnp.int32),
    )
    try:
      return traced.lower(lowering_platforms=(platform,)).as_text()
    except Exception as error:  # noqa: BLE001 - a CPU-only jaxlib may not lower for CUDA
      self.skipTest(f"this jaxlib cannot lower for {platform}: {error!r:.200}")

  @parameterized.parameters(("pallas", True, False), ("xla", False, True), (None, True, True))
  def test_traced_branches(self, implementation, kernel, choice):
    h, w, pos = jnp.ones((5, 4)), jnp.ones((9, 4)), jnp.zeros((5, 2), jnp.int32)
    loss = lambda h: bce_jax.linear_binary_crossentropy(h, w, pos, implementation=implementation)
    with interpreted():
      text = str(jax.make_jaxpr(jax.grad(loss))(h))
    self.assertEqual("pallas_call" in text, kernel)
    self.assertEqual("platform_index" in text, choice)

  def test_kernel_for_cuda_only(self):
    self.assertIn("xla.gpu.triton", self._lowered("cuda"))
    self.assertNotIn("xla.gpu.triton", self._lowered("cpu"))

  def test_xla_when_asked(self):
    self.assertNotIn("xla.gpu.triton", self._lowered("cuda", implementation="xla"))

  def test_float64_stays_on_xla(self):
    with jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64():
      text = self._lowered("cuda", dtype=jnp.float64)
    self.assertNotIn("xla.gpu.triton", text)

  def test_bfloat16_dw_has_no_float32_copy(self):
    # The kernel writes dW in w's dtype with the row weight applied: no
    # [C, D] float32 buffer in the CUDA program (C, D need no padding).
    text = self._lowered("cuda", labels=4096, dim=64)
    self.assertIn("tensor<4096x64xbf16>", text)
    self.assertNotIn("tensor<4096x64xf32>", text)

  def test_labels_no_multiple_of_the_block_are_not_copied(self):
    # 4100 labels: 64 blocks of 64 in the kernels, 4 in an XLA tile; no
    # padded [4160, 64] copy of w or of dW.
    text = self._lowered("cuda", labels=4100, dim=64)
    self.assertIn("xla.gpu.triton", text)
    self.assertNotIn("tensor<4160x64x", text)


class ArgumentsTest(parameterized.TestCase):
  H, W, POS = jnp.ones((4, 2)), jnp.ones((6, 2)), jnp.zeros((4, 1), jnp.int32)

  def test_unknown_implementation(self):
    with self.assertRaisesRegex(ValueError, "`implementation`.*'cudnn'"):
      bce_jax.linear_binary_crossentropy(self.H, self.W, self.POS, implementation="cudnn")
    with self.assertRaisesRegex(ValueError, "`implementation`"):
      bce_jax.LinearBinaryCrossentropy(implementation="triton")

  def test_pallas_needs_a_gpu(self):
    if jax.default_backend() == "gpu":
      self.skipTest("a GPU is here")
    with self.assertRaisesRegex(ValueError, "`implementation`='pallas'.*GPU"):
      bce_jax.linear_binary_crossentropy(self.H, self.W, self.POS, implementation="pallas")

  def test_loss_object_round_trips(self):
    loss = bce_jax.LinearBinaryCrossentropy(implementation="xla")
    config = loss.get_config()
    self.assertEqual(config["implementation"], "xla")
    self.assertEqual(bce_jax.LinearBinaryCrossentropy.from_config(config), loss)
    want = bce_jax.linear_binary_crossentropy(self.H, self.W, self.POS)
    np.testing.assert_allclose(loss(self.H, self.W, self.POS), want, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
