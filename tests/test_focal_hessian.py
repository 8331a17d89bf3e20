"""Second derivatives of the focal loss in the labels: finite by every route, and right.

The label gradient has its own JVP; these tests differentiate it by every
route (`jax.hessian` over both arguments, reverse-over-reverse,
forward-over-reverse, reverse-over-forward) against a float64 closed form,
itself checked against float64 finite differences of the reference's first
derivatives.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import bce_jax
from tests import _reference as ref

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
F32_MAX = float(np.finfo(np.float32).max)
_MAG = np.array([0.0, 1e-6, 1.0, 30.0, 60.0, 1e4, 3e38])
XS = np.concatenate([_MAG, -_MAG[1:]]).astype(np.float32)
YS = np.array([0.0, 0.3, 1.0], np.float32)
# (label_smoothing, alpha or None, pos_weight or None); pos_weight <= 1 keeps the
# label gradient itself (~ w |x|) inside float32 at |x| = 3e38.
CONFIGS = {
  "plain": (0.0, None, None),
  "smoothing_balancing": (0.1, 0.25, None),
  "pos_weight_balancing": (0.0, 0.75, 0.5),
  "all": (0.2, 0.4, 0.8),
}


def _log_softplus(x):
  """``log(softplus(x))`` in float64, also where softplus(x) underflows (~ x there)."""
  with np.errstate(divide="ignore"):
    return np.where(
      x < -30, x + np.log1p(-0.5 * np.exp(np.minimum(x, 0))), np.log(np.logaddexp(0, x))
    )


def second_derivatives_f64(y, x, smoothing, gamma, alpha, w):
  """``(d2L/dx dy, d2L/dy2, scale_xy, scale_yy)`` of ``L = c P**gamma BCE``, float64.

  In the smoothed label ``y~`` (times ``1 - s`` per label derivative), with
  ``P = y~ (1 - p) + (1 - y~) p``, ``P_y = 1 - 2p``, ``P_x = (1 - 2y~) p (1 - p)``,
  ``P_xy = -2 p (1 - p)``, ``F = P**gamma``:
  ``L_yy = 2 c' (F_y B + F B_y) + c gamma (F / P) P_y ((gamma - 1) P_y B / P + 2 B_y)``,
  ``L_xy = c' (F_x B + F B_x) + c (F_xy B + F_y B_x + F_x B_y + F B_xy)``.
  Each product is taken in log space where its factors over- or underflow
  alone. The scales are the sums of the terms' magnitudes.
  """
  ys = ref.smooth(y, smoothing)
  x = np.asarray(x, np.float64)
  w = 1.0 if w is None else float(w)
  c, dc = (1.0, 0.0) if alpha is None else (alpha * ys + (1 - alpha) * (1 - ys), 2 * alpha - 1)
  sp, sp_neg = np.logaddexp(0, x), np.logaddexp(0, -x)
  log_p, log_1mp = -sp_neg, -sp
  with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
    log_big_p = np.logaddexp(np.log(ys) + log_1mp, np.log1p(-ys) + log_p)
    log_b = np.logaddexp(np.log(w * ys) + _log_softplus(-x), np.log1p(-ys) + _log_softplus(x))
    p_y = -np.tanh(x / 2)
    pq = np.exp(log_p + log_1mp)
    px_over_p = (1 - 2 * ys) * np.exp(log_p + log_1mp - log_big_p)
    b_y = w * sp_neg - sp
    b_x = (1 - ys) * np.exp(log_p) - w * ys * np.exp(log_1mp)
    log_abs_bx = np.where(
      ys == 0, log_p, np.where(ys == 1, np.log(w) + log_1mp, np.log(np.abs(b_x)))
    )
    b_xy = -(w * np.exp(log_1mp) + np.exp(log_p))
    f = np.exp(gamma * log_big_p)
    fb = np.exp(gamma * log_big_p + log_b)
    fb_over_p = np.exp((gamma - 1) * log_big_p + log_b)
    fbx_over_p = np.sign(b_x) * np.exp((gamma - 1) * log_big_p + log_abs_bx)
    f_over_p = np.exp((gamma - 1) * log_big_p)
    b_over_p = np.exp(log_b - log_big_p)
    # B_y and B_x are differences: their rounding scales with their terms.
    b_y_size, b_x_size = w * sp_neg + sp, (1 - ys) * np.exp(log_p) + w * ys * np.exp(log_1mp)
    yy, yy_size = [2 * dc * f * b_y], [2 * np.abs(dc) * f * b_y_size]
    xy, xy_size = [dc * f * b_x, c * f * b_xy], [np.abs(dc) * f * b_x_size, np.abs(c * f * b_xy)]
    if gamma:
      bracket = [(gamma - 1) * p_y * b_over_p, 2 * b_y]
      yy += [2 * dc * gamma * p_y * fb_over_p, c * gamma * f_over_p * p_y * sum(bracket)]
      yy_size += [
        np.abs(yy[-2]),
        np.abs(c * gamma * f_over_p * p_y) * (np.abs(bracket[0]) + 2 * b_y_size),
      ]
      xy += [
        dc * gamma * px_over_p * fb,
        c * gamma * fb_over_p * ((gamma - 1) * px_over_p * p_y - 2 * pq),
        c * gamma * p_y * fbx_over_p,
        c * gamma * f * px_over_p * b_y,
      ]
      xy_size += [np.abs(t) for t in xy[2:5]] + [np.abs(c * gamma * f * px_over_p) * b_y_size]
    d_xy, d_yy = sum(xy), sum(yy)
  k = 1 - smoothing
  return k * d_xy, k * k * d_yy, k * sum(xy_size), k * k * sum(yy_size)


def _fd_label_grad(ys, x, gamma, alpha, w):
  """d loss / d y~ from the reference (no smoothing: `ys` is already smoothed)."""
  return ref.focal_grad_labels_logits(ys, x, gamma, alpha, w)[0]


class ReferenceTest(parameterized.TestCase):
  """The closed form against float64 finite differences of the reference's first derivatives."""

  @parameterized.product(gamma=GAMMAS, config=tuple(CONFIGS))
  def test_closed_form_matches_finite_differences(self, gamma, config):
    smoothing, alpha, w = CONFIGS[config]
    x = np.array([0.0, 1e-6, -0.7, 1.0, -3.0, 5.0, 12.0, -20.0])
    for y in (0.0, 0.3, 1.0):
      ys = float(ref.smooth(y, smoothing))
      d_xy, d_yy, _, _ = second_derivatives_f64(np.full_like(x, y), x, smoothing, gamma, alpha, w)
      k = 1 - smoothing
      h = 1e-5
      gy = functools.partial(_fd_label_grad, gamma=gamma, alpha=alpha, w=w)
      fd_xy = (gy(ys, x + h) - gy(ys, x - h)) / (2 * h)
      # d/dy~ of the x-gradient too: the mixed partials agree.
      gx = lambda ys: ref.focal_derivatives_logits(ys, x, 0.0, gamma, alpha, w)[0]
      # One-sided steps well inside P's own scale (P ~ e^-|x| at a hard label).
      big_p = ref.sigmoid(x) if ys == 0 else ref.sigmoid(-x)
      hy = (-1 if ys == 1 else 1) * np.minimum(1e-6, 1e-3 * big_p)
      if 0 < ys < 1:
        fd_yx = (gx(ys + 1e-6) - gx(ys - 1e-6)) / 2e-6
        fd_yy = (gy(ys + 1e-6, x) - gy(ys - 1e-6, x)) / 2e-6
      else:  # second order, from inside [0, 1]
        fd_yx = (-3 * gx(ys) + 4 * gx(ys + hy) - gx(ys + 2 * hy)) / (2 * hy)
        fd_yy = (-3 * gy(ys, x) + 4 * gy(ys + hy, x) - gy(ys + 2 * hy, x)) / (2 * hy)
      tol = {"rtol": 2e-5, "atol": 1e-7}
      np.testing.assert_allclose(d_xy, k * fd_xy, **tol, err_msg=f"xy y={y}")
      # A step in y below 1e-3 P loses digits to rounding where P < 1e-7.
      fine = (0 < ys < 1) | (big_p > 1e-7)
      np.testing.assert_allclose(d_xy[fine], k * fd_yx[fine], **tol, err_msg=f"yx y={y}")
      np.testing.assert_allclose(d_yy[fine], k * k * fd_yy[fine], **tol, err_msg=f"yy y={y}")


