"""The pairwise sigmoid (SigLIP) loss against a float64 reference, on one and 8 devices.

* values and gradients in x, y, scale and bias against the dense formula,
  written here in float64 NumPy, for B in {1, 2, 7, 64, 300}, D in {1, 16},
  with and without `positives`, tiles that divide B and tiles that do not;
* the tiled loss equals the one-tile loss to float32 rounding, and the two
  derivative schedules ("fused" and "recompute") agree;
* bfloat16 and float64 inputs, extreme logits, the loss object's config;
* on 8 host devices (a subprocess), the ring under ``jax.shard_map`` equals
  one device, value and gradients, also when B / 8 is not a multiple of the
  tile, with and without ``check_vma``;
* the compiled ``value_and_grad`` needs O(B D + block^2) temporary memory,
  not O(B^2);
* bad arguments raise ValueError or TypeError naming the argument.

Numerics run under ``jax.jit``.
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

import bce_jax
from bce_jax import _pairwise
from tests import _host_devices

SCALE, BIAS = 3.0, -2.0
# float32 results against float64: sums of up to 300^2 terms, gradients
# relative to their largest entry.
VALUE_RTOL, GRAD_TOL = 2e-6, 2e-6


def reference(x, y, scale, bias, positives=None):
  """(loss, dx, dy, dscale, dbias) of the dense formula, in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  batch = x.shape[0]
  ids = np.arange(batch) if positives is None else np.asarray(positives)
  z = np.where(ids[:, None] == ids[None, :], 1.0, -1.0)
  dots = x @ y.T
  logits = scale * dots + bias
  loss = np.sum(np.logaddexp(0.0, -z * logits)) / batch  # -log sigmoid(z l)
  with np.errstate(over="ignore"):
    g = -z / (1.0 + np.exp(z * logits)) / batch  # d loss / d logits
  return loss, scale * g @ y, scale * g.T @ x, np.sum(g * dots), np.sum(g)


