"""The two Pallas-Triton kernels of the tile sweep, without their wrapper.

``rows_kernel`` runs one program per ``[block_rows]`` block of ``a`` and
chunk of column blocks (a grid of row blocks x ``col_chunks``) and walks
over the chunk's column blocks: per-row sums of the losses, of ``g`` and of
``g <a_i, b_j>`` (for ``dL/dscale``), and ``g b`` for its rows (times
``scale[2]`` where ``da_scaled``), one partial sum a chunk (the wrapper adds
them); with one chunk each row is written once, in ``da_dtype``. Chunks give a small batch against a
huge label set enough programs to fill the GPU.
``cols_kernel`` runs one program per ``[block_cols]`` block of ``b`` and
walks over every row block, recomputing the logits: per-column sums of
``g`` (``dL/dbias``) and ``g^T a`` (times ``scale[1]`` where
``db_scaled``, in ``db_dtype``). The wrapper applies the scale
(``dL/da = s g b``). Each program owns the rows it
writes, so no atomics and no tile reaches HBM; the price is the logits'
matmul twice (four matmuls a tile pair instead of three), as in
FlashAttention-2's backward pass.
``tail`` is the same arithmetic as one XLA tile, for the last columns of
an unpadded ``b`` that make no whole block.

Refs, in order (``*`` marks the block a program owns; the others are whole
arrays indexed with ``pl.ds``):
``scale [3]`` (``s`` and the factors of ``g^T a`` and ``g b``), ``a [Bp, Dp]``, ``b [Cp, Dp]``, ``bias [Cp]``,
``row_ok [Bp]``, ``col_ok [Cp]`` (int32, 0 excludes), then
``row_ids [P, Bp]``, ``col_ids [P, Cp]`` for the ``"ids"`` rule (``P``
parts, e.g. the two halves of 64-bit ids; a pair is positive where all
agree) or
``lists [Bp, K]`` for ``"lists"``; then the outputs. ``a``, ``row_ok``,
``row_ids`` and ``lists`` are blocks in the row kernel; ``b``, ``bias``,
``col_ok`` and ``col_ids`` in the column kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bce_jax._tiles import tile


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static facts a kernel body needs."""

  rule: str
  rows: int  # padded rows of a
  cols: int  # padded rows of b
  block_rows: int
  block_cols: int
  value: bool  # the row kernel computes the loss
  grads: bool  # the row kernel computes dL/da and the g <a, b> sums
  precision: Any  # of the logits' and the gradients' dots
  mma_dtype: Any  # g is cast to it for the gradients' dots
  col_chunks: int = 1  # the row kernel's second grid axis
  db_scaled: bool = False  # g^T a is multiplied by scale[1] before it is written
  db_dtype: Any = jnp.float32  # the dtype g^T a is written in
  da_scaled: bool = False  # g b is multiplied by scale[2] before it is written
  da_dtype: Any = jnp.float32  # the dtype g b is written in (float32 for partial sums)


def _unpack(spec: Spec, refs):
  """(scale, a, b, bias, row_ok, col_ok, row_ids, col_ids, lists), outputs."""
  fixed, rest = refs[:6], refs[6:]
  if spec.rule == "ids":
    extra, outs = (rest[0], rest[1], None), rest[2:]
  elif spec.rule == "lists":
    extra, outs = (None, None, rest[0]), rest[1:]
  else:
    extra, outs = (None, None, None), rest
  return (*fixed, *extra), outs


class _Lists:
  """Rows ``start : start + size`` of a ``[rows, K]`` lists ref, indexed as
  :func:`.tile.positive` indexes an array (``lists[:, k : k + 1]``): one
  load of ``[size, 1]`` a column, as Triton's lowering takes one indexer."""

  def __init__(self, ref, start, size: int):
    self.ref, self.start, self.shape = ref, start, (size, ref.shape[1])

  def __getitem__(self, index):
    rows, cols = index
    if rows != slice(None) or cols.step not in (None, 1):
      raise NotImplementedError(f"only lists[:, k:k+1] is supported; got {index!r}")
    return self.ref[pl.ds(self.start, self.shape[0]), pl.ds(cols.start, cols.stop - cols.start)]


