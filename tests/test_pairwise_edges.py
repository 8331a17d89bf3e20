"""The pairwise sigmoid loss at its edges: 64-bit ids, `checked()`, a vmapped
`axis_name`, and the row mask, against the float64 reference.

* 64-bit `positives` past int32 stay distinct (JAX alone would narrow
  ``2**32 + 7`` to 7 and merge it with 7);
* under ``bce_jax.checked``, a nan or inf in `x`, `y`, `scale` or `bias`
  raises naming the argument (not in rows the mask excludes), and
  ``jax.jit(checked(...))`` is refused;
* an `axis_name` bound by ``jax.vmap`` is refused naming `axis_name`;
* `mask`: the value and gradients equal the dense formula on the included
  rows (excluded rows holding nan and inf get exactly zero gradients), on
  one device, with blocks that do not divide B, with `positives`, jitted
  and not, and on the 8-device ring with B padded to a multiple of 8.
"""

from __future__ import annotations

import functools
import json
import textwrap
from unittest import mock

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import strategies as st

import bce_jax
from bce_jax import _pairwise
from tests import _host_devices
from tests import _reference as ref
from tests.test_errors import _primitives

SCALE, BIAS = 3.0, -2.0
VALUE_RTOL, GRAD_TOL = 2e-6, 2e-6


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _data(batch, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  y = (x + rng.normal(size=(batch, dim))).astype(np.float32)
  return x, y, rng


def _poisoned(x, y, mask):
  """`x` and `y` with nan and inf in the rows `mask` excludes."""
  x, y = x.copy(), y.copy()
  x[~mask], y[~mask] = np.nan, np.inf
  y[~mask, 0] = -np.inf
  return x, y


def _loss(x, y, scale, bias, positives=None, mask=None, block_size=None):
  return bce_jax.pairwise_sigmoid_loss(
    x, y, scale=scale, bias=bias, positives=positives, mask=mask, block_size=block_size
  )


@functools.cache
def _value_and_grads(block_size, jit):
  fn = jax.value_and_grad(functools.partial(_loss, block_size=block_size), argnums=(0, 1, 2, 3))
  return jax.jit(fn) if jit else fn


class IdsTest(parameterized.TestCase):
  X = np.eye(3, dtype=np.float32)

  @parameterized.named_parameters(
    ("int64", np.array([7, 2**32 + 7, 9], np.int64)),
    ("uint64", np.array([7, 2**32 + 7, 9], np.uint64)),
    ("python_ints", [7, 2**32 + 7, 9]),
    ("same_low_half", np.array([-1, 2**32 - 1, 2**40 - 1], np.int64)),
  )
  def test_ids_past_int32_stay_distinct(self, ids):
    # Three distinct ids: only the diagonal is positive.
    want = ref.pairwise_sigmoid(self.X, self.X, 10.0, -5.0, np.arange(3))[0]
    self.assertAlmostEqual(want, 0.0201, places=4)  # the value
    got = bce_jax.pairwise_sigmoid_loss(self.X, self.X, scale=10.0, bias=-5.0, positives=ids)
    np.testing.assert_allclose(float(got), want, rtol=VALUE_RTOL)
    # Closed over by a jitted function, the ids are a constant and keep all 64 bits.
    jitted = jax.jit(
      lambda x: bce_jax.pairwise_sigmoid_loss(x, x, scale=10.0, bias=-5.0, positives=ids)
    )
    np.testing.assert_allclose(float(jitted(self.X)), want, rtol=VALUE_RTOL)

  def test_equal_64_bit_ids_group_rows(self):
    x, y, _ = _data(6)
    ids = np.array([2**40 + 1, 5, 2**40 + 1, 2**33 + 5, 5, -(2**50)], np.int64)
    # Eager: a jitted function's int64 argument is narrowed by JAX at its boundary.
    value, grads = _value_and_grads(4, False)(x, y, jnp.float32(SCALE), jnp.float32(BIAS), ids)
    want = ref.pairwise_sigmoid(x, y, SCALE, BIAS, ids)
    np.testing.assert_allclose(float(value), want[0], rtol=VALUE_RTOL)
    for got, w in zip(grads, want[1:]):
      self.assertLess(_rel(got, w), GRAD_TOL)

  def test_64_bit_types_on(self):
    x, y, _ = _data(5)
    ids = np.array([2**33, 1, 2**33 + 1, 1, 2**33], np.int64)
    want = ref.pairwise_sigmoid(x, y, SCALE, BIAS, ids)[0]
    with jax.enable_x64(True):
      jitted = jax.jit(functools.partial(_loss, block_size=2))
      np.testing.assert_allclose(
        float(jitted(x, y, SCALE, BIAS, jnp.asarray(ids))), want, rtol=1e-6
      )


class CheckedTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("x_nan", "x", np.nan, False),
    ("x_inf", "x", np.inf, True),
    ("y_nan", "y", np.nan, True),
    ("y_minus_inf", "y", -np.inf, False),
    ("scale_nan", "scale", np.nan, False),
    ("scale_inf", "scale", np.inf, True),
    ("bias_nan", "bias", np.nan, True),
    ("bias_minus_inf", "bias", -np.inf, False),
  )
  def test_non_finite_raises_naming_the_argument(self, name, bad, jit_inside):
    x, y, _ = _data(6)
    args = {"x": x, "y": y, "scale": np.float32(SCALE), "bias": np.float32(BIAS)}
    if name in ("x", "y"):
      args[name] = args[name].copy()
      args[name][2, 1] = bad
    else:
      args[name] = np.float32(bad)
    fn = jax.jit(_loss) if jit_inside else _loss
    with self.assertRaisesRegex(bce_jax.ValueCheckError, rf"^{name} contains nan or inf"):
      bce_jax.checked(fn)(*args.values())
    jax.block_until_ready(fn(*args.values()))  # unchecked, the same values just compute

  @parameterized.parameters(False, True)
  def test_good_values_and_masked_rows_pass_unchanged(self, jit_inside):
    x, y, _ = _data(6)
    mask = np.array([True, True, False, True, False, True])
    xp, yp = _poisoned(x, y, mask)
    fn = jax.jit(_loss) if jit_inside else _loss
    safe = bce_jax.checked(fn)
    self.assertEqual(float(safe(x, y, SCALE, BIAS)), float(fn(x, y, SCALE, BIAS)))
    self.assertEqual(
      float(safe(xp, yp, SCALE, BIAS, None, mask)), float(fn(x, y, SCALE, BIAS, None, mask))
    )
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^x contains nan"):
      safe(xp, yp, SCALE, BIAS, None, mask | (np.arange(6) == 2))

  def test_train_step_and_loss_object(self):
    loss = bce_jax.PairwiseSigmoidLoss(block_size=4)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    x, y, _ = _data(6)
    safe = bce_jax.checked(step)
    value, _ = safe(x, y, SCALE, BIAS)
    self.assertEqual(float(value), float(step(x, y, SCALE, BIAS)[0]))
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^scale"):
      safe(x, y, np.float32(np.nan), BIAS)

  @parameterized.named_parameters(("jit", jax.jit), ("vmap", jax.vmap), ("grad", jax.grad))
  def test_transforming_checked_is_refused(self, transform):
    x, y, _ = _data(4)
    safe = bce_jax.checked(jax.jit(lambda x: _loss(x, y, SCALE, BIAS)))
    with self.assertRaisesRegex(TypeError, r"checked\(jax\.jit\(f\)\)"):
      transform(safe)(np.stack([x, x]) if transform is jax.vmap else x)

  def test_unchecked_trace_has_no_check(self):
    x, y, _ = _data(4)
    mask = np.ones(4, bool)
    prims = _primitives(jax.make_jaxpr(jax.grad(_loss))(x, y, SCALE, BIAS, None, mask))
    self.assertIn("dot_general", prims)  # the walk reaches inside the custom VJP
    self.assertNotIn("check", prims)


