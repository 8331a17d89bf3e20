"""`MetricState`: the metric's pytree state, its checks and its checkpoints.

One float32 array of four sums (two double-float sums, see
:mod:`bce_jax._metric`) and a static string naming the metric and
configuration that made them. The string is part of the tree structure, not
a leaf, so the state is one array for ``scan``, ``vmap``, ``psum`` and
donation (and an eager call returns one array), while a metric can refuse,
at trace time, a state that another metric made.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STATE_DTYPE = jnp.float32
# The entries of `MetricState.sums`, in order.
SUMS = ("total", "total_err", "count", "count_err")


@dataclasses.dataclass(frozen=True)
class MetricState:
  """The state of a metric: its four float32 sums in one array, and which metric made it.

  Attributes:
    sums: float32 of shape ``[4]``: ``(total, total_err, count, count_err)``.
      Under ``vmap``, and for states stacked for ``reduce``, it has leading
      axes: ``[K, 4]``.
    metric: the metric and configuration that made the state, as a string
      (static: part of the tree structure, not a leaf), such as
      ``"BinaryCrossentropyMetric(from_logits=True, ...)"``. A metric class
      defined outside bce_jax is named with its module,
      ``"mylib.metrics.BinaryCrossentropyMetric(...)"``, so it never shares
      a tag with a bce_jax class of the same name. A metric refuses a state
      another metric or configuration made, also under ``jax.jit``.

  The four sums are also read-only properties, views of `sums` computed on
  access (``sums[..., i]``, so a stacked state's `total` has shape ``[K]``):

  - `total`: the weighted sum of per-sample losses (leading part);
  - `total_err`: the rounding error of `total` (trailing part);
  - `count`: the sum of sample weights (the number of samples if unweighted);
  - `count_err`: the rounding error of `count`.

  A pytree of one array: a ``lax.scan`` carry, batched under ``vmap``,
  summed across devices with ``jax.lax.psum``, donated, pickled.

  Checkpointing: orbax restores it into a target from ``metric.init()``.
  Where ``flax.serialization`` is loaded when a state is made,
  ``flax.serialization.to_bytes`` / ``from_bytes`` (and ``to_state_dict`` /
  ``from_state_dict``) save it as Flax users save a train state; the state
  dict holds `sums` and `metric`, whose class name and configuration are
  checked against the target's when it is restored, the module aside (a
  class saved by the script that defines it, ``__main__.MyMetric``,
  restores where it is imported, ``train.MyMetric``, and states saved
  before tags named the module restore too; the target's tag replaces the
  saved one). A state dict of the earlier layout, four arrays ``total``,
  ``total_err``, ``count`` and ``count_err``, is restored too: its arrays
  are packed into `sums`.

  Examples:
    >>> import bce_jax, jax.numpy as jnp
    >>> m = bce_jax.BinaryCrossentropyMetric()
    >>> state = m.update(m.init(), jnp.array([[0.0, 1.0]]), jnp.array([[0.2, 0.9]]))
    >>> print(state.sums.shape, f"{float(state.total):.4f}", float(state.count))
    (4,) 0.1643 1.0
  """

  sums: jax.Array
  _: dataclasses.KW_ONLY
  metric: str | None = None

  def __post_init__(self) -> None:
    _flax_registration()

  @property
  def total(self) -> jax.Array:
    """The weighted sum of per-sample losses, ``sums[..., 0]`` (computed on access)."""
    return self.sums[..., 0]

  @property
  def total_err(self) -> jax.Array:
    """The rounding error of `total`, ``sums[..., 1]`` (computed on access)."""
    return self.sums[..., 1]

  @property
  def count(self) -> jax.Array:
    """The sum of sample weights, ``sums[..., 2]`` (computed on access)."""
    return self.sums[..., 2]

  @property
  def count_err(self) -> jax.Array:
    """The rounding error of `count`, ``sums[..., 3]`` (computed on access)."""
    return self.sums[..., 3]


jax.tree_util.register_dataclass(MetricState, data_fields=["sums"], meta_fields=["metric"])


def _data_fields(state: Any) -> list[str]:
  """The array fields of a tagged state (every field but the static `metric`)."""
  return [f.name for f in dataclasses.fields(state) if f.name != "metric"]


def _state_dict(state: Any) -> dict[str, Any]:
  serialization = sys.modules["flax.serialization"]
  names = _data_fields(state)
  out = {name: serialization.to_state_dict(getattr(state, name)) for name in names}
  return {**out, "metric": state.metric}


def _packed(state: dict[str, Any]) -> dict[str, Any]:
  """A MetricState's state dict saved in the earlier layout, four arrays, with them packed
  into `sums` (on a new last axis, so stacked states stay stacked)."""
  parts = [np.asarray(state[name]) for name in SUMS]
  if len({part.shape for part in parts}) != 1:
    shapes = ", ".join(f"{name} {part.shape}" for name, part in zip(SUMS, parts))
    raise ValueError(
      f"A MetricState's state dict in the four-array layout needs arrays of one shape; "
      f"got {shapes}."
    )
  return {"sums": np.stack(parts, axis=-1), "metric": state["metric"]}


def _from_state_dict(target: Any, state: dict[str, Any]) -> Any:
  serialization = sys.modules["flax.serialization"]
  names = _data_fields(target)
  expected = {*names, "metric"}
  if type(target) is MetricState and set(state) == {*SUMS, "metric"}:
    state = _packed(state)
  if set(state) != expected:
    raise ValueError(
      f"A {type(target).__name__}'s state dict has the keys {sorted(expected)}; "
      f"got {sorted(state)}."
    )
  if not restores_into(state["metric"], target.metric):
    raise ValueError(
      f"The saved state was made by {state['metric']}, the target by {target.metric}; "
      f"restore it into the init() of a metric with the saved configuration."
    )
  for name in names:  # flax restores any array into any leaf: shapes and dtypes checked here
    want, got = getattr(target, name), np.asarray(state[name])
    if (got.shape, got.dtype) != (np.shape(want), np.dtype(want.dtype)):
      raise ValueError(
        f"The saved state's `{name}` has shape {got.shape} and dtype {got.dtype}; the "
        f"target's has shape {np.shape(want)} and dtype {np.dtype(want.dtype)}. Restore it "
        f"into a target of the saved shape (a stacked state into a stacked target); the "
        f"state's arrays are float32."
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


def from_sums(sums: Any, tag: str | None) -> MetricState:
  """``MetricState(sums, metric=tag)``, without the frozen dataclass's per-field setattr.

  An eager update makes one state a call: this saves about 1 us of it.
  """
  state = object.__new__(MetricState)
  fields = state.__dict__
  fields["sums"] = sums
  fields["metric"] = tag
  if MetricState not in _FLAX_REGISTERED and "flax.serialization" in sys.modules:
    _flax_registration()
  return state


def eager_state(state: Any, tag: str, concrete: Any) -> bool:
  """Whether `state` is a MetricState of `tag` whose `sums` is a concrete array.

  Such a state's shape and dtype are checked by :func:`check_state` where
  its array is used: in the trace of an eager call, once per signature (a
  new signature is traced, so a bad state raises every time).
  """
  return type(state) is MetricState and state.metric == tag and type(state.sums) in concrete


_STATE_NP_DTYPE = np.dtype(STATE_DTYPE)


def check_state(state: Any, tag: str, argname: str = "state", stacked: bool = False) -> MetricState:
  """`state` if it is a MetricState of float32 sums of shape `[4]` (`[K, 4]` if `stacked`)
  made by the metric whose tag is `tag`."""
  if not isinstance(state, MetricState):
    raise TypeError(
      f"`{argname}` must be a bce_jax.MetricState (from metric.init()); got {type(state).__name__}."
    )
  sums = state.sums
  shape = getattr(sums, "shape", None)
  dtype = getattr(sums, "dtype", None)
  if shape is None or dtype != _STATE_NP_DTYPE:
    ok = False
  else:
    ok = len(shape) == 2 and shape[1] == len(SUMS) if stacked else shape == (len(SUMS),)
  if not ok:
    if stacked:
      want = "a float32 array of shape [K, 4] (states stacked on axis 0)"
      hint = " Stack states from init()/update(): vmap, a scan's per-step states, or tree_map(jnp.stack)."
    else:
      want = "a float32 array of shape [4] (total, total_err, count, count_err)"
      hint = (
        " Build states with init()/update(); under vmap, map over such states, and fold a "
        "stacked state with reduce()."
      )
    got = f"shape {shape} and dtype {dtype}" if shape is not None else f"a {type(sums).__name__}"
    raise ValueError(f"`{argname}.sums` must be {want}; got {got}.{hint}")
  check_tag(state.metric, tag, argname)
  return state


def make_tag(cls: type, config: str) -> str:
  """The `metric` tag of the states of metric class `cls` with `config` (``"a=1, b=2"``).

  A class defined in bce_jax is named by its bare name, as it always was, so
  every saved state keeps restoring: ``BinaryCrossentropyMetric(from_logits=False,
  ...)``. Any other class is named by its module and qualified name,
  ``mylib.metrics.BinaryCrossentropyMetric(...)``: a user's class that takes a
  bce_jax class's name measures something else, and its states and bce_jax's
  must never be mixed.
  """
  module = cls.__module__
  if module == "bce_jax" or module.startswith("bce_jax."):
    return f"{cls.__name__}({config})"
  return f"{module}.{cls.__qualname__}({config})"


def bare_tag(tag: str) -> str:
  """`tag` without its module and enclosing names: how bce_jax tagged every class's
  states before it qualified those of classes defined outside it (a bce_jax
  class's tag is its own bare tag)."""
  head, paren, config = tag.partition("(")
  return head.rpartition(".")[2] + paren + config


def restores_into(saved: Any, tag: str | None) -> bool:
  """Whether a checkpoint's `metric` tag, `saved`, restores into a target tagged `tag`.

  Restoring compares the class's name and the configuration, not the module:
  a class's module is where its code lives, and moves (a metric class defined
  in a script is ``__main__.MyMetric`` when the script runs and
  ``train.MyMetric`` where an evaluation imports it; a refactor moves it;
  before bce_jax named the module, every tag was bare). The target, which the
  caller picks, gives the restored state its tag. A metric's methods compare
  the whole tag: they never take a state whose tag names another module.
  """
  if saved == tag:
    return True
  return isinstance(saved, str) and isinstance(tag, str) and bare_tag(saved) == bare_tag(tag)


def check_tag(made_by: str | None, tag: str, argname: str = "state") -> None:
  """A ValueError unless a state's `metric` tag, `made_by`, is `tag` (this metric's)."""
  if made_by == tag:
    return
  if made_by is not None and bare_tag(made_by) == bare_tag(tag):
    raise ValueError(
      f"`{argname}` was made by {made_by}, not by this metric, {tag}: the same class name "
      f"and configuration, with another module (or none: bce_jax's own metric of that "
      f"name, or this class before bce_jax named the module in tags). A metric's methods "
      f"never combine states across modules. Pass a state from this metric's init() and "
      f"update(); restore a checkpoint with flax.serialization.from_bytes or "
      f"from_state_dict into this metric's init(), which re-tags it, and re-tag an "
      f"unpickled state with dataclasses.replace(state, metric=metric.init().metric)."
    )
  who = "no metric (its `metric` is None: built by hand)" if made_by is None else made_by
  raise ValueError(
    f"`{argname}` was made by {who}, not by this metric, {tag}. States of different "
    f"metrics or configurations measure different things and are never combined: pass a "
    f"state from this metric's init() and update() (a metric rebuilt with "
    f"from_config(get_config()), or with another `name`, accepts it)."
  )
