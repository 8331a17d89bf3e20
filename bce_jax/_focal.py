r"""The binary focal cross-entropy element formula, and its two public functions.

Keras 3's definition: labels smoothed first, ``P = 1 - p_t = y (1 - p) + (1 - y) p``,
``loss = c P**gamma BCE`` with ``c = alpha y + (1 - alpha)(1 - y)`` under class
balancing, else 1. `pos_weight` multiplies the BCE's positive term only.

* logits: with ``a = |x|``, ``t = exp(-a)``, ``T = log1p(t)`` (the BCE's two
  transcendentals) and ``u`` the label weight of the larger sigmoid (``1 - y``
  for ``x >= 0``, else ``y``): ``BCE = u a + T`` and
  ``P = (t + u (1 - t)) / (1 + t)``, so ``log P = log(t + u (1 - t)) - T``.
  Sums of non-negative terms: nothing cancels, and P underflows only where
  the loss does. ``P**gamma`` is a multiply chain (and a sqrt) when
  ``2 gamma`` is an integer, so the value costs exp + log1p + one division
  (the BCE's exp and log1p), hard and soft labels alike; other gammas add a
  log and an exp. No select (it would split XLA's CPU reduction fusion).
* probabilities: the BCE's clip rule, and ``P`` of the clipped probability:
  ``P >= 1.2e-7``, so the factor's derivative is finite at the clip.

The JVPs are closed forms in bounded quantities (``q = s (1 - s) / P`` in
[0, 1]; ``BCE / (t + u (1 - t))`` for the labels), built from helpers with
their own JVPs (bce_jax._focal_parts) so that the Hessian is finite too, by
any route and in either argument order. Only the label derivatives can pass
the float range at a finite logit (``d/dy ~ (gamma + 1) |x|`` near
``|x| = 3e38``; ``d2/dy2 ~ |x| P**(gamma - 1)`` at hard labels for
``gamma < 1``): they saturate at the largest float. ``gamma = 0`` is the
BCE, value and gradient, operation for operation.

References:
  T.-Y. Lin, P. Goyal, R. Girshick, K. He and P. Dollar, "Focal Loss for Dense
  Object Detection", ICCV 2017; Keras 3, ``keras.losses.BinaryFocalCrossentropy``
  (https://keras.io/api/losses/probabilistic_losses/#binaryfocalcrossentropy-class).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bce_jax import _config, _logsig, _reduce
from bce_jax._focal_parts import (
  _factor,
  _label_slope,
  _live,
  _magnitude,
  _parts,
  _power,
  _q_scale_bound,
  _ratio_times,
  _saturate,
  _sum_terms,
)

ELEMENTWISE = "binary_focal_crossentropy_elementwise"  # named in errors about `axis`


def _class_weight(labels, alpha):
  return 1.0 if alpha is None else alpha * labels + (1 - alpha) * (1 - labels)


def _logit_value(x, y, w, gamma, alpha):
  """The logits' value; no selects (it runs inside XLA's fused reduction)."""
  a = jnp.abs(x)
  t = jnp.exp(-a)
  tail = jnp.log1p(t)
  if w is not None:  # the BCE's own formulas (see _bce): gamma = 0 is the BCE exactly
    sp_pos, sp_neg = _logsig.softplus_pair(x)
    losses = (1 - y) * sp_pos + w * (y * sp_neg)
  elif not gamma:
    losses = jnp.maximum((1 - y) * x, -(y * x)) + tail
  if gamma:
    u = y + (0.5 + 0.5 * jnp.sign(x)) * (1 - 2 * y)  # 1/2 at x = 0, where t = 1
    if w is None:
      losses = u * a + tail
    losses = _power((t + u * (1 - t)) / (1 + t), gamma) * losses
  return losses if alpha is None else _class_weight(y, alpha) * losses


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _logit_losses(x, y, w, gamma, alpha):
  return _logit_value(x, y, w, gamma, alpha)


def _logit_losses_jvp(gamma, alpha, primals, tangents):
  (x, y, w), (dx, dy, dw) = primals, tangents
  losses = _logit_losses(x, y, w, gamma, alpha)
  pos, a = x >= 0, _magnitude(x)
  u = jnp.where(pos, 1 - y, y)
  t, big, small, _, _ = _parts(a, u)
  tail = jnp.log1p(t)
  w_u, w_v = (1, 1) if w is None else (jnp.where(pos, 1, w), jnp.where(pos, w, 1))
  sp_neg = jnp.where(pos, tail, a + tail)  # softplus(-x)
  bce = w_u * u * (a + tail) + w_v * (1 - u) * tail
  c = _class_weight(y, alpha)
  factor = _factor(a, u, gamma) if gamma else 1
  terms = []
  if _live(dx):
    if gamma:  # c F (BCE' + gamma (1 - 2y) q BCE); q = 0 where |x| is clamped (and infinite)
      finite = jnp.minimum(a, _q_scale_bound(a.dtype))
      if w is None:
        slope, finite = u - small, u * finite + tail
      else:
        slope = w_u * u * big - w_v * (1 - u) * small
        finite = w_u * u * (finite + tail) + w_v * (1 - u) * tail
      slope = jnp.where(pos, slope, -slope) + gamma * (1 - 2 * y) * _ratio_times(a, u, finite)
      slope = factor * slope
    else:  # the BCE's
      sig_pos, sig_neg = jnp.where(pos, big, small), jnp.where(pos, small, big)
      slope = (1 - y) * sig_pos - (y * sig_neg if w is None else w * (y * sig_neg))
    terms.append(c * slope * dx)
  if _live(dy):
    if gamma:  # d(c F BCE)/dy = -+ d/du; its own JVP keeps the Hessian finite
      ones = jnp.ones_like(a)
      c0, c1 = (1, 0) if alpha is None else (jnp.where(pos, alpha, 1 - alpha), 1 - 2 * alpha)
      c1 = jnp.where(pos, c1, -c1) * ones
      slope = _label_slope(a, u, w_u * ones, w_v * ones, c0 * ones, c1, gamma)
      slope = jnp.where(pos, -slope, slope)
    else:
      slope = -x if w is None else (w - 1) * sp_neg - x  # w softplus(-x) - softplus(x)
      slope = c * slope
      if alpha is not None:
        slope = _saturate(slope + (2 * alpha - 1) * bce)  # c' = 2 alpha - 1
    terms.append(slope * dy)
  if w is not None and _live(dw):
    terms.append(c * factor * y * sp_neg * dw)
  return losses, _sum_terms(terms, losses)


_logit_losses.defjvp(_logit_losses_jvp, symbolic_zeros=True)


def _exact_at_infinity(losses, x, y, w, alpha):
  """`losses` with the exact values at infinite logits (the fast form gives nan).

  At ``x = +inf`` the loss is ``c (1 - y)**gamma (1 - y) inf``: inf where
  ``c (1 - y) > 0``, else 0; at ``-inf`` the same with ``c w y``.
  """
  positive = y if w is None else w * y
  wrong = jnp.where(x > 0, 1 - y, positive) * _class_weight(y, alpha) > 0
  exact = jnp.where(wrong, jnp.inf, 0).astype(losses.dtype)
  return jnp.where(jnp.isinf(x), exact, losses)


def _prob_bce(p, y, w):
  """The BCE's own formula (see _bce), and the two clipped logs."""
  log_p, log_1mp = _logsig.clipped_logs(p)
  positive = y * log_p if w is None else w * (y * log_p)
  return -(positive + (1 - y) * log_1mp), log_p, log_1mp


