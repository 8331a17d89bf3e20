"""Argument, shape and dtype checks, and the opt-in value checks.

Two kinds of check live here, following chex's split between static and
value assertions:

* Static checks look only at shapes, dtypes and configuration. They run in
  Python while a function is traced, so a wrong shape raises a ``ValueError``
  or ``TypeError`` before anything is compiled, under ``jax.jit`` or not.
* Value checks need the data (a probability of 1.3, a nan label). They are
  off by default and cost nothing then: no check, no branch is traced. Wrap a
  function in :func:`checked` to trace it with the checks on; they are built
  on :mod:`jax.experimental.checkify` and raise a
  :class:`ValueCheckError` naming the argument and the violated range.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_F = TypeVar("_F", bound=Callable[..., Any])

_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight", "none")

# --------------------------------------------------------------------------
# The switch for value checks.
#
# The flag has to be part of JAX's tracing cache key: a train step that was
# jitted and traced once without checks must be traced again when it is
# wrapped in `checked`, otherwise the cached, check-free trace would be reused
# and the checks silently skipped. JAX's own configuration states do exactly
# that when created with `include_in_jit_key`; if a future JAX drops that
# private hook we fall back to a plain flag, which is only unsafe for
# functions that were already traced before being wrapped.
try:  # pragma: no cover - exercised implicitly on every import
  from jax._src import config as _jax_config

  _VALUE_CHECKS = _jax_config.bool_state(
      "bce_jax_value_checks",
      False,
      "Trace bce_jax's data-dependent value checks (set by bce_jax.checked).",
      include_in_jit_key=True,
      include_in_trace_context=True,
  )

  def value_checks_on() -> bool:
    return bool(_VALUE_CHECKS.value)

  def _value_checks_scope():
    return _VALUE_CHECKS(True)

except Exception:  # pragma: no cover - depends on the installed JAX
  import contextlib
  import contextvars

  _VALUE_CHECKS_VAR = contextvars.ContextVar("bce_jax_value_checks", default=False)

  def value_checks_on() -> bool:
    return _VALUE_CHECKS_VAR.get()

  @contextlib.contextmanager
  def _value_checks_scope():
    token = _VALUE_CHECKS_VAR.set(True)
    try:
      yield
    finally:
      _VALUE_CHECKS_VAR.reset(token)


class ValueCheckError(ValueError):
  """Raised by a function wrapped in :func:`checked` when an input value is bad.

  The message names the argument (``y_true``, ``y_pred``, ``sample_weight``
  or ``pos_weight``) and the range it violated.
  """


def checked(fn: _F) -> _F:
  """Returns `fn` with bce_jax's data-dependent value checks switched on.

  By default bce_jax checks only what it can see while tracing: shapes,
  dtypes and configuration. Values are not checked, because that would add
  work and branches to every training step. ``checked(fn)`` traces `fn` with
  the value checks on and raises, after `fn` has run, if any input to a
  bce_jax function inside it was bad:

  * ``y_pred`` outside ``[0, 1]`` when ``from_logits=False``;
  * ``y_true`` outside ``[0, 1]``;
  * ``sample_weight`` or ``pos_weight`` negative;
  * a nan in any of them.

  `fn` may be anything that calls bce_jax: a loss object, a whole train step
  with ``jax.value_and_grad`` inside, a ``jax.jit``-compiled function (it is
  traced again, with the checks). The wrapper returns exactly what `fn`
  returns. It is built on :func:`jax.experimental.checkify.checkify`, which
  compiles the checks into jitted code: ``checked(jax.jit(step))`` runs the
  compiled step and raises once its result is ready. (The other order,
  ``jax.jit(checked(step))``, cannot raise from inside the trace and is
  refused with a TypeError saying so.)

  Args:
    fn: the function to check.

  Returns:
    A function with the signature and outputs of `fn`.

  Raises:
    ValueCheckError: from the returned function, if an input value is out of
      range; the message names the argument and the expected range.

  Examples:
    >>> import jax.numpy as jnp, bce_jax
    >>> safe = bce_jax.checked(bce_jax.binary_crossentropy)
    >>> print(f"{safe(jnp.array([1.0, 0.0]), jnp.array([0.8, 0.3])):.4f}")
    0.2899
    >>> safe(jnp.array([1.0, 0.0]), jnp.array([1.5, 0.3]))
    Traceback (most recent call last):
      ...
    bce_jax._checks.ValueCheckError: y_pred must hold probabilities in [0, 1] ...
  """

  checkified = checkify.checkify(fn, errors=checkify.user_checks)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with _value_checks_scope():
      err, out = checkified(*args, **kwargs)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(err)):
      raise TypeError(
          "bce_jax.checked(f) raises on the host, so it cannot itself be traced by "
          "jax.jit, vmap or grad. Put the transformation inside instead: "
          "bce_jax.checked(jax.jit(f))."
      )
    message = err.get()
    if message is not None:
      raise ValueCheckError(_first_line(message))
    return out

  return wrapper  # type: ignore[return-value]


def _first_line(message: str) -> str:
  # checkify appends where the check was traced and a "(`check` failed)"
  # tag; the first line without the tag is the message we wrote.
  first = message.strip().splitlines()[0]
  return first.replace(" (`check` failed)", "")


def value_check(ok: jax.Array, message: str, **fmt: jax.Array) -> None:
  """Records a data-dependent check; a no-op unless under `checked`."""
  if value_checks_on():
    checkify.check(jnp.all(ok), message, **fmt)


def _where(x: jax.Array, where: jax.Array | None, fill: float) -> jax.Array:
  """`x` as float32, with `fill` in the elements that `where` leaves out."""
  x = x.astype(jnp.float32)
  if where is None:
    return x
  return jnp.where(where, x, jnp.float32(fill))


def check_in_unit_interval(
    name: str, x: jax.Array, what: str, where: jax.Array | None = None
) -> None:
  """Value check: every element of `x` is in [0, 1] and not nan.

  Elements where `where` is False (masked padding) are not checked.
  """
  if not value_checks_on():
    return
  has_nan = jnp.isnan(_where(x, where, 0.0)).any()
  value_check(~has_nan, f"{name} contains nan; expected {what} in [0, 1].")
  # nan marks the skipped elements for nanmin/nanmax; an all-skipped
  # array reports the empty range [0, 0].
  x = _where(x, where, float("nan"))
  ok = ~((x < 0) | (x > 1)).any()
  lo = jnp.nanmin(jnp.append(x, jnp.float32(jnp.inf)))
  hi = jnp.nanmax(jnp.append(x, -jnp.float32(jnp.inf)))
  value_check(
      ok,
      f"{name} must hold {what} in [0, 1]; got values in [{{lo}}, {{hi}}].",
      lo=lo,
      hi=hi,
  )


def check_finite(
    name: str, x: jax.Array, what: str, where: jax.Array | None = None
) -> None:
  """Value check: `x` has no nan (infinities are allowed, e.g. for logits)."""
  if not value_checks_on():
    return
  value_check(~jnp.isnan(_where(x, where, 0.0)).any(), f"{name} contains nan; expected {what}.")


def check_non_negative(name: str, x: jax.Array) -> None:
  """Value check: `x` is >= 0 and has no nan."""
  if not value_checks_on():
    return
  x = x.astype(jnp.float32)
  value_check(~jnp.isnan(x).any(), f"{name} contains nan; expected weights >= 0.")
  value_check(
      (x >= 0).all(),
      f"{name} must be >= 0; got a minimum of {{lo}}.",
      lo=jnp.nanmin(jnp.append(x.ravel(), jnp.float32(0))),
  )


# --------------------------------------------------------------------------
# Static checks.


def as_array(name: str, x: Any) -> jax.Array:
  """`jnp.asarray(x)`, with a TypeError naming `name` for non-numeric input."""
  if isinstance(x, (str, bytes)):
    raise TypeError(f"`{name}` must be a numeric array; got a {type(x).__name__}: {x!r}.")
  try:
    arr = jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"`{name}` must be a numeric array (or something jnp.asarray accepts); got "
        f"{type(x).__name__}: {e}"
    ) from None
  if jnp.issubdtype(arr.dtype, jnp.complexfloating):
    raise TypeError(
        f"`{name}` has complex dtype {arr.dtype}; binary cross-entropy needs real "
        f"numbers. Pass the real part or the magnitude explicitly."
    )
  if not (
      jnp.issubdtype(arr.dtype, jnp.floating)
      or jnp.issubdtype(arr.dtype, jnp.integer)
      or arr.dtype == jnp.bool_
  ):
    raise TypeError(f"`{name}` must have a real numeric or bool dtype; got {arr.dtype}.")
  return arr


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


def same_rank_shapes(
    y_true: jax.Array, y_pred: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Applies the Keras shape policy to `y_true` and `y_pred`.

  Equal shapes pass. Where the ranks differ by one and the extra trailing
  axis has size 1, the two are brought to the same rank: a rank-1 array
  gains a trailing axis (`[B]` against `[B, 1]` gives `[B, 1]`), otherwise the
  size-1 axis is dropped (`[B, T, 1]` against `[B, T]` gives `[B, T]`). Any
  other mismatch is an error: nothing is broadcast, so `[B]` against `[B, 1]`
  can never become `[B, B]`.
  """
  a, b = _match_rank(y_true, y_pred)
  if a.shape != b.shape:
    raise ValueError(
        f"`y_true` and `y_pred` must have the same shape; got y_true {tuple(y_true.shape)} "
        f"and y_pred {tuple(y_pred.shape)}. Shapes that differ only by a trailing axis "
        f"of size 1 are accepted; reshape the inputs to agree."
    )
  return a, b


