"""Guards the program a GPU gets, on a machine without one, through cross-lowering.

jax lowers a function for CUDA on a CPU-only machine
(``jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))``): the
StableHLO it prints is the program XLA:GPU receives. XLA:GPU's own passes
cannot run here, so these tests assert what the lowering shows, and the
module docstring of ``bce_jax/_kernel.py`` says what that buys:

* ``value_and_grad`` (one pass): beside a derivative, the value is the sum of
  the element losses that the derivative's elementwise pass computes, from
  the same inputs with nothing between them: no ``optimization_barrier``
  over an array of N elements (the CPU rule's barriers would keep XLA:GPU
  from fusing the reduction with the gradient's pass, and it would read the
  inputs twice, as on the H200 at 37b2748: 1.65-2.12x the floor), and one
  reduction of N elements on the fast path. XLA:GPU fuses such siblings into
  one multi-output fusion: inputs read once, only the gradient written.
* bfloat16 logits get a bfloat16 gradient (f32 math inside the fusion, never
  an f32 array of N elements returned).
* The CPU lowering of the same function keeps the CPU rule (its barriers):
  the choice is made per platform, at lowering time, in
  ``_kernel._value_for_platform``.

The one-pass rule's numerics are checked on CPU too, by putting it in place
of the platform choice (a test-only substitution): values and gradients
against float64, padding full of nan, the infinite-logit fallback, forward
mode and Hessians.
"""

from __future__ import annotations

import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import bce_jax
from bce_jax import _kernel
from tests import _reference as ref

N = 1 << 16  # lowering only: the size just has to be recognizable

