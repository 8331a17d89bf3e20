r"""The binary cross-entropy element formula, and its two public functions.

* logits: ``(1 - y) * softplus(x) + w * y * softplus(-x)``; without a weight
  it is computed as ``max((1 - y) x, -y x) + log1p(exp(-|x|))``, the same
  non-negative sum in 6 cheap operations beside the exp and the log1p.
  Nothing cancels, so it is accurate to a few ulps for every finite logit.
* probabilities: ``-(w * y * log(pc) + (1 - y) * log(1 - pc))`` with
  ``pc = clip(p, eps, 1 - eps)``.

Both carry a custom JVP with closed-form derivatives: in the logits
``(1 - y) sigmoid(x) - w y sigmoid(-x)``, each sigmoid on the side that
cannot round away; in the labels ``w softplus(-x) - softplus(x)``, which is
exactly ``-x`` for ``w = 1``; in the probabilities the derivative of the loss
at the clipped probability (never 0 at the clip, unlike Keras).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from bce_jax import _logsig, _reduce


def _sum_terms(terms: list[jax.Array], like: jax.Array) -> jax.Array:
  if not terms:
    return jnp.zeros_like(like)
  total = terms[0]
  for term in terms[1:]:
    total = total + term
  return jnp.broadcast_to(total, like.shape).astype(like.dtype)


@jax.custom_jvp
def _logit_losses(logits, labels, pos_weight):
  if pos_weight is None:
    # One of max(x, 0), max(-x, 0) is 0 and the tail's weights sum to 1, so
    # the larger product is the non-zero one. No select: XLA's CPU fusion of
    # the reduction would split off a pass writing a full-size temporary.
    tail = jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.maximum((1 - labels) * logits, -(labels * logits)) + tail
  sp_pos, sp_neg = _logsig.softplus_pair(logits)  # -log(1 - p), -log(p)
  return (1 - labels) * sp_pos + pos_weight * (labels * sp_neg)


def _logit_losses_jvp(primals, tangents):
  logits, labels, pos_weight = primals
  d_logits, d_labels, d_weight = tangents
  losses = _logit_losses(logits, labels, pos_weight)
  terms = []
  if not isinstance(d_logits, SymbolicZero):
    one = _logsig.fresh(1, logits.dtype)
    sig_pos, sig_neg = _logsig.sigmoid_pair(logits, one)
    positive = labels * sig_neg if pos_weight is None else pos_weight * (labels * sig_neg)
    terms.append(((one - labels) * sig_pos - positive) * d_logits)
  weighted = pos_weight is not None and not isinstance(d_weight, SymbolicZero)
  if not isinstance(d_labels, SymbolicZero) or weighted:
    _sp_pos, sp_neg = _logsig.softplus_pair(logits)
    if not isinstance(d_labels, SymbolicZero):
      # w sp(-x) - sp(x) = (w - 1) sp(-x) - x: the closed form, no cancellation at w = 1.
      slope = -logits if pos_weight is None else (pos_weight - 1) * sp_neg - logits
      terms.append(slope * d_labels)
    if weighted:
      terms.append(labels * sp_neg * d_weight)
  return losses, _sum_terms(terms, losses)


_logit_losses.defjvp(_logit_losses_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _prob_losses(probs, labels, pos_weight):
  log_p, log_1mp = _logsig.clipped_logs(probs)
  positive = labels * log_p if pos_weight is None else pos_weight * (labels * log_p)
  return -(positive + (1 - labels) * log_1mp)


def _prob_losses_jvp(primals, tangents):
  probs, labels, pos_weight = primals
  d_probs, d_labels, d_weight = tangents
  losses = _prob_losses(probs, labels, pos_weight)
  weight = 1 if pos_weight is None else pos_weight
  terms = []
  if not isinstance(d_probs, SymbolicZero):
    one = _logsig.fresh(1, probs.dtype)
    clipped = _logsig.clip_probs(probs)
    terms.append(((one - labels) / (one - clipped) - weight * labels / clipped) * d_probs)
  weighted = pos_weight is not None and not isinstance(d_weight, SymbolicZero)
  if not isinstance(d_labels, SymbolicZero) or weighted:
    log_p, log_1mp = _logsig.clipped_logs(probs)
    if not isinstance(d_labels, SymbolicZero):
      terms.append((log_1mp - weight * log_p) * d_labels)
    if weighted:
      terms.append(-labels * log_p * d_weight)
  return losses, _sum_terms(terms, losses)


_prob_losses.defjvp(_prob_losses_jvp, symbolic_zeros=True)


def _exact_at_infinity(losses, logits, labels, pos_weight):
  """`losses` with the exact values at infinite logits (the fast form gives nan).

  At ``x = +inf`` the loss is ``(1 - y) * inf``, at ``-inf`` it is
  ``w y * inf``: 0 where that coefficient is 0 (a matching label, or
  ``pos_weight = 0``), else an infinity of its sign. `labels` are already
  smoothed, so a smoothed label meets an infinite logit with ``inf``.
  """
  positive = labels if pos_weight is None else pos_weight * labels
  coefficient = jnp.where(logits > 0, 1 - labels, positive)
  exact = jnp.where(coefficient == 0, 0, coefficient * jnp.inf).astype(losses.dtype)
  return jnp.where(jnp.isinf(logits), exact, losses)


def bce_element(labels, preds, pos_weight, *, from_logits: bool, safe: bool) -> jax.Array:
  """BCE of each element; all arrays in the compute dtype, labels smoothed.

  `safe` adds the exact values at infinite logits (a select the fast
  reduction avoids; it falls back to this path when its sum is not finite).
  """
  if not from_logits:
    return _prob_losses(preds, labels, pos_weight)
  losses = _logit_losses(preds, labels, pos_weight)
  return _exact_at_infinity(losses, preds, labels, pos_weight) if safe else losses


@functools.cache
def formula(from_logits: bool) -> _reduce.Formula:
  """The BCE formula for logits or probabilities."""
  return _reduce.Formula(bce_element, from_logits)


def binary_crossentropy_elementwise(
  y_true: ArrayLike,
  y_pred: ArrayLike,
  from_logits: bool = False,
  label_smoothing: float = 0.0,
  *,
  pos_weight: ArrayLike | None = None,
) -> jax.Array:
  r"""Binary cross-entropy of each element, with no reduction.

  .. math::
    \ell = -\left[w_+\,\tilde y \log p + (1 - \tilde y) \log(1 - p)\right],
    \qquad \tilde y = y (1 - s) + s / 2

  where :math:`p = \sigma(x)` for logits and :math:`p` clipped to
  ``[eps, 1 - eps]`` (``eps = 1e-7``) for probabilities.

  Args:
    y_true: labels in [0, 1], shape `[batch, d0, .., dN]`. Integer and bool
      labels are cast.
    y_pred: probabilities, or logits if `from_logits`, of the same shape as
      `y_true`. A trailing axis of size 1 on either side is squeezed or
      added so the ranks agree (`[B]` with `[B, 1]` gives `[B, 1]`); other
      shape differences are an error, never a broadcast.
    from_logits: whether `y_pred` holds logits (the numerically safer
      choice) rather than probabilities.
    label_smoothing: `s` in [0, 1]; labels become ``y * (1 - s) + 0.5 * s``.
    pos_weight: weight `w_+` of the positive term: a scalar or any shape that
      broadcasts to the element losses without changing their shape (as
      PyTorch's ``BCEWithLogitsLoss``). None means 1.

  Returns:
    The element losses, in the shape of the aligned inputs. The dtype is
    float32 for float32, float16, bfloat16, integer and bool `y_pred`, and
    float64 for float64 `y_pred` (with ``jax_enable_x64``). Infinite logits
    are exact: 0 for a matching label (or a `pos_weight` of 0 on the
    positive term), ``inf`` otherwise, smoothed labels included.

  Raises:
    ValueError: if the shapes do not match, `label_smoothing` is outside
      [0, 1], or `pos_weight` does not broadcast to the element losses.
    TypeError: if an input is complex or not numeric.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, bce_jax
    >>> y = jnp.array([1.0, 0.0, 1.0])
    >>> x = jnp.array([2.0, -1.0, -3.0])
    >>> losses = bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True)
    >>> print(np.round(np.asarray(losses), 4))
    [0.1269 0.3133 3.0486]
  """
  return _reduce.elementwise(
    formula(_reduce.flag("from_logits", from_logits)),
    y_true,
    y_pred,
    label_smoothing,
    pos_weight,
  )


def binary_crossentropy(
  y_true: ArrayLike,
  y_pred: ArrayLike,
  from_logits: bool = False,
  label_smoothing: float = 0.0,
  axis: int | tuple[int, ...] = -1,
  *,
  pos_weight: ArrayLike | None = None,
) -> jax.Array:
  r"""Binary cross-entropy averaged over `axis`, as ``keras.losses.binary_crossentropy``.

  .. math:: \ell = -\,\mathrm{mean}_{axis}\left[w_+\,\tilde y \log p
     + (1 - \tilde y) \log(1 - p)\right]

  Args:
    y_true: labels in [0, 1], shape `[batch, d0, .., dN]`; int/bool are cast.
    y_pred: probabilities (clipped to ``[1e-7, 1 - 1e-7]``, also when they
      lie outside [0, 1]), or logits if `from_logits`, of the same shape (a
      trailing size-1 axis on either side is squeezed or added; nothing is
      broadcast).
    from_logits: whether `y_pred` holds logits rather than probabilities.
    label_smoothing: `s` in [0, 1]; labels become ``y * (1 - s) + 0.5 * s``.
    axis: the axis or tuple of axes to average over.
    pos_weight: weight of the positive term: a scalar or any shape that
      broadcasts to the element losses without changing their shape.

  Returns:
    Array of shape `[batch, d0, .., dN-1]` (the inputs without `axis`):
    float32, or float64 for float64 `y_pred`. Averaging over an axis of size
    0 gives 0.

  Raises:
    ValueError: if the shapes do not match, `axis` is out of range,
      `label_smoothing` is outside [0, 1], or `pos_weight` does not fit.
    TypeError: if an input is complex or not numeric.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, bce_jax
    >>> y_true = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    >>> y_pred = jnp.array([[0.6, 0.4], [0.4, 0.6]])
    >>> print(np.round(np.asarray(bce_jax.binary_crossentropy(y_true, y_pred)), 3))
    [0.916 0.714]
  """
  return _reduce.axis_mean(
    formula(_reduce.flag("from_logits", from_logits)),
    y_true,
    y_pred,
    label_smoothing,
    pos_weight,
    axis,
  )
