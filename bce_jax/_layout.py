"""The static description of one call: its element formula and its layout.

:class:`Formula` names an element loss and its parameters; :class:`Layout`
says how the arrays of a call are brought to `[M, L]` rows (`M` per-sample
entries of `L` elements) and how weights and masks reach the rows. Both are
hashable: they are static arguments of the jitted cores.
:func:`element_losses` applies a formula to rows as the call gave them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bce_jax import _validate


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


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static facts about one call: shapes, and the axes averaged per sample.

  Attributes:
    shape: the aligned shape of `y_true` and `y_pred`.
    axes: the sorted, non-negative axes averaged into each per-sample loss.
    weight_shapes: the shapes `sample_weight` and `mask` are reshaped to
      before they are broadcast to the per-sample shape (None if absent).
  """

  shape: tuple[int, ...]
  axes: tuple[int, ...]
  weight_shapes: tuple[Any, Any] = (None, None)

  @property
  def per_sample_shape(self) -> tuple[int, ...]:
    return tuple(d for i, d in enumerate(self.shape) if i not in self.axes)

  @property
  def width(self) -> int:
    """`L`: the elements averaged into one per-sample loss."""
    return _validate.prod(self.shape[a] for a in self.axes)

  @property
  def rows(self) -> tuple[int, int]:
    return (_validate.prod(self.per_sample_shape), self.width)

  def per_sample(self, sample_weight, mask):
    """`sample_weight` and `mask` broadcast to the per-sample loss shape."""
    out = []
    for array, shape in zip((sample_weight, mask), self.weight_shapes):
      if array is not None:
        array = jnp.broadcast_to(array.reshape(shape), self.per_sample_shape)
      out.append(array)
    return out

  def to_rows(self, array):
    """An array of the aligned shape as `[M, L]` rows (the axes last)."""
    array = array.reshape(self.shape)
    kept = tuple(i for i in range(len(self.shape)) if i not in self.axes)
    order = kept + self.axes
    if order != tuple(range(len(self.shape))):
      array = array.transpose(order)
    return array.reshape(self.rows)

  def row_weights(self, sample_weight, mask, dtype):
    """`[M]` row weights with the mask folded in (0 where excluded), or None."""
    sample_weight, mask = self.per_sample(sample_weight, mask)
    weight = None if sample_weight is None else sample_weight.astype(dtype).reshape(-1)
    if mask is None:
      return weight
    mask = mask.reshape(-1)
    return mask.astype(dtype) if weight is None else jnp.where(mask, weight, 0)


def compute_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def element_losses(formula: Formula, labels, preds, pos_weight, smoothing, safe: bool) -> jax.Array:
  """Element losses of raw inputs: cast and smoothing happen inside the fusion."""
  dtype = compute_dtype(preds.dtype)
  smoothing = smoothing.astype(dtype)
  labels = labels.astype(dtype) * (1 - smoothing) + 0.5 * smoothing
  return formula(labels, preds.astype(dtype), pos_weight, safe=safe)
