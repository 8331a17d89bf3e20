"""Regression tests: one per defect of an earlier version, each pinned to the documented rule.

Each test failed on the package as it was before the internals were rewritten (the
`_functional.py` / `_checks.py` layout) and passes now; the comments cite the README or
the docstring that states the rule. Numbers are compared with the float64 NumPy formulas
of tests/_reference.py.
"""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import bce_jax
from tests import _reference as ref

F32_EPS = float(np.finfo(np.float32).eps)
B, T, L, F = 4, 3, 5, 3  # batch, time, classes, features of the toy model `x @ w`
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(bce_jax.__file__)))


def _run_python(code, timeout=120, **env):
  """Runs `code` in a fresh interpreter importing this checkout's bce_jax; returns stdout."""
  full_env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS="cpu", **env)
  proc = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    env=full_env,
    cwd=_REPO,
    capture_output=True,
    check=False,
    text=True,
    timeout=timeout,
  )
  if proc.returncode:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc.stdout


# --------------------------------------------------------------------------
# 1. Excluded entries (mask False or weight exactly 0) are inert, whatever they hold.

_GARBAGE_LABELS = (np.nan, -1.0, 2.0, np.nan, 0.5)
_GARBAGE_LOGITS = (np.nan, np.inf, -np.inf, 1e30, np.nan)
_GARBAGE_PROBS = (np.nan, np.inf, -np.inf, 2.0, -1.0)
_REDUCTIONS = ("sum_over_batch_size", "sum", "mean_with_sample_weight", "none")


# Per-sample shapes. bce_jax/_kernel.py computes small inputs on its safe path alone and
# large ones on a fast path that falls back to the safe one when its sum is nan (as
# padding makes it): "large" (40960 elements) is well above that threshold (2^14).
_PER_SAMPLE = {
  ("small", 2): (B,),
  ("small", 3): (B, T),
  ("large", 2): (8192,),
  ("large", 3): (1024, 8),
}


def _padded_batch(rank, from_logits, exclusion, seed=0, size="small"):
  """A batch for the model ``preds = base + x @ w``, clean and with garbage padding.

  Returns a dict with `x`, `w`, `y`/`base` (clean), `y_pad`/`base_pad` (garbage in the
  excluded entries), `sample_weight`, `mask` (None where unused) and `keep` (bool, the
  per-sample shape: True where the entry counts).
  """
  rng = np.random.default_rng(seed)
  per_sample = _PER_SAMPLE[size, rank]
  shape = per_sample + (L,)
  keep = rng.uniform(size=per_sample) > 0.1  # about 10% excluded ...
  keep.flat[[1, keep.size - 1]] = False  # ... and at least two, one of them the last
  y = rng.integers(0, 2, shape).astype(np.float32)
  base = rng.normal(0, 2, shape) if from_logits else rng.uniform(0.2, 0.8, shape)
  y_pad, base_pad = y.copy(), base.copy()
  garbage_preds = _GARBAGE_LOGITS if from_logits else _GARBAGE_PROBS
  y_pad[~keep] = _GARBAGE_LABELS
  base_pad[~keep] = garbage_preds
  weight = rng.uniform(0.5, 2.0, per_sample).astype(np.float32)
  batch = {
    "x": rng.uniform(-1, 1, per_sample + (F,)).astype(np.float32),
    "w": (0.02 * rng.normal(size=(F, L))).astype(np.float32),
    "y": y,
    "base": base.astype(np.float32),
    "y_pad": y_pad,
    "base_pad": base_pad.astype(np.float32),
    "keep": keep,
    "sample_weight": None,
    "mask": None,
  }
  if exclusion == "mask":
    batch["mask"] = keep
  else:
    batch["sample_weight"] = np.where(keep, weight, 0).astype(np.float32)
  return {k: v if v is None or k == "keep" else jnp.asarray(v) for k, v in batch.items()}


def _reference_value_and_grad(batch, from_logits, reduction):
  """The float64 value on the clean batch and its gradient in `w`, by the chain rule."""
  x, w = (np.asarray(batch[k], np.float64) for k in ("x", "w"))
  y = np.asarray(batch["y"], np.float64)
  preds = np.asarray(batch["base"], np.float64) + x @ w
  per_sample = ref.mean_over(ref.elementwise(y, preds, from_logits), -1)
  sw = None if batch["sample_weight"] is None else np.asarray(batch["sample_weight"])
  mask = batch["mask"] if batch["mask"] is None else np.asarray(batch["mask"])
  values = ref.reduce(per_sample, reduction, sw, mask)
  value = values.sum() if reduction == "none" else values
  # d value / d per-sample loss: the effective weight over the denominator.
  weight = batch["keep"] * (1.0 if sw is None else sw)
  if reduction in ("sum", "none"):
    den = 1.0
  elif reduction == "mean_with_sample_weight":
    den = weight.sum()
  else:
    den = batch["keep"].sum() if mask is not None else batch["keep"].size
  grad_elem = ref.grad_logits(y, preds) if from_logits else ref.grad_probs(y, preds)
  d_preds = grad_elem * (weight / den)[..., None] / L
  return value, x.reshape(-1, F).T @ d_preds.reshape(-1, L)


