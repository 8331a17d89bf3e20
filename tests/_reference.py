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


def elementwise(y, y_pred, from_logits=False, label_smoothing=0.0, pos_weight=None, clip_hi=None):
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
  weight = _f64(weight) if np.asarray(weight).dtype != bool else np.asarray(weight)
  if weight.ndim == len(shape) + 1 and weight.shape[-1] == 1:
    weight = weight[..., 0]
  if weight.ndim == 1 and len(shape) > 1 and weight.shape[0] == shape[0]:
    weight = weight.reshape(weight.shape + (1,) * (len(shape) - 1))
  return np.broadcast_to(weight, shape)


def reduce(per_sample, reduction, sample_weight=None, mask=None):
  """Keras 3 reductions with the README's "Differences from Keras 3", in float64."""
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


# --------------------------------------------------------------------------
# Binary focal cross-entropy (Keras 3's definition), in float64 log space.


def _focal_parts(y, x, label_smoothing, gamma, alpha, pos_weight):
  """Smoothed labels, class weight, factor, log(1 - p_t), BCE and its pieces for logits."""
  y = smooth(y, label_smoothing)
  x = _f64(x)
  w = 1.0 if pos_weight is None else _f64(pos_weight)
  c = 1.0 if alpha is None else alpha * y + (1.0 - alpha) * (1.0 - y)
  sp, sp_neg = np.logaddexp(0.0, x), np.logaddexp(0.0, -x)  # -log(1 - p), -log(p)
  with np.errstate(divide="ignore"):
    # 1 - p_t = y (1 - p) + (1 - y) p, as logaddexp(log y - sp(x), log(1 - y) - sp(-x)).
    log_q = np.logaddexp(np.log(y) - sp, np.log1p(-y) - sp_neg)
  factor = np.ones_like(x) if gamma == 0 else np.exp(gamma * log_q)
  bce = w * y * sp_neg + (1.0 - y) * sp
  return y, w, c, factor, log_q, bce, sp, sp_neg


def focal_elementwise(
  y, y_pred, from_logits=False, label_smoothing=0.0, gamma=2.0, alpha=None, pos_weight=None
):
  """Focal element losses ``c (1 - p_t)**gamma BCE``; `alpha` None: no class balancing.

  For probabilities, ``1 - p_t`` uses the clipped probability, as the BCE does.
  """
  if from_logits:
    _, _, c, factor, _, bce, _, _ = _focal_parts(
      y, y_pred, label_smoothing, gamma, alpha, pos_weight
    )
    return c * factor * bce
  y = smooth(y, label_smoothing)
  c = 1.0 if alpha is None else alpha * y + (1.0 - alpha) * (1.0 - y)
  p = np.clip(_f64(y_pred), np.float32(KERAS_EPS), float(np.float32(1.0 - KERAS_EPS)))
  factor = (y * (1.0 - p) + (1.0 - y) * p) ** gamma
  return c * factor * elementwise(y, y_pred, pos_weight=pos_weight)


def focal_derivatives_logits(y, x, label_smoothing=0.0, gamma=2.0, alpha=None, pos_weight=None):
  """First and second derivatives in the logits, element by element.

  With ``L = log(1 - p_t)``, ``k = 1 - 2y``, ``q = s (1 - s) / (1 - p_t)``,
  ``s = sigmoid(x)``: ``L' = k q``, ``L'' = k q (1 - 2s) - (k q)**2``, and
  ``f = c e^{gamma L} B`` gives ``f' = c F (gamma L' B + B')`` and
  ``f'' = c F (gamma^2 L'^2 B + 2 gamma L' B' + gamma L'' B + B'')``.
  """
  y, w, c, factor, log_q, bce, sp, sp_neg = _focal_parts(
    y, x, label_smoothing, gamma, alpha, pos_weight
  )
  s, s_neg = sigmoid(x), sigmoid(-_f64(x))
  q = np.exp(-sp - sp_neg - log_q)
  d_log = (1.0 - 2.0 * y) * q
  dd_log = d_log * (s_neg - s) - d_log**2
  d_bce = (1.0 - y) * s - w * y * s_neg
  dd_bce = (1.0 - y + w * y) * s * s_neg
  grad = c * factor * (gamma * d_log * bce + d_bce)
  hess = (
    c
    * factor
    * (gamma**2 * d_log**2 * bce + 2 * gamma * d_log * d_bce + gamma * dd_log * bce + dd_bce)
  )
  return grad, hess