def _match_rank(x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  if x1.ndim == x2.ndim + 1 and x1.shape[-1] == 1:
    if x2.ndim == 1:
      return x1, x2[:, None]
    return jnp.squeeze(x1, -1), x2
  if x2.ndim == x1.ndim + 1 and x2.shape[-1] == 1:
    if x1.ndim == 1:
      return x1[:, None], x2
    return x1, jnp.squeeze(x2, -1)
  return x1, x2


def _raise_empty_axis(axis: Any) -> None:
  raise TypeError(
      f"`axis` must be an int or a non-empty tuple of ints; got {axis!r}. Name at "
      f"least one axis to average over, or use binary_crossentropy_elementwise for the "
      f"losses of every element."
  )


def normalize_axis(axis: Any, ndim: int) -> tuple[int, ...]:
  """`axis` (int or tuple of ints) as sorted non-negative ints; ValueError if bad."""
  axes = (axis,) if isinstance(axis, numbers.Integral) else axis
  if not isinstance(axes, Sequence) or not all(
      isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes
  ):
    raise TypeError(f"`axis` must be an int or a tuple of ints; got {axis!r}.")
  if not axes:
    _raise_empty_axis(axis)
  if ndim == 0:
    raise ValueError(
        f"`axis` {axis!r} cannot be used with scalar (rank-0) inputs, which have no "
        f"axis to average over; pass arrays of rank >= 1, or use "
        f"binary_crossentropy_elementwise."
    )
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"`axis` {axis!r} is out of range for inputs of rank {ndim}; expected "
          f"values in [{-ndim}, {ndim - 1}]."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"`axis` {axis!r} names the same axis more than once.")
  return tuple(sorted(out))