def _one_minus_pt(p, y):
  """``y (1 - pc) + (1 - y) pc``, `pc` clipped: one bound a side (a clamp splits the fusion)."""
  lo, hi = _logsig.clip_bounds(p.dtype)
  return y * jnp.maximum(1 - p, 1 - hi) + (1 - y) * jnp.maximum(p, lo)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _prob_losses(p, y, w, gamma, alpha):
  losses, _, _ = _prob_bce(p, y, w)
  if gamma:
    losses = _power(_one_minus_pt(p, y), gamma) * losses
  return losses if alpha is None else _class_weight(y, alpha) * losses


def _prob_losses_jvp(gamma, alpha, primals, tangents):
  p, y, w = primals
  dp, dy, dw = tangents
  losses = _prob_losses(p, y, w, gamma, alpha)
  # From the clipped probability alone (as the BCE's JVP): sharing the value's
  # clip constants would make XLA write them out as full-size broadcasts.
  clipped = _logsig.clip_probs(p)
  log_p, log_1mp = jnp.log(clipped), jnp.log1p(-clipped)
  weight = 1 if w is None else w
  bce = -(weight * y * log_p + (1 - y) * log_1mp)
  one_minus_pt = y * (1 - clipped) + (1 - y) * clipped
  factor = _power(one_minus_pt, gamma) if gamma else 1
  c = _class_weight(y, alpha)
  terms = []
  if _live(dp):
    slope = (1 - y) / (1 - clipped) - weight * y / clipped  # the BCE's, at the clip
    if gamma:  # d P / dp = 1 - 2y; P >= 1.2e-7, so factor / P is finite
      slope = factor * (slope + gamma * (1 - 2 * y) * bce / one_minus_pt)
    terms.append(c * slope * dp)
  if _live(dy):
    slope = log_1mp - weight * log_p
    if gamma:
      slope = factor * (slope + gamma * (1 - 2 * clipped) * bce / one_minus_pt)
    slope = c * slope
    if alpha is not None:
      slope = slope + (2 * alpha - 1) * factor * bce
    terms.append(slope * dy)
  if w is not None and _live(dw):
    terms.append(-c * factor * y * log_p * dw)
  return losses, _sum_terms(terms, losses)