def _model(base, x, w):
  """``base + x @ w`` with the matmul in full float32.

  The tolerances below are float32's: a GPU runs a default-precision float32
  matmul in TF32 (a 10-bit mantissa), ~1e-3 off, so the precision is stated.
  """
  return base + jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)


def _objective(loss):
  """``objective(w, y, base, x, sample_weight, mask)``: the loss of the model ``base + x @ w``."""

  def objective(w, y, base, x, sample_weight, mask):
    return jnp.sum(loss(y, _model(base, x, w), sample_weight, mask))  # None: sum per-sample

  return objective


def _args(batch, padded):
  """The arguments after `w` of `_objective`, with or without the garbage."""
  y, base = (batch["y_pad"], batch["base_pad"]) if padded else (batch["y"], batch["base"])
  return y, base, batch["x"], batch["sample_weight"], batch["mask"]


class PaddingTest(parameterized.TestCase):
  """Loss.__call__ docstring: an entry of weight 0 "contributes exactly 0 to the value and
  every derivative"; masked entries likewise, "whatever they hold (nan, inf, a label of -1)".
  """

  @parameterized.product(
    (
      {"rank": 2, "size": "small"},
      {"rank": 3, "size": "small"},
      {"rank": 3, "size": "large"},  # [B, T, L] with a [B, T] mask, on the fast path
    ),
    reduction=_REDUCTIONS,
    from_logits=[True, False],
    exclusion=["mask", "zero_weight"],
  )
  def test_value_and_grad_of_model_parameter(self, reduction, from_logits, rank, exclusion, size):
    batch = _padded_batch(rank, from_logits, exclusion, size=size)
    loss = bce_jax.BinaryCrossentropy(from_logits=from_logits, reduction=reduction)
    value_and_grad = jax.jit(jax.value_and_grad(_objective(loss)))
    value, grad = value_and_grad(batch["w"], *_args(batch, padded=True))
    clean_value, clean_grad = value_and_grad(batch["w"], *_args(batch, padded=False))
    self.assertTrue(np.isfinite(value) and np.all(np.isfinite(grad)), (value, grad))
    expected_value, expected_grad = _reference_value_and_grad(batch, from_logits, reduction)
    # float32 sums of up to 40960 terms against float64.
    np.testing.assert_allclose(value, expected_value, rtol=2e-5)
    np.testing.assert_allclose(clean_value, expected_value, rtol=2e-5)
    # The padded gradient is the clean one exactly: each excluded entry adds exactly 0.
    np.testing.assert_array_equal(grad, clean_grad)
    scale = np.abs(expected_grad).max()
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5 * scale)

  def test_model_matmul_is_full_float32_whatever_the_default(self):
    # The tolerances assume a float32 matmul; TF32 (a GPU's default) is not simulated
    # on CPU, so the lowered program is checked to carry the precision itself.
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((B, L), (B, F), (F, L))]
    with jax.default_matmul_precision("tensorfloat32"):
      text = jax.jit(_model).lower(*args).as_text()
    self.assertRegex(text, r"dot_general.*precision = \[HIGHEST, HIGHEST\]")

  def test_value_does_not_depend_on_the_padding(self):
    # "Exactly 0": the value with garbage in the excluded entries is the value of the
    # same batch with ordinary numbers there, bit for bit (the gradients are compared
    # exactly in test_value_and_grad_of_model_parameter). On a batch large enough for
    # the kernel's fast path, where the padding's nan sends the sum to the fallback.
    mismatches = []
    for reduction in _REDUCTIONS:
      for from_logits in (True, False):
        loss = bce_jax.BinaryCrossentropy(from_logits=from_logits, reduction=reduction)
        objective = jax.jit(_objective(loss))
        for exclusion in ("mask", "zero_weight"):
          batch = _padded_batch(3, from_logits, exclusion, size="large")
          padded = objective(batch["w"], *_args(batch, padded=True))
          clean = objective(batch["w"], *_args(batch, padded=False))
          if padded != clean:
            mismatches.append((reduction, from_logits, exclusion, float(padded - clean)))
    self.assertEmpty(mismatches, "(reduction, from_logits, exclusion, padded - clean)")

  @parameterized.product(from_logits=[True, False], rank=[2, 3])
  def test_per_sample_losses_are_zero_where_excluded(self, from_logits, rank):
    # reduction None returns the weighted per-sample losses: exactly 0 where excluded.
    for exclusion in ("mask", "zero_weight"):
      batch = _padded_batch(rank, from_logits, exclusion, seed=1)
      loss = bce_jax.BinaryCrossentropy(from_logits=from_logits, reduction=None)
      per_sample = jax.jit(loss)(
        batch["y_pad"], batch["base_pad"], batch["sample_weight"], batch["mask"]
      )
      np.testing.assert_array_equal(np.asarray(per_sample)[~batch["keep"]], 0.0)
      self.assertTrue(np.all(np.isfinite(per_sample)))

  @parameterized.product(from_logits=[True, False], exclusion=["mask", "zero_weight"])
  def test_metric_gradient(self, from_logits, exclusion):
    batch = _padded_batch(3, from_logits, exclusion, seed=2)
    m = bce_jax.BinaryCrossentropyMetric(from_logits=from_logits)

    def result(w, padded):
      y = batch["y_pad" if padded else "y"]
      preds = _model(batch["base_pad" if padded else "base"], batch["x"], w)
      return m.result(m.update(m.init(), y, preds, batch["sample_weight"], batch["mask"]))

    grad = jax.jit(jax.value_and_grad(result), static_argnums=1)
    value, g = grad(batch["w"], True)
    clean_value, clean_g = grad(batch["w"], False)
    self.assertTrue(np.isfinite(value) and np.all(np.isfinite(g)), (value, g))
    np.testing.assert_allclose(value, clean_value, rtol=4 * F32_EPS)
    np.testing.assert_array_equal(g, clean_g)

  @parameterized.product(
    from_logits=[True, False], exclusion=["mask", "zero_weight"], jit=[True, False]
  )
  def test_forward_mode(self, from_logits, exclusion, jit):
    # jax.jvp with a tangent that is non-zero everywhere, padding included.
    batch = _padded_batch(3, from_logits, exclusion, seed=3)
    loss = bce_jax.BinaryCrossentropy(from_logits=from_logits)
    tangents = (
      jnp.asarray(np.random.default_rng(4).normal(size=batch["y"].shape), jnp.float32),
      jnp.ones_like(batch["base"]),
    )

    def jvp(y, preds):
      f = lambda y, p: loss(y, p, batch["sample_weight"], batch["mask"])
      return jax.jvp(f, (y, preds), tangents)

    jvp = jax.jit(jvp) if jit else jvp
    out, d_out = jvp(batch["y_pad"], batch["base_pad"])
    clean_out, clean_d_out = jvp(batch["y"], batch["base"])
    self.assertTrue(np.isfinite(out) and np.isfinite(d_out), (out, d_out))
    np.testing.assert_allclose(out, clean_out, rtol=4 * F32_EPS)
    self.assertEqual(float(d_out), float(clean_d_out))

  @parameterized.product(reduction=_REDUCTIONS, exclusion=["mask", "zero_weight"])
  def test_gradient_in_the_sample_weight(self, reduction, exclusion):
    batch = _padded_batch(2, True, exclusion, seed=5)
    keep = batch["keep"]
    sw = batch["sample_weight"]
    if sw is None:  # weighted and masked: the masked weights hold garbage too
      sw = jnp.where(keep, jnp.linspace(0.5, 1.5, B), jnp.nan)
    loss = bce_jax.BinaryCrossentropy(from_logits=True, reduction=reduction)

    def value(sw, y, preds):
      return jnp.sum(loss(y, preds, sw, batch["mask"]))

    grad = jax.jit(jax.grad(value))
    g = np.asarray(grad(sw, batch["y_pad"], batch["base_pad"]))
    clean_sw = jnp.where(keep, sw, 1.0)
    clean_g = np.asarray(
      grad(clean_sw if batch["mask"] is not None else sw, batch["y"], batch["base"])
    )
    self.assertTrue(np.all(np.isfinite(g)), g)
    if reduction == "mean_with_sample_weight":
      # d/dw_i of sum(w l) / sum(w) involves the value itself, which may differ from the
      # clean batch's in the last bit (test_value_does_not_depend_on_the_padding).
      np.testing.assert_allclose(g[keep], clean_g[keep], rtol=4 * F32_EPS, atol=1e-9)
    else:
      np.testing.assert_array_equal(g[keep], clean_g[keep])
    if reduction == "mean_with_sample_weight" and exclusion == "zero_weight":
      # value = sum(w l) / sum(w): a zero weight still moves the denominator, so its
      # derivative is -value / sum(w), finite and the same whatever the entry holds.
      expected = -float(value(sw, batch["y"], batch["base"])) / float(jnp.sum(sw))
      np.testing.assert_allclose(g[~keep], expected, rtol=1e-6)
    else:
      np.testing.assert_array_equal(g[~keep], 0.0)


