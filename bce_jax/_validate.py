"""Argument, shape and dtype checks, run once at the public entry points.

Everything here looks only at shapes, dtypes and configuration, so it runs
in Python while a function is traced: a wrong shape raises a ``ValueError``
or ``TypeError`` before anything is compiled, under ``jax.jit`` or not. The
checks that need the data live in :mod:`bce_jax._checked`.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight", "none")


@functools.cache
def _dtype_problem(dtype: np.dtype) -> str | None:
  """Why `dtype` is not a real numeric or bool dtype (None if it is)."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return (
      f"has complex dtype {dtype}; binary cross-entropy needs real numbers. Pass the "
      f"real part or the magnitude explicitly."
    )
  if jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer):
    return None
  if dtype == jnp.bool_:
    return None
  return f"must have a real numeric or bool dtype; got {dtype}."


def as_array(name: str, x: Any) -> jax.Array:
  """`jnp.asarray(x)`, with a TypeError naming `name` for non-numeric input."""
  if isinstance(x, (str, bytes)):
    raise TypeError(f"`{name}` must be a numeric array; got a {type(x).__name__}: {x!r}.")
  if not isinstance(x, jax.Array):
    try:
      x = jnp.asarray(x)
    except (TypeError, ValueError) as e:
      raise TypeError(
        f"`{name}` must be a numeric array (or something jnp.asarray accepts); got "
        f"{type(x).__name__}: {e}"
      ) from None
  problem = _dtype_problem(np.dtype(x.dtype))
  if problem is not None:
    raise TypeError(f"`{name}` {problem}")
  return x


def compute_dtype(y_pred: jax.Array) -> np.dtype:
  """float32 for float16/bfloat16/int/bool inputs, float64 for float64."""
  if jnp.issubdtype(y_pred.dtype, jnp.floating):
    return np.dtype(jnp.promote_types(y_pred.dtype, jnp.float32))
  return np.dtype(jnp.float32)


def _is_real_number_dtype(dtype: Any) -> bool:
  """Integer or floating (bfloat16 included); not bool, str or object."""
  return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))


def check_label_smoothing(label_smoothing: Any) -> None:
  """`label_smoothing` is a real scalar in [0, 1].

  A traced value (annealed inside a jitted step) is checked for its shape
  and dtype here, and for its value only under :func:`checked`.
  """
  if type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0:
    return  # the common case, and every loss or metric object's: nothing to check
  if isinstance(label_smoothing, (str, bytes, bool, np.bool_)):
    raise TypeError(
      f"`label_smoothing` must be a float in [0, 1]; got a "
      f"{type(label_smoothing).__name__}: {label_smoothing!r}."
    )
  if isinstance(label_smoothing, jax.core.Tracer):
    dtype, shape = label_smoothing.dtype, label_smoothing.shape
  else:
    try:
      arr = np.asarray(label_smoothing)
    except (TypeError, ValueError):
      arr = np.asarray(None)
    dtype, shape = arr.dtype, arr.shape
  if not _is_real_number_dtype(dtype) or shape != ():
    raise TypeError(
      f"`label_smoothing` must be a scalar float in [0, 1]; got "
      f"{type(label_smoothing).__name__} of dtype {dtype} and shape {shape}: "
      f"{label_smoothing!r}."
    )
  if isinstance(label_smoothing, jax.core.Tracer):
    return
  value = float(arr)
  if not 0.0 <= value <= 1.0:  # also rejects nan
    raise ValueError(f"`label_smoothing` must be in [0, 1]; got {label_smoothing!r}.")


# The function that gives every element's loss, named in errors about `axis`.
BCE_ELEMENTWISE = "binary_crossentropy_elementwise"


def _raise_empty_axis(axis: Any, elementwise: str) -> None:
  raise TypeError(
    f"`axis` must be an int or a non-empty tuple of ints; got {axis!r}. Name at "
    f"least one axis to average over, or use {elementwise} for the losses of every "
    f"element."
  )


