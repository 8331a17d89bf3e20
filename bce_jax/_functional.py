r"""The binary cross-entropy formula: the only copy in the package.

Everything else (the loss object, the metric) calls
:func:`binary_crossentropy_elementwise` or :func:`binary_crossentropy`.

Two formulations, one per kind of prediction:

* logits: ``(1 - y) * softplus(x) + w * y * softplus(-x)``, where both
  softplus values share one ``exp`` and one ``log1p``:
  ``softplus(±x) = max(±x, 0) + log1p(exp(-|x|))`` (without a weight, the
  loss is computed as ``max((1 - y) x, -y x) + log1p(exp(-|x|))``, the same
  sum in fewer operations). All terms are
  non-negative, so there is no cancellation: the result is accurate to a few
  float32 ulps for every finite logit and every label in [0, 1]. The loss
  carries a custom JVP: its derivative in the logits,
  ``(1 - y) * sigmoid(x) - w * y * sigmoid(-x)``, takes each sigmoid on the
  side that cannot round away, and is recomputed from the inputs behind an
  optimization barrier, so that ``value_and_grad`` compiles to one fused
  reduction for the loss and one fused pass writing the gradient, with no
  full-size temporary in between (plain autodiff of ``max`` and ``|x|``
  would also be wrong at exactly ``x = 0``).
* probabilities: ``-(w * y * log(p) + (1 - y) * log(1 - p))`` with ``p``
  clipped to ``[eps, 1 - eps]``, as two one-sided clips (``p >= eps`` and
  ``1 - p >= 1 - fl(1 - eps)``, the same values; a two-sided clip is
  written out as a temporary on CPU). The clips pass the gradient straight
  through, so the derivative is that of the loss at the clipped probability
  (Keras returns 0 there, and a confidently wrong prediction stops learning).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bce_jax import _checks

_EPS = 1e-7
# Arrays whose innermost axis is narrower than this are computed flattened.
_FLATTEN_BELOW = 64


def clip_eps(dtype: Any) -> float:
  """The clip width for probabilities computed in `dtype`.

  Keras's 1e-7, widened where the dtype cannot represent ``1 - 1e-7`` (it
  would round to 1 and ``log(1 - p)`` would be ``-inf``). bce_jax computes
  in float32 or float64, where 1e-7 already works; the rule is kept general
  so the clip can never produce an infinite loss.
  """
  return max(_EPS, float(np.finfo(dtype).epsneg))


def _one_minus_clip_hi(dtype: Any) -> float:
  """``1 - fl(1 - eps)``: the smallest ``1 - p`` that Keras's clip leaves.

  ``1 - eps`` rounds in `dtype` (to ``1 - 2**-23`` in float32), so clipping
  ``1 - p`` from below at this value gives exactly Keras's ``1 - clip(p)``.
  """
  return float(1 - np.asarray(1 - clip_eps(dtype), dtype))


@jax.custom_jvp
def _sigmoid_pair(x: jax.Array, one: jax.Array, zero: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sigmoid(x), sigmoid(-x))``, both accurate in their tails, one exp.

  `one` and `zero` are the scalars 1 and 0. The gradient passes them
  through an optimization barrier (see :func:`_logit_grad`) so that XLA
  cannot merge their broadcasts with the loss's.
  """
  e = jnp.exp(-jnp.abs(x))
  big = one / (one + e)  # sigmoid(|x|)
  small = e * big  # sigmoid(-|x|)
  pos = x >= zero
  return jnp.where(pos, big, small), jnp.where(pos, small, big)


@_sigmoid_pair.defjvp
def _sigmoid_pair_jvp(primals, tangents):
  (x, one, zero), (dx, _, _) = primals, tangents
  sig_pos, sig_neg = _sigmoid_pair(x, one, zero)
  d = sig_pos * sig_neg * dx
  return (sig_pos, sig_neg), (d, -d)


