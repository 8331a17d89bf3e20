"""An independent float64 NumPy reference for binary cross-entropy.

This module never imports bce_jax. It writes the textbook formulas in
float64 with NumPy so that bce_jax's float32 results can be compared
against values about 1e9 times more precise.
"""

from __future__ import annotations

import numpy as np

KERAS_EPS = 1e-7


def _f64(x):
  return np.asarray(x, dtype=np.float64)


def smooth(y, label_smoothing):
  return _f64(y) * (1.0 - label_smoothing) + 0.5 * label_smoothing


def sigmoid(x):
  x = _f64(x)
  # exp of a non-positive number never overflows.
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def elementwise(y, y_pred, from_logits=False, label_smoothing=0.0, pos_weight=None,
                clip_hi=None):
  """Element losses in float64.

  For probabilities, the clip is Keras's: ``[1e-7, clip_hi]`` where
  ``clip_hi`` defaults to ``1 - 1e-7`` rounded to float32 (the value Keras
  uses when it computes in float32).
  """
  y = smooth(y, label_smoothing)
  w = 1.0 if pos_weight is None else _f64(pos_weight)
  if from_logits:
    x = _f64(y_pred)
    # -log(sigmoid(x)) = logaddexp(0, -x); -log(1 - sigmoid(x)) = logaddexp(0, x)
    return w * y * np.logaddexp(0.0, -x) + (1.0 - y) * np.logaddexp(0.0, x)
  if clip_hi is None:
    clip_hi = float(np.float32(1.0 - KERAS_EPS))
  p = np.clip(_f64(y_pred), np.float32(KERAS_EPS), clip_hi)
  return -(w * y * np.log(p) + (1.0 - y) * np.log(1.0 - p))


def grad_logits(y, x, label_smoothing=0.0, pos_weight=None):
  """d loss / d x, element by element: (1 - y) sigmoid(x) - w y sigmoid(-x)."""
  y = smooth(y, label_smoothing)
  w = 1.0 if pos_weight is None else _f64(pos_weight)
  return (1.0 - y) * sigmoid(x) - w * y * sigmoid(-_f64(x))


def hess_logits(y, x, label_smoothing=0.0, pos_weight=None):
  """d^2 loss / d x^2: (1 - y + w y) sigmoid(x) sigmoid(-x)."""
  y = smooth(y, label_smoothing)
  w = 1.0 if pos_weight is None else _f64(pos_weight)
  return (1.0 - y + w * y) * sigmoid(x) * sigmoid(-_f64(x))


def grad_probs(y, p, label_smoothing=0.0, pos_weight=None):
  """d loss / d p at the clipped probability."""
  y = smooth(y, label_smoothing)
  w = 1.0 if pos_weight is None else _f64(pos_weight)
  pc = np.clip(_f64(p), np.float32(KERAS_EPS), float(np.float32(1.0 - KERAS_EPS)))
  return -w * y / pc + (1.0 - y) / (1.0 - pc)


def mean_over(values, axis):
  values = _f64(values)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return values.mean(axis=axes)


def expand_weight(weight, shape):
  """A sample weight/mask as the per-sample loss shape, by the documented rules."""
  weight = _f64(weight) if not np.asarray(weight).dtype == bool else np.asarray(weight)
  if weight.ndim == len(shape) + 1 and weight.shape[-1] == 1:
    weight = weight[..., 0]
  if weight.ndim == 1 and len(shape) > 1 and weight.shape[0] == shape[0]:
    weight = weight.reshape(weight.shape + (1,) * (len(shape) - 1))
  return np.broadcast_to(weight, shape)


def reduce(per_sample, reduction, sample_weight=None, mask=None):
  """Keras 3 reductions with the SPEC's fixes, in float64."""
  per_sample = _f64(per_sample)
  shape = per_sample.shape
  w = np.ones(shape) if sample_weight is None else expand_weight(sample_weight, shape)
  m = np.ones(shape, bool) if mask is None else expand_weight(mask, shape).astype(bool)
  values = np.where(m, per_sample * w, 0.0)
  if reduction in (None, "none"):
    return values
  total = values.sum()
  if reduction == "sum":
    return total
  if reduction == "mean_with_sample_weight" and (sample_weight is not None or mask is not None):
    den = np.where(m, w, 0.0).sum()
  else:
    den = m.sum()
  return 0.0 if den == 0 else total / den


def metric_result(batches):
  """Keras' weighted mean of per-sample losses over batches.

  `batches` holds ``(per_sample, sample_weight_or_None)`` pairs with per-sample
  losses of shape `[B, ...]` and weights already expanded to that shape.
  """
  total = 0.0
  count = 0.0
  for per_sample, weight in batches:
    per_sample = _f64(per_sample)
    rest = int(np.prod(per_sample.shape[1:])) if per_sample.ndim else 1
    batch = per_sample.shape[0] if per_sample.ndim else 1
    if weight is None:
      total += per_sample.sum() / rest
      count += batch
    else:
      weight = _f64(weight)
      total += (per_sample * weight).sum() / rest
      count += weight.sum() / rest
  return 0.0 if count == 0 else total / count