def check_pos_weight(pos_weight: jax.Array, shape: tuple[int, ...]) -> None:
  """`pos_weight` is a scalar or a vector over the last axis of `shape`."""
  ok = pos_weight.ndim == 0 or (
      pos_weight.ndim == 1
      and len(shape) >= 1
      and pos_weight.shape[0] in (1, shape[-1])
  )
  if not ok:
    last = shape[-1] if shape else None
    raise ValueError(
        f"`pos_weight` with shape {tuple(pos_weight.shape)} does not broadcast to the "
        f"last axis of the element losses {tuple(shape)}; expected a scalar or shape "
        f"({last},)."
    )


def weight_to_shape(
    name: str, weight: jax.Array, shape: tuple[int, ...]
) -> jax.Array:
  """Brings a `sample_weight` or `mask` to the per-sample loss `shape`.

  * a scalar or any shape that broadcasts to `shape` without changing it is
    broadcast;
  * a trailing axis of size 1 beyond the rank of `shape` is dropped
    (`[B, 1]` weights for `[B]` losses);
  * a rank-1 weight of length `batch` weights whole samples: it gains
    trailing axes (`[B]` against `[B, T]` weights rows, even when B == T).
    A rank-1 weight of any other length (except 1) is an error, since it
    would be ambiguous.
  """
  given = tuple(weight.shape)
  if weight.ndim == len(shape) + 1 and weight.shape[-1] == 1:
    weight = jnp.squeeze(weight, -1)
  if weight.ndim == 1 and len(shape) > 1:
    if weight.shape[0] == shape[0]:
      weight = weight.reshape(weight.shape + (1,) * (len(shape) - 1))
    elif weight.shape[0] != 1:
      raise ValueError(
          f"`{name}` with shape {given} is rank 1, so it weights whole samples and "
          f"must have length batch={shape[0]} (per-sample loss shape {shape}); to "
          f"weight the trailing axes pass shape {(1,) + shape[1:]} or {shape}."
      )
  try:
    out_shape = jnp.broadcast_shapes(weight.shape, shape)
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
  return jnp.broadcast_to(weight, shape)


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
    raise ValueError(
        f"`reduction` must be one of {list(_REDUCTIONS)} or None; got {reduction!r}."
    )
  return reduction