SHAPES = {
  "flat": (N,),
  "column": (N, 1),
  "rows2": (N // 2, 2),
  "rows8": (N // 8, 8),
  "rank3": (N // 64, 8, 8),
}
PATHS = ("default", "weighted", "masked", "none", "probabilities", "focal")

_TENSOR = re.compile(r"tensor<(?P<dims>(?:\d+x)*)(?P<dtype>[a-z]+\d*)>")


def _count(dims: str) -> int:
  out = 1
  for d in filter(None, dims.split("x")):
    out *= int(d)
  return out


def _n_element_tensors(text: str):
  """(dtype) of each N-element tensor type mentioned in `text`."""
  return [m.group("dtype") for m in _TENSOR.finditer(text) if _count(m.group("dims")) == N]


def _reduces_n_elements(line: str) -> bool:
  """Whether `line` is a reduction of an N-element operand over axes longer than 1.

  A rank-1 operand of N elements is per-sample losses (``reduction="none"`` of
  an `[N, 1]` input), summed by the test's own ``jnp.sum``: not the loss's pass.
  """
  if "stablehlo.reduce(" not in line:
    return False
  operand = _TENSOR.search(line.split("->")[0].split(":")[-1])
  axes = re.search(r"dimensions = \[([\d, ]*)\]", line)
  if operand is None or axes is None or _count(operand.group("dims")) != N:
    return False
  dims = [int(d) for d in filter(None, operand.group("dims").split("x"))]
  reduced = [dims[int(a)] for a in axes.group(1).split(",") if a.strip()]
  return len(dims) > 1 and any(d > 1 for d in reduced)


def fast_path_lines(stablehlo: str) -> list[str]:
  """The lines outside every fallback branch.

  ``lax.cond(pred, safe, fast)`` lowers to ``stablehlo.case`` on ``int(pred)``
  with the fast (false) branch first; ``platform_dependent`` lowered for one
  platform keeps that platform's branch alone, also first. So the fast path
  is region 0 of every enclosing ``case``.
  """
  lines, stack = [], []  # stack: the region index inside each open case
  for line in stablehlo.splitlines():
    stripped = line.strip()
    if stripped.startswith("}, {") and stack:
      stack[-1] += 1
      continue
    if stripped.startswith("})") and stack:
      stack.pop()
      continue
    if all(region == 0 for region in stack):
      lines.append(line)
    if '"stablehlo.case"' in line and line.rstrip().endswith("({"):
      stack.append(0)
  return lines


def _cell(path: str, shape: tuple[int, ...], dtype: str):
  """`value_and_grad` w.r.t. the predictions of one cell, and its abstract arguments."""
  pred = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  label = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  batch = (shape[0],) if len(shape) > 1 else ()
  logits = path != "probabilities"
  if path == "focal":
    loss = bce_jax.BinaryFocalCrossentropy(from_logits=True)
  else:
    reduction = "none" if path == "none" else "sum_over_batch_size"
    loss = bce_jax.BinaryCrossentropy(from_logits=logits, reduction=reduction)
  extra = ()
  if path == "weighted":
    extra = (jax.ShapeDtypeStruct(batch, jnp.float32),)
    fn = lambda x, y, w: jnp.sum(loss(y, x, sample_weight=w))
  elif path == "masked":
    extra = (jax.ShapeDtypeStruct(batch, jnp.bool_),)
    fn = lambda x, y, m: jnp.sum(loss(y, x, mask=m))
  else:
    fn = lambda x, y: jnp.sum(loss(y, x))
  return jax.value_and_grad(fn), (pred, label, *extra)


def lowered_text(path: str, shape_name: str, dtype: str, platform: str) -> str:
  fn, args = _cell(path, SHAPES[shape_name], dtype)
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


class OnePassGradientTest(parameterized.TestCase):
  """The CUDA program of ``value_and_grad``: nothing between the value and the gradient."""

  @parameterized.product(path=PATHS, shape_name=list(SHAPES), dtype=("float32", "bfloat16"))
  def test_cuda_value_and_gradient_share_one_pass(self, path, shape_name, dtype):
    if path == "weighted" and len(SHAPES[shape_name]) == 1:
      self.skipTest("a rank-1 input is one sample: its weight is a scalar")
    text = lowered_text(path, shape_name, dtype, "cuda")
    barriers = [
      line.strip()[:200]
      for line in text.splitlines()
      if "optimization_barrier" in line and _n_element_tensors(line)
    ]
    self.assertEqual(barriers, [], msg="an N-element barrier splits the pass")
    fast = fast_path_lines(text)
    reductions = [line.strip()[:200] for line in fast if _reduces_n_elements(line)]
    # Per-sample losses of one element each are the element losses: no reduction.
    per_sample_elements = path == "none" and SHAPES[shape_name][-1] == 1
    self.assertLen(reductions, 0 if per_sample_elements else 1, msg="\n".join(reductions))
    # The gradient comes back in the predictions' dtype.
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    results = main.split("->", 1)[1]
    self.assertEqual(_n_element_tensors(results), [{"float32": "f32", "bfloat16": "bf16"}[dtype]])

  @parameterized.parameters("rows8", "column", "flat")
  def test_cpu_keeps_its_barriers(self, shape_name):
    # The control: the same function lowered for CPU takes the CPU rule,
    # whose barriers over the inputs the test above would flag.
    text = lowered_text("default", shape_name, "float32", "cpu")
    barriers = [
      line
      for line in text.splitlines()
      if "optimization_barrier" in line and _n_element_tensors(line)
    ]
    self.assertNotEmpty(barriers)

  def test_forward_alone_is_unchanged_on_cuda(self):
    # Without a derivative the value is the kernel's own fast path, on every platform.
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    arg = jax.ShapeDtypeStruct(SHAPES["rows8"], jnp.float32)
    text = jax.jit(loss).trace(arg, arg).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("optimization_barrier", text)


class OnePassRuleNumericsTest(parameterized.TestCase):
  """The GPU rule, run on CPU in place of the platform choice."""

  def setUp(self):
    super().setUp()
    jax.clear_caches()  # nothing traced with the CPU rule may be reused
    patch = mock.patch.object(_kernel, "_value_for_platform", _kernel._one_pass_value)
    patch.start()
    self.addCleanup(patch.stop)
    self.addCleanup(jax.clear_caches)  # nor anything traced here, after the test

  @parameterized.product(
    shape=((40, 1), (12, 8), (5, 3, 4), (_kernel._FAST_MIN_SIZE // 8, 8)),
    reduction=("sum_over_batch_size", "mean_with_sample_weight", "none"),
    from_logits=(True, False),
  )
  def test_value_and_grad_against_float64(self, shape, reduction, from_logits):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, shape)
    x = x if from_logits else ref.sigmoid(x)
    y = (rng.random(shape) < 0.4).astype(np.float32)
    w = rng.uniform(0.5, 1.5, shape[:1]).astype(np.float32)
    m = np.arange(shape[0]) % 4 != 1
    pad = m.reshape((-1,) + (1,) * (len(shape) - 1))
    x_pad = np.where(pad, x, np.nan).astype(np.float32)  # excluded rows full of nan
    loss = bce_jax.BinaryCrossentropy(from_logits=from_logits, reduction=reduction)

    def f(x):
      out = loss(y, x, sample_weight=w, mask=m)
      return jnp.sum(out), out

    (_, value), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(x_pad))
    per_sample = ref.mean_over(ref.elementwise(y, x.astype(np.float32), from_logits), -1)
    np.testing.assert_allclose(value, ref.reduce(per_sample, reduction, w, m), rtol=2e-5)
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[~m], 0.0)

  def test_bfloat16_gradient_stays_bfloat16(self):
    x = jnp.asarray(np.random.default_rng(2).normal(0, 3, (64, 8)), jnp.bfloat16)
    y = jnp.zeros((64, 8), jnp.bfloat16).at[::3].set(1)
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    value, grad = jax.jit(jax.value_and_grad(lambda x: loss(y, x)))(x)
    self.assertEqual(grad.dtype, jnp.bfloat16)
    x32 = np.asarray(x, np.float32)
    want = ref.grad_logits(np.asarray(y, np.float32), x32) / x32.size
    np.testing.assert_allclose(np.asarray(grad, np.float32), want, rtol=1e-2, atol=1e-7)
    np.testing.assert_allclose(value, ref.elementwise(np.asarray(y), x32, True).mean(), rtol=1e-6)

  def test_infinite_logits_fall_back(self):
    shape = (_kernel._FAST_MIN_SIZE // 8, 8)
    rng = np.random.default_rng(3)
    x = rng.normal(0, 3, shape).astype(np.float32)
    y = (rng.random(shape) < 0.5).astype(np.float32)
    x[0, 0], y[0, 0] = np.inf, 1.0  # matched: loss 0, derivative 0
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    value, grad = jax.jit(jax.value_and_grad(lambda x: loss(y, x)))(x)
    want = ref.elementwise(y, np.clip(x, -1e4, 1e4), from_logits=True).mean()
    np.testing.assert_allclose(value, want, rtol=2e-5)
    self.assertEqual(float(grad[0, 0]), 0.0)
    y[0, 0] = 0.0  # mismatched: +inf, not nan
    value, _ = jax.jit(jax.value_and_grad(lambda x: loss(y, x)))(x)
    self.assertEqual(float(value), np.inf)

  def test_forward_mode_and_hessian(self):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(0, 2, (6, 3)), jnp.float32)
    y = jnp.asarray(rng.random((6, 3)) < 0.5, jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 1.5, (6,)), jnp.float32)
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    f = lambda x: loss(y, x, sample_weight=w)
    dx = jnp.ones_like(x)
    _, tangent = jax.jvp(f, (x,), (dx,))
    coef = np.asarray(w)[:, None] / (3 * 6)
    grad = ref.grad_logits(np.asarray(y), np.asarray(x)) * coef
    np.testing.assert_allclose(tangent, grad.sum(), rtol=1e-5)
    hess = jax.jit(jax.hessian(f))(x)
    want = np.diag((ref.hess_logits(np.asarray(y), np.asarray(x)) * coef).reshape(-1))
    np.testing.assert_allclose(np.asarray(hess).reshape(18, 18), want, rtol=1e-5, atol=1e-9)


if __name__ == "__main__":
  absltest.main()