def focal_gradient_scale(y, x, label_smoothing=0.0, gamma=2.0, alpha=None, pos_weight=None):
  """The sum of the magnitudes of the logit gradient's terms.

  ``(1 - y) s``, ``w y (1 - s)`` and ``gamma L' B``, times ``c F``: a
  rounding of the terms moves the gradient by a few ulps of this, however
  much they cancel (soft labels, near the gradient's zero).
  """
  y, w, c, factor, log_q, bce, sp, sp_neg = _focal_parts(
    y, x, label_smoothing, gamma, alpha, pos_weight
  )
  s, s_neg = sigmoid(x), sigmoid(-_f64(x))
  d_log = (1.0 - 2.0 * y) * np.exp(-sp - sp_neg - log_q)
  return np.abs(c * factor) * ((1.0 - y) * s + w * y * s_neg + gamma * np.abs(d_log) * bce)


def focal_grad_labels_logits(y, x, gamma=2.0, alpha=None, pos_weight=None):
  """d loss / d y for logits (no smoothing), and the sum of its terms' magnitudes."""
  y, w, c, factor, log_q, bce, sp, sp_neg = _focal_parts(y, x, 0.0, gamma, alpha, pos_weight)
  # d L / d y = (1 - 2 s) / (1 - p_t); times B as exp(log|1 - 2s| + log B - L).
  s, s_neg = sigmoid(x), sigmoid(-_f64(x))
  with np.errstate(divide="ignore"):
    d_log_bce = np.sign(s_neg - s) * np.exp(np.log(np.abs(s_neg - s)) + np.log(bce) - log_q)
  grad = c * factor * (gamma * d_log_bce + w * sp_neg - sp)
  scale = np.abs(c * factor) * (gamma * np.abs(d_log_bce) + w * sp_neg + sp)
  if alpha is not None:
    grad = grad + (2 * alpha - 1) * factor * bce
    scale = scale + np.abs((2 * alpha - 1) * factor * bce)
  return grad, scale


def focal_grad_probs(y, p, label_smoothing=0.0, gamma=2.0, alpha=None, pos_weight=None):
  """d loss / d p at the clipped probability, and the sum of its terms' magnitudes."""
  y = smooth(y, label_smoothing)
  c = 1.0 if alpha is None else alpha * y + (1.0 - alpha) * (1.0 - y)
  pc = np.clip(_f64(p), np.float32(KERAS_EPS), float(np.float32(1.0 - KERAS_EPS)))
  one_minus_pt = y * (1.0 - pc) + (1.0 - y) * pc
  bce = elementwise(y, p, pos_weight=pos_weight)
  factor = one_minus_pt**gamma
  d_bce = grad_probs(y, p, pos_weight=pos_weight)
  w = 1.0 if pos_weight is None else _f64(pos_weight)
  scale = np.abs(c * factor) * (gamma * bce / one_minus_pt + (1.0 - y) / (1.0 - pc) + w * y / pc)
  return c * factor * (gamma * (1.0 - 2.0 * y) * bce / one_minus_pt + d_bce), scale


def pairwise_sigmoid(x, y, scale, bias, positives=None, mask=None):
  """(loss, dx, dy, dscale, dbias) of SigLIP's pairwise sigmoid loss, dense.

  Positive pairs are ``i == j`` or equal `positives` (compared as given,
  64-bit ids included). Rows where `mask` is False are dropped before the
  formula (neither anchor nor negative); their gradients are 0, and the
  mean is over the rows kept (0 if none).
  """
  keep = np.ones(len(x), bool) if mask is None else np.asarray(mask, bool)
  dx, dy = np.zeros(np.shape(x)), np.zeros(np.shape(y))
  if not keep.any():
    return 0.0, dx, dy, 0.0, 0.0
  xs, ys = _f64(x)[keep], _f64(y)[keep]
  ids = np.arange(len(xs)) if positives is None else np.asarray(positives)[keep]
  z = np.where(ids[:, None] == ids[None, :], 1.0, -1.0)
  dots = xs @ ys.T
  logits = scale * dots + bias
  n = len(xs)
  loss = np.sum(np.logaddexp(0.0, -z * logits)) / n  # -log sigmoid(z l)
  g = -z * sigmoid(-z * logits) / n  # d loss / d logits
  dx[keep], dy[keep] = scale * g @ ys, scale * g.T @ xs
  return loss, dx, dy, float(np.sum(g * dots)), float(np.sum(g))


