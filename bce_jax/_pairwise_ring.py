r"""The pairwise sigmoid loss's SPMD program: tiles of the ``[B, B]`` logits,
and the ring of devices.

:func:`run` returns this device's loss sum and, with ``grads``, the
derivatives of the sum over all devices; :mod:`bce_jax._pairwise` wraps it
in the custom VJP and the public function. The ``[B, B]`` logits are taken
in ``[block, block]`` tiles inside ``lax.scan`` (:func:`_sweep`, or the
Pallas kernels on CUDA, chosen in :mod:`bce_jax._tiles.backend`). On a ring
each y shard goes to the next device with ``ppermute``, issued before the
sweep so the transfer can overlap it; the ``dL/dy`` partials follow a step
behind and a last ``ppermute`` takes each home.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np

from bce_jax import _shard
from bce_jax._tiles import backend as _backend
from bce_jax._tiles import tile


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static facts of one call."""

  rows: int  # rows of x and y on this device
  block: int
  devices: int
  axis_name: Hashable | None
  mode: str
  dtypes: tuple[np.dtype, np.dtype]  # of x and y, for their cotangents
  precision: str | None = None  # of the tiles' dots, by name
  kernel: bool | str = False  # each sweep runs the Pallas kernels ("mosaic": Mosaic GPU's)
  # The derivatives come out divided by the count and in the embeddings'
  # (16-bit) dtypes: residuals of half the bytes, rounded once (see _ring).
  narrow: bool = False

  @property
  def padded(self) -> int:
    return -(-self.rows // self.block) * self.block


def _tile(xi, yj, row, col, s, b, precision, *, value: bool, grads: bool) -> dict[str, jax.Array]:
  """One tile: row sums of the losses and of ``g = dloss/dl``; ``g yj``, ``g.T xi``.

  `row` and `col` describe the tile's rows and columns: ``"start"``, the
  global index of the first (for the diagonal rule), or ``"ids"``
  ``[block, K]`` (positive where all K parts are equal); and, where some are
  excluded (the mask, or padding to a whole block), ``"ok"`` ``[block]``,
  False for those. An excluded row of x or y is zero, so the matmuls need
  no mask; the sums over the tile do.
  """
  xi, yj = xi.astype(s.dtype), yj.astype(s.dtype)
  dots = functools.partial(jax.lax.dot_general, precision=precision)
  logits = s * dots(xi, yj, (((1,), (1,)), ((), ()))) + b
  shape = logits.shape
  if "ids" in row:
    pos = tile.positive("ids", shape, row_ids=row["ids"][:, 0], col_ids=col["ids"][:, 0])
    for k in range(1, row["ids"].shape[1]):
      pos = pos & tile.positive("ids", shape, row_ids=row["ids"][:, k], col_ids=col["ids"][:, k])
  else:
    pos = tile.positive("diagonal", shape, row_start=row["start"], col_start=col["start"])
  ok = None  # the pairs that count; columns are marked wherever rows are
  if "ok" in col:
    ok = col["ok"][None, :] if "ok" not in row else row["ok"][:, None] & col["ok"][None, :]
  keep = (lambda a: a) if ok is None else (lambda a: jnp.where(ok, a, 0))
  out = {}
  if value:
    out["loss"] = jnp.sum(keep(tile.losses(logits, pos)), axis=1)
  if grads:
    g = keep(tile.dlogits(logits, pos))  # the exp of the losses, shared by XLA
    out["g"] = jnp.sum(g, axis=1)
    out["dx"] = dots(g, yj, (((1,), (0,)), ((), ())))
    out["dy"] = dots(g, xi, (((0,), (0,)), ((), ())))
  return out


def _zeros(like, rows: int, dim: int, dtype, *, value: bool, grads: bool) -> dict[str, jax.Array]:
  """Accumulators, varying over the ``shard_map`` axes any of `like` vary over
  (a loop's carry keeps its type)."""
  axes = tuple(sorted(set().union(*map(_shard.varying_axes, jax.tree.leaves(like))), key=str))
  out = {"loss": jnp.zeros(rows, dtype)} if value else {}
  if grads:
    out.update(g=jnp.zeros(rows, dtype), dx=jnp.zeros((rows, dim), dtype))
  return {k: _shard.varying(v, axes) for k, v in out.items()}


def _blocks(side: dict[str, jax.Array], plan: Plan) -> dict[str, jax.Array]:
  """`side`'s arrays in blocks ``[n, block, ...]``; its ``"start"`` one per block."""
  n, bs = plan.padded // plan.block, plan.block
  out = {k: v.reshape(n, bs, *v.shape[1:]) for k, v in side.items() if k != "start"}
  if "start" in side:
    out["start"] = side["start"] + bs * jnp.arange(n, dtype=jnp.int32)
  return out


def _sweep(row, col, s, b, plan: Plan, *, value: bool, grads: bool, factor=None, dtypes=None):
  """All tiles of this device's rows against one shard of columns: the row
  sums of the losses and of g, ``sum_j g_ij y_j`` and ``sum_i g_ij x_i``.
  The kernels take `factor` and `dtypes` (see :func:`.backend.kernel_sweep`);
  the XLA tiles ignore them."""
  precision = _backend.lax_precision(plan.precision)
  if plan.kernel:
    return _backend.kernel_sweep(
      row,
      col,
      s,
      b,
      value=value,
      grads=grads,
      precision=precision,
      kernel=plan.kernel,
      factor=factor,
      dtypes=dtypes,
    )
  dim, like = row["x"].shape[1], (row, col, s, b)

  def row_block(dy, row):
    def col_block(acc, col):
      out = _tile(row["x"], col["y"], row, col, s, b, precision, value=value, grads=grads)
      dy_part = out.pop("dy", None)
      return {k: acc[k] + out[k] for k in acc}, dy_part

    init = _zeros(like, plan.block, dim, s.dtype, value=value, grads=grads)
    acc, dy_parts = jax.lax.scan(col_block, init, _blocks(col, plan))
    return (dy + dy_parts.reshape(dy.shape) if grads else dy), acc

  dy = _zeros(like, plan.padded, dim, s.dtype, value=False, grads=grads).get("dx")
  dy, acc = jax.lax.scan(row_block, dy, _blocks(row, plan))
  out = {k: v.reshape(plan.padded, *v.shape[2:]) for k, v in acc.items()}
  return {**out, "dy": dy} if grads else out


def _ring(
  plan: Plan, x, y, ids, mask, s, b, count, *, value: bool, grads: bool
) -> dict[str, jax.Array]:
  """This device's loss sum against every y shard and, with `grads`, the
  derivatives of the sum over all devices w.r.t. this device's arguments.

  Rows padded to a whole block, and rows the mask excludes, are zero in x
  and y and False in ``"ok"``, the validity of a tile's rows and columns.

  With ``plan.narrow`` the derivatives are those of ``sum / count`` and
  ``dx``, ``dy`` come in ``plan.dtypes`` (16-bit): the kernels scale their
  float32 sums by ``s / count`` and write the 16-bit dtype themselves on
  one device (no float32 ``[B, D]`` buffer); on a ring they write float32
  partials, added across steps and rounded after the last. The XLA tiles
  scale and cast at the end, so that both ``platform_dependent`` branches
  return the same types. Otherwise the derivatives are float32, of the sum.
  """
  n, axis, extra = plan.devices, plan.axis_name, plan.padded - plan.rows
  pad = lambda a: jnp.pad(a, ((0, extra),) + ((0, 0),) * (a.ndim - 1)) if extra else a
  x, y = pad(x), pad(y)
  row, col = {}, {}
  if ids is not None:
    row["ids"] = col["ids"] = pad(ids)
  if mask is not None:  # excluded rows may hold nan: zero them, and mark them
    ok = pad(mask)  # padding is False too
    x, y = jnp.where(ok[:, None], x, 0), jnp.where(ok[:, None], y, 0)
    row["ok"] = col["ok"] = ok
  elif extra:  # padded rows of x are zero and sliced off; columns need the mark
    col["ok"] = jnp.arange(plan.padded) < plan.rows
  row["x"], col["y"] = x, y
  me = 0 if n == 1 else jax.lax.axis_index(axis)
  if ids is None:  # global indices: device i holds rows i * padded + [0, rows)
    row["start"] = me * plan.padded
  moving = ("y", "ids", "ok") if mask is not None else ("y", "ids")
  ship = functools.partial(
    jax.lax.ppermute, axis_name=axis, perm=[(i, (i + 1) % n) for i in range(n)]
  )
  narrow = plan.narrow and grads
  unit = 1 / count  # used where narrow
  scaled = narrow and bool(plan.kernel)  # the kernels apply s / count themselves
  factor = s * unit if scaled else None
  # The kernels write 16-bit derivatives where a sweep gives them whole.
  written = plan.dtypes if n == 1 else (s.dtype, s.dtype)

  def shipped(col):
    return {k: ship(v) if k in moving else v for k, v in col.items()}

  def sweep(acc, col, step, dy_in):
    if ids is None:
      col = {**col, "start": ((me - step) % n) * plan.padded}
    out = _sweep(row, col, s, b, plan, value=value, grads=grads, factor=factor, dtypes=written)
    dy = out.pop("dy", None)
    if acc is None:  # the first step; on a ring the sums across steps stay float32
      wide = (lambda v: v) if n == 1 else lambda v: v.astype(jnp.promote_types(v.dtype, s.dtype))
      acc = {k: wide(v) for k, v in out.items()}
    else:
      acc = {k: acc[k] + out[k] for k in acc}
    if not grads:
      return acc, None
    if not scaled:
      dy = s * dy  # this device's scale, for the rows of the visiting shard
    return acc, dy if dy_in is None else dy_in + dy

  def finish_dy(dy):  # the visiting shard's dL/dy, complete
    if narrow:
      return (dy if scaled else unit * dy).astype(plan.dtypes[1])
    return dy

  if n == 1:
    acc, dy = sweep(None, col, 0, None)
    dy = finish_dy(dy) if grads else None
  else:
    # Each step first sends its shard on (and the partials of the shard
    # before it), then sweeps the shard it holds.
    col_next = shipped(col)
    acc, dy = sweep(None, col, 0, None)

    def middle(step, carry):
      acc, col, dy = carry
      col_next = shipped(col)
      acc, dy = sweep(acc, col, step, ship(dy) if grads else None)
      return acc, col_next, dy

    acc, col, dy = jax.lax.fori_loop(1, n - 1, middle, (acc, col_next, dy))
    acc, dy = sweep(acc, col, n - 1, ship(dy) if grads else None)
    dy = ship(finish_dy(dy)) if grads else None  # home, to the shard's own device
  rows = plan.rows
  out = {"value": jnp.sum(acc["loss"][:rows])} if value else {}
  if not grads:
    return out
  dx, dbias = acc["dx"][:rows], jnp.sum(acc["g"][:rows])
  if scaled:  # s dx / count already; sum_ij g_ij <x_i, y_j> from the kernels' float32 sums
    out.update(dx=dx.astype(plan.dtypes[0]), dscale=unit * jnp.sum(acc["gdot"][:rows]))
  else:
    dscale = jnp.sum(x[:rows].astype(s.dtype) * dx)  # sum_ij g_ij <x_i, y_j>
    out.update(dx=s * dx, dscale=dscale)
  if narrow and not scaled:
    out.update(dx=(unit * out["dx"]).astype(plan.dtypes[0]), dscale=unit * out["dscale"])
  out.update(dy=typing.cast(jax.Array, dy)[:rows], dbias=unit * dbias if narrow else dbias)
  return out


def run(plans: tuple[Plan, Plan | None], *args, value: bool, grads: bool):
  """:func:`_ring` with the plan for the platform this is lowered for:
  ``plans[1]`` on CUDA where given, else ``plans[0]``."""
  ring = functools.partial(_ring, value=value, grads=grads)
  return _backend.by_platform(ring, *plans, *args)
