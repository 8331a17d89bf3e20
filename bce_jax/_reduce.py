"""Shapes, weights, masks and reductions, shared by every loss and metric.

Each public entry point checks its arguments once, in Python
(:func:`prepare`, :func:`prepare_weights`), then makes one call to a jitted
core here, compiled once per formula, configuration and shape: an eager call
costs about one jitted dispatch. The cores bring the inputs to `[M, L]`
rows (the `L` elements averaged into each of the `M` per-sample losses) and
reduce them with :func:`bce_jax._kernel.reduced`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from bce_jax import _checked, _validate
from bce_jax._kernel import Formula, compute_dtype, reduced

__all__ = [
  "Formula",
  "axis_mean",
  "batch_sums",
  "elementwise",
  "flag",
  "loss_value",
  "prepare_call",
]


def flag(name: str, value: Any) -> bool:
  return _validate.check_bool(name, value)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static facts about one call: shapes and the reduced axes."""

  shape: tuple[int, ...]
  axes: tuple[int, ...]
  weight_shapes: tuple[Any, Any] = (None, None)

  def weights(self, sample_weight, mask):
    """`sample_weight` and `mask` in the per-sample loss shape (inside the jit)."""
    out = []
    for array, shape in zip((sample_weight, mask), self.weight_shapes):
      out.append(
        None if array is None else jnp.broadcast_to(array.reshape(shape), self.per_sample_shape)
      )
    return out

  @property
  def per_sample_shape(self) -> tuple[int, ...]:
    return tuple(d for i, d in enumerate(self.shape) if i not in self.axes)

  @property
  def width(self) -> int:
    return _validate.prod(self.shape[a] for a in self.axes)


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Checked arrays of one call, as given (not yet reshaped or cast)."""

  y_true: jax.Array
  y_pred: jax.Array
  smoothing: Any
  pos_weight: jax.Array | None
  shape: tuple[int, ...]


def prepare(y_true, y_pred, label_smoothing, pos_weight) -> Inputs:
  """Checks the arrays and configuration of a call; reshapes nothing."""
  y_true = _validate.as_array("y_true", y_true)
  y_pred = _validate.as_array("y_pred", y_pred)
  _validate.check_label_smoothing(label_smoothing)
  shape = _aligned_shape(y_true, y_pred)
  if pos_weight is not None:
    pos_weight = _validate.as_array("pos_weight", pos_weight)
    _validate.check_pos_weight(pos_weight, shape)
  return Inputs(y_true, y_pred, label_smoothing, pos_weight, shape)


def _aligned_shape(y_true: jax.Array, y_pred: jax.Array) -> tuple[int, ...]:
  if y_true.shape == y_pred.shape:
    return tuple(y_pred.shape)
  return _validate.aligned_shape(tuple(y_true.shape), tuple(y_pred.shape))


def prepare_weights(sample_weight, mask, per_sample_shape):
  """Checks `sample_weight` and `mask`; returns them with their static shapes.

  Returns ``(sample_weight, mask, shapes)``, where `shapes` gives the shape
  each is reshaped to inside the jit before broadcasting (None if absent).
  """
  sample_weight = _validate.check_sample_weight(sample_weight)
  weight_shape = mask_shape = None
  if sample_weight is not None:
    weight_shape = _validate.weight_shape(
      "sample_weight", tuple(sample_weight.shape), per_sample_shape
    )
  if mask is not None:
    mask = _validate.as_array("mask", mask)
    _validate.check_mask_dtype(mask)
    mask_shape = _validate.weight_shape("mask", tuple(mask.shape), per_sample_shape)
  return sample_weight, mask, (weight_shape, mask_shape)


# --------------------------------------------------------------------------
# Inside the jit.


def _value_checks(formula, y_true, y_pred, smoothing, pos_weight, where):
  """The opt-in value checks (no-ops unless under `bce_jax.checked`)."""
  _checked.check_in_unit_interval("y_true", y_true, "labels", where)
  if formula.from_logits:
    _checked.check_not_nan("y_pred", y_pred, "logits", where)
  else:
    _checked.check_in_unit_interval("y_pred", y_pred, "probabilities", where)
  if pos_weight is not None:
    _checked.check_non_negative("pos_weight", pos_weight)
  _checked.check_smoothing(smoothing)


def _rows_layout(layout: Layout, y_true, y_pred, pos_weight):
  """The inputs as `[M, L]` rows (the reduced axes last), in their own dtypes."""
  y_true, y_pred = y_true.reshape(layout.shape), y_pred.reshape(layout.shape)
  if not jnp.issubdtype(y_true.dtype, jnp.floating):
    y_true = y_true.astype(compute_dtype(y_pred.dtype))
  if pos_weight is not None and pos_weight.ndim:
    pos_weight = jnp.broadcast_to(pos_weight, layout.shape)
  ndim = len(layout.shape)
  kept = tuple(i for i in range(ndim) if i not in layout.axes)
  order = kept + layout.axes
  if order != tuple(range(ndim)):
    y_true, y_pred = y_true.transpose(order), y_pred.transpose(order)
    if pos_weight is not None and pos_weight.ndim:
      pos_weight = pos_weight.transpose(order)
  rows = (_validate.prod(layout.per_sample_shape), layout.width)
  if pos_weight is not None and pos_weight.ndim:
    pos_weight = pos_weight.reshape(rows)
  return y_true.reshape(rows), y_pred.reshape(rows), pos_weight


def _row_weights(layout, sample_weight, mask, dtype):
  """`[M]` weights (mask folded in, 0 where excluded) and the unmasked count."""
  weight = None if sample_weight is None else sample_weight.astype(dtype).reshape(-1)
  if mask is None:
    return weight, _validate.prod(layout.per_sample_shape)
  mask = mask.reshape(-1)
  weight = mask.astype(dtype) if weight is None else jnp.where(mask, weight, 0)
  return weight, jnp.sum(mask, dtype=jnp.int32).astype(dtype)


def _divide_or_zero(num, den):
  """`num / den`, and 0 (with a zero gradient) where `den == 0`."""
  den = jnp.asarray(den, num.dtype)
  zero = den == 0
  return jnp.where(zero, 0, num / jnp.where(zero, 1, den))


def _weighted_rows(formula, layout, y_true, y_pred, smoothing, pos_weight, sample_weight, mask):
  """Value checks, then the `[M, L]` rows and their `[M]` weights."""
  sample_weight, mask = layout.weights(sample_weight, mask)
  where = None
  if mask is not None:
    where = jnp.expand_dims(mask, layout.axes)
  elif sample_weight is not None and _checked.value_checks_on():
    where = jnp.expand_dims(sample_weight != 0, layout.axes)
  _value_checks(
    formula,
    y_true.reshape(layout.shape),
    y_pred.reshape(layout.shape),
    smoothing,
    pos_weight,
    where,
  )
  if sample_weight is not None:
    _checked.check_non_negative("sample_weight", sample_weight, mask)
  dtype = compute_dtype(y_pred.dtype)
  labels, preds, pos_weight = _rows_layout(layout, y_true, y_pred, pos_weight)
  if pos_weight is not None:
    pos_weight = pos_weight.astype(dtype)
  weight, valid = _row_weights(layout, sample_weight, mask, dtype)
  smoothing = jnp.asarray(smoothing, dtype)
  return (labels, preds, pos_weight, smoothing, weight), valid, dtype


@functools.partial(jax.jit, static_argnums=(0, 1))
def _elementwise_core(formula, shape, y_true, y_pred, smoothing, pos_weight):
  _value_checks(formula, y_true.reshape(shape), y_pred.reshape(shape), smoothing, pos_weight, None)
  layout = Layout(shape, tuple(range(len(shape))))
  args, _, _ = _weighted_rows(formula, layout, y_true, y_pred, smoothing, pos_weight, None, None)
  labels, preds, pos_weight, smoothing, _ = args
  # Each element is its own row: [N, 1], the per-row sums are the losses.
  rows = reduced(
    formula,
    "rows",
    labels.reshape(-1, 1),
    preds.reshape(-1, 1),
    None if pos_weight is None else pos_weight.reshape(-1, 1),
    smoothing,
    None,
  )
  return rows.reshape(shape)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _loss_core(
  formula, layout, reduction, y_true, y_pred, smoothing, pos_weight, sample_weight, mask
):
  args, valid, _dtype = _weighted_rows(
    formula, layout, y_true, y_pred, smoothing, pos_weight, sample_weight, mask
  )
  width = max(layout.width, 1)
  if reduction == "none":
    return (reduced(formula, "rows", *args) / width).reshape(layout.per_sample_shape)
  total = reduced(formula, "total", *args) / width
  if reduction == "sum":
    return total
  weight = args[-1]
  if reduction == "mean_with_sample_weight" and weight is not None:
    return _divide_or_zero(total, jnp.sum(weight))
  return _divide_or_zero(total, valid)


def batch_sums(formula, layout, y_true, y_pred, smoothing, pos_weight, sample_weight, mask):
  """One batch's weighted loss total and weight count, as a metric adds them.

  Traceable, not jitted: the metric's update jits it with its state.
  """
  args, _, dtype = _weighted_rows(
    formula, layout, y_true, y_pred, smoothing, pos_weight, sample_weight, mask
  )
  per_sample = layout.per_sample_shape
  # Keras averages the axes after the batch axis, so each sample counts once.
  per_row = max(_validate.prod(per_sample[1:]), 1) if per_sample else 1
  batch = (per_sample[0] if per_sample else 1) if _validate.prod(layout.shape) else 0
  total = reduced(formula, "total", *args) / (max(layout.width, 1) * per_row)
  weight = args[-1]
  count = jnp.asarray(batch, dtype) if weight is None else jnp.sum(weight) / per_row
  return total, count


def elementwise(formula, y_true, y_pred, label_smoothing, pos_weight) -> jax.Array:
  inputs = prepare(y_true, y_pred, label_smoothing, pos_weight)
  return _elementwise_core(
    formula, inputs.shape, inputs.y_true, inputs.y_pred, inputs.smoothing, inputs.pos_weight
  )


def layout_of(inputs: Inputs, axis: Any) -> Layout:
  return Layout(inputs.shape, _validate.normalize_axis(axis, len(inputs.shape)))


def axis_mean(formula, y_true, y_pred, label_smoothing, pos_weight, axis) -> jax.Array:
  return loss_value(formula, y_true, y_pred, label_smoothing, pos_weight, axis, "none")


def loss_value(
  formula,
  y_true,
  y_pred,
  label_smoothing,
  pos_weight,
  axis,
  reduction,
  sample_weight=None,
  mask=None,
) -> jax.Array:
  """A loss object's value: per-sample losses, weighted, masked and reduced."""
  layout, arrays = prepare_call(
    y_true, y_pred, label_smoothing, pos_weight, axis, sample_weight, mask
  )
  return _loss_core(formula, layout, reduction, *arrays)


def prepare_call(y_true, y_pred, label_smoothing, pos_weight, axis, sample_weight, mask):
  """Checks one call's arguments; returns its static layout and its arrays."""
  inputs = prepare(y_true, y_pred, label_smoothing, pos_weight)
  layout = layout_of(inputs, axis)
  sample_weight, mask, shapes = prepare_weights(sample_weight, mask, layout.per_sample_shape)
  layout = dataclasses.replace(layout, weight_shapes=shapes)
  arrays = (inputs.y_true, inputs.y_pred, inputs.smoothing, inputs.pos_weight, sample_weight, mask)
  return layout, arrays