def dense_labels(positives, num_labels):
  """A dense 0/1 ``[B, C]`` matrix from ``[B, K]`` id lists (-1 pads, repeats once)."""
  positives = np.asarray(positives)
  labels = np.zeros((positives.shape[0], num_labels))
  for row, ids in enumerate(positives):
    for c in ids:
      if 0 <= c < num_labels:
        labels[row, c] = 1.0
  return labels


def linear_bce(h, w, positives, bias=None, mask=None, label_reduction="sum"):
  """(loss, dh, dw, dbias) of one-vs-all BCE on the dense logits ``h @ w.T + bias``.

  The loss is the mean over included rows of each row's element losses,
  summed over the labels ("sum") or averaged ("mean"); 0 with no row.
  Excluded rows get zero gradients whatever they hold.
  """
  h, w = _f64(h), _f64(w)
  rows, labels = h.shape[0], w.shape[0]
  include = np.ones(rows, bool) if mask is None else np.asarray(mask, bool)
  h = np.where(include[:, None], h, 0.0)
  logits = h @ w.T + (0.0 if bias is None else _f64(bias))
  y = dense_labels(positives, labels)
  per = 1.0 / max(include.sum(), 1) / (labels if label_reduction == "mean" else 1)
  weight = np.where(include, per, 0.0)[:, None]
  loss = np.sum(weight * elementwise(y, logits, from_logits=True))
  g = weight * (sigmoid(logits) - y)
  return loss, g @ w, g.T @ h, g.sum(axis=0)


def top_k_metrics(ids, positives, ks, mask=None):
  """{"precision@k": .., "ndcg@k": ..}: row means of precision@k and nDCG@k."""
  ids, positives = np.asarray(ids), np.asarray(positives)
  include = np.ones(len(ids), bool) if mask is None else np.asarray(mask, bool)
  out = {}
  for k in ks:
    prec, ndcg = [], []
    for row in np.flatnonzero(include):
      pos = {int(c) for c in positives[row] if c >= 0}
      hits = [1.0 if int(c) in pos else 0.0 for c in ids[row, :k]]
      prec.append(sum(hits) / k)
      dcg = sum(hit / np.log2(r + 2) for r, hit in enumerate(hits))
      ideal = sum(1 / np.log2(r + 2) for r in range(min(k, len(pos))))
      ndcg.append(dcg / ideal if ideal > 0 else 0.0)
    out[f"precision@{k}"] = float(np.mean(prec)) if prec else 0.0
    out[f"ndcg@{k}"] = float(np.mean(ndcg)) if ndcg else 0.0
  return out


def bilinear_sweep(a, b, scale, bias, positive, row_ok=None, col_ok=None):
  """Every pair of rows ``a [B, D]`` and ``b [C, D]``, in float64: the row sums
  of ``-log sigmoid(+-z)``, ``z_ij = scale <a_i, b_j> + bias_j``, over the
  pairs whose row and column are both kept, and the analytic derivatives of
  their total: ``da``, ``db``, ``dscale`` and ``dbias`` (per column).

  `positive` is the bool ``[B, C]`` label; `row_ok` and `col_ok` bool
  ``[B]`` and ``[C]`` (None keeps all). Excluded rows and columns are
  replaced by zeros before any product, so nan in them is never read.
  """
  a, b = _f64(a), _f64(b)
  rows, cols = a.shape[0], b.shape[0]
  row_ok = np.ones(rows, bool) if row_ok is None else np.asarray(row_ok, bool)
  col_ok = np.ones(cols, bool) if col_ok is None else np.asarray(col_ok, bool)
  a, b = np.where(row_ok[:, None], a, 0.0), np.where(col_ok[:, None], b, 0.0)
  keep = row_ok[:, None] & col_ok[None, :]
  dots = a @ b.T
  z = float(scale) * dots + np.broadcast_to(_f64(bias), (cols,))[None, :]
  sign = np.where(positive, 1.0, -1.0)
  losses = np.where(keep, np.logaddexp(0.0, -sign * z), 0.0)
  g = np.where(keep, sigmoid(z) - np.asarray(positive, np.float64), 0.0)
  return {
    "loss": losses.sum(axis=1),
    "da": float(scale) * g @ b,
    "db": float(scale) * g.T @ a,
    "dscale": float(np.sum(g * dots)),
    "dbias": g.sum(axis=0),
  }