_prob_losses.defjvp(_prob_losses_jvp, symbolic_zeros=True)


def focal_element(labels, preds, pos_weight, *, from_logits, safe, alpha, gamma) -> jax.Array:
  """Focal loss of each element (compute dtype, labels smoothed); `alpha` None: no balancing."""
  if not from_logits:
    return _prob_losses(preds, labels, pos_weight, gamma, alpha)
  losses = _logit_losses(preds, labels, pos_weight, gamma, alpha)
  return _exact_at_infinity(losses, preds, labels, pos_weight, alpha) if safe else losses


@functools.cache
def _cached_formula(from_logits: bool, alpha: float | None, gamma: float) -> _reduce.Formula:
  return _reduce.Formula(focal_element, from_logits, (("alpha", alpha), ("gamma", gamma)))


def formula(from_logits, apply_class_balancing, alpha, gamma) -> _reduce.Formula:
  """The focal formula; checks each option by its name (a loss object has already).

  Options that passed once are remembered by value and type (so ``1`` is
  never taken for ``True``): an eager call does not check them again. A
  failed check is not remembered, so it raises on every call.
  """
  key = (
    (type(from_logits), from_logits),
    (type(apply_class_balancing), apply_class_balancing),
    (type(alpha), alpha),
    (type(gamma), gamma),
  )
  try:
    return _CHECKED[key]
  except KeyError:
    pass
  except TypeError:  # an array-valued option: checked (and refused) each time
    return _formula(from_logits, apply_class_balancing, alpha, gamma)
  out = _formula(from_logits, apply_class_balancing, alpha, gamma)
  if len(_CHECKED) >= 256:
    _CHECKED.clear()
  _CHECKED[key] = out
  return out


# The formulas of option tuples that passed their checks, keyed by value and type.
_CHECKED: dict[tuple, _reduce.Formula] = {}


def _formula(from_logits, apply_class_balancing, alpha, gamma) -> _reduce.Formula:
  check = _config._FIELDS  # the objects' field checks, reused for the functions' arguments
  balancing = check["apply_class_balancing"](apply_class_balancing)
  alpha, gamma = check["alpha"](alpha), check["gamma"](gamma)
  return _cached_formula(check["from_logits"](from_logits), alpha if balancing else None, gamma)


