"""Shapes, weights, masks and reductions, shared by every loss and metric.

Each public entry point checks its arguments in Python (:func:`prepare_call`),
then makes one call to a jitted core here, compiled once per formula,
configuration and shape. An eager call with jax arrays instead calls the
jitted callable of its configuration (:mod:`bce_jax._eager`), which runs the
same checks as it is traced, once per input signature, so a repeated eager
call costs about one jitted dispatch. The cores hand the arrays, as given,
to :func:`bce_jax._kernel.reduced` with a static :class:`Layout`, and turn
its weighted sums into Keras 3's reductions.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from bce_jax import _checked, _validate
from bce_jax._eager import eager, note_concrete
from bce_jax._kernel import Formula, Layout, cpu_barrier, reduced, scaled_sums, small

__all__ = [
  "Formula",
  "Layout",
  "axis_mean",
  "batch_sums",
  "checked_call",
  "elementwise",
  "flag",
  "object_loss",
  "prepare_call",
  "prepare_object_call",
]


def flag(name: str, value: Any) -> bool:
  return _validate.check_bool(name, value)


# --------------------------------------------------------------------------
# At the entry, in Python.


def _prepare(y_true, y_pred, label_smoothing, pos_weight):
  """Checks the arrays and configuration of a call; returns them and the aligned shape."""
  y_true = _validate.as_array("y_true", y_true)
  y_pred = _validate.as_array("y_pred", y_pred)
  _validate.check_label_smoothing(label_smoothing)
  if y_true.shape == y_pred.shape:
    shape = tuple(y_pred.shape)
  else:
    shape = _validate.aligned_shape(tuple(y_true.shape), tuple(y_pred.shape))
  if pos_weight is not None:
    pos_weight = _validate.as_array("pos_weight", pos_weight)
    _validate.check_pos_weight(pos_weight, shape)
  return (y_true, y_pred, label_smoothing, pos_weight), shape


def prepare_call(
  y_true, y_pred, label_smoothing, pos_weight, axis, sample_weight, mask, elementwise=None
):
  """Checks one call's arguments; returns its static layout and its arrays.

  `elementwise` names the loss's per-element function in errors about `axis`.
  """
  arrays, shape = _prepare(y_true, y_pred, label_smoothing, pos_weight)
  sample_weight = _validate.check_sample_weight(sample_weight)
  if mask is not None:
    mask = _validate.as_array("mask", mask)
    _validate.check_mask_dtype(mask)
  layout = _layout(
    shape,
    _validate.normalize_axis(axis, len(shape), elementwise or _validate.BCE_ELEMENTWISE),
    None if sample_weight is None else tuple(sample_weight.shape),
    None if mask is None else tuple(mask.shape),
  )
  return layout, (*arrays, sample_weight, mask)


def prepare_object_call(obj, y_true, y_pred, sample_weight, mask):
  """:func:`prepare_call` for a loss or metric object; returns its formula too.

  The configured `pos_weight` comes in the call's compute dtype: whole in
  float64 for float64 `y_pred` under x64, rounded to float32 otherwise.
  """
  y_true = _validate.as_array("y_true", y_true)  # first, as in prepare_call, for its errors
  y_pred = _validate.as_array("y_pred", y_pred)
  config = obj.call_config(_validate.compute_dtype(y_pred))
  formula, label_smoothing, pos_weight, axis, elementwise = config
  layout, arrays = prepare_call(
    y_true, y_pred, label_smoothing, pos_weight, axis, sample_weight, mask, elementwise
  )
  return formula, layout, arrays


@functools.lru_cache(maxsize=4096)
def _layout(shape, axes, weight_shape, mask_shape) -> Layout:
  """The static layout of a call (the shape checks run once per combination)."""
  per_sample_shape = tuple(d for i, d in enumerate(shape) if i not in axes)
  if weight_shape is not None:
    weight_shape = _validate.weight_shape("sample_weight", weight_shape, per_sample_shape)
  if mask_shape is not None:
    mask_shape = _validate.weight_shape("mask", mask_shape, per_sample_shape)
  return Layout(shape, axes, (weight_shape, mask_shape))


# --------------------------------------------------------------------------
# Inside the jit.


def _value_checks(formula, layout, y_true, y_pred, smoothing, pos_weight, sample_weight, mask):
  """The opt-in value checks of one call (no-ops unless under `bce_jax.checked`).

  Entries excluded by a mask or a zero weight are not checked: padding may
  hold anything.
  """
  if not _checked.value_checks_on():
    return
  sample_weight, mask = layout.per_sample(sample_weight, mask)
  included = mask
  if sample_weight is not None:
    _checked.check_non_negative("sample_weight", sample_weight, mask)
    nonzero = sample_weight != 0
    included = nonzero if mask is None else mask & nonzero
  where = None if included is None else jnp.expand_dims(included, layout.axes)
  y_true, y_pred = y_true.reshape(layout.shape), y_pred.reshape(layout.shape)
  _checked.check_in_unit_interval("y_true", y_true, "labels", where)
  if formula.from_logits:
    _checked.check_not_nan("y_pred", y_pred, "logits", where)
  else:
    _checked.check_in_unit_interval("y_pred", y_pred, "probabilities", where)
  if pos_weight is not None:
    _checked.check_non_negative("pos_weight", pos_weight)
  _checked.check_smoothing(smoothing)


def _divide_or_zero(num, den):
  """`num / den`, and 0 (with a zero gradient) where `den == 0`."""
  den = jnp.asarray(den, num.dtype)
  zero = den == 0
  return jnp.where(zero, 0, num / jnp.where(zero, 1, den))


def _unmasked(layout, mask, dtype):
  """How many per-sample entries the mask keeps (all of them without one)."""
  if mask is None:
    return _validate.prod(layout.per_sample_shape)
  _, mask = layout.per_sample(None, cpu_barrier(mask))
  # The barrier makes the count read the mask on its own: a conversion
  # shared with the loss's reduction would be written out in full.
  return jnp.sum(mask.astype(dtype))


def _elementwise_value(formula, shape, y_true, y_pred, smoothing, pos_weight):
  # Each element is its own row: the row sums are the element losses.
  layout = Layout(shape, ())
  _value_checks(formula, layout, y_true, y_pred, smoothing, pos_weight, None, None)
  losses = reduced(formula, "rows", layout, y_true, y_pred, smoothing, pos_weight, None, None)
  return losses.reshape(shape)


def _loss_value(formula, layout, reduction, *arrays):
  _value_checks(formula, layout, *arrays)
  width = max(layout.width, 1)
  if reduction == "none":
    means = reduced(formula, "means", layout, *arrays)
    return means.reshape(layout.per_sample_shape)
  total = reduced(formula, "total", layout, *arrays)
  value, scale = total / width, jnp.asarray(1 / width, total.dtype)
  if reduction != "sum":
    sample_weight, mask = arrays[-2:]
    if reduction == "mean_with_sample_weight" and sample_weight is not None:
      count = jnp.sum(layout.row_weights(sample_weight, mask, total.dtype))
    else:
      count = _unmasked(layout, mask, total.dtype)
    value, scale = _divide_or_zero(value, count), _divide_or_zero(scale, count)
  return _unless_overflow(value, total, formula, layout, arrays, scale)


# The jitted cores of a call checked in Python; the static configuration is an argument.
_elementwise_core = jax.jit(_elementwise_value, static_argnums=(0, 1))
_loss_core = jax.jit(_loss_value, static_argnums=(0, 1, 2))


def _unless_overflow(value, total, formula, layout, arrays, scale):
  """`value` (`total` times `scale`), recomputed if `total` overflowed.

  Element losses are finite for finite inputs, but their float32 sum can
  overflow (two logits of 3e38 with label 0) where the mean cannot. Only
  then, and only in the value (the derivative stays `value`'s), the terms
  are scaled before they are summed. The common case pays for one scalar
  test; small inputs take the scaled sum alone.
  """
  arrays, scale = jax.lax.stop_gradient((arrays, scale))
  recompute = functools.partial(scaled_sums, formula, layout, False, scale, *arrays)
  if small(layout):  # small inputs (no conditional, as in the kernel): the scaled sum alone
    return _value_of_second(value, recompute())
  return _replace_primal(value, jax.lax.cond(jnp.isinf(total), recompute, lambda: value))


@jax.custom_jvp
def _replace_primal(value, replacement):
  """`replacement` where `value` is infinite, `value` elsewhere; `value`'s derivative."""
  return jnp.where(jnp.isinf(value), replacement, value)


@_replace_primal.defjvp
def _replace_primal_jvp(primals, tangents):
  return _replace_primal(*primals), tangents[0]


@jax.custom_jvp
def _value_of_second(first, second):
  """`second`, with `first`'s derivative (`first` is then computed only when differentiated)."""
  del first
  return second


@_value_of_second.defjvp
def _value_of_second_jvp(primals, tangents):
  return _value_of_second(*primals), tangents[0]


def batch_sums(formula, layout, *arrays):
  """One batch's weighted loss total and weight count, as a metric adds them.

  Traceable, not jitted: the metric's update jits it with its state.
  """
  _value_checks(formula, layout, *arrays)
  per_sample = layout.per_sample_shape
  # Keras averages the axes after the batch axis, so each sample counts once.
  per_row = max(_validate.prod(per_sample[1:]), 1) if per_sample else 1
  batch = (per_sample[0] if per_sample else 1) if _validate.prod(layout.shape) else 0
  total = reduced(formula, "total", layout, *arrays) / (max(layout.width, 1) * per_row)
  sample_weight, mask = arrays[-2:]
  if sample_weight is None and mask is None:
    return total, jnp.asarray(batch, total.dtype)
  return total, jnp.sum(layout.row_weights(sample_weight, mask, total.dtype)) / per_row


# --------------------------------------------------------------------------
# Eager calls: one jitted callable per configuration, checked as it is traced.


def _checked_elementwise(formula, label_smoothing, axis, axis_types, elementwise, *arrays):
  del axis, axis_types, elementwise
  arrays, shape = _prepare(*arrays[:2], label_smoothing, arrays[2])
  return _elementwise_value(formula, shape, *arrays)


def _checked_loss(formula, label_smoothing, axis, axis_types, elementwise, reduction, *arrays):
  del axis_types
  layout, arrays = checked_call(label_smoothing, axis, elementwise, *arrays)
  return _loss_value(formula, layout, reduction, *arrays)


def checked_call(label_smoothing, axis, elementwise, *arrays):
  """:func:`prepare_call` while an eager callable is traced, on its arrays
  ``(y_true, y_pred, pos_weight, sample_weight, mask)``.

  `label_smoothing` is the configuration's float: a constant of the
  compiled program, not one more argument to dispatch.
  """
  y_true, y_pred, pos_weight, sample_weight, mask = arrays
  return prepare_call(
    y_true, y_pred, label_smoothing, pos_weight, axis, sample_weight, mask, elementwise
  )


def _function_head(kind, formula, label_smoothing, pos_weight, axis, elementwise):
  """The head of a public function's call; None (checked in Python) for array arguments."""
  if pos_weight is not None or type(label_smoothing) is not float:
    return None
  # `axis` by value and type: 1.0 == True == 1, and only the int passes its check.
  axis_types = tuple(map(type, axis)) if isinstance(axis, tuple) else type(axis)
  return (kind, formula, label_smoothing, axis, axis_types, elementwise)


# --------------------------------------------------------------------------
# What the public functions and objects call.


def elementwise(formula, y_true, y_pred, label_smoothing, pos_weight) -> jax.Array:
  """The element losses of a formula (no reduction)."""
  head = _function_head("elementwise", formula, label_smoothing, pos_weight, None, None)
  e = eager(
    head,
    lambda _: (formula, label_smoothing, pos_weight, None, None),
    (_checked_elementwise,),
    y_true,
    y_pred,
  )
  if e is not None:
    return e.call(y_true, y_pred, e.pos_weight)
  arrays, shape = _prepare(y_true, y_pred, label_smoothing, pos_weight)
  note_concrete(y_true, y_pred)
  return _elementwise_core(formula, shape, *arrays)


def object_loss(loss, y_true, y_pred, sample_weight=None, mask=None) -> jax.Array:
  """A loss object's value; `loss` gives its formula, options and reduction."""
  checked = (_checked_loss, loss.reduction)
  e = eager(loss, loss.call_config, checked, y_true, y_pred, sample_weight, mask)
  if e is not None:
    return e.call(y_true, y_pred, e.pos_weight, sample_weight, mask)
  formula, layout, arrays = prepare_object_call(loss, y_true, y_pred, sample_weight, mask)
  note_concrete(y_true, y_pred, sample_weight, mask)
  return _loss_core(formula, layout, loss.reduction, *arrays)


def axis_mean(
  formula, y_true, y_pred, label_smoothing, pos_weight, axis, elementwise=None
) -> jax.Array:
  """The per-sample losses: element losses averaged over `axis`."""
  head = _function_head(_PER_SAMPLE, formula, label_smoothing, pos_weight, axis, elementwise)
  e = eager(
    head,
    lambda _: (formula, label_smoothing, pos_weight, axis, elementwise),
    _PER_SAMPLE_CORE,
    y_true,
    y_pred,
  )
  if e is not None:
    return e.call(y_true, y_pred, e.pos_weight, None, None)
  layout, arrays = prepare_call(
    y_true, y_pred, label_smoothing, pos_weight, axis, None, None, elementwise
  )
  note_concrete(y_true, y_pred)
  return _loss_core(formula, layout, "none", *arrays)


_PER_SAMPLE = ("loss", "none")  # the head's kind
_PER_SAMPLE_CORE = (_checked_loss, "none")