@jax.custom_jvp
def _softplus_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(softplus(x), softplus(-x))`` from one exp and one log1p."""
  # log1p(exp(-|x|)) is the part the two share; it is in (0, log 2] and
  # never overflows. max(±x, 0) carries the magnitude.
  tail = jnp.log1p(jnp.exp(-jnp.abs(x)))
  return jnp.maximum(x, 0) + tail, jnp.maximum(-x, 0) + tail


@_softplus_pair.defjvp
def _softplus_pair_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  one, zero = jnp.ones((), x.dtype), jnp.zeros((), x.dtype)
  sig_pos, sig_neg = _sigmoid_pair(x, one, zero)
  return _softplus_pair(x), (sig_pos * dx, -sig_neg * dx)


def _logit_grad(
    logits: jax.Array, labels: jax.Array, pos_weight: jax.Array | None
) -> jax.Array:
  """``d loss / d logits = (1 - y) sigmoid(x) - w y sigmoid(-x)``.

  Each sigmoid is taken on the side where it cannot round to 0 or 1, so the
  derivative is accurate in both tails (``sigmoid(x) - y`` is 0 instead of
  -2e-9 at ``x = 20, y = 1``).

  Everything is recomputed from the inputs behind
  ``lax.optimization_barrier``: XLA then cannot share an ``exp``, a ``1 - y``
  or a broadcast constant between the loss's reduction and the gradient.
  On CPU, any value the two share is written out as a full-size temporary,
  which costs more than recomputing it.
  """
  one, zero = jnp.ones((), logits.dtype), jnp.zeros((), logits.dtype)
  logits, labels, pos_weight, one, zero = jax.lax.optimization_barrier(
      (logits, labels, pos_weight, one, zero)
  )
  sig_pos, sig_neg = _sigmoid_pair(logits, one, zero)
  positive = labels * sig_neg
  if pos_weight is not None:
    positive = pos_weight * positive
  return (one - labels) * sig_pos - positive


def _logit_losses_impl(logits, labels, pos_weight):
  if pos_weight is None:
    tail = jnp.log1p(jnp.exp(-jnp.abs(logits)))
    # The tail's weights 1 - y and y sum to 1, and one of max(x, 0) and
    # max(-x, 0) is 0, so the loss is max((1 - y) x, -y x) + tail: the
    # larger product is the non-zero one. Every term is still non-negative,
    # so nothing cancels (max(x, 0) - x y + tail is shorter, but accurate
    # only where the compiler happens to contract x - x y into an FMA).
    # Beside the exp and log1p this is 6 elementwise operations instead of
    # 9, which is ~20% of the forward loss on CPU. There is no select on
    # purpose: XLA's CPU fusion of the reduction does not take one, and
    # splits off a pass that writes a full-size temporary.
    return jnp.maximum((1 - labels) * logits, -(labels * logits)) + tail
  sp_pos, sp_neg = _softplus_pair(logits)  # -log(1 - p), -log(p)
  return (1 - labels) * sp_pos + pos_weight * (labels * sp_neg)


@jax.custom_jvp
def _logit_losses(
    logits: jax.Array, labels: jax.Array, pos_weight: jax.Array | None
) -> jax.Array:
  """``(1 - y) softplus(x) + w y softplus(-x)``: one exp, one log1p.

  The custom JVP gives the derivative in each argument from its own
  formula (:func:`_logit_grad` for the logits), so the loss and its
  gradient compile to two fusions that share nothing but the inputs.
  """
  return _logit_losses_impl(logits, labels, pos_weight)


def _logit_losses_jvp(primals, tangents):
  logits, labels, pos_weight = primals
  d_logits, d_labels, d_weight = tangents
  losses = _logit_losses(logits, labels, pos_weight)
  zero_tangent = jax.custom_derivatives.SymbolicZero
  terms = []
  if not isinstance(d_logits, zero_tangent):
    terms.append(_logit_grad(logits, labels, pos_weight) * d_logits)
  d_labels_zero = isinstance(d_labels, zero_tangent)
  d_weight_zero = pos_weight is None or isinstance(d_weight, zero_tangent)
  if not (d_labels_zero and d_weight_zero):
    sp_pos, sp_neg = _softplus_pair(logits)  # -log(1 - p), -log(p)
    if not d_labels_zero:
      positive = sp_neg if pos_weight is None else pos_weight * sp_neg
      terms.append((positive - sp_pos) * d_labels)
    if not d_weight_zero:
      terms.append(labels * sp_neg * d_weight)
  if not terms:
    return losses, jnp.zeros_like(losses)
  d_losses = terms[0]
  for term in terms[1:]:
    d_losses = d_losses + term
  return losses, jnp.broadcast_to(d_losses, losses.shape).astype(losses.dtype)


_logit_losses.defjvp(_logit_losses_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _max_straight_through(v: jax.Array, lo: jax.Array) -> jax.Array:
  """``max(v, lo)`` whose derivative in `v` is 1 everywhere."""
  return jnp.maximum(v, lo)


@_max_straight_through.defjvp
def _max_straight_through_jvp(primals, tangents):
  (v, lo), (dv, _) = primals, tangents
  return _max_straight_through(v, lo), dv


def _element_losses(
    labels: jax.Array,
    preds: jax.Array,
    pos_weight: jax.Array | None,
    from_logits: bool,
) -> jax.Array:
  """The BCE of each element; `labels` already smoothed, all in one dtype."""
  shape = preds.shape
  if len(shape) > 1 and shape[-1] < _FLATTEN_BELOW:
    # XLA on CPU runs a fused reduction over a [B, 1] array ~20x slower than
    # over [B] (and [B, 4] ~3x): the innermost axis is its vector. A narrow
    # innermost axis is computed flat; the barrier keeps XLA from folding
    # the (free) reshape back into the fusion. It costs a float32 copy of
    # float16/bfloat16 inputs, far less than what it saves.
    labels, preds = labels.reshape(-1), preds.reshape(-1)
    if pos_weight is not None:
      pos_weight = jnp.broadcast_to(pos_weight, shape).reshape(-1)
    labels, preds = jax.lax.optimization_barrier((labels, preds))
    return _element_losses(labels, preds, pos_weight, from_logits).reshape(shape)
  if from_logits:
    return _logit_losses(preds, labels, pos_weight)
  # Keras clips p to [eps, 1 - eps]. Two one-sided clips, p >= eps for
  # log(p) and 1 - p >= 1 - fl(1 - eps) for log(1 - p), give the same
  # values and, unlike a two-sided clip, fuse into the reduction on CPU.
  dtype = preds.dtype
  lo = jnp.asarray(clip_eps(dtype), dtype)
  lo_complement = jnp.asarray(_one_minus_clip_hi(dtype), dtype)
  positive = -labels * jnp.log(_max_straight_through(preds, lo))
  negative = -(1 - labels) * jnp.log(_max_straight_through(1 - preds, lo_complement))
  if pos_weight is not None:
    positive = pos_weight * positive
  return positive + negative


def _prepare(y_true, y_pred, label_smoothing, pos_weight, from_logits):
  """Converts, checks and aligns the inputs; returns arrays in the compute dtype."""
  from_logits = _checks.check_bool("from_logits", from_logits)
  y_true = _checks.as_array("y_true", y_true)
  y_pred = _checks.as_array("y_pred", y_pred)
  _checks.check_label_smoothing(label_smoothing)
  y_true, y_pred = _checks.same_rank_shapes(y_true, y_pred)
  dtype = _checks.compute_dtype(y_pred)
  if pos_weight is not None:
    pos_weight = _checks.as_array("pos_weight", pos_weight)
    _checks.check_pos_weight(pos_weight, tuple(y_pred.shape))
    pos_weight = pos_weight.astype(dtype)
  return y_true, y_pred.astype(dtype), pos_weight, from_logits


@functools.partial(jax.jit, static_argnames=("from_logits", "axes"))
def _kernel(y_true, y_pred, label_smoothing, pos_weight, check_where=None, *, from_logits, axes):
  """Element losses (``axes is None``) or their mean over `axes`.

  `check_where` (bool, broadcastable to the inputs) limits the value checks
  of :func:`bce_jax.checked` to the unmasked elements, so that padding such
  as a label of -1 under a mask is not reported. It changes nothing else.
  """
  _checks.check_in_unit_interval("y_true", y_true, "labels", check_where)
  if from_logits:
    _checks.check_finite("y_pred", y_pred, "logits", check_where)
  else:
    _checks.check_in_unit_interval("y_pred", y_pred, "probabilities", check_where)
  if pos_weight is not None:
    _checks.check_non_negative("pos_weight", pos_weight)
  _checks.check_in_unit_interval("label_smoothing", jnp.asarray(label_smoothing), "a value")
  labels = y_true.astype(y_pred.dtype)
  smoothing = jnp.asarray(label_smoothing, y_pred.dtype)
  labels = labels * (1 - smoothing) + 0.5 * smoothing
  losses = _element_losses(labels, y_pred, pos_weight, from_logits)
  if axes is None:
    return losses
  count = _checks.prod(losses.shape[a] for a in axes)
  # An empty axis gives 0, not nan, like every other empty reduction here.
  return jnp.sum(losses, axis=axes) / max(count, 1)


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
    pos_weight: weight `w_+` of the positive term, a scalar or a vector over
      the last axis (as PyTorch's ``BCEWithLogitsLoss``). None means 1.

  Returns:
    The element losses, in the shape of the aligned inputs. The dtype is
    float32 for float32, float16, bfloat16, integer and bool `y_pred`, and
    float64 for float64 `y_pred` (with ``jax_enable_x64``).

  Raises:
    ValueError: if the shapes do not match, `label_smoothing` is outside
      [0, 1], or `pos_weight` does not fit the last axis.
    TypeError: if an input is complex or not numeric.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, bce_jax
    >>> y = jnp.array([1.0, 0.0, 1.0])
    >>> x = jnp.array([2.0, -1.0, -3.0])
    >>> losses = bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True)
    >>> print(np.round(np.asarray(losses), 4))
    [0.1269 0.3133 3.0486]
  """
  y_true, y_pred, pos_weight, from_logits = _prepare(
      y_true, y_pred, label_smoothing, pos_weight, from_logits
  )
  return _kernel(
      y_true, y_pred, label_smoothing, pos_weight, from_logits=from_logits, axes=None
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
    y_pred: probabilities (clipped to ``[1e-7, 1 - 1e-7]``), or logits if
      `from_logits`, of the same shape (a trailing size-1 axis on either
      side is squeezed or added; nothing is broadcast).
    from_logits: whether `y_pred` holds logits rather than probabilities.
    label_smoothing: `s` in [0, 1]; labels become ``y * (1 - s) + 0.5 * s``.
    axis: the axis or tuple of axes to average over.
    pos_weight: weight of the positive term, scalar or per last-axis entry.

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
  losses, _ = masked_mean_losses(
      y_true, y_pred, None, from_logits=from_logits, label_smoothing=label_smoothing,
      axis=axis, pos_weight=pos_weight,
  )
  return losses


def masked_mean_losses(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    mask: jax.Array | None,
    *,
    from_logits: bool,
    label_smoothing: float,
    axis: int | tuple[int, ...],
    pos_weight: ArrayLike | None,
) -> tuple[jax.Array, jax.Array | None]:
  """:func:`binary_crossentropy` with a `mask` (for the loss and metric objects).

  Returns the per-sample losses and `mask` brought to their shape (None if
  no mask). Under :func:`bce_jax.checked`, the elements of masked samples
  are left out of the value checks: masked padding may hold anything.
  """
  y_true, y_pred, pos_weight, from_logits = _prepare(
      y_true, y_pred, label_smoothing, pos_weight, from_logits
  )
  axes = _checks.normalize_axis(axis, y_pred.ndim)
  check_where = None
  if mask is not None:
    mask = _checks.as_array("mask", mask)
    _checks.check_mask_dtype(mask)
    per_sample_shape = tuple(d for i, d in enumerate(y_pred.shape) if i not in axes)
    mask = _checks.weight_to_shape("mask", mask, per_sample_shape)
    if _checks.value_checks_on():
      check_where = jnp.expand_dims(mask, axes)
  losses = _kernel(
      y_true, y_pred, label_smoothing, pos_weight, check_where,
      from_logits=from_logits, axes=axes,
  )
  return losses, mask
