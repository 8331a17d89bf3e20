"""Argument checks of the pairwise sigmoid loss, in Python at every call.

Shapes, dtypes and configuration only (they hold while tracing); the values
of `x`, `y`, `scale` and `bias` are checked under :func:`bce_jax.checked`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bce_jax import _validate


class Args(NamedTuple):
  """One call's arrays, checked."""

  x: jax.Array
  y: jax.Array
  scale: jax.Array
  bias: jax.Array
  ids: jax.Array | None  # [B, K] integer: a pair is positive where all K parts are equal
  mask: jax.Array | None  # [B] bool: False for a row that is neither anchor nor negative


def _halves(host: np.ndarray) -> np.ndarray | None:
  """``[B, 2]`` int32 halves of 64-bit ids that JAX would narrow to 32 bits
  (64-bit types off) and that do not fit; None if they fit, or stay 64-bit."""
  if host.dtype.kind not in "iu" or host.dtype.itemsize != 8 or host.ndim != 1 or not host.size:
    return None
  if jax.dtypes.canonicalize_dtype(host.dtype).itemsize == 8:
    return None
  fits = np.iinfo(np.int32)
  if fits.min <= host.min() and host.max() <= fits.max:
    return None
  bits = host.view(np.int64)
  low = (bits & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
  return np.stack([(bits >> 32).astype(np.int32), low], axis=1)


def _ids(positives: Any, batch: int) -> jax.Array:
  """`positives` as ``[B, K]`` integer ids: K = 2 for the halves of 64-bit ids."""
  halves = None
  if not isinstance(positives, (jax.Array, str, bytes)):
    try:  # a list of Python ints past int32 would overflow in jnp.asarray
      positives = np.asarray(positives)
    except (TypeError, ValueError, OverflowError):
      pass  # as_array below names the problem
    else:
      halves = _halves(positives)
  ids = _validate.as_array("positives", positives if halves is None else halves[:, 1])
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    msg = f"(a pair is positive where they are equal); got dtype {ids.dtype}."
    raise TypeError(f"`positives` must be an integer array of ids {msg}")
  if ids.shape != (batch,):
    msg = f"one id per row of x and y; got shape {ids.shape}."
    raise ValueError(f"`positives` must have shape [batch]=({batch},), {msg}")
  return ids[:, None] if halves is None else jnp.asarray(halves)


def _mask(mask: Any, batch: int) -> jax.Array:
  mask = _validate.as_array("mask", mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
      f"`mask` must be a boolean array (True for the rows that count); got dtype "
      f"{mask.dtype}. Pass `mask.astype(bool)`."
    )
  if mask.shape != (batch,):
    raise ValueError(
      f"`mask` must have shape [batch]=({batch},), one bool per row of x and y (False for "
      f"a padding row); got shape {mask.shape}."
    )
  return mask


def check_inputs(x, y, scale, bias, positives, mask) -> Args:
  x, y = _validate.as_array("x", x), _validate.as_array("y", y)
  for name, a in (("x", x), ("y", y)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"`{name}` must hold floating-point embeddings; got dtype {a.dtype}.")
    if a.ndim != 2:
      raise ValueError(f"`{name}` must have shape [batch, dim]; got shape {a.shape}.")
  if x.shape != y.shape:
    msg = f"(row i of each is a positive pair); got x {x.shape} and y {y.shape}."
    raise ValueError(f"`x` and `y` must have the same shape [batch, dim] {msg}")
  scale, bias = _validate.as_array("scale", scale), _validate.as_array("bias", bias)
  for name, a in (("scale", scale), ("bias", bias)):
    if a.dtype == jnp.bool_:
      raise TypeError(f"`{name}` must be a real number; got a bool array.")
    if a.ndim != 0:
      msg = f"got shape {a.shape}; pass `{name}.reshape(())` (e.g. for a parameter of shape (1,))."
      raise ValueError(f"`{name}` must be a scalar; {msg}")
  ids = None if positives is None else _ids(positives, x.shape[0])
  mask = None if mask is None else _mask(mask, x.shape[0])
  return Args(x, y, scale, bias, ids, mask)
