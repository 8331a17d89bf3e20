"""The weighted row and total sums of element losses, for any element formula.

Inputs arrive as `[M, L]` arrays: `M` per-sample entries (rows) of `L`
elements each, averaged later. Two reductions, one custom JVP:

* ``"rows"``: ``w_m * sum_l E_ml``, a `[M]` array;
* ``"total"``: ``sum_m w_m * sum_l E_ml``, a scalar.

A row whose weight is exactly 0 (a masked or zero-weighted entry) adds exactly
0 to the value and to every derivative, whatever its inputs hold: the
value drops the row after its sum, the derivative sanitizes the row's
inputs before the formula (the double-``where`` pattern).

How each is computed is chosen for XLA on CPU, where a fused reduction over
a narrow innermost axis runs several times slower than over a flat vector:

* an unweighted total is computed on the flattened inputs behind an
  optimization barrier (without it XLA folds the free reshape back in);
* a weighted total over rows of one element is flat too; a weighted total
  over wider rows reduces over the batch axis first (the weights scale
  whole rows there, so the innermost axis stays the vector axis);
* the fast sums use formulas without selects (a select splits XLA's CPU
  reduction fusion). A nan from ``0 * inf`` at an infinite logit, or from
  padding, makes the sum nan; only then is the sum taken again on the safe
  path (exact infinities, excluded rows zeroed), so the common case pays
  for one scalar ``cond``.

The derivative is the element formula's own JVP, taken on the inputs as
they are (no barrier, no flattening): in reverse mode it is one elementwise
pass that writes the gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


@dataclasses.dataclass(frozen=True)
class Formula:
  """An element formula with its static parameters (hashable: a jit key).

  `element(labels, preds, pos_weight, *, from_logits, safe, **params)` takes
  arrays in the compute dtype (labels already smoothed) and returns the
  element losses; `safe=True` asks for exact values where the fast form
  gives nan (infinite logits).
  """

  element: Callable[..., jax.Array]
  from_logits: bool
  params: tuple[tuple[str, Any], ...] = ()

  def __call__(self, labels, preds, pos_weight, *, safe: bool = False) -> jax.Array:
    return self.element(
      labels, preds, pos_weight, from_logits=self.from_logits, safe=safe, **dict(self.params)
    )


def compute_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _losses(formula: Formula, labels, preds, pos_weight, smoothing, safe: bool) -> jax.Array:
  """Element losses of raw inputs: cast and smoothing happen inside the fusion."""
  dtype = compute_dtype(preds.dtype)
  smoothing = smoothing.astype(dtype)
  labels = labels.astype(dtype) * (1 - smoothing) + 0.5 * smoothing
  return formula(labels, preds.astype(dtype), pos_weight, safe=safe)


def _flat(*arrays):
  """The arrays flattened behind a barrier, so XLA reduces a flat vector."""
  return jax.lax.optimization_barrier(tuple(a.reshape(-1) for a in arrays))


def _flat_weight(pos_weight, shape):
  if pos_weight is None or pos_weight.ndim == 0:
    return pos_weight
  return jnp.broadcast_to(pos_weight, shape).reshape(-1)


def _rows(formula, labels, preds, pos_weight, smoothing, weight, safe):
  rows = jnp.sum(_losses(formula, labels, preds, pos_weight, smoothing, safe), axis=-1)
  if weight is None:
    return rows
  return jnp.where(weight != 0, rows * weight.astype(rows.dtype), 0)


def _fast_total(formula, labels, preds, pos_weight, smoothing, weight):
  width = preds.shape[1]
  if weight is None or width == 1:
    pos_weight = _flat_weight(pos_weight, preds.shape)
    if weight is None:
      labels, preds = _flat(labels, preds)
      return jnp.sum(_losses(formula, labels, preds, pos_weight, smoothing, False))
    labels, preds, weight = _flat(labels, preds, weight)
    losses = _losses(formula, labels, preds, pos_weight, smoothing, False)
    return jnp.sum(losses * weight.astype(losses.dtype))
  losses = _losses(formula, labels, preds, pos_weight, smoothing, False)
  return jnp.sum(jnp.sum(losses * weight.astype(losses.dtype)[:, None], axis=0))


def _impl(formula, kind, labels, preds, pos_weight, smoothing, weight):
  args = (formula, labels, preds, pos_weight, smoothing, weight)
  if kind == "rows":
    fast = _rows(*args, safe=False)
    return jax.lax.cond(jnp.any(jnp.isnan(fast)), lambda: _rows(*args, safe=True), lambda: fast)
  fast = _fast_total(*args)
  return jax.lax.cond(jnp.isnan(fast), lambda: jnp.sum(_rows(*args, safe=True)), lambda: fast)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def reduced(formula: Formula, kind: str, labels, preds, pos_weight, smoothing, weight):
  """``"rows"``: the `[M]` weighted row sums; ``"total"``: their sum.

  Args:
    formula: the element formula.
    kind: ``"rows"`` or ``"total"``.
    labels: `[M, L]` labels, any dtype castable to the compute dtype.
    preds: `[M, L]` logits or probabilities (float; bfloat16 stays bfloat16
      until it is read).
    pos_weight: None, a scalar, or an array broadcastable to `[M, L]`.
    smoothing: the label smoothing, a scalar array.
    weight: None or `[M]` row weights; 0 excludes a row.
  """
  return _impl(formula, kind, labels, preds, pos_weight, smoothing, weight)


def _active(tangent) -> bool:
  return tangent is not None and not isinstance(tangent, SymbolicZero)


@reduced.defjvp
def _reduced_jvp(formula, kind, primals, tangents):
  labels, preds, pos_weight, smoothing, weight = primals
  out = reduced(formula, kind, labels, preds, pos_weight, smoothing, weight)
  if weight is not None:
    keep = (weight != 0)[:, None]
    labels = jnp.where(keep, labels, jnp.zeros((), labels.dtype))
    preds = jnp.where(keep, preds, jnp.zeros((), preds.dtype))
  inputs = [labels, preds, pos_weight, smoothing]
  active = [i for i, t in enumerate(tangents[:4]) if _active(t)]

  def losses(*values):
    args = list(inputs)
    for i, v in zip(active, values):
      args[i] = v
    return _losses(formula, *args, safe=False)

  d_out = jnp.zeros_like(out)
  if active:
    _, d_losses = jax.jvp(losses, [inputs[i] for i in active], [tangents[i] for i in active])
    if weight is not None:
      d_losses = d_losses * weight.astype(d_losses.dtype)[:, None]
    d_out = jnp.sum(d_losses, axis=-1) if kind == "rows" else jnp.sum(d_losses)
  d_weight = tangents[4]
  if weight is not None and _active(d_weight):
    rows = reduced(formula, "rows", labels, preds, pos_weight, smoothing, None)
    per_row = jnp.where(weight != 0, rows, 0) * d_weight.astype(rows.dtype)
    d_out = d_out + (per_row if kind == "rows" else jnp.sum(per_row))
  return out, d_out
