"""Shapes, weights, masks and reductions, shared by every loss and metric.

Each public entry point checks its arguments in Python (:func:`prepare_call`),
then makes one call to a jitted core here, compiled once per formula,
configuration and shape. An eager call with jax arrays is checked once per
configuration and input shapes and dtypes (:func:`plan`); later calls look
the result up and dispatch the core with ready-made constants, so an eager
call costs about one jitted dispatch. The cores hand the arrays, as given, to
:func:`bce_jax._kernel.reduced` with a static :class:`Layout`, and turn its
weighted sums into Keras 3's reductions.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bce_jax import _checked, _validate
from bce_jax._kernel import Formula, Layout, cpu_barrier, reduced, scaled_sums, small

__all__ = [
  "Formula",
  "Layout",
  "Plan",
  "axis_mean",
  "batch_sums",
  "elementwise",
  "flag",
  "loss_value",
  "object_loss",
  "plan",
  "prepare_call",
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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _elementwise_core(formula, shape, y_true, y_pred, smoothing, pos_weight):
  # Each element is its own row: the row sums are the element losses.
  layout = Layout(shape, ())
  _value_checks(formula, layout, y_true, y_pred, smoothing, pos_weight, None, None)
  losses = reduced(formula, "rows", layout, y_true, y_pred, smoothing, pos_weight, None, None)
  return losses.reshape(shape)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _loss_core(formula, layout, reduction, *arrays):
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
# Eager calls: the checks of a call, once per configuration and input signature.


class Plan(NamedTuple):
  """What the checks of a call found: its formula, layout and constant arguments.

  `layout` is a :class:`Layout`, or the aligned shape for element losses;
  `smoothing` and `pos_weight` are passed to the jitted core as they are.
  """

  formula: Formula
  layout: Any
  smoothing: Any
  pos_weight: Any


_PLANS: dict[Any, Plan] = {}
_MAX_PLANS = 4096
# The types of the concrete jax arrays seen at an entry (never a tracer's).
_CONCRETE: set[type] = set()


def _key(head, y_true, y_pred, sample_weight, mask) -> tuple | None:
  """The key of an eager call's plan; None when an input is traced or not a jax array.

  The checks look only at shapes, dtypes and configuration, so a call with
  a planned key passes them: it skips them and their conversions.
  """
  concrete = _CONCRETE
  if head is None or type(y_true) not in concrete or type(y_pred) not in concrete:
    return None
  x64 = jax.config.read("jax_enable_x64")
  key: tuple[Any, ...] = (head, x64, y_true.shape, y_true.dtype, y_pred.shape, y_pred.dtype)
  for x in (sample_weight, mask):
    if x is None:
      key += (None,)
    elif type(x) in concrete:
      key += (x.shape, x.dtype)
    else:
      return None
  return key


def _note_concrete(*xs) -> None:
  for x in xs:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      _CONCRETE.add(type(x))


def plan(head, config, y_true, y_pred, sample_weight=None, mask=None, per_element=False):
  """Checks a call (once per `head` and input signature); returns its plan and arrays.

  Args:
    head: a hashable naming everything `config` returns (a loss or metric
      object), or None: the call is checked every time.
    config: ``() -> (formula, label_smoothing, pos_weight, axis,
      elementwise)``, called only when the call is checked.
    y_true, y_pred, sample_weight, mask: the call's inputs.
    per_element: the element losses (no axis, weight or mask): the plan's
      layout is then the aligned shape.

  Returns:
    The :class:`Plan` and the arrays for the jitted core: ``(y_true, y_pred,
    smoothing, pos_weight, sample_weight, mask)``.
  """
  key = _key(head, y_true, y_pred, sample_weight, mask)
  if key is not None:
    try:
      hit = _PLANS.get(key)
    except TypeError:  # an unhashable argument (an axis list): checked every time
      hit, key = None, None
    if hit is not None:
      return hit, (y_true, y_pred, hit.smoothing, hit.pos_weight, sample_weight, mask)
  formula, label_smoothing, pos_weight, axis, elementwise = config()
  # A planned call keeps its constants: they must be arrays, not tracers.
  with jax.ensure_compile_time_eval() if key is not None else contextlib.nullcontext():
    if per_element:
      arrays, layout = _prepare(y_true, y_pred, label_smoothing, pos_weight)
      arrays += (None, None)
    else:
      layout, arrays = prepare_call(
        y_true, y_pred, label_smoothing, pos_weight, axis, sample_weight, mask, elementwise
      )
    if key is not None:
      arrays = (arrays[0], arrays[1], jnp.asarray(label_smoothing), *arrays[3:])
  out = Plan(formula, layout, arrays[2], arrays[3])
  if key is not None:
    if len(_PLANS) >= _MAX_PLANS:
      _PLANS.clear()
    _PLANS[key] = out
  _note_concrete(y_true, y_pred, sample_weight, mask)
  return out, arrays


def _function_head(kind, formula, label_smoothing, pos_weight, axis, elementwise):
  """The plan head of a public function's call; None (never planned) for array arguments."""
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
  p, arrays = plan(
    head,
    lambda: (formula, label_smoothing, pos_weight, None, None),
    y_true,
    y_pred,
    per_element=True,
  )
  return _elementwise_core(formula, p.layout, *arrays[:4])


def object_loss(loss, y_true, y_pred, sample_weight=None, mask=None) -> jax.Array:
  """A loss object's value; `loss` gives its formula, options and reduction."""
  p, arrays = plan(loss, loss.call_config, y_true, y_pred, sample_weight, mask)
  return _loss_core(p.formula, p.layout, loss.reduction, *arrays)


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
  elementwise=None,
) -> jax.Array:
  """A loss's value: per-sample losses, weighted, masked and reduced."""
  head = _function_head("loss", formula, label_smoothing, pos_weight, axis, elementwise)
  p, arrays = plan(
    head,
    lambda: (formula, label_smoothing, pos_weight, axis, elementwise),
    y_true,
    y_pred,
    sample_weight,
    mask,
  )
  return _loss_core(p.formula, p.layout, reduction, *arrays)


def axis_mean(
  formula, y_true, y_pred, label_smoothing, pos_weight, axis, elementwise=None
) -> jax.Array:
  """The per-sample losses: element losses averaged over `axis`."""
  return loss_value(
    formula, y_true, y_pred, label_smoothing, pos_weight, axis, "none", None, None, elementwise
  )