def _data(batch, dim, seed=0, positives=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  y = (x + rng.normal(size=(batch, dim))).astype(np.float32)  # correlated: confident pairs
  ids = rng.integers(0, max(batch // 3, 1), batch).astype(np.int32) if positives else None
  return x, y, ids


@functools.cache
def _value_and_grads(block_size=None):
  def loss(x, y, scale, bias, positives):
    return bce_jax.pairwise_sigmoid_loss(
      x, y, scale=scale, bias=bias, positives=positives, block_size=block_size
    )

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# (B, block_size): None picks the block itself; the rest divide B or do not.
_SIZES = [(1, None), (2, None), (2, 1), (7, 3), (7, None), (64, 16), (64, 48), (300, 64)]
_SIZES += [(300, 100), (300, None)]
# Every size with D = 16 and positives, and D = 1 without; the other two
# pairings where a tile does not divide B or one tile covers it.
_CASES = [(b, k, 16, True) for b, k in _SIZES] + [(b, k, 1, False) for b, k in _SIZES]
_CASES += [(7, 3, 16, False), (64, 48, 16, False), (300, None, 16, False), (7, 3, 1, True)]
_CASES += [(300, 64, 1, True)]


class AgainstReferenceTest(parameterized.TestCase):
  """float32 tolerances of a few ulp: the tiles' matmuls run at HIGHEST precision.

  A GPU's default float32 matmul is TF32 (about 1e-3 relative per product),
  which these tolerances do not allow; `precision=` documents the choice.
  """

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))

  @parameterized.parameters(*_CASES)
  def test_value_and_gradients(self, batch, block, dim, positives):
    x, y, ids = _data(batch, dim, seed=batch + dim, positives=positives)
    value, grads = _value_and_grads(block)(x, y, jnp.float32(SCALE), jnp.float32(BIAS), ids)
    want = reference(x, y, SCALE, BIAS, ids)
    self.assertEqual(value.dtype, jnp.float32)
    # atol: one pair of B = 1 may have a loss near float32's smallest normal.
    np.testing.assert_allclose(float(value), want[0], rtol=VALUE_RTOL, atol=1e-36)
    for name, got, ref in zip(("x", "y", "scale", "bias"), grads, want[1:]):
      self.assertEqual(got.shape, np.shape(ref), name)
      self.assertLess(_rel(got, ref), GRAD_TOL, name)

  @parameterized.parameters((300, 64, True), (257, 32, False))
  def test_tiles_equal_one_tile(self, batch, block, positives):
    x, y, ids = _data(batch, 16, positives=positives)
    args = (x, y, jnp.float32(SCALE), jnp.float32(BIAS), ids)
    tiled, tiled_grads = _value_and_grads(block)(*args)
    whole, whole_grads = _value_and_grads(batch)(*args)
    np.testing.assert_allclose(float(tiled), float(whole), rtol=5e-7)
    for got, want in zip(tiled_grads, whole_grads):
      self.assertLess(_rel(got, want), 1e-6)

  @parameterized.parameters(
    (300, 64),
  )
  def test_recompute_schedule_equals_fused(self, batch, block):
    x, y, ids = _data(batch, 16, positives=True)
    args = (x, y, jnp.float32(SCALE), jnp.float32(BIAS), ids)
    fused = _value_and_grads(block)(*args)
    with mock.patch.object(_pairwise, "_MODE", "recompute"):
      recomputed = _value_and_grads(block)(*args)
    for got, want in zip(jax.tree.leaves(recomputed), jax.tree.leaves(fused)):
      self.assertLess(_rel(got, want), 1e-6)

  def test_value_alone_and_loss_object(self):
    x, y, ids = _data(64, 16, positives=True)
    want = reference(x, y, SCALE, BIAS, ids)[0]
    loss = bce_jax.PairwiseSigmoidLoss(block_size=16)
    got = jax.jit(loss)(x, y, jnp.float32(SCALE), jnp.float32(BIAS), ids)
    np.testing.assert_allclose(float(got), want, rtol=VALUE_RTOL)
    got = bce_jax.pairwise_sigmoid_loss(x, y, scale=SCALE, bias=BIAS, positives=ids)
    np.testing.assert_allclose(float(got), want, rtol=VALUE_RTOL)

  def test_extreme_logits_are_finite_and_accurate(self):
    x, y, _ = _data(32, 16)
    for scale, bias in ((1e4, 0.0), (10.0, -1e4), (0.0, 80.0)):
      value, grads = _value_and_grads(8)(x, y, jnp.float32(scale), jnp.float32(bias), None)
      want = reference(x, y, scale, bias)
      np.testing.assert_allclose(float(value), want[0], rtol=VALUE_RTOL)
      for got, ref in zip(grads, want[1:]):
        self.assertTrue(np.all(np.isfinite(got)))
        self.assertLess(_rel(got, ref), 1e-5)

  def test_bfloat16_accumulates_in_float32(self):
    x, y, _ = _data(48, 16)
    xb, yb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    value, grads = _value_and_grads(16)(xb, yb, jnp.float32(SCALE), jnp.float32(BIAS), None)
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual((grads[0].dtype, grads[1].dtype), (jnp.bfloat16, jnp.bfloat16))
    want = reference(np.asarray(xb, np.float32), np.asarray(yb, np.float32), SCALE, BIAS)
    np.testing.assert_allclose(float(value), want[0], rtol=VALUE_RTOL)
    self.assertLess(_rel(grads[0], want[1]), 1e-2)  # one bfloat16 rounding of the result

  def test_float64(self):
    with jax.enable_x64(True):
      x, y, ids = _data(37, 16, positives=True)
      x, y = x.astype(np.float64), y.astype(np.float64)
      value, grads = _value_and_grads(8)(x, y, SCALE, BIAS, ids)
      want = reference(x, y, SCALE, BIAS, ids)
      self.assertEqual(value.dtype, jnp.float64)
      np.testing.assert_allclose(float(value), want[0], rtol=1e-13)
      for got, ref in zip(grads, want[1:]):
        self.assertLess(_rel(got, ref), 1e-12)

  def test_config_round_trip(self):
    loss = bce_jax.PairwiseSigmoidLoss(block_size=256, axis_name="data")
    config = json.loads(json.dumps(loss.get_config()))
    want = {"block_size": 256, "axis_name": "data", "precision": None, "implementation": None}
    self.assertEqual(config, want)
    self.assertEqual(bce_jax.PairwiseSigmoidLoss.from_config(config), loss)
    self.assertEqual(hash(bce_jax.PairwiseSigmoidLoss()), hash(bce_jax.PairwiseSigmoidLoss()))
    pair = bce_jax.PairwiseSigmoidLoss(axis_name=("a", "b"))
    round_trip = bce_jax.PairwiseSigmoidLoss.from_config(json.loads(json.dumps(pair.get_config())))
    self.assertEqual(round_trip, pair)


class MemoryTest(absltest.TestCase):
  def test_temporaries_do_not_grow_as_batch_squared(self):
    # The default tile (512 at these sizes); compiled only, never run.
    temps = {}
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    for batch in (2048, 4096):
      emb = jax.ShapeDtypeStruct((batch, 8), jnp.float32)
      compiled = _value_and_grads(None).lower(emb, emb, scalar, scalar, None).compile()
      temps[batch] = compiled.memory_analysis().temp_size_in_bytes
    self.assertLess(temps[4096] / temps[2048], 1.5, temps)  # B^2 would be 4
    # The [4096, 4096] float32 logits alone would be 64 MiB.
    self.assertLess(temps[4096], 8 << 20, temps)


class ErrorTest(parameterized.TestCase):
  X = np.zeros((4, 3), np.float32)

  @parameterized.named_parameters(
    ("shapes", {"y": np.zeros((5, 3), np.float32)}, ValueError, "`x` and `y`.*same shape"),
    ("rank", {"x": np.zeros(3, np.float32), "y": np.zeros(3, np.float32)}, ValueError, "`x`"),
    ("int_x", {"x": np.zeros((4, 3), np.int32)}, TypeError, "`x`.*floating"),
    ("scale_shape", {"scale": np.ones(1, np.float32)}, ValueError, "`scale` must be a scalar"),
    ("bias_shape", {"bias": np.ones((2, 2))}, ValueError, "`bias` must be a scalar"),
    ("scale_bool", {"scale": True}, TypeError, "`scale`"),
    ("positives_len", {"positives": np.arange(3)}, ValueError, r"`positives`.*\(4,\)"),
    ("positives_float", {"positives": np.zeros(4)}, TypeError, "`positives`.*integer"),
    ("positives_bool", {"positives": np.ones(4, bool)}, TypeError, "`positives`.*integer"),
    ("block_zero", {"block_size": 0}, ValueError, "`block_size` must be >= 1"),
    ("block_float", {"block_size": 2.0}, TypeError, "`block_size`"),
    ("block_bool", {"block_size": True}, TypeError, "`block_size`"),
    ("axis_unbound", {"axis_name": "data"}, ValueError, "`axis_name` 'data' is not bound"),
    ("axis_type", {"axis_name": ["data", 1]}, TypeError, "`axis_name`"),
  )
  def test_bad_argument(self, change, error, message):
    kwargs = {"x": self.X, "y": self.X, "scale": 1.0, "bias": 0.0}
    kwargs.update(change)
    x, y = kwargs.pop("x"), kwargs.pop("y")
    with self.assertRaisesRegex(error, message):
      bce_jax.pairwise_sigmoid_loss(x, y, **kwargs)
    with self.assertRaisesRegex(error, message):  # while tracing, too
      jax.jit(lambda x, y: bce_jax.pairwise_sigmoid_loss(x, y, **kwargs))(x, y)

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "`block_size`"):
      bce_jax.PairwiseSigmoidLoss(block_size=-1)
    with self.assertRaisesRegex(TypeError, "`axis_name`"):
      bce_jax.PairwiseSigmoidLoss(axis_name=3)


