"""Configuration checks shared by the tile-swept losses (pairwise, linear, top-k).

In Python, at every call and in the loss objects' ``__post_init__``: tile
sizes, the ``shard_map`` axis a loss is sharded over, matmul precision and
the implementation (:func:`check_options` checks all four at once).
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable
from typing import Any

import jax
import numpy as np

from bce_jax._tiles import backend

OPTIONS = ("block_size", "axis_name", "precision", "implementation")


def check_block_size(block_size: Any, unit: str) -> int | None:
  """`block_size` as an int >= 1, or None; `unit` says what a tile counts (rows, labels)."""
  if block_size is None:
    return None
  if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, numbers.Integral):
    raise TypeError(
      f"`block_size` must be an int >= 1 ({unit} per tile) or None; got {block_size!r}."
    )
  if block_size < 1:
    raise ValueError(f"`block_size` must be >= 1 ({unit} per tile) or None; got {block_size!r}.")
  return int(block_size)


def check_axis_name(axis_name: Any) -> Hashable | None:
  """A mesh axis name, a tuple of them (a JSON list becomes one), or None."""
  name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
  names = name if isinstance(name, tuple) else (name,)
  if name is not None and not all(isinstance(a, str) for a in names):
    msg = f"a mesh axis name (str), a tuple of them, or None; got {axis_name!r}."
    raise TypeError(f"`axis_name` must be {msg}")
  return name


def axis_size(axis_name: Hashable | None, sharded: str) -> int:
  """The number of devices `axis_name` spans; a ValueError unless an enclosing
  ``shard_map`` binds it (`sharded` names what is split over it, for the message)."""
  if axis_name is None:
    return 1
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  try:
    size = int(jax.lax.axis_size(axis_name))
  except NameError:
    msg = "call it inside jax.shard_map over a mesh with that axis, or pass axis_name=None."
    raise ValueError(f"`axis_name` {axis_name!r} is not bound here: {msg}") from None
  manual = set(jax.sharding.get_abstract_mesh().manual_axes)
  others = [a for a in names if a not in manual]
  if others:  # bound by vmap: no devices to send shards to
    raise ValueError(
      f"`axis_name` {axis_name!r} must name mesh axes of an enclosing jax.shard_map, over "
      f"which the {sharded} is sharded; {others[0]!r} is bound by another transformation "
      f"(jax.vmap?). For a vmapped batch of losses pass axis_name=None."
    )
  return size


def check_precision(precision: Any) -> str | None:
  """`precision` by its name (``"default"``, ``"high"``, ``"highest"``), or None."""
  if precision is None:
    return None
  try:
    return jax.lax.Precision(precision).name.lower()
  except (ValueError, TypeError, KeyError):
    raise ValueError(
      f"`precision` must be None, a jax.lax.Precision or one of its names ('default', 'high', "
      f"'highest', as jnp.dot takes); got {precision!r}."
    ) from None


def check_options(
  block_size: Any,
  axis_name: Any,
  precision: Any,
  implementation: Any,
  unit: str,
  implementations: tuple[Any, ...] = backend.IMPLEMENTATIONS,
) -> tuple[int | None, Hashable | None, str | None, Any]:
  """The :data:`OPTIONS` of a tile-swept loss, checked and normalized, in that
  order; `unit` says what a tile counts (rows, labels), `implementations`
  which implementations the loss has."""
  return (
    check_block_size(block_size, unit),
    check_axis_name(axis_name),
    check_precision(precision),
    backend.check_implementation(implementation, implementations),
  )


def check_config_options(
  config: Any, unit: str, implementations: tuple[Any, ...] = backend.IMPLEMENTATIONS
) -> None:
  """Checks and normalizes the :data:`OPTIONS` fields of a frozen loss object, in place
  (for its ``__post_init__``)."""
  values = check_options(
    config.block_size,
    config.axis_name,
    config.precision,
    config.implementation,
    unit,
    implementations,
  )
  for name, value in zip(OPTIONS, values):
    object.__setattr__(config, name, value)