def _loss(gamma, smoothing, alpha, w):
  def scalar(x, y):
    return bce_jax.binary_focal_crossentropy_elementwise(
      y[None],
      x[None],
      apply_class_balancing=alpha is not None,
      alpha=0.25 if alpha is None else alpha,
      gamma=gamma,
      from_logits=True,
      label_smoothing=smoothing,
      pos_weight=w,
    )[0]

  return scalar


def _routes(f):
  """Each route's ``(d/dx dL/dy, d/dy dL/dx, d2L/dy2, d2L/dx2)`` of a scalar ``f(x, y)``."""
  h = jax.hessian(f, argnums=(0, 1))
  rr_y, rr_x = jax.grad(f, argnums=1), jax.grad(f, argnums=0)
  fr_y, fr_x = jax.jacfwd(rr_y, argnums=(0, 1)), jax.jacfwd(rr_x, argnums=(0, 1))

  def jvp_y(x, y):  # forward first, in y
    return jax.jvp(lambda y: f(x, y), (y,), (jnp.ones_like(y),))[1]

  def jvp_x(x, y):
    return jax.jvp(lambda x: f(x, y), (x,), (jnp.ones_like(x),))[1]

  def hessian(x, y):
    (xx, xy), (yx, yy) = h(x, y)
    return yx, xy, yy, xx

  def fwd_over_rev(x, y):
    (yx, yy), (_, xy) = fr_y(x, y), fr_x(x, y)
    return yx, xy, yy, fr_x(x, y)[0]

  return {
    "hessian": hessian,
    "rev_over_rev": lambda x, y: (
      jax.grad(rr_y, 0)(x, y),
      jax.grad(rr_x, 1)(x, y),
      jax.grad(rr_y, 1)(x, y),
      jax.grad(rr_x, 0)(x, y),
    ),
    "fwd_over_rev": fwd_over_rev,
    "rev_over_fwd": lambda x, y: (
      jax.grad(jvp_y, 0)(x, y),
      jax.grad(jvp_x, 1)(x, y),
      jax.grad(jvp_y, 1)(x, y),
      jax.grad(jvp_x, 0)(x, y),
    ),
  }