def _tile(spec: Spec, s, a, b, bias, row_ok, col_ok, row_start, col_start, ids, lists):
  """One tile: the dots, the logits, which pairs are positive, which count."""
  dots = jax.lax.dot_general(
    a,
    b,
    (((1,), (1,)), ((), ())),
    precision=spec.precision,
    preferred_element_type=jnp.float32,
  )
  logits = s * dots + bias[None, :]
  row_ids, col_ids = ids
  shape = (a.shape[0], b.shape[0])
  if spec.rule == "ids":  # every part of the ids equal
    pos = tile.positive("ids", shape, row_ids=row_ids[0], col_ids=col_ids[0])
    for row_part, col_part in zip(row_ids[1:], col_ids[1:]):
      pos = pos & tile.positive("ids", shape, row_ids=row_part, col_ids=col_part)
  else:
    pos = tile.positive(spec.rule, shape, row_start=row_start, col_start=col_start, lists=lists)
  ok = (row_ok[:, None] != 0) & (col_ok[None, :] != 0)
  return dots, logits, pos, ok


def _parts(ref, index) -> tuple[jax.Array, ...] | None:
  """The ``[size]`` ids of each part at `index`, from a ``[P, N]`` ref."""
  if ref is None:
    return None
  return tuple(ref[k, index] for k in range(ref.shape[0]))


def _dot(x, y, contract: tuple[int, int], precision):
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(x, y, dims, precision=precision, preferred_element_type=jnp.float32)