# --------------------------------------------------------------------------
# 2. Probabilities outside [0, 1] are clipped, so the loss is never negative.


class OutOfRangePaddingLabelsTest(parameterized.TestCase):
  """Padding labels outside [0, 1] (-1, 1e15) in an excluded row: their focal
  factor can be nan or inf, and must not reach any derivative."""

  @parameterized.product(
    gamma=(0.5, 1.5, 2.0), from_logits=(True, False), pad=(-1.0, 1e15), by=("mask", "weight")
  )
  def test_gradients_of_excluded_rows_are_zero(self, gamma, from_logits, pad, by):
    y = jnp.array([[1.0, 0.0], [pad, pad]])
    preds = jnp.array([[0.5, -0.3], [30.0, -3.0]] if from_logits else [[0.6, 0.3], [0.9, 0.1]])
    keep = jnp.array([True, False])
    extra = {"mask": keep} if by == "mask" else {"sample_weight": keep.astype(jnp.float32)}
    focal = bce_jax.BinaryFocalCrossentropy(gamma=gamma, from_logits=from_logits)
    grad = jax.jit(jax.grad(lambda p: focal(y, p, **extra)))(preds)
    np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)
    want = jax.grad(lambda p: focal(y[:1], p))(preds[:1])
    scale = 0.5 if by == "weight" else 1.0  # a zero weight still counts in the mean
    np.testing.assert_allclose(np.asarray(grad[0]), scale * np.asarray(want[0]), rtol=1e-6)


