r"""The pairwise sigmoid loss of SigLIP, in tiles and on a ring of devices.

The ``[B, B]`` logits are taken in ``[block, block]`` tiles inside
``lax.scan``, each one matmul, one ``exp`` and one ``log1p``. The custom VJP
has two schedules: ``"fused"`` (default), where the one forward sweep also
accumulates the gradients in x, y, scale and bias (O(B D)) as residuals and
the backward pass scales them (three matmuls a tile); ``"recompute"``, where
the backward sweep recomputes each tile as flash attention does (two sweeps,
four matmuls). An undifferentiated call computes the value alone. On a ring
the y shards go to the next device with ``ppermute``, issued before the
sweep so the transfer can overlap it; the ``dL/dy`` partials follow a step
behind and a last ``ppermute`` takes each home. The VJP is the transpose of
that SPMD program, so ``jax.grad`` of the mapped loss is the global one.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bce_jax import _logsig, _validate
from bce_jax._config import Config

# 512 x 512 tiles (1 MiB of float32 logits): their matmuls run at the BLAS
# rate on CPU; see benchmarks/pairwise.py for the two schedules.
_BLOCK = 512
_MODE = "fused"


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static facts of one call."""

  rows: int  # rows of x and y on this device
  block: int
  devices: int
  axis_name: Hashable | None
  positives: bool  # ids travel with y; else they are global row indices
  mode: str
  dtypes: tuple[np.dtype, np.dtype]  # of x and y, for their cotangents

  @property
  def padded(self) -> int:
    return -(-self.rows // self.block) * self.block


def _tile(xi, yj, idi, idj, col_ok, s, b, *, value: bool, grads: bool) -> dict[str, jax.Array]:
  """One tile: row sums of the losses and of ``g = dloss/dl``; ``g yj``, ``g.T xi``."""
  xi, yj = xi.astype(s.dtype), yj.astype(s.dtype)
  dots = jax.lax.dot_general(xi, yj, (((1,), (1,)), ((), ())))
  logits = s * dots + b
  positive = idi[:, None] == idj[None, :]
  out = {}
  if value:
    sp_pos, sp_neg = _logsig.softplus_pair(logits)  # -log sigmoid(-l), -log sigmoid(l)
    losses = jnp.where(positive, sp_neg, sp_pos)
    out["loss"] = jnp.sum(losses if col_ok is None else jnp.where(col_ok, losses, 0), axis=1)
  if grads:
    sig_pos, sig_neg = _logsig.sigmoid_pair(logits)  # the exp above, shared by XLA
    g = jnp.where(positive, -sig_neg, sig_pos)
    out["g"] = jnp.sum(g if col_ok is None else jnp.where(col_ok, g, 0), axis=1)
    # Padded rows of x and y are zero: they add nothing to these two.
    out["dx"] = jax.lax.dot_general(g, yj, (((1,), (0,)), ((), ())))
    out["dy"] = jax.lax.dot_general(g, xi, (((0,), (0,)), ((), ())))
  return out


def _zeros(like, rows: int, dim: int, dtype, *, value: bool, grads: bool) -> dict[str, jax.Array]:
  """Accumulators, varying over the ``shard_map`` axes any of `like` vary over
  (a loop's carry keeps its type)."""
  axes = tuple(sorted(set().union(*map(_varying_axes, like)), key=str))
  out = {"loss": jnp.zeros(rows, dtype)} if value else {}
  if grads:
    out.update(g=jnp.zeros(rows, dtype), dx=jnp.zeros((rows, dim), dtype))
  return {k: _varying(v, axes) for k, v in out.items()}


def _sweep(x, y, ids_x, ids_y, s, b, plan: _Plan, *, value: bool, grads: bool):
  """All tiles of this device's rows against one shard of columns: the row
  sums of the losses and of g, ``sum_j g_ij y_j`` and ``sum_i g_ij x_i``."""
  bs, n, dim = plan.block, plan.padded // plan.block, x.shape[1]
  cols: tuple[jax.Array, ...] = (y.reshape(n, bs, dim), ids_y.reshape(n, bs))
  if plan.padded != plan.rows:
    cols += ((jnp.arange(plan.padded) < plan.rows).reshape(n, 1, bs),)
  like = (x, y, ids_x, ids_y, s, b)

  def row_block(dy, row):
    xi, idi = row

    def col_block(acc, col):
      ok = col[2] if len(col) > 2 else None
      out = _tile(xi, col[0], idi, col[1], ok, s, b, value=value, grads=grads)
      dy_part = out.pop("dy", None)
      return {k: acc[k] + out[k] for k in acc}, dy_part

    init = _zeros(like, bs, dim, s.dtype, value=value, grads=grads)
    acc, dy_parts = jax.lax.scan(col_block, init, cols)
    return (dy + dy_parts.reshape(dy.shape) if grads else dy), acc

  dy = _zeros(like, plan.padded, dim, s.dtype, value=False, grads=grads).get("dx")
  dy, acc = jax.lax.scan(row_block, dy, (x.reshape(n, bs, dim), ids_x.reshape(n, bs)))
  out = {k: v.reshape(plan.padded, *v.shape[2:]) for k, v in acc.items()}
  return {**out, "dy": dy} if grads else out


def _ring(plan: _Plan, x, y, ids, s, b, *, value: bool, grads: bool) -> dict[str, jax.Array]:
  """This device's loss sum against every y shard and, with `grads`, the
  derivatives of the sum over all devices w.r.t. this device's arguments."""
  pad = ((0, plan.padded - plan.rows),)
  x, y, ids = (jnp.pad(a, pad + ((0, 0),) * (a.ndim - 1)) for a in (x, y, ids))
  n, axis, like = plan.devices, plan.axis_name, (x, y, ids, s, b)
  perm = [(i, (i + 1) % n) for i in range(n)]
  ship = functools.partial(jax.lax.ppermute, axis_name=axis, perm=perm)

  def ids_at(step, travelling):  # without `positives`: global row indices
    if plan.positives:
      return travelling
    return ((jax.lax.axis_index(axis) - step) % n) * plan.rows + jnp.arange(plan.padded)

  def sweep(acc, y_k, ids_k, dy_in):
    out = _sweep(x, y_k, ids, ids_k, s, b, plan, value=value, grads=grads)
    acc = {k: acc[k] + out[k] for k in acc}
    if not grads:
      return acc, None
    dy = s * out["dy"]  # this device's scale, for the rows of the visiting shard
    return acc, dy if dy_in is None else dy_in + dy

  acc = _zeros(like, plan.padded, x.shape[1], s.dtype, value=value, grads=grads)
  if n == 1:
    acc, dy = sweep(acc, y, ids, None)
  else:
    # Each step first sends its shard on (and the partials of the shard
    # before it), then sweeps the shard it holds.
    y_next, ids_next = ship(y), ship(ids) if plan.positives else ids
    acc, dy = sweep(acc, y, ids_at(0, ids), None)

    def middle(step, carry):
      acc, y_k, ids_k, dy = carry
      y_next, ids_next = ship(y_k), ship(ids_k) if plan.positives else ids_k
      acc, dy = sweep(acc, y_k, ids_at(step, ids_k), ship(dy) if grads else None)
      return acc, y_next, ids_next, dy

    acc, y_k, ids_k, dy = jax.lax.fori_loop(1, n - 1, middle, (acc, y_next, ids_next, dy))
    acc, dy = sweep(acc, y_k, ids_at(n - 1, ids_k), ship(dy) if grads else None)
    dy = ship(dy) if grads else None  # home, to the shard's own device
  rows = plan.rows
  out = {"value": jnp.sum(acc["loss"][:rows])} if value else {}
  if grads:
    dx = acc["dx"][:rows]
    out.update(dx=s * dx, dy=dy[:rows], dbias=jnp.sum(acc["g"][:rows]))
    out["dscale"] = jnp.sum(x[:rows].astype(s.dtype) * dx)  # sum_ij g_ij <x_i, y_j>
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _local_sum(plan: _Plan, x, y, ids, scale, bias):
  """``sum_{i on this device, all j} softplus(-z_ij l_ij)``."""
  return _ring(plan, x, y, ids, scale, bias, value=True, grads=False)["value"]


def _local_sum_fwd(plan, *args):
  if plan.mode == "recompute":
    return _local_sum(plan, *args), args
  out = _ring(plan, *args, value=True, grads=True)
  return out.pop("value"), out


def _local_sum_bwd(plan, res, ct):
  if plan.mode == "recompute":
    res = _ring(plan, *res, value=False, grads=True)
  dx, dy = (ct * res["dx"]).astype(plan.dtypes[0]), (ct * res["dy"]).astype(plan.dtypes[1])
  return dx, dy, None, ct * res["dscale"], ct * res["dbias"]


_local_sum.defvjp(_local_sum_fwd, _local_sum_bwd)


def _varying_axes(a: jax.Array) -> frozenset:
  """The ``shard_map`` axes `a` varies over (none outside one, or without check_vma)."""
  aval = jax.typeof(a) if hasattr(jax, "typeof") else None  # older jax: no such types
  kind = getattr(aval, "manual_axis_type", None)
  return kind.varying if kind is not None else getattr(aval, "vma", frozenset())


def _varying(a: jax.Array, axes: tuple) -> jax.Array:
  """`a` marked as varying over `axes`; the mark's transpose sums the
  per-device cotangents of a replicated argument."""
  missing = tuple(n for n in axes if n not in _varying_axes(a))
  return jax.lax.pcast(a, missing, to="varying") if missing else a


def _check_block_size(block_size: Any) -> int | None:
  if block_size is None:
    return None
  if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, numbers.Integral):
    raise TypeError(f"`block_size` must be an int >= 1 or None; got {block_size!r}.")
  if block_size < 1:
    raise ValueError(f"`block_size` must be >= 1 (rows per tile) or None; got {block_size!r}.")
  return int(block_size)