# Run with 8 host devices: each case compares the ring under shard_map with
# one device, and the float64 reference; prints one JSON object.
_RING_SCRIPT = textwrap.dedent(
  """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import bce_jax
    from tests.test_pairwise import reference

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",))
    rows = NamedSharding(mesh, P("data"))
    out = {}
    # (global B, D, block, positives, check_vma): 296 / 8 = 37 rows a device.
    cases = [(64, 16, None, False, True), (296, 16, 16, True, True), (296, 1, 5, False, False)]
    for batch, dim, block, with_ids, check in cases:
      rng = np.random.default_rng(batch + dim)
      x = rng.normal(size=(batch, dim)).astype(np.float32)
      y = (x + rng.normal(size=(batch, dim))).astype(np.float32)
      ids = rng.integers(0, batch // 3, batch).astype(np.int32) if with_ids else None
      kw = dict(block_size=block)

      def ring(x, y, scale, bias, ids):
        loss = bce_jax.pairwise_sigmoid_loss(
            x, y, scale=scale, bias=bias, positives=ids, axis_name="data", **kw)
        return loss, loss[None]  # the value, and each device's copy of it

      specs = (P("data"), P("data"), P(), P(), P("data") if with_ids else None)
      mapped = jax.shard_map(ring, mesh=mesh, in_specs=specs, out_specs=(P(), P("data")),
                             check_vma=check)
      step = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2, 3), has_aux=True))
      one = jax.jit(jax.value_and_grad(
          lambda x, y, s, b, i: bce_jax.pairwise_sigmoid_loss(
              x, y, scale=s, bias=b, positives=i, **kw), argnums=(0, 1, 2, 3)))
      scale, bias = jnp.float32(3.0), jnp.float32(-2.0)
      put = lambda a: None if a is None else jax.device_put(a, rows)
      with jax.set_mesh(mesh):
        (value, copies), grads = step(put(x), put(y), scale, bias, put(ids))
      value1, grads1 = one(x, y, scale, bias, ids)
      want = reference(x, y, 3.0, -2.0, ids)
      rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b))
                               / max(np.max(np.abs(b)), 1e-30))
      out[f"{batch}/{dim}/{block}/{with_ids}/{check}"] = {
          "copies_equal": bool(np.all(np.asarray(copies) == np.asarray(copies)[0])),
          "value_vs_one": rel(value, np.float64(value1)),
          "value_vs_ref": rel(value, want[0]),
          "grads_vs_one": max(rel(g, np.asarray(h, np.float64)) for g, h in zip(grads, grads1)),
          "grads_vs_ref": max(rel(g, w) for g, w in zip(grads, want[1:])),
      }

    # axis_name=None inside shard_map: each device's own loss, here averaged.
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = (x + rng.normal(size=(64, 16))).astype(np.float32)

    def local(x, y, scale, bias):
      loss = bce_jax.pairwise_sigmoid_loss(x, y, scale=scale, bias=bias, block_size=3)
      return jax.lax.pmean(loss, "data")

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                           out_specs=P())
    with jax.set_mesh(mesh):
      value, grads = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2, 3)))(
          put(x), put(y), jnp.float32(3.0), jnp.float32(-2.0))
    parts = [reference(x[i:i + 8], y[i:i + 8], 3.0, -2.0) for i in range(0, 64, 8)]
    want = [np.mean([p[0] for p in parts]), np.concatenate([p[1] for p in parts]) / 8,
            np.concatenate([p[2] for p in parts]) / 8, np.mean([p[3] for p in parts]),
            np.mean([p[4] for p in parts])]
    out["local"] = {"copies_equal": True, "value_vs_one": 0.0, "grads_vs_one": 0.0,
                    "value_vs_ref": rel(value, want[0]),
                    "grads_vs_ref": max(rel(g, w) for g, w in zip(grads, want[1:]))}
    print(json.dumps(out))
    """
)


class RingTest(absltest.TestCase):
  def test_eight_devices_equal_one(self):
    proc = _host_devices.run(_RING_SCRIPT, devices=8, timeout=300)
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    self.assertEqual(proc.returncode, 0, output)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertLen(results, 4, output)
    for case, result in results.items():
      with self.subTest(case=case):
        self.assertTrue(result["copies_equal"], result)
        self.assertLess(result["value_vs_one"], 1e-6, result)
        self.assertLess(result["value_vs_ref"], VALUE_RTOL, result)
        self.assertLess(result["grads_vs_one"], 1e-6, result)
        self.assertLess(result["grads_vs_ref"], GRAD_TOL, result)


if __name__ == "__main__":
  absltest.main()