class ClippingTest(chex.TestCase):
  """binary_crossentropy docstring: probabilities are "clipped to [1e-7, 1 - 1e-7], also
  when they lie outside [0, 1]"; README: the gradient is "the derivative of the loss at
  the clipped value"."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_at_points_outside(self):
    f = self.variant(bce_jax.binary_crossentropy)
    # Keras gives 1.1920929e-07 here: -log(fl32(1 - 1e-7)).
    above = f(jnp.array([[1.0]]), jnp.array([[2.0]]))
    np.testing.assert_allclose(above, ref.elementwise([[1.0]], [[2.0]]).mean(-1), rtol=1e-6)
    np.testing.assert_allclose(above, 1.1920929e-07, rtol=1e-6)
    # y = 0, p = -0.5: -log1p(-1e-7) = 1.0e-7 (Keras computes 1 - p first: 1.19e-7).
    below = float(f(jnp.array([[0.0]]), jnp.array([[-0.5]]))[0])
    self.assertGreaterEqual(below, 0.0)
    self.assertLessEqual(below, 2e-7)
    np.testing.assert_allclose(below, ref.elementwise([[0.0]], [[-0.5]])[0, 0], rtol=1e-6)

  def test_never_negative_on_a_grid(self):
    p = jnp.linspace(-2.0, 3.0, 501)
    for y in (0.0, 0.3, 1.0):
      for smoothing in (0.0, 0.1):
        losses = jax.jit(bce_jax.binary_crossentropy_elementwise, static_argnums=2)(
          jnp.full_like(p, y), p, False, smoothing
        )
        self.assertGreaterEqual(float(jnp.min(losses)), 0.0, (y, smoothing))
        np.testing.assert_allclose(
          losses, ref.elementwise(np.full(p.shape, y), p, label_smoothing=smoothing), rtol=1e-5
        )

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_outside_pushes_back(self):
    grad = self.variant(
      jax.grad(lambda p, y: jnp.sum(bce_jax.binary_crossentropy_elementwise(y, p)))
    )
    p = jnp.array([-2.0, -0.5, 1.5, 3.0])
    for y in (0.0, 1.0):
      g = np.asarray(grad(p, jnp.full_like(p, y)))
      self.assertTrue(np.all(np.isfinite(g)), g)
      np.testing.assert_allclose(g, ref.grad_probs(np.full(4, y), p), rtol=1e-5)
    # The wrong label's gradient pushes p back towards [0, 1]: for y = 0 it is positive
    # above 1 (a descent step lowers p), for y = 1 negative below 0.
    self.assertTrue(np.all(np.asarray(grad(p[2:], jnp.zeros(2))) > 0))
    self.assertTrue(np.all(np.asarray(grad(p[:2], jnp.ones(2))) < 0))

  def test_sgd_from_outside_never_negative(self):
    y = jnp.array([[0.0], [0.5], [1.0]])
    step = jax.jit(jax.value_and_grad(lambda p: bce_jax.BinaryCrossentropy()(y, p)))
    p = jnp.full((3, 1), 1.5)
    for _ in range(5):
      value, g = step(p)
      self.assertGreaterEqual(float(value), 0.0)
      self.assertTrue(np.all(np.isfinite(g)))
      self.assertTrue(np.all(np.asarray(bce_jax.binary_crossentropy_elementwise(y, p)) >= 0))
      p = p - 0.1 * g


# --------------------------------------------------------------------------
# 3. to 5. The metric state and infinite logits.


class MetricStateTest(parameterized.TestCase):
  def test_fresh_state_can_be_donated(self):
    # Metric.init docstring: "No two leaves share a buffer (donatable)".
    m = bce_jax.BinaryCrossentropyMetric()
    y, p = jnp.array([[1.0, 0.0]]), jnp.array([[0.8, 0.3]])
    state = jax.jit(m.update, donate_argnums=0)(m.init(), y, p)
    np.testing.assert_allclose(m.result(state), ref.elementwise(y, p).mean(), rtol=1e-6)

  def test_scan_evaluation_donating_its_initial_state(self):
    m = bce_jax.BinaryCrossentropyMetric(from_logits=True)
    rng = np.random.default_rng(6)
    ys = rng.integers(0, 2, (5, 8, 2)).astype(np.float32)
    xs = rng.normal(0, 3, (5, 8, 2)).astype(np.float32)

    def evaluate(state, ys, xs):
      step = lambda s, batch: (m.update(s, *batch), None)
      return jax.lax.scan(step, state, (ys, xs))[0]

    state = jax.jit(evaluate, donate_argnums=0)(m.init(), ys, xs)
    np.testing.assert_allclose(m.result(state), ref.elementwise(ys, xs, True).mean(), rtol=1e-6)

  @parameterized.parameters(True, False)
  def test_empty_rank1_batch_adds_nothing(self, jit):
    # Metric.update docstring: "An empty batch adds nothing."
    m = bce_jax.BinaryCrossentropyMetric()
    update = jax.jit(m.update) if jit else m.update
    empty = update(m.init(), jnp.zeros((0,)), jnp.zeros((0,)))
    self.assertEqual(float(empty.count + empty.count_err), 0.0)
    self.assertEqual(float(m.result(empty)), 0.0)
    empty = update(empty, jnp.zeros((0, 2)), jnp.zeros((0, 2)))
    y, p = jnp.array([[1.0, 0.0], [0.0, 0.0]]), jnp.array([[0.8, 0.3], [0.4, 0.6]])
    chex.assert_trees_all_equal(update(empty, y, p), update(m.init(), y, p))


class InfiniteLogitsTest(chex.TestCase):
  """binary_crossentropy_elementwise docstring: "Infinite logits are exact: 0 for a
  matching label, inf for the opposite one"."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_elementwise_values_and_gradient(self):
    f = self.variant(lambda y, x: bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True))
    y = jnp.array([0.0, 1.0])
    matched = jnp.array([-jnp.inf, jnp.inf])
    np.testing.assert_array_equal(f(y, matched), [0.0, 0.0])
    np.testing.assert_array_equal(f(y, -matched), [np.inf, np.inf])
    grad = self.variant(
      jax.grad(lambda x: jnp.sum(bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True)))
    )
    np.testing.assert_array_equal(grad(matched), [0.0, 0.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_loss_and_metric_with_one_infinite_matched_logit(self):
    y = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    x = jnp.array([[-jnp.inf, 2.0], [1.0, -3.0]])
    x64 = np.asarray(x, np.float64)
    finite_x = np.where(np.isinf(x64), np.sign(x64) * 1e300, x64)  # loss 0 in float64
    expected = ref.elementwise(y, finite_x, from_logits=True).mean()
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    np.testing.assert_allclose(self.variant(loss)(y, x), expected, rtol=1e-6)
    m = bce_jax.BinaryCrossentropyMetric(from_logits=True)
    result = self.variant(lambda y, x: m.result(m.update(m.init(), y, x)))(y, x)
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    value, g = self.variant(jax.value_and_grad(lambda x: loss(y, x)))(x)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    self.assertEqual(float(g[0, 0]), 0.0)
    np.testing.assert_allclose(g, ref.grad_logits(y, x) / 4, rtol=1e-6)
    # A mismatched infinite logit gives inf, not nan.
    self.assertEqual(float(self.variant(loss)(y, -x)), np.inf)

  @parameterized.product(shape=[(3, 2), (8193, 2), (2341, 7), (2049, 8)], jit=[True, False])
  def test_mismatched_infinite_logit_in_a_kept_row_keeps_its_gradient(self, shape, jit):
    # docs/rules.md: an infinite logit gives a finite gradient, d/dx = 1 at x = +inf
    # with y = 0 (-1 at -inf with y = 1). A weighted or masked call sanitizes its
    # excluded rows; the kept rows' infinite logits must keep that derivative.
    rng = np.random.default_rng(3)
    y = (rng.random(shape) < 0.5).astype(np.float32)
    x = rng.normal(0, 3, shape).astype(np.float32)
    x[1, 1], y[1, 1] = np.inf, 0.0
    x[2, 0], y[2, 0] = -np.inf, 1.0
    w = rng.random(shape[0]).astype(np.float32) + 0.5
    m = np.ones(shape[0], bool)
    m[0] = False
    loss = bce_jax.BinaryCrossentropy(from_logits=True, reduction="sum")
    for kwargs in ({"sample_weight": w}, {"mask": m}, {"sample_weight": w, "mask": m}):
      grad = jax.grad(lambda x, kwargs=kwargs: loss(y, x, **kwargs))
      g = np.asarray((jax.jit(grad) if jit else grad)(x))
      keep = np.where(m, 1.0, 0.0) if "mask" in kwargs else np.ones(shape[0])
      weight = keep * (w if "sample_weight" in kwargs else 1.0)
      want = ref.grad_logits(y, x) * weight[:, None] / shape[1]
      np.testing.assert_allclose(g, want, rtol=1e-6, err_msg=str(kwargs))

  def test_large_batch_with_infinite_logits(self):
    # Large enough for the kernel's fast path, whose sum is nan at an infinite logit
    # and is then taken again on the safe path (bce_jax/_kernel.py).
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, (4096, 8)).astype(np.float32)
    x = rng.normal(0, 3, (4096, 8)).astype(np.float32)
    x[5, 3] = np.inf if y[5, 3] else -np.inf  # matched: loss 0
    x[100, 0] = np.inf if y[100, 0] else -np.inf
    x64 = x.astype(np.float64)
    finite_x = np.where(np.isinf(x64), np.sign(x64) * 1e300, x64)
    per_sample = ref.elementwise(y, finite_x, from_logits=True).mean(-1)
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    value, g = jax.jit(jax.value_and_grad(loss, argnums=1))(y, x)
    np.testing.assert_allclose(value, per_sample.mean(), rtol=1e-5)
    self.assertEqual(float(g[5, 3]), 0.0)
    self.assertEqual(float(g[100, 0]), 0.0)
    self.assertTrue(np.all(np.isfinite(g)))
    none = jax.jit(bce_jax.BinaryCrossentropy(from_logits=True, reduction=None))(y, x)
    np.testing.assert_allclose(none, per_sample, rtol=1e-5)
    m = bce_jax.BinaryCrossentropyMetric(from_logits=True)
    result = jax.jit(lambda y, x: m.result(m.update(m.init(), y, x)))(y, x)
    np.testing.assert_allclose(result, per_sample.mean(), rtol=1e-5)
    x[7, 7] = -np.inf if y[7, 7] else np.inf  # mismatched: inf, not nan
    self.assertEqual(float(jax.jit(loss)(y, x)), np.inf)


class HugeFiniteLogitsTest(parameterized.TestCase):
  """README: a finite loss for every finite logit. Element losses near the float32
  maximum overflow a float32 sum (two logits of 3.39e38 with label 0), not their mean."""

  @parameterized.product(
    dtype=("bfloat16", "float32"),
    shape=((2, 1), (2, 8), (4096, 8)),
    reduction=("sum_over_batch_size", "mean_with_sample_weight", "none"),
    jit=(False, True),
  )
  def test_mean_of_huge_losses_is_finite(self, dtype, shape, reduction, jit):
    x = np.zeros(shape, np.float32)
    x[:2] = 3.39e38  # rounds to 3.3895e38 in bfloat16
    x = jnp.asarray(x, dtype)
    y = np.zeros(shape, np.float32)
    weight = np.ones(shape[0], np.float32)
    weight[-1] = 0.0  # an excluded sample holding nan
    x = x.at[-1].set(jnp.nan)
    x64 = np.where(np.isnan(np.asarray(x, np.float64)), 0.0, np.asarray(x, np.float64))
    per_sample = np.where(weight > 0, ref.elementwise(y, x64, from_logits=True).mean(-1), 0.0)
    expected = {
      "sum_over_batch_size": per_sample.sum() / shape[0],
      "mean_with_sample_weight": per_sample.sum() / weight.sum(),
      "none": per_sample,
    }[reduction]
    loss = bce_jax.BinaryCrossentropy(from_logits=True, reduction=reduction)
    value = (jax.jit(loss) if jit else loss)(y, x, weight)
    g = jax.grad(lambda x: jnp.sum(loss(y, x, sample_weight=weight)))(x)
    np.testing.assert_allclose(np.asarray(value, np.float64), expected, rtol=1e-6)
    # The derivative is the usual one: sigmoid(x) / L per element, scaled by the reduction.
    self.assertTrue(np.all(np.isfinite(np.asarray(g, np.float32))))
    np.testing.assert_array_equal(np.asarray(g[-1], np.float32), 0.0)

  def test_a_sum_that_overflows_is_inf(self):
    x = jnp.full((2, 1), 3.39e38, jnp.float32)
    loss = bce_jax.BinaryCrossentropy(from_logits=True, reduction="sum")
    self.assertEqual(float(loss(jnp.zeros((2, 1)), x)), np.inf)


# --------------------------------------------------------------------------
# 6. to 8. Weights over a non-batch axis, and digits in the derivative and the value.


class WeightsAndDigitsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_rank1_weight_over_a_non_batch_axis(self):
    # README, `sample_weight`: a shape that broadcasts to the per-sample losses; (3,)
    # against [2, 3] broadcasts on the last axis, as in NumPy and Keras. Keras 3.15:
    # BinaryCrossentropy()(ones((2,3,4)), full((2,3,4), .3), sample_weight=[1, 2, 3])
    # is 2.4079456, and 1.2039728 with sample_weight=ones(3).
    y, p = jnp.ones((2, 3, 4)), jnp.full((2, 3, 4), 0.3)
    loss = self.variant(lambda y, p, w: bce_jax.BinaryCrossentropy()(y, p, w))
    per_sample = ref.mean_over(ref.elementwise(y, p), -1)
    for w, keras in (([1.0, 2.0, 3.0], 2.4079456), ([1.0, 1.0, 1.0], 1.2039728)):
      expected = ref.reduce(per_sample, "sum_over_batch_size", np.array(w))
      np.testing.assert_allclose(expected, keras, rtol=1e-7)
      np.testing.assert_allclose(loss(y, p, jnp.array(w)), expected, rtol=4 * F32_EPS)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
    x=[1e-4, 1e-7, -1e-7],
    smoothing=[0.0, 0.1],
    pos_weight=[None, 1.0, 2.5],
  )
  def test_label_gradient_is_the_closed_form(self, x, smoothing, pos_weight):
    # bce_jax/_bce.py: the derivative in the labels is ``w softplus(-x) - softplus(x)``,
    # "exactly -x for w = 1"; through the smoothing it is scaled by (1 - s).
    w = 1.0 if pos_weight is None else pos_weight
    x64 = float(np.float32(x))
    expected = (1 - smoothing) * (w * np.logaddexp(0, -x64) - np.logaddexp(0, x64))
    if w == 1.0:
      np.testing.assert_allclose(expected, -(1 - smoothing) * x64, rtol=1e-8)
    y = jnp.array([[0.3]])
    logits = jnp.array([[x]], jnp.float32)

    def f(y):
      return bce_jax.binary_crossentropy(y, logits, True, smoothing, pos_weight=pos_weight).sum()

    loss = bce_jax.BinaryCrossentropy(
      from_logits=True, label_smoothing=smoothing, pos_weight=pos_weight
    )
    for fn in (f, lambda y: loss(y, logits)):
      g = self.variant(jax.grad(fn))(y)
      np.testing.assert_allclose(g[0, 0], expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_small_probability_keeps_its_digits(self):
    # bce_jax/_logsig.py: "log1p(-p) keeps the digits of a small p".
    expected = -np.log1p(-np.float64(np.float32(1e-6)))
    y, p = jnp.array([[0.0]]), jnp.array([[1e-6]])
    for fn in (
      lambda y, p: bce_jax.binary_crossentropy_elementwise(y, p)[0, 0],
      lambda y, p: bce_jax.BinaryCrossentropy()(y, p),
    ):
      np.testing.assert_allclose(self.variant(fn)(y, p), expected, rtol=2 * F32_EPS)


# --------------------------------------------------------------------------
# 9. to 12. The value checks of `bce_jax.checked`, and the flags that may not break them.


class CheckedTest(parameterized.TestCase):
  def test_negative_weight_on_a_masked_sample_is_not_reported(self):
    # README, `mask`: "Under bce_jax.checked, masked samples are not value-checked".
    loss = bce_jax.BinaryCrossentropy()
    y = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    p = jnp.full((3, 2), 0.4)
    w = jnp.array([1.0, -1.0, 1.0])
    mask = jnp.array([True, False, True])
    safe = bce_jax.checked(jax.jit(loss))
    np.testing.assert_array_equal(safe(y, p, w, mask), loss(y, p, w, mask))
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"^sample_weight must be >= 0"):
      safe(y, p, w, mask.at[1].set(True))

  def test_float64_probability_just_above_one_is_reported(self):
    # The check compares in the input's own dtype: 1 + 1e-12 is not rounded to 1.
    with jax.enable_x64(True):
      y = jnp.array([[1.0, 0.0]], jnp.float64)
      p = jnp.array([[1 + 1e-12, 0.3]], jnp.float64)
      safe = bce_jax.checked(jax.jit(bce_jax.binary_crossentropy))
      with self.assertRaisesRegex(
        bce_jax.ValueCheckError, r"^y_pred must hold probabilities in \[0, 1\]; .*1\.000000000001"
      ):
        safe(y, p)
      self.assertEqual(safe(y, p.at[0, 0].set(1.0)).dtype, jnp.float64)

  @parameterized.parameters(True, False)
  def test_range_under_vmap_is_one_failing_example(self, jit):
    # check_in_unit_interval docstring: under vmap, checkify reports one failing
    # example, and the range is that example's. Bad values in examples 0 and 2 of 3.
    y = jnp.ones((3, 4, 2))
    p = jnp.full((3, 4, 2), 0.5).at[0, 1, 0].set(1.5).at[2, 3, 1].set(-0.25)
    f = jax.vmap(lambda y, p: bce_jax.BinaryCrossentropy()(y, p))
    f = jax.jit(f) if jit else f
    with self.assertRaisesRegex(
      bce_jax.ValueCheckError,
      r"^y_pred must hold probabilities in \[0, 1\]; got values in "
      r"(\[0\.5, 1\.5\]|\[-0\.25, 0\.5\])",
    ):
      bce_jax.checked(f)(y, p)

  def test_sharded_inputs(self):
    # checked() docstring: any function "on sharded arrays under any mesh". 8 host
    # devices, a [4096, 8] batch split over "data", for an Explicit and an Auto mesh.
    out = _run_python(
      """
      import jax, numpy as np, bce_jax
      from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
      assert len(jax.devices()) == 8, jax.devices()
      rng = np.random.default_rng(0)
      y = rng.integers(0, 2, (4096, 8)).astype(np.float32)
      x = rng.normal(size=(4096, 8)).astype(np.float32)
      w = np.ones(4096, np.float32)
      bad_w = w.copy()
      bad_w[4000] = -1.0
      loss = bce_jax.BinaryCrossentropy(from_logits=True)
      m = bce_jax.BinaryCrossentropyMetric(from_logits=True)
      fns = {
        "loss": jax.jit(loss),
        "metric": jax.jit(lambda y, x, w: m.result(m.update(m.init(), y, x, w))),
      }
      expected = float(fns["loss"](y, x, w))
      for kind in ("explicit", "auto"):
        types = (AxisType.Auto,) if kind == "auto" else None
        mesh = jax.make_mesh((8,), ("data",), axis_types=types)
        assert mesh.axis_types == ((AxisType.Auto,) if types else (AxisType.Explicit,))
        data = NamedSharding(mesh, P("data"))
        args = jax.device_put((y, x, w), data)
        bad = args[:2] + (jax.device_put(bad_w, data),)
        with jax.set_mesh(mesh):
          for name, fn in fns.items():
            safe = bce_jax.checked(fn)
            value = float(safe(*args))
            assert abs(value - expected) <= 1e-6 * expected, (kind, name, value, expected)
            try:
              safe(*bad)
            except bce_jax.ValueCheckError as e:
              assert str(e).startswith("sample_weight must be >= 0"), e
              print(kind, name, "ok")
            else:
              raise AssertionError(f"{kind} {name}: negative weight not reported")
      """,
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    self.assertEqual(
      out.split("\n")[:4],
      ["explicit loss ok", "explicit metric ok", "auto loss ok", "auto metric ok"],
    )

  @parameterized.parameters(True, False, np.bool_(True))
  def test_bool_sample_weight_is_refused(self, value):
    # Loss.__call__ docstring: a Python bool as `sample_weight` is a TypeError
    # ("from_logits belongs on the constructor").
    y, x = jnp.array([[1.0, 0.0]]), jnp.array([[2.0, -1.0]])
    with self.assertRaisesRegex(TypeError, r"`sample_weight`.*bool.*from_logits"):
      bce_jax.BinaryCrossentropy()(y, x, value)
    m = bce_jax.BinaryCrossentropyMetric()
    with self.assertRaisesRegex(TypeError, r"`sample_weight`.*bool.*from_logits"):
      m.update(m.init(), y, x, value)

  def test_environment_cannot_switch_the_checks_on(self):
    # bce_jax/_checked.py: "Only this module reads it; nothing in the environment can turn
    # it on."
    out = _run_python(
      "import jax.numpy as jnp, bce_jax; "
      "print(bce_jax.binary_crossentropy(jnp.array([1., 0.]), jnp.array([.8, .3])))",
      BCE_JAX_VALUE_CHECKS="1",
    )
    np.testing.assert_allclose(float(out), ref.elementwise([1.0, 0.0], [0.8, 0.3]).mean(), 1e-6)


if __name__ == "__main__":
  absltest.main()
