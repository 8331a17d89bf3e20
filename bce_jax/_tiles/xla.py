"""The portable XLA sweep over ``[B, D] x [C, D]`` tiles.

Rows ``a`` (``[B, D]``) are scored against columns ``b`` (``[C, D]``) in
tiles of `block` columns: one ``[B, block]`` matmul a tile, never the
``[B, C]`` logits. The logit of row ``i`` and column ``j`` is
``z_ij = scale * <a_i, b_j> + bias_j`` (`scale` optional, `bias` a ``[C]``
vector, a scalar or None), its label comes from a positives rule of
:mod:`.tile`, and one sweep returns the row sums of the element losses and,
with ``grads=True``, the derivatives of ``sum_i row_weight_i * loss_i``:

* ``da`` (``[B, D]``), accumulated over the tiles;
* ``db`` (``[C, D]``, in `b`'s dtype): ``db[tile] = g.T a`` written tile by
  tile into one C-sized buffer, so nothing but that buffer and one tile of
  logits is held;
* ``dbias`` (``[C]`` for a vector bias, a scalar otherwise) and ``dscale``.

Tiles are taken with ``dynamic_slice`` inside a ``fori_loop``; a last tile
of ``C % block`` columns runs after the loop, so `b` is never padded or
copied. Matmuls take the operands in their common dtype (bfloat16 stays
bfloat16 on the matrix units) and accumulate in float32 (float64 for
float64 operands); `precision` goes to every dot.

Shards of the columns: `col_offset` is the global index of ``b[0]``, so the
``"lists"`` and ``"diagonal"`` rules see global ids. Inside ``shard_map``
the loop carries are typed as varying over the axes the inputs vary over.

A GPU kernel can take this function's place: same arguments, same outputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bce_jax._tiles import tile

# Default tile widths, as a budget of tile elements (rows x columns) per
# platform: the tile is ``budget // rows`` columns, a power of two clamped to
# [_MIN_BLOCK, _MAX_BLOCK]. CPU: 2^21 float32 logits (8 MiB, cache-sized work
# for the three matmuls; benchmarks/linear.py). GPU: 2^25, the 32768-label
# tiles that were fastest on an H200 at B = 1024 (plain XLA, 3.1M labels).
TILE_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25, "rocm": 1 << 25, "default": 1 << 23}
_MIN_BLOCK, _MAX_BLOCK = 128, 1 << 17
_PLATFORMS = ("cpu", "cuda", "rocm")


def default_block(platform: str, rows: int) -> int:
  """The default tile width (columns) for `rows` rows on `platform`."""
  budget = TILE_ELEMENTS.get(platform, TILE_ELEMENTS["default"])
  block = 1 << max(int(budget // max(rows, 1)).bit_length() - 1, 0)
  return int(np.clip(block, _MIN_BLOCK, _MAX_BLOCK))


def at_default_block(fn, rows: int, *args):
  """``fn(block, *args)`` with the default tile width of the platform lowered for.

  The choice is made by ``jax.lax.platform_dependent`` when the program is
  lowered (a program cross-lowered for CUDA on a CPU host gets the GPU
  width); lowering for one platform keeps only that platform's branch.
  """
  branches = {p: functools.partial(fn, default_block(p, rows)) for p in _PLATFORMS}
  default = functools.partial(fn, default_block("default", rows))
  return jax.lax.platform_dependent(*args, default=default, **branches)


def varying_axes(a: jax.Array) -> frozenset:
  """The ``shard_map`` axes `a` varies over (none outside one, or without check_vma)."""
  aval = jax.typeof(a) if hasattr(jax, "typeof") else None
  kind = getattr(aval, "manual_axis_type", None)
  return kind.varying if kind is not None else getattr(aval, "vma", frozenset())


def as_varying(a: jax.Array, axes: tuple) -> jax.Array:
  """`a` typed as varying over `axes`; the transpose of the cast sums the
  per-device cotangents of a replicated value."""
  missing = tuple(n for n in axes if n not in varying_axes(a))
  return jax.lax.pcast(a, missing, to="varying") if missing else a


def _dot(x, y, contract, precision, out_dtype):
  dims = ((contract[0],), (contract[1],)), ((), ())
  return jax.lax.dot_general(x, y, dims, precision=precision, preferred_element_type=out_dtype)


def sweep(
  a: jax.Array,
  b: jax.Array,
  bias: jax.Array | None = None,
  *,
  rule: str,
  block: int,
  scale: jax.Array | None = None,
  lists: jax.Array | None = None,
  row_ids: jax.Array | None = None,
  col_ids: jax.Array | None = None,
  row_mask: jax.Array | None = None,
  row_weight: jax.Array | None = None,
  row_offset=0,
  col_offset=0,
  precision=None,
  grads: bool = False,
  value: bool = True,
) -> dict[str, jax.Array]:
  """Every tile of `a` against `b`: row loss sums and, with `grads`, derivatives.

  Args:
    a: rows, ``[B, D]``, any float dtype.
    b: columns, ``[C, D]``, any float dtype (the dots run in the two's
      common dtype).
    bias: ``[C]`` (one per column), a scalar, or None.
    rule: a positives rule of :mod:`.tile` (``"diagonal"``, ``"ids"``,
      ``"lists"``).
    block: columns per tile (static); ``min(block, C)`` is used.
    scale: optional scalar multiplying the dots.
    lists: ``[B, K]`` int global column ids, for ``"lists"`` (``-1`` pads).
    row_ids, col_ids: ``[B]`` and ``[C]`` int ids, for ``"ids"``.
    row_mask: optional bool ``[B]``; excluded rows are zeroed before any
      product (they may hold nan), have loss 0 and add nothing anywhere.
    row_weight: optional ``[B]`` float: the derivatives are those of
      ``sum_i row_weight_i * loss_i`` (default weight 1).
    row_offset, col_offset: global index of ``a[0]`` and ``b[0]``.
    precision: passed to every ``lax.dot_general``.
    grads: also return the derivatives.
    value: compute the row loss sums (else ``"loss"`` is zeros): False gives
      the "skip loss" sweep (derivatives alone), for measuring what the
      exact loss costs.

  Returns:
    A dict: ``"loss"`` ``[B]`` row sums in the accumulation dtype; with
    `grads`, ``"da"`` ``[B, D]`` (accumulation dtype), ``"db"`` ``[C, D]``
    (`b`'s dtype), ``"dbias"`` (``[C]`` or scalar; absent without `bias`)
    and ``"dscale"`` (absent without `scale`).
  """
  rows, dim = a.shape
  cols = b.shape[0]
  operand = jnp.promote_types(a.dtype, b.dtype)
  acc = np.dtype(jnp.promote_types(operand, jnp.float32))
  a = a.astype(operand)
  if row_mask is not None:
    a = jnp.where(row_mask[:, None], a, jnp.zeros((), operand))
  weight = None
  if grads:
    weight = jnp.ones(rows, acc) if row_weight is None else row_weight.astype(acc)
    if row_mask is not None:
      weight = jnp.where(row_mask, weight, jnp.zeros((), acc))
  col_bias = bias is not None and bias.ndim == 1
  if bias is not None:
    bias = bias.astype(acc)
  if scale is not None:
    scale = scale.astype(acc)
  block = max(min(int(block), cols), 1)
  n_full, rest = divmod(cols, block)
  axes = tuple(
    sorted(
      set().union(*(varying_axes(x) for x in (a, b, bias, scale, lists) if x is not None)), key=str
    )
  )

  def tile_sums(start, size, carry):
    b_t = jax.lax.dynamic_slice_in_dim(b, start, size).astype(operand)
    dots = _dot(a, b_t, (1, 1), precision, acc)  # [B, size]
    logits = dots if scale is None else scale * dots
    if bias is not None:
      logits = logits + (jax.lax.dynamic_slice_in_dim(bias, start, size) if col_bias else bias)
    ids_t = None if col_ids is None else jax.lax.dynamic_slice_in_dim(col_ids, start, size)
    pos = tile.positive(
      rule,
      (rows, size),
      row_start=row_offset,
      col_start=col_offset + start,
      row_ids=row_ids,
      col_ids=ids_t,
      lists=lists,
    )
    out = dict(carry)
    if value:
      out["loss"] = carry["loss"] + jnp.sum(tile.losses(logits, pos), axis=1)
    if grads:
      g = tile.dlogits(logits, pos) * weight[:, None]
      out["da"] = carry["da"] + _dot(g.astype(operand), b_t, (1, 0), precision, acc)
      db_t = _dot(g.astype(operand), a, (0, 0), precision, acc)  # [size, D]
      if scale is not None:
        db_t = scale * db_t
      out["db"] = jax.lax.dynamic_update_slice_in_dim(carry["db"], db_t.astype(b.dtype), start, 0)
      if col_bias:
        dbias_t = jnp.sum(g, axis=0)
        out["dbias"] = jax.lax.dynamic_update_slice_in_dim(carry["dbias"], dbias_t, start, 0)
      elif bias is not None:
        out["dbias"] = carry["dbias"] + jnp.sum(g)
    return out

  carry = {"loss": jnp.zeros(rows, acc)}
  if grads:
    carry.update(da=jnp.zeros((rows, dim), acc), db=jnp.zeros((cols, dim), b.dtype))
    if bias is not None:
      carry["dbias"] = jnp.zeros(cols if col_bias else (), acc)
  carry = {k: as_varying(v, axes) for k, v in carry.items()} if axes else carry
  if n_full == 1:
    carry = tile_sums(0, block, carry)
  elif n_full > 1:
    carry = jax.lax.fori_loop(0, n_full, lambda i, c: tile_sums(i * block, block, c), carry)
  if rest:
    carry = tile_sums(n_full * block, rest, carry)
  if row_mask is not None:
    carry["loss"] = jnp.where(row_mask, carry["loss"], jnp.zeros((), acc))
  if grads and scale is not None:
    carry["dscale"] = jnp.sum(a.astype(acc) * carry["da"])  # sum_ij g_ij <a_i, b_j>
    carry["da"] = scale * carry["da"]
  return carry


def rank_key(scores: jax.Array) -> jax.Array:
  """The values `scores` are ranked by: nan as -inf, -0.0 as 0.0.

  ``lax.top_k`` orders floats totally (nan above +inf or below -inf by its
  sign bit, -0.0 below 0.0); ranking by this key instead makes equal
  numbers, -inf and nan tie, and ties go to the lower index.
  """
  zero = jnp.zeros((), scores.dtype)
  key = jnp.where(scores == 0, zero, scores)
  return jnp.where(jnp.isnan(scores), jnp.full((), -jnp.inf, scores.dtype), key)


def best_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The `k` best of each row of `scores` by :func:`rank_key`, and their columns.

  Scores come back as they were (nan stays nan); ties go to the lower column.
  """
  where = jax.lax.top_k(rank_key(scores), k)[1]
  return jnp.take_along_axis(scores, where, axis=1), where


def top_k(
  a: jax.Array,
  b: jax.Array,
  bias: jax.Array | None,
  k: int,
  *,
  block: int,
  col_offset=0,
  precision=None,
) -> tuple[jax.Array, jax.Array]:
  """The `k` highest ``<a_i, b_j> + bias_j`` of each row, tile by tile.

  The first tile's top-k (tiles are at least `k` wide) is merged with each
  later tile's own top-k, ranked by :func:`rank_key`: ties, -inf and nan
  included, go to the lower column index, and every id is a real column.
  Returns ``(scores [B, k] float32/64, ids [B, k] int32)``, ids global
  (`col_offset` added), best first.
  """
  cols = b.shape[0]
  operand = jnp.promote_types(a.dtype, b.dtype)
  acc = np.dtype(jnp.promote_types(operand, jnp.float32))
  a = a.astype(operand)
  block = max(min(int(block), cols), k, 1)
  block = min(block, cols)
  n_full, rest = divmod(cols, block)
  axes = tuple(
    sorted(set().union(*(varying_axes(x) for x in (a, b, bias) if x is not None)), key=str)
  )

  def tile_best(start, size):
    b_t = jax.lax.dynamic_slice_in_dim(b, start, size).astype(operand)
    scores = _dot(a, b_t, (1, 1), precision, acc)
    if bias is not None:
      scores = scores + jax.lax.dynamic_slice_in_dim(bias.astype(acc), start, size)
    t_scores, where = best_k(scores, min(k, size))
    return t_scores, (where + start + col_offset).astype(jnp.int32)

  def merge(start, size, carry):
    t_scores, t_ids = tile_best(start, size)
    # The carry (lower ids) comes first, so it wins ties.
    both, where = best_k(jnp.concatenate([carry[0], t_scores], axis=1), k)
    return both, jnp.take_along_axis(jnp.concatenate([carry[1], t_ids], axis=1), where, axis=1)

  carry = tile_best(0, block)  # block >= k: no placeholder entries to lose ties to
  if axes:
    carry = (as_varying(carry[0], axes), as_varying(carry[1], axes))
  if n_full > 1:
    carry = jax.lax.fori_loop(1, n_full, lambda i, c: merge(i * block, block, c), carry)
  if rest:
    carry = merge(n_full * block, rest, carry)
  return carry
