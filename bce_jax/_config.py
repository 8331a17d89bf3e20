"""Configuration shared by every loss and metric object: checks, Keras configs.

The objects are frozen dataclasses registered as static pytrees: hashable,
no array leaves, so equal configurations never retrace. :class:`Config`
checks each field once, when the object is made, by the field's name, and
turns the object into a JSON-serialisable config and back (Keras configs,
with their ``dtype`` key, are accepted too).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from bce_jax import _validate


def _name(value: Any) -> str:
  if not isinstance(value, str):
    raise TypeError(f"`name` must be a str; got {value!r}.")
  return value


def _real(field: str, lo: float, hi: float | None = None) -> Callable[[Any], float]:
  def check(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
      raise TypeError(f"`{field}` must be a float; got {value!r}.")
    value = float(value) + 0.0  # -0.0 as 0.0: equal objects, equal reprs and state tags
    if not (value >= lo and (hi is None or value <= hi)) or not np.isfinite(value):
      bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo} and finite"
      raise ValueError(f"`{field}` must be {bound}; got {value!r}.")
    return value

  return check


def _no_dtype(dtype: Any) -> None:
  """A loss object's `dtype`: Keras's argument, refused unless None (see the loss docstrings)."""
  if dtype is not None:
    raise ValueError(
      f"`dtype` is not supported (got {dtype!r}): bce_jax losses compute in float32 "
      f"(float64 for float64 `y_pred` under jax_enable_x64) whatever the input dtype, "
      f"and return that dtype, so float16 and bfloat16 inputs never overflow (Keras's "
      f"dtype='float16' computes the loss in float16, which gives inf or nan at p = 1). Remove "
      f"`dtype=`; for a float64 loss pass float64 `y_pred` with jax_enable_x64, and for "
      f"a lower-precision value cast the result: loss(y_true, y_pred).astype(jnp.bfloat16)."
    )


# Each field any loss or metric may have, and how it is checked and normalized.
_FIELDS: dict[str, Callable[[Any], Any]] = {
  "from_logits": lambda v: _validate.check_bool("from_logits", v),
  "apply_class_balancing": lambda v: _validate.check_bool("apply_class_balancing", v),
  "label_smoothing": _validate.static_label_smoothing,
  "axis": _validate.check_static_axis,
  "reduction": _validate.check_reduction,
  "name": _name,
  "pos_weight": _validate.check_static_pos_weight,
  "alpha": _real("alpha", 0.0, 1.0),
  "gamma": _real("gamma", 0.0),
  "dtype": _no_dtype,
}

# A field with this metadata is kept out of configs.
NOT_IN_CONFIG = {"config": False}


def _keras_dtype_ok(dtype: Any) -> bool:
  if isinstance(dtype, Mapping):  # a serialized Keras DTypePolicy
    dtype = dtype.get("config", {}).get("name")
  return dtype in (None, "float32", "mixed_float16", "mixed_bfloat16")


def _json(value: Any) -> Any:
  return [_json(v) for v in value] if isinstance(value, tuple) else value


class Config:
  """Base of the loss and metric dataclasses: field checks and configs."""

  # A metric's state tag, made on first use (see bce_jax._metric._tag). A slot,
  # not an entry of the instance dict, so `vars(metric)` holds the fields only;
  # `__getstate__` leaves it out of pickles and copies (it is made again).
  __slots__ = ("_state_tag",)
  _state_tag: str

  # The public function giving the formula's element losses, named in errors about `axis`.
  _ELEMENTWISE: ClassVar[str] = _validate.BCE_ELEMENTWISE

  def __getstate__(self) -> dict[str, Any]:
    """The fields only: what pickle and copy save, whatever was used before."""
    return dict(self.__dict__)

  def __post_init__(self) -> None:
    for field in dataclasses.fields(self):  # type: ignore[arg-type]
      value = getattr(self, field.name)
      if field.name == "axis":
        value = _validate.check_static_axis(value, self._ELEMENTWISE)
      elif field.name in _FIELDS:
        value = _FIELDS[field.name](value)
      else:
        continue
      object.__setattr__(self, field.name, value)

  def static_pos_weight(self, dtype: Any) -> np.ndarray | None:
    """The configured `pos_weight` as an array of `dtype` (None if unset).

    `dtype` is the call's compute dtype: float64 for float64 inputs under
    x64 gets the configured floats whole; float32 rounds them once, here.
    """
    pos_weight = getattr(self, "pos_weight", None)
    return None if pos_weight is None else np.asarray(pos_weight, dtype)

  def call_config(self, dtype: Any) -> tuple[Any, ...]:
    """What a call's checks need: formula, label smoothing, pos_weight, axis, elementwise name.

    `pos_weight` in `dtype`, the call's compute dtype (:meth:`static_pos_weight`).
    """
    label_smoothing = getattr(self, "label_smoothing", 0.0)
    axis = getattr(self, "axis", -1)
    return self.formula(), label_smoothing, self.static_pos_weight(dtype), axis, self._ELEMENTWISE

  def formula(self) -> Any:
    raise NotImplementedError

  def get_config(self) -> dict[str, Any]:
    """The configuration as a JSON-serialisable dict."""
    fields = dataclasses.fields(self)  # type: ignore[arg-type]
    return {f.name: _json(getattr(self, f.name)) for f in fields if f.metadata != NOT_IN_CONFIG}

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> Any:
    """Builds an object from `get_config()` output or a Keras config.

    Accepts Keras configs (with their ``dtype`` key) and Keras' serialized
    form ``{"class_name": ..., "config": {...}}``.
    """
    if not isinstance(config, Mapping):
      raise TypeError(f"`config` must be a dict; got {type(config).__name__}.")
    if "config" in config and "class_name" in config:
      config = config["config"]
    kwargs = dict(config)
    if "dtype" in kwargs:
      dtype = kwargs.pop("dtype")
      if not _keras_dtype_ok(dtype):
        raise ValueError(
          f"config `dtype` {dtype!r} is not supported: bce_jax computes in float32 "
          f"(float64 for float64 inputs). Remove the key or use 'float32'."
        )
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - fields)
    if unknown:
      raise ValueError(
        f"Unknown config keys for {cls.__name__}: {unknown}; expected a subset of "
        f"{sorted(fields | {'dtype'})}."
      )
    return cls(**kwargs)
