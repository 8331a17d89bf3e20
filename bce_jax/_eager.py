"""Eager calls: one jitted callable per configuration, its checks run as it is traced.

A loss, function or metric called from Python with concrete jax arrays does
not check its arguments in Python on every call. It looks up its
configuration (the "head": a loss or metric object, or a function's options)
and calls a ``jax.jit`` of a function that runs the call's checks and then
the computation, with the configuration bound (:func:`bound`). The call
passes arrays only, so JAX's C++ dispatch matches their shapes, dtypes and
shardings and runs the compiled program without returning to Python. A new
signature is traced, and the trace runs the same checks as a Python call:
a bad input raises the same error, on every call (a failed trace caches
nothing). Calls with tracers or non-jax inputs are checked in Python.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from bce_jax import _validate

__all__ = ["CONCRETE", "Eager", "bound", "eager", "note_concrete"]


class Eager(NamedTuple):
  """How a configuration is called eagerly: a jitted callable and its `pos_weight`.

  `call` takes arrays only (or None) and checks its inputs' shapes and
  dtypes while it is traced, once per input signature. The label smoothing
  is bound into it as a constant of the program (one argument fewer to
  dispatch); `pos_weight`, the configuration's array or None, is passed
  as it is.
  """

  call: Any
  pos_weight: Any


_EAGER: dict[Any, Eager] = {}
_MAX_EAGER = 4096
# The types of the concrete jax arrays seen at an entry (never a tracer's).
CONCRETE: set[type] = set()


def note_concrete(*xs) -> None:
  for x in xs:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      CONCRETE.add(type(x))


def eager(head, config, checked, y_true, y_pred, sample_weight=None, mask=None) -> Eager | None:
  """The eager callable of `head`'s calls, or None: check this call in Python.

  A call is eager when `head` is not None and every array argument is a
  concrete jax array (not a tracer, not a NumPy array). The callable is jax's
  jit of `checked` with the configuration bound (:func:`bound`): jax's C++
  dispatch matches the inputs' shapes, dtypes and shardings and runs the
  compiled program; a new signature is traced, and the trace runs the checks
  a Python call runs, so a bad input raises the same error every time.

  Args:
    head: a hashable naming everything `config` returns (a loss or metric
      object, or a function's options by value and type), or None.
    config: ``(dtype) -> (formula, label_smoothing, pos_weight, axis,
      elementwise)``, called once per `head` and compute dtype, with
      `pos_weight` (a configured one) in that dtype.
    checked: ``(function, *statics)``: the traced function is ``function(formula,
      label_smoothing, axis, axis_types, elementwise, *statics, *arrays)``.
    y_true, y_pred, sample_weight, mask: the call's inputs.
  """
  concrete = CONCRETE
  if head is None or type(y_true) not in concrete or type(y_pred) not in concrete:
    return None
  if (sample_weight is not None and type(sample_weight) not in concrete) or (
    mask is not None and type(mask) not in concrete
  ):
    return None
  # The attribute reads faster than config.read (its stub does not declare it).
  x64 = jax.config.jax_enable_x64  # type: ignore[attr-defined]
  # The compute dtype (float64 only for float64 y_pred, so only under x64):
  # a configured pos_weight is passed in it, whole in float64.
  wide = x64 and y_pred.dtype == np.float64
  key = (head, x64, wide)
  try:
    hit = _EAGER.get(key)
  except TypeError:  # an unhashable argument (an axis list): checked every time
    return None
  if hit is not None:
    return hit
  formula, label_smoothing, pos_weight, axis, elementwise = config(
    np.float64 if wide else np.float32
  )
  if type(label_smoothing) is not float:
    return None
  # `axis` by value and type: 1.0 == True == 1, and only the int passes its check.
  axis_types: Any = tuple(map(type, axis)) if isinstance(axis, tuple) else type(axis)
  call = bound(checked[0], formula, label_smoothing, axis, axis_types, elementwise, *checked[1:])
  # The constant outlives this call: an array, not a tracer of a trace around it.
  if pos_weight is not None:
    with jax.ensure_compile_time_eval():
      pos_weight = _validate.as_array("pos_weight", pos_weight)
  if len(_EAGER) >= _MAX_EAGER:
    _EAGER.clear()
  out = _EAGER[key] = Eager(call, pos_weight)
  return out


@functools.lru_cache(maxsize=1024)
def bound(function, *statics):
  """`function` with its leading static arguments bound, jitted: it takes arrays only.

  Equal configurations share one callable, and so its compiled programs.
  """
  return jax.jit(functools.partial(function, *statics))