def normalize_axis(axis: Any, ndim: int, elementwise: str = BCE_ELEMENTWISE) -> tuple[int, ...]:
  """`axis` (int or tuple of ints) as sorted non-negative ints; ValueError if bad.

  `elementwise` names the loss's function without an axis, for the errors.
  """
  axes = (axis,) if isinstance(axis, numbers.Integral) else axis
  if not isinstance(axes, Sequence) or not all(
    isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes
  ):
    raise TypeError(f"`axis` must be an int or a tuple of ints; got {axis!r}.")
  if not axes:
    _raise_empty_axis(axis, elementwise)
  if ndim == 0:
    raise ValueError(
      f"`axis` {axis!r} cannot be used with scalar (rank-0) inputs, which have no "
      f"axis to average over; pass arrays of rank >= 1, or use {elementwise}."
    )
  out = []
  for a in map(int, axes):
    if not -ndim <= a < ndim:
      raise ValueError(
        f"`axis` {axis!r} is out of range for inputs of rank {ndim}; expected "
        f"values in [{-ndim}, {ndim - 1}]."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"`axis` {axis!r} names the same axis more than once.")
  return tuple(sorted(out))


def check_mask_dtype(mask: jax.Array) -> None:
  if mask.dtype != jnp.bool_:
    raise TypeError(
      f"`mask` must be a boolean array; got dtype {mask.dtype}. Pass "
      f"`mask.astype(bool)`, or use `sample_weight` for numeric weights."
    )


def check_reduction(reduction: Any) -> str:
  """Normalizes `reduction`; ValueError for unknown values."""
  if reduction is None:
    return "none"
  if reduction == "auto":  # Keras 2 configs
    return "sum_over_batch_size"
  if reduction == "mean":
    return "sum_over_batch_size"
  if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
    raise ValueError(f"`reduction` must be one of {list(_REDUCTIONS)} or None; got {reduction!r}.")
  return reduction


def check_bool(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool; got {value!r}.")
  return bool(value)


def check_static_axis(axis: Any, elementwise: str = BCE_ELEMENTWISE) -> int | tuple[int, ...]:
  """Config-time `axis`: an int or a tuple of ints (lists become tuples)."""
  if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
    return int(axis)
  if (
    isinstance(axis, (list, tuple))
    and axis
    and all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axis)
  ):
    return tuple(int(a) for a in axis)
  if isinstance(axis, (list, tuple)) and not axis:
    _raise_empty_axis(axis, elementwise)
  raise TypeError(f"`axis` must be an int or a non-empty tuple of ints; got {axis!r}.")


def static_label_smoothing(label_smoothing: Any) -> float:
  """Config-time `label_smoothing`: a Python float in [0, 1]."""
  check_label_smoothing(label_smoothing)
  if isinstance(label_smoothing, jax.core.Tracer):
    raise TypeError("`label_smoothing` of a loss or metric object must be a Python float.")
  # + 0.0 turns -0.0 into 0.0: equal objects then have equal reprs and state tags.
  return float(label_smoothing) + 0.0


def prod(shape: Iterable[int]) -> int:
  return math.prod(int(d) for d in shape)


