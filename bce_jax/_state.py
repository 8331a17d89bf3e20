"""`MetricState`: the metric's pytree state, its checks and its checkpoints.

Four float32 scalars (two double-float sums, see :mod:`bce_jax._metric`) and
a static string naming the metric and configuration that made them. The
string is part of the tree structure, not a leaf, so the state stays four
arrays for ``scan``, ``vmap``, ``psum`` and donation, while a metric can
refuse, at trace time, a state that another metric made.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STATE_DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class MetricState:
  """The state of a metric: four float32 scalars, and which metric made it.

  Attributes:
    total: the weighted sum of per-sample losses (leading part).
    total_err: the rounding error of `total` (trailing part).
    count: the sum of sample weights (the number of samples if unweighted).
    count_err: the rounding error of `count`.
    metric: the metric and configuration that made the state, as a string
      (static: part of the tree structure, not a leaf). A metric refuses a
      state another metric or configuration made, also under ``jax.jit``.

  A pytree of four arrays: a ``lax.scan`` carry, batched under ``vmap``,
  summed across devices with ``jax.lax.psum``, donated, pickled.

  Checkpointing: orbax restores it into a target from ``metric.init()``.
  Where ``flax.serialization`` is loaded when a state is made,
  ``flax.serialization.to_bytes`` / ``from_bytes`` (and ``to_state_dict`` /
  ``from_state_dict``) save it as Flax users save a train state; the state
  dict holds the four arrays and `metric`, checked against the target's
  when it is restored.
  """

  total: jax.Array
  total_err: jax.Array
  count: jax.Array
  count_err: jax.Array
  _: dataclasses.KW_ONLY
  metric: str | None = None

  def __post_init__(self) -> None:
    _flax_registration()


DATA_FIELDS = ("total", "total_err", "count", "count_err")
jax.tree_util.register_dataclass(MetricState, data_fields=list(DATA_FIELDS), meta_fields=["metric"])


def _data_fields(state: Any) -> list[str]:
  """The array fields of a tagged state (every field but the static `metric`)."""
  return [f.name for f in dataclasses.fields(state) if f.name != "metric"]


def _state_dict(state: Any) -> dict[str, Any]:
  serialization = sys.modules["flax.serialization"]
  names = _data_fields(state)
  out = {name: serialization.to_state_dict(getattr(state, name)) for name in names}
  return {**out, "metric": state.metric}


def _from_state_dict(target: Any, state: dict[str, Any]) -> Any:
  serialization = sys.modules["flax.serialization"]
  names = _data_fields(target)
  expected = {*names, "metric"}
  if set(state) != expected:
    raise ValueError(
      f"A {type(target).__name__}'s state dict has the keys {sorted(expected)}; "
      f"got {sorted(state)}."
    )
  if state["metric"] != target.metric:
    raise ValueError(
      f"The saved state was made by {state['metric']}, the target by {target.metric}; "
      f"restore it into the init() of a metric with the saved configuration."
    )
  fields = {
    name: serialization.from_state_dict(getattr(target, name), state[name], name=name)
    for name in names
  }
  return dataclasses.replace(target, **fields)


_FLAX_REGISTERED: set[type] = set()


def _flax_registration(cls: type = MetricState) -> None:
  """Registers `cls`, a state with a static `metric` tag, with ``flax.serialization``
  once flax is loaded.

  bce_jax never imports flax: it looks for the module each time a state is
  made, until flax has been imported elsewhere (a dict lookup).
  """
  if cls in _FLAX_REGISTERED:
    return
  register = getattr(sys.modules.get("flax.serialization"), "register_serialization_state", None)
  if register is not None:
    register(cls, _state_dict, _from_state_dict, override=True)
    _FLAX_REGISTERED.add(cls)


def from_leaves(leaves: Any, tag: str | None) -> MetricState:
  """``MetricState(*leaves, metric=tag)``, without the frozen dataclass's per-field setattr.

  An eager update makes one state a call: this saves about 1 us of it.
  """
  state = object.__new__(MetricState)
  fields = state.__dict__
  fields["total"], fields["total_err"], fields["count"], fields["count_err"] = leaves
  fields["metric"] = tag
  _flax_registration()
  return state


def eager_state(state: Any, tag: str, concrete: Any) -> bool:
  """Whether `state` is a MetricState of `tag` whose leaves are concrete arrays.

  Such a state's leaf shapes and dtypes are checked by :func:`check_state`
  where its arrays are used: in the trace of an eager update, once per
  signature (a new signature is traced, so a bad leaf raises every time).
  """
  if type(state) is not MetricState or state.metric != tag:
    return False
  return (
    type(state.total) in concrete
    and type(state.total_err) in concrete
    and type(state.count) in concrete
    and type(state.count_err) in concrete
  )


def leaves(state: MetricState) -> tuple[Any, Any, Any, Any]:
  """The four arrays of `state`, in field order."""
  return state.total, state.total_err, state.count, state.count_err


def _is_scalar(value: Any) -> bool:
  return getattr(value, "shape", None) == () and getattr(value, "dtype", None) == _STATE_NP_DTYPE


_STATE_NP_DTYPE = np.dtype(STATE_DTYPE)


def check_state(state: Any, tag: str, argname: str = "state", stacked: bool = False) -> MetricState:
  """`state` if it is a MetricState of float32 scalars (of `[K]` arrays if `stacked`) made
  by the metric whose tag is `tag`."""
  if (
    not stacked
    and type(state) is MetricState
    and state.metric == tag
    and _is_scalar(state.total)
    and _is_scalar(state.total_err)
    and _is_scalar(state.count)
    and _is_scalar(state.count_err)
  ):
    return state  # the common case, checked in a few attribute reads
  if not isinstance(state, MetricState):
    raise TypeError(
      f"`{argname}` must be a bce_jax.MetricState (from metric.init()); got {type(state).__name__}."
    )
  shapes = set()
  for name in DATA_FIELDS:
    value = getattr(state, name)
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    shapes.add(shape)
    if shape is None or dtype != STATE_DTYPE:
      ok = False
    else:
      ok = len(shape) == 1 if stacked else shape == ()
    if not ok:
      want = (
        "a float32 array of shape [K] (states stacked on axis 0)"
        if stacked
        else ("a float32 scalar")
      )
      hint = (
        ""
        if stacked
        else (
          " Under vmap, map over states built by init()/update(); fold a stacked state "
          "with reduce()."
        )
      )
      raise ValueError(
        f"`{argname}.{name}` must be {want}; got shape {shape} and dtype {dtype}.{hint}"
      )
  if len(shapes) != 1:
    raise ValueError(
      f"The fields of `{argname}` have different shapes: {sorted(map(str, shapes))}."
    )
  check_tag(state.metric, tag, argname)
  return state


def check_tag(made_by: str | None, tag: str, argname: str = "state") -> None:
  """A ValueError unless a state's `metric` tag, `made_by`, is `tag` (this metric's)."""
  if made_by == tag:
    return
  who = "no metric (its `metric` is None: built by hand)" if made_by is None else made_by
  raise ValueError(
    f"`{argname}` was made by {who}, not by this metric, {tag}. States of different "
    f"metrics or configurations measure different things and are never combined: pass a "
    f"state from this metric's init() and update() (a metric rebuilt with "
    f"from_config(get_config()), or with another `name`, accepts it)."
  )