@functools.cache
def _all_routes(gamma, config, use_jit, every_route=True):
  scalar = _loss(gamma, *CONFIGS[config])
  routes = _routes(scalar)
  if not every_route:
    routes = {"hessian": routes["hessian"]}

  def all_of(x, y):
    return {name: jax.vmap(r)(x, y) for name, r in routes.items()}

  return jax.jit(all_of) if use_jit else all_of


def _assert_close(got, want, scale, rtol, what):
  got = np.asarray(got, np.float64)
  bad = ~np.isfinite(got)
  assert not bad.any(), f"{what}: non-finite {got[bad]}"
  err = np.abs(got - want) - rtol * scale - 1e-30
  i = int(np.argmax(err))
  assert err[i] <= 0, f"{what}: got {got[i]!r}, want {want[i]!r} (index {i})"


class RoutesTest(parameterized.TestCase):
  """Every route, both argument orders: finite everywhere, right at moderate logits."""

  @parameterized.parameters(*((g, "plain") for g in GAMMAS), (0.5, "all"), (5.0, "all"))
  def test_every_route(self, gamma, config):
    self._check(gamma, config, True)

  @parameterized.product(gamma=GAMMAS, config=("smoothing_balancing", "pos_weight_balancing"))
  def test_hessian_route(self, gamma, config):
    self._check(gamma, config, True, every_route=False)

  @parameterized.parameters(0.5, 2.0)
  def test_eager(self, gamma):
    self._check(gamma, "all", False, every_route=False)

  def _check(self, gamma, config, use_jit, every_route=True):
    smoothing, alpha, w = CONFIGS[config]
    y, x = (a.ravel() for a in np.meshgrid(YS, XS, indexing="ij"))
    want_xy, want_yy, s_xy, s_yy = second_derivatives_f64(y, x, smoothing, gamma, alpha, w)
    _, want_xx = ref.focal_derivatives_logits(y, x, smoothing, gamma, alpha, w)
    got = _all_routes(gamma, config, use_jit, every_route)(jnp.asarray(x), jnp.asarray(y))
    moderate = np.abs(x) <= 60
    huge = np.abs(want_yy) > 1e37
    # Smoothed labels are rounded to float32 first; the reference smooths in float64.
    rtol = 3e-6 * (1 + gamma)
    for name, (yx, xy, yy, xx) in got.items():
      for what, value in (("d/dx dL/dy", yx), ("d/dy dL/dx", xy), ("d2/dy2", yy), ("d2/dx2", xx)):
        self.assertTrue(np.all(np.isfinite(np.asarray(value))), f"{name} {what}: {value}")
      _assert_close(yx, want_xy, s_xy, rtol, f"{name} d/dx dL/dy")
      _assert_close(xy, want_xy, s_xy, rtol, f"{name} d/dy dL/dx")
      # d2/dy2 is reached through exp of a log where P is tiny (log-space
      # factor): its error grows as |log P| float32 ulps.
      _assert_close(yy[~huge], want_yy[~huge], s_yy[~huge], rtol * (1 + np.abs(x[~huge]) / 8), name)
      # Past float32's range (|x| ~ 3e38) the label derivatives saturate: the
      # true sign and a magnitude near the largest float (times (1 - s)**2).
      yy = np.asarray(yy, np.float64)
      np.testing.assert_array_equal(np.sign(yy[huge]), np.sign(want_yy[huge]))
      self.assertTrue(np.all(np.abs(yy[huge]) >= 0.5 * np.minimum(np.abs(want_yy[huge]), F32_MAX)))
      _assert_close(xx[moderate], want_xx[moderate], np.abs(want_xx[moderate]), 3e-5, "xx")
      # The mixed partials agree with each other within the same rounding.
      _assert_close(yx, np.asarray(xy, np.float64), 2 * s_xy, rtol, f"{name} symmetry")

  def test_named_defect(self):
    # d/dx of the label gradient at x = 60, y = 0 (gamma 2): nan before its own JVP.
    f = lambda x, y: bce_jax.binary_focal_crossentropy_elementwise(
      y, x, gamma=2.0, from_logits=True
    )
    x, y = jnp.float32(60.0), jnp.float32(0.0)
    yx = jax.grad(jax.grad(f, argnums=1), argnums=0)(x, y)
    xy = jax.grad(jax.grad(f, argnums=0), argnums=1)(x, y)
    np.testing.assert_allclose(float(yx), -3.0, rtol=1e-6)
    np.testing.assert_allclose(float(xy), -3.0, rtol=1e-6)


