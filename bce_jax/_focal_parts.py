r"""The focal loss's logit-side pieces with their own JVPs (used by bce_jax._focal).

With ``a = |x|``, ``t = exp(-a)``, ``T = log1p(t)``, ``u`` the label weight of
the larger sigmoid (``1 - y`` for ``x >= 0``, else ``y``), ``den = t + u (1 - t)``
and ``P = den / (1 + t)``: each helper is a closed form in bounded quantities
with a closed-form JVP, so that its derivatives are finite too (no ``0 * inf``
from a ``where`` or from an underflowed factor met before a huge one).

* `_ratio`, `_ratio_times`, `_factor`: ``q = sigmoid(-a) / den``, ``q b`` and
  ``P**gamma``, for the logits' slope.
* `_label_slope`: the labels' slope ``d(c P**gamma BCE)/du``; its JVP is the
  labels' second derivatives (``d2/du2`` and ``d2/du da``), saturated at the
  largest float where the true value overflows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

_MAX_CHAIN = 64  # largest gamma computed as a multiply chain


def _one_minus_t(a: jax.Array) -> jax.Array:
  """``1 - exp(-a)`` without cancellation near ``a = 0`` (``(1 - t) / (1 + t) = tanh(a / 2)``)."""
  return -jnp.expm1(-a)


def _q_scale_bound(dtype) -> float:
  """A magnitude beyond which ``exp(-a)``, and so ``q``, is exactly 0 in `dtype`.

  ``q * |x|`` is bounded, but in reverse mode the cotangent of `q` is
  ``gamma |x|``, which overflows at huge logits and turns the ``0``
  derivative of `q` into ``inf * 0 = nan``. Clamping ``|x|`` here changes
  no value and no derivative: past the bound ``q`` and its derivative are 0.
  """
  return math.ceil(-math.log(float(jnp.finfo(dtype).smallest_subnormal))) + 2.0


def _live(tangent) -> bool:
  return tangent is not None and not isinstance(tangent, SymbolicZero)


def _power(base: jax.Array, gamma: float) -> jax.Array:
  """``base**gamma`` for ``base >= 0`` and ``gamma > 0``; 0 at 0."""
  whole = math.floor(gamma)
  if 2 * gamma != round(2 * gamma) or gamma > _MAX_CHAIN:
    return jnp.exp(gamma * jnp.log(base))
  if gamma == whole:
    return jax.lax.integer_pow(base, whole)
  root = jnp.sqrt(base)
  return root if whole == 0 else jax.lax.integer_pow(base, whole) * root


def _sum_terms(terms: list[jax.Array], like: jax.Array) -> jax.Array:
  total = jnp.zeros_like(like)
  for term in terms:
    total = total + term
  return jnp.broadcast_to(total, like.shape).astype(like.dtype)


@jax.custom_jvp
def _magnitude(x):
  """``|x|`` with derivative +1 at 0, the side whose formulas are used there."""
  return jnp.abs(x)


_magnitude.defjvp(lambda p, t: (_magnitude(*p), jnp.where(p[0] >= 0, 1, -1) * t[0]))


def _parts(a, u):
  """``t``, ``sigmoid(a)``, ``sigmoid(-a)``, ``den = t + u (1 - t)`` and ``1 / den``.

  Built alike wherever used, so XLA computes them once. ``den`` is 0 only
  where ``u = 0`` and ``t`` underflows; ``1 / den`` is capped there, and all
  it scales is 0.
  """
  t = jnp.exp(-a)
  big = 1 / (1 + t)
  den = t + u * (1 - t)
  return t, big, t * big, den, 1 / jnp.maximum(den, jnp.finfo(den.dtype).tiny)


@jax.custom_jvp
def _ratio(a, u):
  """``q = s (1 - s) / P = sigmoid(-a) / den``, in [0, 1]."""
  _, _, small, _, inv = _parts(a, u)
  return small * inv


def _ratio_jvp(primals, tangents):
  (a, u), (da, du) = primals, tangents
  q = _ratio(a, u)
  _, _, small, _, inv = _parts(a, u)
  terms = [q * (small - u * inv) * da] if _live(da) else []  # bounded
  if _live(du):
    terms.append(-q * _one_minus_t(a) * inv * du)
  return q, _sum_terms(terms, q)


_ratio.defjvp(_ratio_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _ratio_times(a, u, b):
  """``q b`` (``b`` a BCE, ~ ``den`` where ``u`` is small), with ``b / den`` kept whole.

  Reverse mode through ``_ratio(a, u) * b`` meets the cotangent ``~ F b``
  (which flushes to 0 where ``P`` is tiny) before ``d q / du ~ 1 / den``.
  """
  return _ratio(a, u) * b


def _ratio_times_jvp(primals, tangents):
  (a, u, b), (da, du, db) = primals, tangents
  out = _ratio_times(a, u, b)
  q = _ratio(a, u)
  _, _, small, _, inv = _parts(a, u)
  terms = [q * (small - u * inv) * b * da] if _live(da) else []
  if _live(du):
    terms.append(-q * _one_minus_t(a) * (b * inv) * du)
  if _live(db):
    terms.append(q * db)
  return out, _sum_terms(terms, out)


_ratio_times.defjvp(_ratio_times_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _factor(a, u, gamma):
  """``P**gamma``, ``P = den sigmoid(a)``."""
  _, big, _, den, _ = _parts(a, u)
  return _power(den * big, gamma)


def _factor_jvp(gamma, primals, tangents):
  (a, u), (da, du) = primals, tangents
  f = _factor(a, u, gamma)
  _, _, _, _, inv = _parts(a, u)
  terms = [gamma * f * (2 * u - 1) * _ratio(a, u) * da] if _live(da) else []  # (log P)' = (u - v) q
  if _live(du):
    terms.append(gamma * f * _one_minus_t(a) * inv * du)
  return f, _sum_terms(terms, f)


_factor.defjvp(_factor_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _saturate(v: jax.Array) -> jax.Array:
  """`v` clipped to the finite range, with the unclipped derivative.

  For a label derivative whose true value overflows: only they grow past
  the range at finite logits (``d/dy ~ (gamma + 1) |x|``, ``d2/dy2 ~ |x| /
  P**(1 - gamma)``); an ``inf`` there would turn the zero tangents of a
  forward-mode Hessian's other entries into nan.
  """
  big = jnp.finfo(v.dtype).max
  return jnp.clip(v, -big, big)


_saturate.defjvp(lambda p, t: (_saturate(p[0]), t[0]))


def _label_parts(a, u, w_u, w_v, gamma):
  """The label slope's bounded pieces: ``BCE / den``, ``BCE_u``, ``t / den``, ``q``, logs.

  ``BCE = w_u u (a + T) + w_v (1 - u) T``. Where ``u = 0``, ``den = t``
  (which may underflow): ``t / den = 1``, ``q = sigmoid(a)``, ``log den = -a``.
  """
  t, big, small, den, inv = _parts(a, u)
  tail, hit = jnp.log1p(t), u > 0
  t_den = jnp.where(hit, t * inv, 1)
  t_ratio = jnp.where(t > 0, tail / jnp.where(t > 0, t, 1), 1)  # log1p(t) / t
  tail_den = (1 - u) * t_ratio * t_den  # (1 - u) T / den
  bce_den = w_u * (a + tail) * (u * inv) + w_v * tail_den
  b_u = w_u * a + (w_u - w_v) * tail  # exact for w_u = w_v: the BCE's -x
  log_den = jnp.where(hit, jnp.log(jnp.where(hit, den, 1)), -a)
  log_f = gamma * (log_den - tail)  # P**gamma in log space: exact where P underflows
  q = jnp.where(hit, small * inv, big)
  return t, big, small, tail, inv, t_den, tail_den, bce_den, b_u, log_den, log_f, q


def _scale(gamma: float) -> float:
  """A power of two that keeps each scaled term below float max / 4 (then no 0 * inf)."""
  return 2.0 ** math.ceil(math.log2(4 * (gamma + 2)))


def _slope_parts(a, u, w_u, w_v, c0, c1, gamma):
  """``S / m``, its pieces ``G / m`` and ``F``, and the label parts (see `_label_slope`)."""
  parts = _label_parts(a, u, w_u, w_v, gamma)
  tail, bce_den, b_u = parts[3], parts[7], parts[8]
  f, m = jnp.exp(parts[10]), _scale(gamma)  # the small factor first in each product
  g_m = (f * bce_den) * (gamma / m * _one_minus_t(a)) + f * b_u / m
  fb_m = f * (w_u * u * (a + tail) + w_v * (1 - u) * tail) / m
  return (c0 + c1 * u) * g_m + c1 * fb_m, g_m, f, parts


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _label_slope(a, u, w_u, w_v, c0, c1, gamma):
  """``S = d(c F BCE)/du`` with ``c = c0 + c1 u``: ``c G + c1 F BCE``, saturated.

  ``G = d(F BCE)/du = F (gamma (1 - t) BCE / den + BCE_u)``, ``BCE = w_u u (a + T)
  + w_v (1 - u) T``, ``(log P)_u = (1 - t) / den``; ``1 - t`` by expm1 keeps
  ``dP/dy = -tanh(x / 2)``'s digits near ``x = 0``.
  """
  s_m, _, _, _ = _slope_parts(a, u, w_u, w_v, c0, c1, gamma)
  return _saturate(s_m * _scale(gamma))


def _label_slope_jvp(gamma, primals, tangents):
  """Second derivatives in bounded pieces; ``F / den`` (unbounded for gamma < 1) in log space.

  With ``r = (1 - t) / den``, ``F_u = gamma F r``, ``F_a = gamma (2u - 1) q F``,
  ``r_a = t / den**2``: ``G_u = gamma (F / den)(1 - t)((gamma - 1)(1 - t) BCE / den + 2 BCE_u)``,
  ``G_a = F_ua BCE + F_u BCE_a + F_a BCE_u + F BCE_ua``; ``S_u = 2 c1 G + c G_u``,
  ``S_a = c G_a + c1 (F BCE)_a``.
  """
  (a, u, w_u, w_v, c0, c1), (da, du, dw_u, dw_v) = primals, tangents[:4]
  s = _label_slope(a, u, w_u, w_v, c0, c1, gamma)
  _, g_m, f, parts = _slope_parts(a, u, w_u, w_v, c0, c1, gamma)
  _, big, small, tail, inv, t_den, tail_den, bce_den, b_u, log_den, log_f, q = parts
  omt, c, m = _one_minus_t(a), c0 + c1 * u, _scale(gamma)
  terms = []
  if _live(da):
    ba_den = w_u * big * (u * inv) - w_v * (1 - u) * q  # BCE_a / den
    fk = f * ((2 * u - 1) * q)
    inner = (fk * (gamma * omt) + f * t_den) * bce_den + (f * omt) * ba_den + fk * b_u
    g_a = gamma * inner + f * (w_u * big + w_v * small)
    # (F BCE)_a as the logits' slope, |x| clamped where q = 0
    finite = w_u * u * (jnp.minimum(a, _q_scale_bound(a.dtype)) + tail) + w_v * (1 - u) * tail
    fb_a = f * (w_u * u * big - w_v * (1 - u) * small + gamma * (2 * u - 1) * q * finite)
    terms.append(_saturate(c * g_a + c1 * fb_a) * da)
  if _live(du):
    inner = ((gamma - 1) / m * omt) * bce_den + (2 / m) * b_u
    coef = gamma * jnp.exp(log_f - log_den) * omt  # gamma (F / den)(1 - t)
    terms.append(_saturate((2 * c1 * g_m + c * (coef * inner)) * m) * du)
  if _live(dw_u):
    terms.append(f * (a + tail) * (c * (gamma * omt * (u * inv) + 1) + c1 * u) * dw_u)
  if _live(dw_v):
    terms.append(f * (c * (gamma * omt * tail_den - tail) + c1 * (1 - u) * tail) * dw_v)
  return s, _sum_terms(terms, s)


_label_slope.defjvp(_label_slope_jvp, symbolic_zeros=True)