class AxisNameTest(absltest.TestCase):
  def test_axis_bound_by_vmap_is_refused(self):
    x = jnp.ones((2, 3, 4))
    fn = lambda a: bce_jax.pairwise_sigmoid_loss(a, a, scale=1.0, bias=0.0, axis_name="batch")
    with self.assertRaisesRegex(
      ValueError, r"`axis_name` 'batch' must name mesh axes of .*shard_map"
    ):
      jax.vmap(fn, axis_name="batch")(x)
    loss = bce_jax.PairwiseSigmoidLoss(axis_name="batch")
    with self.assertRaisesRegex(ValueError, r"`axis_name` 'batch' must name mesh axes"):
      jax.jit(jax.vmap(lambda a: loss(a, a, 1.0, 0.0), axis_name="batch"))(x)


# (B, block_size, with positives): tiles that divide B and tiles that do not.
_MASK_CASES = [(1, None, False), (10, 3, False), (10, 3, True), (37, 8, True), (64, None, False)]
_MASK_CASES += [(64, 48, True)]


class MaskTest(parameterized.TestCase):
  @parameterized.parameters(*[(*c, True) for c in _MASK_CASES], (10, 3, True, False))
  def test_value_and_gradients_with_nan_padding(self, batch, block, with_ids, jit):
    x, y, rng = _data(batch, seed=batch)
    mask = rng.random(batch) < 0.7
    mask[0] = True
    # Excluded rows share ids with included ones: they still pair with nothing.
    ids = rng.integers(0, max(batch // 3, 1), batch).astype(np.int32) if with_ids else None
    xp, yp = _poisoned(x, y, mask)
    value, grads = _value_and_grads(block, jit)(
      xp, yp, jnp.float32(SCALE), jnp.float32(BIAS), ids, mask
    )
    want = ref.pairwise_sigmoid(x, y, SCALE, BIAS, ids, mask)
    np.testing.assert_allclose(float(value), want[0], rtol=VALUE_RTOL)
    for name, got, w in zip(("x", "y", "scale", "bias"), grads, want[1:]):
      self.assertTrue(np.all(np.isfinite(got)), name)
      self.assertLess(_rel(got, w), GRAD_TOL, name)
    np.testing.assert_array_equal(grads[0][~mask], 0.0)  # exactly
    np.testing.assert_array_equal(grads[1][~mask], 0.0)

  def test_padded_batch_equals_unpadded(self):
    # The case: 100 rows padded to 104 changed the loss.
    x, y, _ = _data(100, 16)
    pad = lambda a: np.concatenate([a, np.full((4, 16), np.nan, np.float32)])
    mask = np.arange(104) < 100
    args = (jnp.float32(SCALE), jnp.float32(BIAS), None)
    padded, padded_grads = _value_and_grads(None, True)(pad(x), pad(y), *args, mask)
    whole, whole_grads = _value_and_grads(None, True)(x, y, *args, None)
    np.testing.assert_allclose(float(padded), float(whole), rtol=1e-6)
    self.assertLess(_rel(padded_grads[0][:100], whole_grads[0]), 1e-6)
    self.assertLess(_rel(padded_grads[1][:100], whole_grads[1]), 1e-6)
    np.testing.assert_allclose(padded_grads[2:], whole_grads[2:], rtol=1e-6)
    np.testing.assert_array_equal(padded_grads[0][100:], 0.0)

  @parameterized.parameters(False, True)
  def test_all_masked_is_zero_not_nan(self, jit):
    x, y, _ = _data(5)
    mask = np.zeros(5, bool)
    xp, yp = _poisoned(x, y, mask)
    value, grads = _value_and_grads(2, jit)(
      xp, yp, jnp.float32(SCALE), jnp.float32(BIAS), None, mask
    )
    self.assertEqual(float(value), 0.0)
    for g in grads:
      np.testing.assert_array_equal(g, 0.0)

  def test_recompute_schedule_with_mask(self):
    x, y, rng = _data(20)
    mask = rng.random(20) < 0.5
    xp, yp = _poisoned(x, y, mask)
    with mock.patch.object(_pairwise, "_MODE", "recompute"):
      value, grads = _value_and_grads(6, False)(
        xp, yp, jnp.float32(SCALE), jnp.float32(BIAS), None, mask
      )
    want = ref.pairwise_sigmoid(x, y, SCALE, BIAS, None, mask)
    np.testing.assert_allclose(float(value), want[0], rtol=VALUE_RTOL)
    for got, w in zip(grads, want[1:]):
      self.assertLess(_rel(got, w), GRAD_TOL)

  def test_loss_object_takes_the_mask(self):
    loss = bce_jax.PairwiseSigmoidLoss(block_size=4)
    x, y, _ = _data(9)
    mask = np.arange(9) % 3 != 1
    xp, yp = _poisoned(x, y, mask)
    want = ref.pairwise_sigmoid(x, y, SCALE, BIAS, None, mask)[0]
    np.testing.assert_allclose(float(loss(xp, yp, SCALE, BIAS, None, mask)), want, rtol=VALUE_RTOL)
    got = jax.jit(loss)(xp, yp, SCALE, BIAS, mask=mask)
    np.testing.assert_allclose(float(got), want, rtol=VALUE_RTOL)

  @hypothesis.settings(max_examples=8)
  @hypothesis.given(
    batch=st.integers(1, 12),
    block=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    with_ids=st.booleans(),
  )
  def test_any_mask_is_the_dense_formula_on_the_kept_rows(self, batch, block, seed, with_ids):
    x, y, rng = _data(batch, 3, seed)
    mask = rng.random(batch) < 0.6
    ids = rng.integers(0, 3, batch).astype(np.int32) if with_ids else None
    xp, yp = _poisoned(x, y, mask)
    value, grads = _value_and_grads(block, True)(
      xp, yp, jnp.float32(SCALE), jnp.float32(BIAS), ids, mask
    )
    want = ref.pairwise_sigmoid(x, y, SCALE, BIAS, ids, mask)
    np.testing.assert_allclose(float(value), want[0], rtol=VALUE_RTOL, atol=1e-30)
    for got, w in zip(grads, want[1:]):
      self.assertLess(float(np.max(np.abs(np.asarray(got, np.float64) - w), initial=0)), 1e-5)

  @parameterized.named_parameters(
    ("shape", np.ones(3, bool), ValueError, r"`mask` must have shape \[batch\]=\(4,\)"),
    ("rank", np.ones((4, 1), bool), ValueError, r"`mask` must have shape"),
    ("int", np.ones(4, np.int32), TypeError, r"`mask` must be a boolean array.*astype\(bool\)"),
    ("float", np.ones(4, np.float32), TypeError, r"`mask` must be a boolean"),
    ("string", "all", TypeError, r"`mask`"),
  )
  def test_bad_mask(self, mask, error, message):
    x = np.zeros((4, 3), np.float32)
    with self.assertRaisesRegex(error, message):
      bce_jax.pairwise_sigmoid_loss(x, x, scale=1.0, bias=0.0, mask=mask)
    if not isinstance(mask, str):
      with self.assertRaisesRegex(error, message):  # while tracing, too
        jax.jit(lambda x, m: bce_jax.pairwise_sigmoid_loss(x, x, scale=1.0, bias=0.0, mask=m))(
          x, mask
        )


# On 8 host devices: B = 100 padded to 104 (13 rows a device), the padding
# (and some scattered rows) excluded by the mask and holding nan; the ring's
# value and gradients against one device on the unpadded batch and the
# float64 reference; an all-masked batch; checked() on the ring.
_RING_SCRIPT = textwrap.dedent(
  """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import bce_jax
    from tests import _reference as ref

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",))
    put = lambda a: None if a is None else jax.device_put(a, NamedSharding(mesh, P("data")))
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b))
                             / max(np.max(np.abs(b)), 1e-30))
    scale, bias = jnp.float32(3.0), jnp.float32(-2.0)

    def mapped(block, with_ids, check=True):
      def ring(x, y, scale, bias, ids, mask):
        return bce_jax.pairwise_sigmoid_loss(x, y, scale=scale, bias=bias, positives=ids,
                                             mask=mask, block_size=block, axis_name="data")
      specs = (P("data"), P("data"), P(), P(), P("data") if with_ids else None, P("data"))
      return jax.shard_map(ring, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check)

    def one(x, y, s, b, ids, block):
      return bce_jax.pairwise_sigmoid_loss(x, y, scale=s, bias=b, positives=ids, block_size=block)

    out = {}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(104, 8)).astype(np.float32)
    y = (x + rng.normal(size=(104, 8))).astype(np.float32)
    ids = rng.integers(0, 30, 104).astype(np.int32)
    # (block, positives, scattered excluded rows, check_vma)
    for block, with_ids, scattered, check in [(5, False, False, True), (None, True, True, False)]:
      mask = np.arange(104) < 100
      if scattered:
        mask[[3, 50, 51, 77]] = False
      xp, yp = x.copy(), y.copy()
      xp[~mask], yp[~mask] = np.nan, -np.inf
      i = ids if with_ids else None
      step = jax.jit(jax.value_and_grad(mapped(block, with_ids, check), argnums=(0, 1, 2, 3)))
      with jax.set_mesh(mesh):
        value, grads = step(put(xp), put(yp), scale, bias, put(i), put(mask))
      keep = lambda a: None if a is None else a[mask]
      unpadded = jax.jit(jax.value_and_grad(one, argnums=(0, 1, 2, 3)), static_argnums=5)
      value1, grads1 = unpadded(x[mask], y[mask], scale, bias, keep(i), block)
      want = ref.pairwise_sigmoid(x, y, 3.0, -2.0, i, mask)
      g = [np.asarray(a) for a in grads]
      out[f"{block}/{with_ids}/{scattered}/{check}"] = {
          "value_vs_one": rel(value, np.float64(value1)),
          "value_vs_ref": rel(value, want[0]),
          "grads_vs_one": max(rel(g[k][mask], np.asarray(grads1[k], np.float64)) for k in (0, 1)),
          "scalars_vs_one": max(rel(g[k], np.float64(grads1[k])) for k in (2, 3)),
          "grads_vs_ref": max(rel(a, w) for a, w in zip(g, want[1:])),
          "excluded_grads_zero": bool(np.all(g[0][~mask] == 0) and np.all(g[1][~mask] == 0)),
      }

    none = np.zeros(104, bool)
    with jax.set_mesh(mesh):
      value, grads = jax.jit(jax.value_and_grad(mapped(4, False), argnums=(0, 1, 2, 3)))(
          put(np.full_like(x, np.nan)), put(y), scale, bias, None, put(none))
    out["all_masked"] = {"value": float(value),
                         "grads_zero": all(bool(np.all(np.asarray(a) == 0)) for a in grads)}

    # checked() inside shard_map: checkify needs Auto mesh axes and no context
    # mesh there (jax-ml/jax#40907).
    mask = np.arange(104) < 100
    xp = x.copy()
    xp[~mask] = np.nan
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    safe = bce_jax.checked(jax.jit(mapped(4, False)))
    ok = float(safe(put(xp), put(y), scale, bias, None, put(mask)))
    try:
      safe(put(xp), put(y), scale, bias, None, put(np.ones(104, bool)))
      raised = ""
    except bce_jax.ValueCheckError as e:
      raised = str(e)
    out["checked"] = {"value_vs_ref": rel(ok, ref.pairwise_sigmoid(x, y, 3.0, -2.0, None, mask)[0]),
                      "raised": raised}
    print(json.dumps(out))
    """
)


class RingTest(absltest.TestCase):
  def test_eight_devices_with_padding_rows(self):
    proc = _host_devices.run(_RING_SCRIPT, devices=8, timeout=300)
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    self.assertEqual(proc.returncode, 0, output)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertLen(results, 4, output)
    self.assertEqual(results.pop("all_masked"), {"value": 0.0, "grads_zero": True})
    checked = results.pop("checked")
    self.assertLess(checked["value_vs_ref"], VALUE_RTOL, checked)
    self.assertRegex(checked["raised"], r"^(at mapped index \d+: )?x contains nan or inf")
    for case, result in results.items():
      with self.subTest(case=case):
        self.assertTrue(result.pop("excluded_grads_zero"), result)
        self.assertLess(result["value_vs_one"], 1e-6, result)
        self.assertLess(result["value_vs_ref"], VALUE_RTOL, result)
        self.assertLess(result["grads_vs_one"], 1e-6, result)
        self.assertLess(result["scalars_vs_one"], 1e-6, result)
        self.assertLess(result["grads_vs_ref"], GRAD_TOL, result)


if __name__ == "__main__":
  absltest.main()
