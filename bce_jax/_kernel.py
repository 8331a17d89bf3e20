"""The weighted row and total sums of element losses, for any element formula.

Inputs arrive as `[M, L]` arrays: `M` per-sample entries (rows) of `L`
elements each, averaged later. Three reductions, one custom JVP:

* ``"rows"``: ``w_m * sum_l E_ml``, a `[M]` array;
* ``"means"``: ``w_m * mean_l E_ml``, finite where the row sum overflows
  float32 but the mean does not (inputs near the float32 maximum);
* ``"total"``: ``sum_m w_m * sum_l E_ml``, a scalar.

A row whose weight is exactly 0 (a masked or zero-weighted entry) adds exactly
0 to the value and to every derivative, whatever its inputs hold: the
value drops the row after its sum, the derivative sanitizes the row's
inputs before the formula (the double-``where`` pattern).

How each is computed is chosen for XLA on CPU: the fast path's sums take
the layouts XLA:CPU reduces fastest (flat vectors, blocks of rows, the
transposed narrowest rows; :mod:`bce_jax._fast_sums`), with formulas
without selects. A nan from ``0 * inf`` at an infinite logit, or from
padding, makes such a sum nan; only then is the sum taken again on the safe
path (exact infinities, excluded rows zeroed), so the common case pays for
one scalar ``cond``. Inputs under ``_FAST_MIN_SIZE`` elements take the safe
path alone.

The derivative is the element formula's own JVP, taken on the inputs as
they are (no barrier, no flattening): in reverse mode it is one elementwise
pass that writes the gradient.

Beside a derivative, the value's layout is chosen per platform, when the
program is lowered (``_value_for_platform``, the one place): on CPU it is
the fast path above, a pass of its own; elsewhere (GPU) it is the sum of the
element losses the derivative's pass computes, with nothing between them,
so that XLA:GPU fuses the reduction and the gradient into one multi-output
pass (inputs read once, only the gradient written; in bfloat16 the
gradient is written in bfloat16, the math in float32 inside the fusion).
The JVP rule stays a JVP rule, so forward mode and Hessians work on both.

The kernel takes the arrays as the user passed them, with a static
:class:`Layout` saying how to bring them to rows, so that the fallback's
``cond`` only holds buffers that exist anyway (a derived array, such as a
mask converted to weights, would be written out in full for it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from bce_jax import _fast_sums, _validate
from bce_jax._layout import Formula, Layout, compute_dtype, element_losses

__all__ = ["Formula", "Layout", "compute_dtype", "cpu_barrier", "reduced", "scaled_sums", "small"]


def _row_sums(formula, labels, preds, pos_weight, smoothing, safe):
  if preds.shape[1] == 1:  # one element a row: no reduction, computed flat
    pos_weight = _fast_sums.flat_weight(pos_weight)
    return element_losses(
      formula, labels.reshape(-1), preds.reshape(-1), pos_weight, smoothing, safe
    )
  return jnp.sum(element_losses(formula, labels, preds, pos_weight, smoothing, safe), axis=-1)


def _rows(formula, labels, preds, pos_weight, smoothing, weight, safe):
  rows = _row_sums(formula, labels, preds, pos_weight, smoothing, safe)
  return _weighted(rows, weight)


def _weighted(rows, weight):
  if weight is None:
    return rows
  return jnp.where(weight != 0, rows * weight.astype(rows.dtype), 0)


def _rows_inputs(layout, y_true, y_pred, smoothing, pos_weight, sample_weight, mask):
  """The raw arrays as `[M, L]` rows, `[M]` weights, in their own dtypes."""
  dtype = compute_dtype(y_pred.dtype)
  labels = layout.to_rows(y_true)
  if not jnp.issubdtype(labels.dtype, jnp.floating):
    labels = labels.astype(dtype)
  if pos_weight is not None:
    pos_weight = pos_weight.astype(dtype)
    if pos_weight.ndim:
      pos_weight = layout.to_rows(jnp.broadcast_to(pos_weight, layout.shape))
  weight = layout.row_weights(sample_weight, mask, dtype)
  return labels, layout.to_rows(y_pred), pos_weight, jnp.asarray(smoothing, dtype), weight


# Below this many elements the safe path alone is used: a call that small
# costs its dispatch, not its arithmetic, and one path compiles ~3x faster
# than the fast path with its fallback.
_FAST_MIN_SIZE = 1 << 14


def small(layout: Layout) -> bool:
  """Whether a call takes the safe path alone (no fallback conditional)."""
  return _validate.prod(layout.shape) < _FAST_MIN_SIZE


def _impl(formula, kind, layout, *raw):
  width = max(layout.width, 1)
  means = kind == "means"
  if small(layout):
    return _safe_value(formula, kind, layout, *raw)

  def compute(safe: bool):
    labels, preds, pos_weight, smoothing, weight = _rows_inputs(layout, *raw)
    if safe and weight is not None:  # padding that made the fast sum nan: zeros
      keep = (weight != 0)[:, None]
      labels = jnp.where(keep, labels, jnp.zeros((), labels.dtype))
      preds = jnp.where(keep, preds, jnp.zeros((), preds.dtype))
    args = (formula, labels, preds, pos_weight, smoothing)
    if kind == "total":
      return _fast_sums.total(*args, weight, safe)
    rows = _weighted(_fast_sums.row_sums(*args, safe), weight)
    if not means:
      return rows
    return _row_means(formula, layout, rows, raw) if safe else rows / width

  # The fallback sums in the same order as the fast path, so padding full of
  # nan gives the value of padding full of zeros: to the bit in most layouts,
  # within an ulp where XLA fuses the two sums differently (seen with the
  # transposed narrow rows and focal logits, and on some blocks).
  fast = compute(safe=False)
  # One nan makes the sum nan; the barrier keeps the check off the rows' fusion.
  check = fast if kind == "total" else jnp.sum(jax.lax.optimization_barrier(fast))
  # Row means also fall back where a row sum overflowed (inf for finite inputs).
  bad = ~jnp.isfinite(check) if means and width > 1 else jnp.isnan(check)
  return jax.lax.cond(bad, lambda: compute(safe=True), lambda: fast)


def _safe_value(formula, kind, layout, *raw):
  """The value on the safe path alone (exact at infinite logits, padding ignored)."""
  rows = _rows(formula, *_rows_inputs(layout, *raw), safe=True)
  if kind == "means":
    return _row_means(formula, layout, rows, raw)
  return rows if kind == "rows" else jnp.sum(rows)


def _row_means(formula, layout, rows, raw):
  """Row sums over the width; where a sum overflowed, the terms scaled before it."""
  width = max(layout.width, 1)
  means = rows / width
  if width == 1:
    return means
  scaled = scaled_sums(formula, layout, True, jnp.asarray(1 / width, means.dtype), *raw)
  return jnp.where(jnp.isinf(means), scaled, means)


def scaled_sums(formula: Formula, layout: Layout, rows: bool, scale, *raw) -> jax.Array:
  """``sum_m w_m sum_l scale * E_ml`` (per row if `rows`): each term scaled before the sum.

  The safe path, for sums that overflow float32 where the scaled ones do not
  (not differentiable: its callers keep the derivative of :func:`reduced`).
  """
  labels, preds, pos_weight, smoothing, weight = _rows_inputs(layout, *raw)
  losses = element_losses(formula, labels, preds, pos_weight, smoothing, safe=True)
  if weight is None:
    terms = losses * jnp.asarray(scale, losses.dtype)
    return jnp.sum(terms, axis=-1) if rows else jnp.sum(terms)
  # Each row's scaled terms summed first, then weighted; an excluded row's
  # sum (whatever its inputs made it: nan, inf) is dropped by one select on
  # the rows, cheaper than sanitizing every element.
  sums = jnp.sum(losses * jnp.asarray(scale, losses.dtype), axis=-1)
  sums = jnp.where(weight != 0, sums * weight.astype(sums.dtype), jnp.zeros((), sums.dtype))
  return sums if rows else jnp.sum(sums)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def reduced(
  formula: Formula,
  kind: str,
  layout: Layout,
  y_true,
  y_pred,
  smoothing,
  pos_weight,
  sample_weight,
  mask,
):
  """``"rows"``: the `[M]` weighted sums of each row's losses; ``"total"``: their sum.

  ``"means"``: the `[M]` weighted means of each row's losses.

  Args:
    formula: the element formula.
    kind: ``"rows"``, ``"means"`` or ``"total"``.
    layout: how the arrays are brought to `[M, L]` rows.
    y_true: labels in the aligned shape (any dtype castable to the compute
      dtype).
    y_pred: logits or probabilities (bfloat16 stays bfloat16 until read).
    smoothing: the label smoothing, a scalar.
    pos_weight: None, or an array broadcastable to the aligned shape.
    sample_weight: None, or weights for the per-sample losses.
    mask: None, or a bool mask for the per-sample losses.
  """
  return _impl(formula, kind, layout, y_true, y_pred, smoothing, pos_weight, sample_weight, mask)


def _active(tangent) -> bool:
  if tangent is None or isinstance(tangent, SymbolicZero):
    return False
  return tangent.dtype != jax.dtypes.float0


def _one_pass_value(formula, kind, layout, raw, losses, weight):
  """The value summed from `losses`, the element losses the derivative pass computes.

  `losses` come from inputs whose excluded rows are zeros, so the weights
  multiply without a select; a nan (an infinite logit) or, for row means,
  an overflow still falls back to the safe path.
  """
  if kind == "total":
    fast = jnp.sum(losses if weight is None else losses * weight[:, None])
    check = fast
  else:
    fast = jnp.sum(losses, axis=-1)
    fast = fast if weight is None else fast * weight
    check = jnp.sum(fast)
  width = max(layout.width, 1)
  if kind == "means":
    fast = fast / width
  bad = ~jnp.isfinite(check) if kind == "means" and width > 1 else jnp.isnan(check)
  return jax.lax.cond(bad, lambda: _safe_value(formula, kind, layout, *raw), lambda: fast)


def _value_for_platform(formula, kind, layout, raw, losses, weight):
  """The value beside a derivative: how it is computed is chosen per platform, here.

  * CPU: :func:`reduced`'s own fast path (flat vectors and barriers, see
    :mod:`bce_jax._fast_sums`). The derivative's elementwise pass is separate:
    XLA's CPU reduction fusion would otherwise write shared values out.
  * Every other platform (GPU): the sum of the element losses that the
    derivative's pass computes from the same inputs, with no barrier and no
    reshape between them. XLA:GPU then fuses the value's reduction and the
    gradient's elementwise pass into one multi-output fusion: the inputs
    are read once and only the gradient is written.

  The choice is made when the program is lowered for its platform, never at
  run time.
  """
  return jax.lax.platform_dependent(
    cpu=lambda: reduced(formula, kind, layout, *raw),
    default=lambda: _one_pass_value(formula, kind, layout, raw, losses, weight),
  )


def cpu_barrier(value):
  """`value` behind an optimization barrier on CPU; as it is elsewhere.

  For a small side computation (a mask's count) that XLA's CPU fusion would
  share with the loss's reduction and write out in full; on a GPU it belongs
  in the same fused pass.
  """
  return jax.lax.platform_dependent(
    value, cpu=jax.lax.optimization_barrier, default=lambda value: value
  )


@jax.custom_jvp
def _sanitized(preds, poison, infinity):
  """`preds` with non-finite entries replaced: `poison` for nan, `infinity` signed for ±inf.

  The tangent passes through unchanged (0 at a nan): a kept infinite logit
  (`infinity` is inf in its row) keeps the derivative of the loss there, and
  an excluded row's is multiplied by its zero weight after the formula.
  """
  fill = jnp.where(jnp.isnan(preds), poison, infinity)
  return jnp.where(jnp.isfinite(preds), preds, jnp.where(preds > 0, fill, -fill))


@_sanitized.defjvp
def _sanitized_jvp(primals, tangents):
  preds, tangent = primals[0], tangents[0]
  return _sanitized(*primals), jnp.where(jnp.isnan(preds), jnp.zeros_like(tangent), tangent)


@reduced.defjvp
def _reduced_jvp(formula, kind, layout, primals, tangents):
  out = reduced(formula, kind, layout, *primals)
  y_true, y_pred, smoothing, pos_weight, sample_weight, mask = primals
  dtype = compute_dtype(y_pred.dtype)
  weight = layout.row_weights(sample_weight, mask, dtype)
  keep = None if weight is None else (weight != 0)[:, None]
  # What replaces a non-finite input: 0 in an excluded row (where the weight
  # then multiplies a finite derivative by exactly 0), itself in a kept one.
  poison = None if weight is None else jnp.where(keep, jnp.nan, 0).astype(dtype)
  infinity = None if weight is None else jnp.where(keep, jnp.inf, 0).astype(dtype)

  def row_losses(y_true, y_pred, smoothing, pos_weight):
    labels, preds, pos_weight, smoothing, _ = _rows_inputs(
      layout, y_true, y_pred, smoothing, pos_weight, None, None
    )
    if poison is not None:  # excluded rows: inputs that cannot poison a derivative
      # Selected on each input's own test (an infinite logit is exact): XLA:CPU
      # runs a select on the rows' weights ~6x slower over narrow rows. A
      # label outside [0, 1] (padding such as -1 or 1e15) is clipped into it
      # in an excluded row, since a focal factor of it can be nan or inf
      # there, and stays itself in a kept one; a non-finite label is the poison.
      # In the compute dtype: bfloat16 copies of the fills would be written out.
      labels, preds = labels.astype(dtype), preds.astype(dtype)
      labels = jnp.where(jnp.isfinite(labels), labels, poison)
      labels = jnp.minimum(jnp.maximum(labels, -infinity), infinity + 1)  # kept: no bounds
      preds = _sanitized(preds, poison, infinity)
    return element_losses(formula, labels, preds, pos_weight, smoothing, safe=False)

  # Scalars through a barrier, as _logsig.fresh: a smoothing or pos_weight
  # broadcast shared with the value's reduction would be written out in full.
  smoothing, pos_weight = jax.lax.optimization_barrier((smoothing, pos_weight))
  inputs = [y_true, y_pred, smoothing, pos_weight]
  active = [i for i, t in enumerate(tangents[:4]) if _active(t)]

  def losses_of_active(*values):
    args = list(inputs)
    for i, v in zip(active, values):
      args[i] = v
    return row_losses(*args)

  d_out = jnp.zeros_like(out)
  if active:
    losses, d_losses = jax.jvp(
      losses_of_active, [inputs[i] for i in active], [tangents[i] for i in active]
    )
    out = _value_for_platform(formula, kind, layout, primals, losses, weight)
    if weight is not None:
      d_losses = d_losses * weight[:, None]
    d_out = jnp.sum(d_losses, axis=-1) if kind != "total" else jnp.sum(d_losses)
  if sample_weight is not None and _active(tangents[4]):
    d_weight = layout.row_weights(tangents[4], mask, dtype)
    rows = jnp.sum(row_losses(*inputs), axis=-1)
    per_row = jnp.where(keep[:, 0], rows, 0) * d_weight
    d_out = d_out + (per_row if kind != "total" else jnp.sum(per_row))
  if kind == "means":
    d_out = d_out / max(layout.width, 1)
  return out, d_out