def _check_axis_name(axis_name: Any) -> Hashable | None:
  name = tuple(axis_name) if isinstance(axis_name, list) else axis_name  # list: from JSON
  names = name if isinstance(name, tuple) else (name,)
  if name is not None and not all(isinstance(a, str) for a in names):
    msg = f"a mesh axis name (str), a tuple of them, or None; got {axis_name!r}."
    raise TypeError(f"`axis_name` must be {msg}")
  return name


def _axis_size(axis_name: Hashable | None) -> int:
  if axis_name is None:
    return 1
  try:
    return int(jax.lax.axis_size(axis_name))
  except NameError:
    msg = "call it inside jax.shard_map over a mesh with that axis, or pass axis_name=None."
    raise ValueError(f"`axis_name` {axis_name!r} is not bound here: {msg}") from None


def _check_inputs(
  x, y, scale, bias, positives
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
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
  scalars = (scale, bias)
  for name, a in zip(("scale", "bias"), scalars):
    if a.dtype == jnp.bool_:
      raise TypeError(f"`{name}` must be a real number; got a bool array.")
    if a.ndim != 0:
      msg = f"got shape {a.shape}; pass `{name}.reshape(())` (e.g. for a parameter of shape (1,))."
      raise ValueError(f"`{name}` must be a scalar; {msg}")
  if positives is not None:
    positives = _validate.as_array("positives", positives)
    if not jnp.issubdtype(positives.dtype, jnp.integer):
      msg = f"(a pair is positive where they are equal); got dtype {positives.dtype}."
      raise TypeError(f"`positives` must be an integer array of ids {msg}")
    if positives.shape != (x.shape[0],):
      msg = f"one id per row of x and y; got shape {positives.shape}."
      raise ValueError(f"`positives` must have shape [batch]=({x.shape[0]},), {msg}")
  return x, y, scale, bias, positives


def _choose_block(rows: int, block_size: int | None) -> int:
  """`block_size` (at most `rows`), else `_BLOCK` or a divisor of `rows` near it."""
  if block_size is not None or rows <= _BLOCK:
    return min(block_size or rows, rows)
  for block in range(_BLOCK, _BLOCK // 2 - 1, -8):  # no padding where a multiple of 8 divides
    if rows % block == 0:
      return block
  tiles = -(-rows // _BLOCK)
  return (-(-rows // tiles) + 7) // 8 * 8  # the fewest tiles, padded least


def pairwise_sigmoid_loss(
  x: ArrayLike,
  y: ArrayLike,
  *,
  scale: ArrayLike,
  bias: ArrayLike,
  positives: ArrayLike | None = None,
  block_size: int | None = None,
  axis_name: Hashable | None = None,
) -> jax.Array:
  r"""The pairwise sigmoid loss of SigLIP, without the ``[B, B]`` logits.

  .. math::
    \ell = -\frac{1}{B} \sum_{i=1}^{B} \sum_{j=1}^{B}
    \log \sigma\!\left(z_{ij} (s \langle x_i, y_j \rangle + b)\right)

  with ``z_ij = +1`` for a positive pair (``i == j``, or equal `positives`)
  and -1 otherwise; each ``-log sigmoid`` is one ``exp`` and one ``log1p``,
  accurate in both tails. The logits are computed in tiles inside a loop
  (memory O(B D + block^2)); the gradient is a custom VJP, accumulated in
  the same sweep as the value (``jax.jvp`` is not supported).

  Args:
    x: embeddings of one tower, ``[B, D]``, any float dtype (float16 and
      bfloat16 are computed and accumulated in float32).
    y: embeddings of the other tower, the same shape; row ``i`` of `y` is
      the positive partner of row ``i`` of `x`.
    scale: ``s``, a scalar; it may be traced and trained (SigLIP learns
      ``log s`` from ``log 10``).
    bias: ``b``, a scalar (SigLIP starts it at -10).
    positives: optional integer ids ``[B]``: pairs with equal ids are
      positive (several captions of one image). None: only ``i == j``.
    block_size: rows and columns per tile (need not divide ``B``). None:
      512, or a divisor of ``B`` near it, or ``B`` if smaller.
    axis_name: inside ``jax.shard_map``, the mesh axis the batch is sharded
      over: `x`, `y` (and `positives`) are this device's shards
      ``[B / n, D]``. The y shards travel around the ring; the loss of the
      global batch is returned on every device, and ``jax.grad`` of the
      mapped function is the single-device gradient.

  Returns:
    The loss, a scalar: float32, or float64 for float64 inputs.

  Raises:
    ValueError: if `x` and `y` differ in shape or are not ``[B, D]``, `scale`
      or `bias` is not a scalar, `positives` is not ``[B]``, `block_size` is
      below 1, or `axis_name` is not bound by an enclosing ``shard_map``.
    TypeError: for non-float embeddings, non-integer `positives`, or a
      `block_size` that is not an int.

  References:
    Zhai, Mustafa, Kolesnikov and Beyer, "Sigmoid Loss for Language Image
    Pre-Training", ICCV 2023.

  Examples:
    >>> import jax, jax.numpy as jnp, bce_jax
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> scale, bias = jnp.array(10.0), jnp.array(-5.0)
    >>> print(f"{bce_jax.pairwise_sigmoid_loss(x, x, scale=scale, bias=bias):.4f}")
    0.0134
    >>> loss = lambda x, y, s, b: bce_jax.pairwise_sigmoid_loss(x, y, scale=s, bias=b)
    >>> dx, dy, ds, db = jax.grad(loss, argnums=(0, 1, 2, 3))(x, x, scale, bias)
    >>> print(dx.shape, f"{ds:.4f}", f"{db:.4f}")
    (2, 2) -0.0067 0.0000
  """
  x, y, scale, bias, positives = _check_inputs(x, y, scale, bias, positives)
  block_size, axis_name = _check_block_size(block_size), _check_axis_name(axis_name)
  devices, rows = _axis_size(axis_name), x.shape[0]
  dtype = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
  if rows == 0:
    return jnp.zeros((), dtype)
  block = _choose_block(rows, block_size)
  dtypes = (np.dtype(x.dtype), np.dtype(y.dtype))
  plan = _Plan(rows, block, devices, axis_name, positives is not None, _MODE, dtypes)
  ids = positives
  if ids is None:
    ids = jnp.arange(rows, dtype=jnp.int32)
    if axis_name is not None:
      ids = ids + jax.lax.axis_index(axis_name) * rows
  args: tuple[jax.Array, ...] = (x, y, ids, scale.astype(dtype), bias.astype(dtype))
  # Inside shard_map every argument of the custom VJP varies over the same
  # axes: the ring's and any that another argument varies over.
  ring = () if axis_name is None else axis_name if isinstance(axis_name, tuple) else (axis_name,)
  axes = tuple(sorted(set().union(ring, *map(_varying_axes, args)), key=str))
  args = tuple(_varying(a, axes) for a in args) if axes else args
  total = _local_sum(plan, *args)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return total / (rows * devices)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PairwiseSigmoidLoss(Config):
  """:func:`pairwise_sigmoid_loss` as a frozen, hashable loss object.

  Args:
    block_size: rows and columns per tile; None chooses from the batch.
    axis_name: the ``shard_map`` mesh axis the batch is sharded over (the
      ring), or None on one device.

  ``loss(x, y, scale, bias, positives=None)`` is :func:`pairwise_sigmoid_loss`;
  ``get_config()`` and ``from_config()`` round-trip the configuration (JSON).

  References:
    Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023.

  Examples:
    >>> import jax.numpy as jnp, bce_jax
    >>> loss = bce_jax.PairwiseSigmoidLoss(block_size=256)
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> print(f"{loss(x, x, jnp.array(10.0), jnp.array(-5.0)):.4f}")
    0.0134
    >>> loss.get_config()
    {'block_size': 256, 'axis_name': None}
  """

  block_size: int | None = None
  axis_name: Hashable | None = None

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "block_size", _check_block_size(self.block_size))
    object.__setattr__(self, "axis_name", _check_axis_name(self.axis_name))

  def __call__(self, x: ArrayLike, y: ArrayLike, scale, bias, positives=None) -> jax.Array:
    """The loss of a batch of pairs; see :func:`pairwise_sigmoid_loss`."""
    return pairwise_sigmoid_loss(
      x,
      y,
      scale=scale,
      bias=bias,
      positives=positives,
      block_size=self.block_size,
      axis_name=self.axis_name,
    )
