"""Which ``shard_map`` mesh axes an array varies over, and marking it so.

Inside ``jax.shard_map`` with ``check_vma`` every value carries the manual
axes it varies over; a loop's carry, a custom VJP's arguments and a Pallas
kernel's outputs must agree on them. Outside one, or without ``check_vma``,
there are none.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax


def varying_axes(a: jax.Array) -> frozenset:
  """The ``shard_map`` axes `a` varies over (none outside one, or without check_vma)."""
  aval = jax.typeof(a) if hasattr(jax, "typeof") else None  # older jax: no such types
  kind = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; `vma` before
  return kind.varying if kind is not None else getattr(aval, "vma", frozenset())


def varying(a: jax.Array, axes: Iterable) -> jax.Array:
  """`a` marked as varying over `axes`; the mark's transpose sums the
  per-device cotangents of a replicated argument."""
  missing = tuple(n for n in axes if n not in varying_axes(a))
  return jax.lax.pcast(a, missing, to="varying") if missing else a