def rows_kernel(*refs, spec: Spec) -> None:
  """Loss sums, ``g <a, b>`` sums and ``dL/da`` for one block of rows and
  one chunk of column blocks."""
  (scale_ref, a_ref, b_ref, bias_ref, row_ok_ref, col_ok_ref, rid_ref, cid_ref, lists_ref), outs = (
    _unpack(spec, refs)
  )
  bm, bn = spec.block_rows, spec.block_cols
  row_start = pl.program_id(0) * bm
  n_blocks = spec.cols // bn
  per_chunk = -(-n_blocks // spec.col_chunks)
  first = pl.program_id(1) * per_chunk
  ragged = per_chunk * spec.col_chunks != n_blocks  # the last chunk has fewer blocks
  s = scale_ref[0]
  a = a_ref[...]
  row_ok = row_ok_ref[...]
  row_ids = _parts(rid_ref, slice(None))

  def step(t, carry):
    j = first + t
    if ragged:  # past the last block: load the last one again, count nothing
      live = j < n_blocks
      j = jnp.minimum(j, n_blocks - 1)
    col_start = j * bn
    cols = pl.ds(col_start, bn)
    b = b_ref[cols, :]
    col_ids = _parts(cid_ref, cols)
    dots, logits, pos, ok = _tile(
      spec,
      s,
      a,
      b,
      bias_ref[cols],
      row_ok,
      col_ok_ref[cols],
      row_start,
      col_start,
      (row_ids, col_ids),
      None if lists_ref is None else _Lists(lists_ref, 0, bm),
    )
    if ragged:
      ok = ok & live
    loss, grow, gdot, gb = carry
    if spec.value:
      loss = loss + jnp.sum(jnp.where(ok, tile.losses(logits, pos), 0.0), axis=1)
    if spec.grads:
      g = jnp.where(ok, tile.dlogits(logits, pos), 0.0)
      grow = grow + jnp.sum(g, axis=1)
      gdot = gdot + jnp.sum(g * dots, axis=1)
      gb = gb + _dot(g.astype(spec.mma_dtype), b.astype(spec.mma_dtype), (1, 0), spec.precision)
    return loss, grow, gdot, gb

  zeros_rows = jnp.zeros((bm,), jnp.float32)
  init = (zeros_rows, zeros_rows, zeros_rows, jnp.zeros(a.shape, jnp.float32))
  loss, grow, gdot, gb = jax.lax.fori_loop(0, per_chunk, step, init)
  if spec.value:
    outs[0][...] = loss
    outs = outs[1:]
  if spec.grads:
    outs[0][...] = grow
    outs[1][...] = gdot
    if spec.da_scaled:
      gb = gb * scale_ref[2]
    outs[2][...] = gb.astype(spec.da_dtype)


def cols_kernel(*refs, spec: Spec) -> None:
  """Sums of ``g`` and ``dL/db`` for one block of columns, recomputing the
  logits of every row block."""
  (scale_ref, a_ref, b_ref, bias_ref, row_ok_ref, col_ok_ref, rid_ref, cid_ref, lists_ref), outs = (
    _unpack(spec, refs)
  )
  bm, bn = spec.block_rows, spec.block_cols
  col_start = pl.program_id(0) * bn
  s = scale_ref[0]
  b = b_ref[...]
  bias, col_ok = bias_ref[...], col_ok_ref[...]
  col_ids = _parts(cid_ref, slice(None))

  def step(i, carry):
    row_start = i * bm
    rows = pl.ds(row_start, bm)
    a = a_ref[rows, :]
    row_ids = _parts(rid_ref, rows)
    lists = _Lists(lists_ref, row_start, bm) if lists_ref is not None else None
    _, logits, pos, ok = _tile(
      spec,
      s,
      a,
      b,
      bias,
      row_ok_ref[rows],
      col_ok,
      row_start,
      col_start,
      (row_ids, col_ids),
      lists,
    )
    gsum, db = carry
    g = jnp.where(ok, tile.dlogits(logits, pos), 0.0)
    gsum = gsum + jnp.sum(g, axis=0)
    db = db + _dot(g.astype(spec.mma_dtype), a.astype(spec.mma_dtype), (0, 0), spec.precision)
    return gsum, db

  init = (jnp.zeros((bn,), jnp.float32), jnp.zeros(b.shape, jnp.float32))
  gsum, db = jax.lax.fori_loop(0, spec.rows // bm, step, init)
  outs[0][...] = gsum
  if spec.db_scaled:
    db = db * scale_ref[1]
  outs[1][...] = db.astype(spec.db_dtype)


def tail(spec: Spec, args: list[jax.Array], start: int, cols: int) -> dict[str, Any]:
  """Columns ``start : cols`` of the kernels' arguments (fewer than a block)
  as one XLA tile, with the kernels' arithmetic: the row sums to add to the
  row kernel's and, with grads, the rows of ``g_cols`` and ``gt_a``."""
  scales, a, b, bias, row_ok = args[:5]
  b_t = b[start:cols]

  def dot(x, y, contract):
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(
      x, y, dims, precision=spec.precision, preferred_element_type=jnp.float32
    )

  dots = dot(a, b_t, (1, 1))
  logits = scales[0] * dots + bias[start:cols][None, :]
  shape = dots.shape
  if spec.rule == "ids":  # [P, N] ids: every part equal
    pos = jnp.ones(shape, jnp.bool_)
    for row_part, col_part in zip(args[6], args[7][:, start:cols]):
      pos = pos & tile.positive("ids", shape, row_ids=row_part, col_ids=col_part)
  else:
    lists = args[6] if spec.rule == "lists" else None
    pos = tile.positive(spec.rule, shape, col_start=start, lists=lists)
  ok = jnp.broadcast_to(row_ok[:, None] != 0, shape)
  out: dict[str, Any] = {"loss": jnp.sum(jnp.where(ok, tile.losses(logits, pos), 0.0), axis=1)}
  if spec.grads:
    g = jnp.where(ok, tile.dlogits(logits, pos), 0.0)
    mma = spec.mma_dtype
    gt_a = dot(g.astype(mma), a.astype(mma), (0, 0))
    if spec.db_scaled:
      gt_a = gt_a * scales[1]
    g_b = dot(g.astype(mma), b_t.astype(mma), (1, 0))
    out.update(
      g_rows=jnp.sum(g, axis=1),
      gdot_rows=jnp.sum(g * dots, axis=1),
      g_b=g_b * scales[2] if spec.da_scaled else g_b,
      g_cols=jnp.sum(g, axis=0),
      gt_a=gt_a.astype(spec.db_dtype),
    )
  return out