def check_static_pos_weight(pos_weight: Any) -> float | tuple[float, ...] | None:
  """Config-time `pos_weight`: None, a float, or a tuple of floats, all >= 0."""
  if pos_weight is None:
    return None
  try:
    arr = np.asarray(pos_weight)
  except (TypeError, ValueError):
    arr = np.asarray(None)
  # Strings ("2", ["1", "2"]) and bools are refused, not parsed.
  if not _is_real_number_dtype(arr.dtype):
    raise TypeError(
        f"`pos_weight` must be None, a float or a sequence of floats; got {pos_weight!r}."
    )
  arr = arr.astype(np.float64)
  if arr.ndim > 1:
    raise ValueError(
        f"`pos_weight` must be a scalar or a 1-D sequence over the last axis; got shape "
        f"{arr.shape}."
    )
  if not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise ValueError(f"`pos_weight` must be finite and >= 0; got {pos_weight!r}.")
  if arr.ndim == 0:
    return float(arr)
  return tuple(float(v) for v in arr)


def check_bool(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool; got {value!r}.")
  return bool(value)


def check_static_axis(axis: Any) -> int | tuple[int, ...]:
  """Config-time `axis`: an int or a tuple of ints (lists become tuples)."""
  if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
    return int(axis)
  if isinstance(axis, (list, tuple)) and axis and all(
      isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axis
  ):
    return tuple(int(a) for a in axis)
  if isinstance(axis, (list, tuple)) and not axis:
    _raise_empty_axis(axis)
  raise TypeError(f"`axis` must be an int or a non-empty tuple of ints; got {axis!r}.")


def static_label_smoothing(label_smoothing: Any) -> float:
  check_label_smoothing(label_smoothing)
  if isinstance(label_smoothing, jax.core.Tracer):
    raise TypeError("`label_smoothing` of a loss or metric object must be a Python float.")
  return float(label_smoothing)


def prod(shape: Sequence[int]) -> int:
  return math.prod(int(d) for d in shape)