def aligned_shape(true_shape: tuple[int, ...], pred_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape `y_true` and `y_pred` are brought to by the Keras shape policy.

  Equal shapes pass. Where the ranks differ by one and the extra trailing
  axis has size 1, the two are brought to the same rank: a rank-1 array
  gains a trailing axis (`[B]` against `[B, 1]` gives `[B, 1]`), otherwise the
  size-1 axis is dropped (`[B, T, 1]` against `[B, T]` gives `[B, T]`). Any
  other mismatch is an error: nothing is broadcast, so `[B]` against `[B, 1]`
  can never become `[B, B]`.
  """
  a, b = true_shape, pred_shape
  if len(a) == len(b) + 1 and a[-1] == 1:
    a, b = (a, b + (1,)) if len(b) == 1 else (a[:-1], b)
  elif len(b) == len(a) + 1 and b[-1] == 1:
    a, b = (a + (1,), b) if len(a) == 1 else (a, b[:-1])
  if a != b:
    raise ValueError(
      f"`y_true` and `y_pred` must have the same shape; got y_true {true_shape} "
      f"and y_pred {pred_shape}. Shapes that differ only by a trailing axis "
      f"of size 1 are accepted; reshape the inputs to agree."
    )
  return b


def check_pos_weight(pos_weight: jax.Array, shape: tuple[int, ...]) -> None:
  """`pos_weight` broadcasts to the element losses without changing their shape.

  PyTorch's rule for ``BCEWithLogitsLoss``: against `[B, C]` losses a scalar,
  `(C,)`, `(1, C)`, `(B, 1)` and `(B, C)` are all accepted.
  """
  if pos_weight.dtype == jnp.bool_:
    _raise_bool_pos_weight(pos_weight)
  try:
    out = jnp.broadcast_shapes(tuple(pos_weight.shape), shape)
  except ValueError:
    out = None
  if out != shape:
    raise ValueError(
      f"`pos_weight` with shape {tuple(pos_weight.shape)} does not broadcast to the "
      f"element losses of shape {shape} without changing it; pass a scalar, shape "
      f"({shape[-1] if shape else 1},) for one weight per class, or any shape that "
      f"broadcasts to {shape}."
    )


def weight_shape(name: str, given: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape to give a `sample_weight` or `mask` before broadcasting it to `shape`.

  `shape` is the per-sample loss shape:

  * a trailing axis of size 1 beyond the rank of `shape` is dropped
    (`[B, 1]` weights for `[B]` losses);
  * a rank-1 weight of length `batch` weights whole samples: it gains
    trailing axes (`[B]` against `[B, T]` weights rows, even when B == T);
  * anything else that broadcasts to `shape` without changing it (a scalar,
    a rank-1 weight over the last axis, `[1, T]`, ...) is broadcast.
  """
  weight = given
  if len(weight) == len(shape) + 1 and weight[-1] == 1:
    weight = weight[:-1]
  if len(weight) == 1 and len(shape) > 1 and weight[0] == shape[0]:
    weight = weight + (1,) * (len(shape) - 1)
  try:
    out_shape = jnp.broadcast_shapes(weight, shape)
  except ValueError:
    out_shape = None
  if out_shape != shape:
    if not shape:
      raise ValueError(
        f"`{name}` with shape {given} does not fit the per-sample loss, which is a "
        f"scalar: rank-1 inputs are one sample's features (as in Keras). For one "
        f"loss per element pass y_true and y_pred of shape [batch, 1], or pass a "
        f"scalar `{name}`."
      )
    raise ValueError(
      f"`{name}` with shape {given} does not broadcast to the per-sample loss "
      f"shape {shape}; pass a scalar, shape [batch]=({shape[0]},), or a shape "
      f"that broadcasts to {shape}."
    )
  return weight


def check_sample_weight(sample_weight: Any) -> jax.Array | None:
  """`sample_weight` as an array; a Python bool is refused (a misplaced flag)."""
  if sample_weight is None:
    return None
  if isinstance(sample_weight, (bool, np.bool_)):
    raise TypeError(
      f"`sample_weight` must be a numeric array; got the bool {sample_weight!r}. "
      f"`from_logits` is set on the constructor: "
      f"BinaryCrossentropy(from_logits=True)(y_true, y_pred)."
    )
  return as_array("sample_weight", sample_weight)


def _nested_tuple(arr: np.ndarray) -> Any:
  if arr.ndim == 0:
    return float(arr) + 0.0  # -0.0 as 0.0, as for label_smoothing
  return tuple(_nested_tuple(a) for a in arr)


def _raise_bool_pos_weight(pos_weight: Any) -> None:
  shown = pos_weight if isinstance(pos_weight, (bool, np.bool_)) else "a bool array"
  raise TypeError(
    f"`pos_weight` must be a number or an array of numbers, not a bool; got {shown}. "
    f"It multiplies the positive term: pass 1.0 for no weighting, or None."
  )


def check_static_pos_weight(pos_weight: Any) -> float | tuple[Any, ...] | None:
  """Config-time `pos_weight`: None, a float, or (nested) tuples of floats >= 0."""
  if pos_weight is None:
    return None
  try:
    arr = np.asarray(pos_weight)
  except (TypeError, ValueError):
    arr = np.asarray(None)
  if arr.dtype == np.bool_:
    _raise_bool_pos_weight(pos_weight)
  # Strings ("2", ["1", "2"]) and bools are refused, not parsed.
  if not _is_real_number_dtype(arr.dtype):
    raise TypeError(
      f"`pos_weight` must be None, a float or a (nested) sequence of floats; got {pos_weight!r}."
    )
  arr = arr.astype(np.float64)
  if not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise ValueError(f"`pos_weight` must be finite and >= 0; got {pos_weight!r}.")
  return _nested_tuple(arr)