class SaturationTest(parameterized.TestCase):
  """Where the true label derivative passes float32's range, it saturates (never inf or nan)."""

  @parameterized.parameters(0.5, 0.9)
  def test_hard_label_curvature_below_gamma_one(self, gamma):
    # d2L/dy2 ~ gamma (2|x| + gamma - 1) exp((1 - gamma)|x|) at y = 1, x > 0.
    f = _loss(gamma, 0.0, None, None)
    x = jnp.array([30.0, 100.0, 1e4], jnp.float32)
    y = jnp.ones_like(x)
    yy = np.asarray(jax.vmap(jax.grad(jax.grad(f, 1), 1))(x, y), np.float64)
    want = second_derivatives_f64(np.ones(3), np.asarray(x), 0.0, gamma, None, None)[1]
    np.testing.assert_allclose(yy[:2], want[:2], rtol=2e-5)
    self.assertGreater(want[-1], F32_MAX)
    self.assertEqual(yy[-1], F32_MAX)
    h = jax.vmap(jax.hessian(f, argnums=(0, 1)))(x, y)  # the other entries stay clean
    self.assertTrue(np.all(np.isfinite(np.asarray(h[1][0]))))
    self.assertTrue(np.all(np.isfinite(np.asarray(h[0][1]))))


class PosWeightTest(parameterized.TestCase):
  @parameterized.parameters(0.5, 2.0)
  def test_label_gradient_in_pos_weight(self, gamma):
    def f(x, y, w):
      return bce_jax.binary_focal_crossentropy_elementwise(
        y, x, gamma=gamma, from_logits=True, pos_weight=w
      )

    x = np.array([-4.0, -0.5, 0.0, 0.5, 3.0, 60.0, -60.0, 3e38], np.float32)
    for y in (0.0, 0.3, 1.0):
      yw = jax.jit(jax.vmap(jax.grad(jax.grad(f, 1), 2), (0, None, None)))(x, y, 1.5)
      yw = np.asarray(yw, np.float64)
      self.assertTrue(np.all(np.isfinite(yw)), yw)
      moderate = np.abs(x) < 10
      xs = x[moderate].astype(np.float64)
      g = lambda w, xs=xs, y=y: ref.focal_grad_labels_logits(y, xs, gamma, None, w)[0]
      fd = (g(1.5 + 1e-6) - g(1.5 - 1e-6)) / 2e-6
      np.testing.assert_allclose(yw[moderate], fd, rtol=1e-5, atol=1e-7)


class MaskTest(absltest.TestCase):
  def test_masked_nan_labels_have_zero_label_hessian(self):
    loss = bce_jax.BinaryFocalCrossentropy(gamma=0.5, from_logits=True)
    x = jnp.array([[2.0], [80.0], [-1.0]])
    keep = jnp.array([True, True, False])

    def f(y):
      return loss(y, x, mask=keep)

    y = jnp.array([[1.0], [1.0], [jnp.nan]])
    h = np.asarray(jax.hessian(f)(y)).reshape(3, 3)
    self.assertTrue(np.all(np.isfinite(h)), h)
    np.testing.assert_array_equal(h[2], 0.0)
    np.testing.assert_array_equal(h[:, 2], 0.0)


if __name__ == "__main__":
  absltest.main()
