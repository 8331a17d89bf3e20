"""The fast path's row and total sums: the layouts XLA:CPU reduces fastest.

:mod:`bce_jax._kernel` takes its sums here first, on `[M, L]` rows of raw
inputs, and takes them again on its safe path only when they come out nan.
They are laid out for XLA on CPU, where a fused reduction over a narrow
innermost axis runs several times slower than over a flat vector:

* an unweighted total is computed on the flattened inputs behind an
  optimization barrier (without it XLA folds the free reshape back in);
* a weighted total over rows of one element is flat too; a weighted total
  over wider rows reduces over the batch axis first (the weights scale
  whole rows there, so the innermost axis stays the vector axis); over the
  narrowest rows (2-7 elements, 2-15 in bfloat16) it reduces the transposed
  inputs instead on CPU, chosen when the program is lowered (:func:`total`):
  XLA:CPU runs the blocks nearly a lane at a time there;
* the sums use formulas without selects (a select splits XLA's CPU
  reduction fusion), so a nan from ``0 * inf`` at an infinite logit, or
  from padding, makes them nan: the kernel's fallback catches that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bce_jax._layout import element_losses

__all__ = ["flat_weight", "row_sums", "total"]


def _flat(*arrays):
  """The arrays flattened behind a barrier, so XLA reduces a flat vector."""
  return jax.lax.optimization_barrier(tuple(a.reshape(-1) for a in arrays))


def flat_weight(pos_weight):
  """`pos_weight` (an [M, L] array or a scalar) for flattened inputs."""
  if pos_weight is None or pos_weight.ndim == 0:
    return pos_weight
  return pos_weight.reshape(-1)


def row_sums(formula, labels, preds, pos_weight, smoothing, safe):
  """Row sums on the fast path, on inputs XLA cannot share with the gradient.

  A value the reduction shares with the gradient's pass (an exp, a ``1 - y``,
  a bfloat16 conversion) is written out in full; the barrier stops that.
  """
  rows, width = preds.shape
  if width == 1 or rows == 1:
    labels, preds = _flat(labels, preds)
    losses = element_losses(formula, labels, preds, flat_weight(pos_weight), smoothing, safe)
    return losses if width == 1 else jnp.sum(losses).reshape(1)
  labels, preds = jax.lax.optimization_barrier((labels, preds))
  return jnp.sum(element_losses(formula, labels, preds, pos_weight, smoothing, safe), axis=-1)


def total(formula, labels, preds, pos_weight, smoothing, weight, safe):
  """``sum_m w_m sum_l E_ml`` (``w_m`` 1 when `weight` is None) on the fast path."""
  width = preds.shape[1]
  if weight is None:
    labels, preds = _flat(labels, preds)
    pos_weight = flat_weight(pos_weight)
    return jnp.sum(element_losses(formula, labels, preds, pos_weight, smoothing, safe))
  if width == 1:
    # The weights are already flat; a barrier on them would write out a
    # mask's conversion to float.
    labels, preds = _flat(labels, preds)
    pos_weight = flat_weight(pos_weight)
    losses = element_losses(formula, labels, preds, pos_weight, smoothing, safe)
    return jnp.sum(losses * weight.astype(losses.dtype))
  # The [M] weights are written once (1/L of the data) rather than
  # recomputed from a broadcast inside the reduction.
  weight = jax.lax.optimization_barrier(weight)
  if width >= _WIDE // 2:  # wide rows: their sums are cheap
    rows = row_sums(formula, labels, preds, pos_weight, smoothing, safe)
    return jnp.sum(rows * weight.astype(rows.dtype))
  # Narrow rows are grouped k at a time into [M/k, k, L] blocks and reduced
  # over the first axis: the weights still scale whole rows, and the
  # innermost k * L elements (up to 128) are wide enough for XLA to
  # vectorize. k divides M (slicing off a remainder costs a copy).
  group = _largest_divisor(preds.shape[0], _WIDE // width)
  args = (formula, labels, preds, pos_weight, smoothing, weight)
  if width >= _columns_below(preds.dtype):
    return _weighted_blocks(*args, group, safe)
  # Narrower rows: the transposed inputs on CPU (_weighted_columns); XLA:GPU
  # keeps the blocks, which it reads once.
  return jax.lax.platform_dependent(
    cpu=lambda: _weighted_columns(*args, safe),
    default=lambda: _weighted_blocks(*args, group, safe),
  )


_WIDE = 128


def _columns_below(dtype) -> int:
  """Rows narrower than this take :func:`_weighted_columns` on CPU.

  Measured with XLA:CPU (jax 0.10): the columns win below 8 elements a row
  in float32 (1.5-1.7x the flat sum where the blocks take 2.2-4x) and lose
  from 16; 16-bit inputs, whose blocks convert in the narrow loop too, gain
  up to 12.
  """
  return 8 if jnp.dtype(dtype).itemsize >= 4 else 16


def _largest_divisor(n: int, limit: int) -> int:
  return max(d for d in range(1, limit + 1) if n % d == 0)


def _weighted_blocks(formula, labels, preds, pos_weight, smoothing, weight, group, safe):
  """``sum_m w_m sum_l E_ml`` over rows grouped `group` at a time."""
  rows, width = preds.shape
  blocks = (rows // group, group, width)
  if pos_weight is not None and pos_weight.ndim:
    pos_weight = jnp.broadcast_to(pos_weight, preds.shape).reshape(blocks)
  # Behind a barrier, as in row_sums: nothing shared with the gradient.
  labels, preds = jax.lax.optimization_barrier((labels.reshape(blocks), preds.reshape(blocks)))
  losses = element_losses(formula, labels, preds, pos_weight, smoothing, safe)
  weight = weight.astype(losses.dtype).reshape(blocks[:2] + (1,))
  return jnp.sum(jnp.sum(losses * weight, axis=0))


def _weighted_columns(formula, labels, preds, pos_weight, smoothing, weight, safe):
  """``sum_m w_m sum_l E_ml`` over the transposed inputs, `[L, M]` columns.

  XLA:CPU's fused reductions vectorize along the innermost axis. With the
  weights broadcast along rows of 2-7 elements (the blocks'
  innermost axis), they run the element formula nearly a lane at a time; here
  the innermost axis is `M`, the weights run along it, and the transposed
  inputs XLA writes first (the inputs' bytes once more, at memory speed) cost
  less than the narrow loop.
  """
  if pos_weight is not None and pos_weight.ndim:
    pos_weight = jnp.broadcast_to(pos_weight, preds.shape).T
  losses = element_losses(formula, labels.T, preds.T, pos_weight, smoothing, safe)
  return jnp.sum(losses * weight.astype(losses.dtype)[None, :])