def binary_focal_crossentropy_elementwise(
  y_true: ArrayLike,
  y_pred: ArrayLike,
  apply_class_balancing: bool = False,
  alpha: float = 0.25,
  gamma: float = 2.0,
  from_logits: bool = False,
  label_smoothing: float = 0.0,
  *,
  pos_weight: ArrayLike | None = None,
) -> jax.Array:
  r"""Binary focal cross-entropy of each element, with no reduction.

  .. math::
    \ell = c\,(1 - p_t)^\gamma\,\mathrm{BCE}(\tilde y, p), \qquad
    1 - p_t = \tilde y (1 - p) + (1 - \tilde y) p, \qquad
    c = \alpha \tilde y + (1 - \alpha)(1 - \tilde y)

  with ``c = 1`` unless `apply_class_balancing`, ``y~ = y (1 - s) + s / 2``
  and `p` the sigmoid of the logits or the clipped probability (as for
  :func:`bce_jax.binary_crossentropy_elementwise`).

  Args:
    y_true: labels in [0, 1] (int and bool are cast).
    y_pred: probabilities, or logits if `from_logits`, of the same shape (a
      trailing size-1 axis on either side is squeezed or added).
    apply_class_balancing: whether to weight by `c` (`alpha` for class 1,
      ``1 - alpha`` for class 0).
    alpha: the class-1 weight in [0, 1], a Python float.
    gamma: the focusing exponent, a Python float ``>= 0``; 0 is the BCE.
      Multiples of 0.5 are cheapest (see the module notes).
    from_logits: whether `y_pred` holds logits (recommended: exact in both
      tails) rather than probabilities.
    label_smoothing: `s` in [0, 1]; labels become ``y * (1 - s) + 0.5 * s``
      before anything else, the class weight and the factor included.
    pos_weight: weight of the positive BCE term only (not of the factor or
      `c`): a scalar or any shape that broadcasts to the element losses.

  Returns:
    The element losses in the shape of the aligned inputs; float32 (float64
    for float64 `y_pred`). Infinite logits are exact (0 or ``inf``).

  Raises:
    ValueError: for mismatched shapes, or `alpha`, `gamma` or
      `label_smoothing` out of range.
    TypeError: for non-numeric inputs, or an option of the wrong type (a
      traced `alpha` or `gamma` included: they select the compiled formula).

  References:
    Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017; Keras 3,
    ``keras.losses.binary_focal_crossentropy``.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, bce_jax
    >>> y = jnp.array([0.0, 1.0, 0.0, 0.0])
    >>> x = jnp.array([-18.6, 0.51, 2.94, -12.8])
    >>> losses = bce_jax.binary_focal_crossentropy_elementwise(y, x, from_logits=True)
    >>> print(np.round(np.asarray(losses), 4))
    [0.     0.0662 2.6986 0.    ]
  """
  focal = formula(from_logits, apply_class_balancing, alpha, gamma)
  return _reduce.elementwise(focal, y_true, y_pred, label_smoothing, pos_weight)


def binary_focal_crossentropy(
  y_true: ArrayLike,
  y_pred: ArrayLike,
  apply_class_balancing: bool = False,
  alpha: float = 0.25,
  gamma: float = 2.0,
  from_logits: bool = False,
  label_smoothing: float = 0.0,
  axis: int | tuple[int, ...] = -1,
  *,
  pos_weight: ArrayLike | None = None,
) -> jax.Array:
  r"""Binary focal cross-entropy averaged over `axis`, as Keras's ``binary_focal_crossentropy``.

  The element losses of :func:`binary_focal_crossentropy_elementwise`
  (every argument but `axis` is described there), averaged over `axis`.

  Returns:
    Array of shape `[batch, d0, .., dN-1]` (the inputs without `axis`);
    float32, or float64 for float64 `y_pred`.

  Raises:
    ValueError: as the elementwise function, or for an out-of-range `axis`.
    TypeError: as the elementwise function.

  References:
    Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017; Keras 3,
    ``keras.losses.binary_focal_crossentropy``, whose docstring prints
    ``[0.330, 0.206]`` for this example.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, bce_jax
    >>> y_true = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    >>> y_pred = jnp.array([[0.6, 0.4], [0.4, 0.6]])
    >>> print(np.round(np.asarray(bce_jax.binary_focal_crossentropy(y_true, y_pred)), 3))
    [0.33  0.206]
  """
  focal = formula(from_logits, apply_class_balancing, alpha, gamma)
  return _reduce.axis_mean(focal, y_true, y_pred, label_smoothing, pos_weight, axis, ELEMENTWISE)
