r"""The ``[B, D] x [C, D]`` tile sweep as two fused Pallas-Triton GPU kernels.

For rows ``a_i`` and columns ``b_j`` with logits
``z_ij = s <a_i, b_j> + bias_j`` and labels from a positives rule (see
:mod:`.tile`), :func:`sweep` returns the row sums of the element losses and
the derivatives of their total in ``a``, ``b``, ``s`` and ``bias``, without
ever writing a ``[B, C]`` tile to memory.

Design:

* **Two kernels, no atomics** (FlashAttention-2's backward layout). The row
  kernel gives each program a block of rows of ``a``; it walks over all
  column blocks, computes each tile's logits, loss and ``g = sigmoid(z) -
  label`` on chip, and accumulates its rows' loss sums, ``sum_j g_ij
  <a_i, b_j>`` and ``dL/da = s g b``. The column kernel does the same for a
  block of columns, recomputing the logits, and accumulates ``dL/db = s g^T
  a`` and the column sums of ``g``. Each program writes only the rows it
  owns, so the result is deterministic. The alternative, one sweep with
  ``atomic_add`` into ``dL/db``, moves a ``[block, D]`` float32 slab through
  L2 for every tile: at ``D = 512`` that traffic exceeds the matmuls' time,
  while recomputing the logits costs one matmul in four.
* **Column chunks.** A small batch against many columns (B = 1024 rows
  against millions of labels) has few row blocks: the row kernel's grid is
  row blocks x column chunks (:mod:`.pallas_triton_config`), each chunk
  writing float32 partial row sums that are added here, at most 64 MiB of
  them. One chunk (a big batch) gives the sums of one walk.
* **Derivatives in 16 bits.** Where each row's ``g b`` is written once (one
  chunk) the row kernel can scale it and write it in the inputs' 16-bit
  dtype (`da_scale`, `da_dtype`), as the column kernel does ``g^T a``
  (`db_scale`, `db_dtype`): float32 inside the kernel, one rounding, and
  half the ``[B, D]`` bytes (B = 65,536, D = 512: 128 MiB instead of 256).
  Partial sums stay float32 until they are added.
* **Masks, not branches.** Excluded rows and columns (``row_mask``,
  ``col_mask``) and padding enter every tile as a select, so they are
  neither anchors nor negatives; their rows of ``a`` and ``b`` are zeroed
  here first, so nan in them reaches no product.
* **Precision.** The logits' dot runs in the inputs' dtype with float32
  accumulation. For the two gradient dots ``g`` is cast to the inputs'
  dtype when that is 16-bit (the tensor-core rate; ``g`` keeps 8 bits of
  mantissa in bfloat16), and stays float32 for float32 inputs. `precision`
  is passed to every dot as ``jnp.dot``'s is: on a GPU ``None``/DEFAULT
  run float32 dots in TF32, ``HIGHEST`` in full float32.
* **Triton, not Mosaic GPU.** On this jax (0.10 and 0.11) the Mosaic-GPU
  lowering has no rule for ``log1p`` nor for ``custom_jvp`` calls, both in
  the shared tile formulas, and its interpret mode cannot take transposed
  WGMMA operands; the Triton lowering takes the tile code as written.

Everything is padded here: rows to the blocks, ``D`` to a power of two.
Costs O((B + C) D) memory beyond the inputs. With ``unpadded_columns``
(the linear BCE: ``b`` is the label matrix, too big to copy) ``b`` is not
padded: the kernels walk its whole column blocks, the last ``C %
block_cols`` columns are one small XLA tile, and ``g^T a`` is written in
place.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from bce_jax import _shard
from bce_jax._tiles import pallas_triton_config as _config
from bce_jax._tiles import pallas_triton_kernel as _kernel
from bce_jax._tiles import tile

_pltriton: Any
try:  # the Triton backend's options; absent from some jax builds
  from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - depends on the installed jax
  _pltriton = None

Config = _config.Config

# Run the kernels in Pallas's interpreter where a call leaves `interpret`
# unset: tests switch it on (mock.patch) to run the loss's kernel path on CPU.
_INTERPRET = False


def available() -> bool:
  """Whether this jax has the Pallas Triton backend."""
  return _pltriton is not None


def _pad(a: jax.Array, n: int, fill: Any = 0) -> jax.Array:
  extra = n - a.shape[0]
  if extra == 0:
    return a
  widths = ((0, extra),) + ((0, 0),) * (a.ndim - 1)
  return jnp.pad(a, widths, constant_values=fill)


def _same_axes(args: list[jax.Array]) -> list[jax.Array]:
  """`args`, each marked varying over every ``shard_map`` axis any of them
  varies over: a kernel's outputs then vary over those axes too."""
  axes = sorted(frozenset().union(*map(_shard.varying_axes, args)), key=str)
  return [_shard.varying(a, axes) for a in args]


def _out_type(shape: tuple[int, ...], like: jax.Array, dtype: Any = jnp.float32) -> Any:
  """An output of `shape` and `dtype` (float32 by default), varying over the ``shard_map`` axes `like`
  varies over (the keyword is ``manual_axis_type`` from jax 0.10, ``vma``
  before)."""
  aval = jax.typeof(like) if hasattr(jax, "typeof") else None
  kind = getattr(aval, "manual_axis_type", None)
  if kind is not None and kind.varying:
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=kind)
  vma = getattr(aval, "vma", None)
  if kind is None and vma:
    old: Any = jax.ShapeDtypeStruct  # jax < 0.10 calls the keyword `vma`
    return old(shape, dtype, vma=vma)
  return jax.ShapeDtypeStruct(shape, dtype)


def _mma_dtype(dtype: Any, precision: Any) -> np.dtype:
  """The dtype ``g`` and the embeddings take in the two gradient dots: a
  16-bit input dtype (the tensor-core rate), unless `precision` asks for
  float32 (HIGHEST), as float32 inputs always get."""
  highest = jax.lax.Precision.HIGHEST
  if isinstance(precision, str):
    precision = jax.lax.Precision(precision)
  wants_f32 = precision == highest or (isinstance(precision, tuple) and highest in precision)
  small = jnp.dtype(dtype).itemsize == 2
  return np.dtype(dtype if small and not wants_f32 else jnp.float32)


def parts(
  a: jax.Array,
  b: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  *,
  rule: str = "diagonal",
  row_ids: jax.Array | None = None,
  col_ids: jax.Array | None = None,
  lists: jax.Array | None = None,
  row_mask: jax.Array | None = None,
  col_mask: jax.Array | None = None,
  value: bool = True,
  grads: bool = True,
  precision: Any = None,
  db_scale: jax.Array | None = None,
  db_dtype: Any = jnp.float32,
  da_scale: jax.Array | None = None,
  da_dtype: Any = jnp.float32,
  unpadded_columns: bool = False,
  config: Config | None = None,
  interpret: bool | None = None,
) -> dict[str, jax.Array]:
  """The sweep's raw sums, before the scale is applied (see :func:`sweep`).

  `db_scale` (a scalar, or None for 1) multiplies ``gt_a`` in the kernel,
  which writes it in `db_dtype`: a caller that needs ``c g^T a`` in the
  columns' dtype (the linear loss's ``dW``) then holds no float32 copy.
  `da_scale` and `da_dtype` do the same for ``g_b``: the row kernel
  accumulates in float32, multiplies and writes `da_dtype` where each row is
  written once (one column chunk, no XLA tail); partial sums (several
  chunks, or the tail) are written and added in float32, then cast. For
  16-bit inputs that halves the ``[B, D]`` buffers a caller keeps (e.g. as
  residuals between a forward and a backward pass).
  `unpadded_columns`: no padded copy of `b` where its rows are no multiple
  of the column block (when ``D`` is a power of two >= 16, `b` already in
  the common dtype and no `col_mask`): the last partial block is an XLA
  tile.

  Returns:
    A dict of float32 arrays: with `value`, ``loss`` ``[B]`` (row sums of
    the element losses); with `grads`, with ``g = sigmoid(z) - label`` (0
    for excluded pairs): ``g_rows`` ``[B]`` and ``g_cols`` ``[C]`` (its row
    and column sums), ``gdot_rows`` ``[B]`` (row sums of ``g <a_i, b_j>``),
    ``g_b`` ``[B, D]`` (``g b``, in `da_dtype`) and ``gt_a`` ``[C, D]``
    (``g^T a``, in `db_dtype`).
  """
  if _pltriton is None:
    raise NotImplementedError(
      "this jax has no Pallas Triton backend (jax.experimental.pallas.triton)."
    )
  if rule not in tile.RULES:
    raise ValueError(f"unknown positives rule {rule!r}; expected one of {tile.RULES}")
  dtype = jnp.promote_types(a.dtype, b.dtype)
  if dtype == jnp.float64:
    raise NotImplementedError("the Triton kernels take float16/bfloat16/float32, not float64.")
  (rows, dim), cols = a.shape, b.shape[0]
  cfg = config or _config.choose(rows, cols, dim)
  bm, bn, dim_p = cfg.block_rows, cfg.block_cols, _config.padded_dim(dim)
  rows_p, cols_p = -(-rows // bm) * bm, -(-cols // bn) * bn

  def prepare(x, mask, n):
    ok = jnp.ones(x.shape[0], jnp.int32) if mask is None else mask.astype(jnp.int32)
    x = x.astype(dtype)
    if mask is not None:  # a select, not a product: nan in an excluded row stays out
      x = jnp.where(mask[:, None], x, jnp.zeros((), dtype))
    return jnp.pad(x, ((0, n - x.shape[0]), (0, dim_p - dim))), _pad(ok, n)

  a_p, row_ok = prepare(a, row_mask, rows_p)
  split = unpadded_columns and col_mask is None and dim == dim_p and b.dtype == dtype
  split = split and cols > bn and cols % bn != 0
  swept = cols - cols % bn if split else cols_p  # the columns the kernels walk
  if split:  # b as it is; the last cols - swept columns are an XLA tile
    b_p, col_ok = b, _pad(jnp.ones(cols, jnp.int32), cols_p)
  else:
    b_p, col_ok = prepare(b, col_mask, cols_p)
  bias_p = _pad(jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (cols,)), cols_p)
  factors = [
    jnp.ones((), jnp.float32) if f is None else jnp.asarray(f, jnp.float32).reshape(())
    for f in (db_scale, da_scale)
  ]
  scales = jnp.stack([jnp.asarray(scale, jnp.float32).reshape(()), *factors])
  args = [scales, a_p, b_p, bias_p, row_ok, col_ok]
  if rule == "ids":
    if row_ids is None or col_ids is None:
      raise ValueError("the 'ids' rule needs `row_ids` and `col_ids`.")
    ids = [x if x.ndim == 2 else x[:, None] for x in (row_ids, col_ids)]
    args += [_pad(ids[0], rows_p).T, _pad(ids[1], cols_p).T]  # [P, N]: a part a load
  elif rule == "lists":
    if lists is None:
      raise ValueError("the 'lists' rule needs `lists`.")
    k = lists.shape[1]
    k_p = 1 << max(k - 1, 0).bit_length()  # a power of two: a Triton block
    args.append(
      jnp.pad(lists.astype(jnp.int32), ((0, rows_p - rows), (0, k_p - k)), constant_values=-1)
    )

  args = _same_axes(args)
  mma = _mma_dtype(dtype, precision)
  chunks = min(cfg.col_chunks, swept // bn)
  db_dtype, da_dtype = np.dtype(db_dtype), np.dtype(da_dtype)
  # Each row's g b is written once by one program, or added up here in float32.
  da_written = da_dtype if chunks == 1 and not split else np.dtype(np.float32)
  spec = _kernel.Spec(
    rule,
    rows_p,
    swept,
    bm,
    bn,
    value,
    grads,
    precision,
    mma,
    chunks,
    db_scale is not None,
    db_dtype,
    da_scale is not None,
    da_written,
  )
  params = _pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  interpret = _INTERPRET if interpret is None else interpret
  call = functools.partial(pl.pallas_call, compiler_params=params, interpret=interpret)

  # Index maps take the grid's indices: (row block, chunk) in the row
  # kernel, (column block,) in the column kernel; blocks follow the first.
  def whole(x):
    return pl.BlockSpec(x.shape, lambda i, *_: (0,) * x.ndim)

  def block(x, size, axis=0):
    shape = list(x.shape)
    shape[axis] = size
    index = lambda i, *_: tuple(i if d == axis else 0 for d in range(x.ndim))
    return pl.BlockSpec(tuple(shape), index)

  def spec_of(i, x, blocked, size):
    if i not in blocked:
      return whole(x)
    return block(x, size, axis=1 if rule == "ids" and i >= 6 else 0)  # ids are [P, N]

  def partial_sum(o):  # one chunk's [bm] or [bm, Dp] part of a [chunks, ...] output
    shape = (None, bm) + tuple(o.shape[2:])
    return pl.BlockSpec(shape, lambda i, c: (c, i) + (0,) * (o.ndim - 2))

  row_blocked = {1, 4} | ({6} if rule in ("ids", "lists") else set())  # a, row_ok, row_ids/lists
  col_blocked = {2, 3, 5} | ({7} if rule == "ids" else set())  # b, bias, col_ok, col_ids
  shapes = {"loss": (rows_p,), "g_rows": (rows_p,), "gdot_rows": (rows_p,), "g_b": (rows_p, dim_p)}
  names = (["loss"] if value else []) + (["g_rows", "gdot_rows", "g_b"] if grads else [])
  dtypes = {"g_b": da_written}
  row_outs = [_out_type((chunks, *shapes[n]), args[1], dtypes.get(n, jnp.float32)) for n in names]
  found = call(
    functools.partial(_kernel.rows_kernel, spec=spec),
    out_shape=row_outs,
    grid=(rows_p // bm, chunks),
    in_specs=[spec_of(i, x, row_blocked, bm) for i, x in enumerate(args)],
    out_specs=[partial_sum(o) for o in row_outs],
  )(*args)
  found = [v[0] if chunks == 1 else jnp.sum(v, axis=0) for v in found]
  tail = _kernel.tail(spec, args, swept, cols) if split else None
  if tail is not None:
    found = [v + tail[n] for n, v in zip(names, found)]
  found = [v.astype(da_dtype) if n == "g_b" else v for n, v in zip(names, found)]
  out = {n: v[:rows, :dim] if v.ndim == 2 else v[:rows] for n, v in zip(names, found)}
  if not grads:
    return out
  col_outs = [
    _out_type((cols_p,), args[1]),
    _out_type((cols if split else cols_p, dim_p), args[1], db_dtype),
  ]
  g_cols, gt_a = call(
    functools.partial(_kernel.cols_kernel, spec=spec),
    out_shape=col_outs,
    grid=(swept // bn,),
    in_specs=[spec_of(i, x, col_blocked, bn) for i, x in enumerate(args)],
    out_specs=[block(o, bn) for o in col_outs],
  )(*args)
  if tail is not None:  # in place: the kernel left these rows unwritten
    g_cols = jax.lax.dynamic_update_slice_in_dim(g_cols, tail["g_cols"], swept, 0)
    gt_a = jax.lax.dynamic_update_slice_in_dim(gt_a, tail["gt_a"], swept, 0)
  return {**out, "g_cols": g_cols[:cols], "gt_a": gt_a[:cols, :dim]}


def sweep(
  a: jax.Array,
  b: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  *,
  grads: bool = True,
  **options: Any,
) -> dict[str, jax.Array]:
  """The loss and its gradient pieces over all ``[B, C]`` pairs, in two kernels.

  Args:
    a: rows ``[B, D]``, a float dtype (not float64).
    b: columns ``[C, D]``, a float dtype.
    scale: ``s``, a scalar.
    bias: a scalar, or one value per column ``[C]``.
    grads: also compute the derivatives.
    **options: of :func:`parts`:
      ``rule``: the positives rule, one of :data:`.tile.RULES`;
      ``row_ids``, ``col_ids``: ``[B]`` and ``[C]`` integer ids for
      ``"ids"``, or ``[B, P]`` and ``[C, P]``, ``P`` parts of each id (a pair
      is positive where all parts are equal: the halves of 64-bit ids);
      ``lists``: ``[B, K]`` positive column ids per row (``-1`` pads), for
      ``"lists"``;
      ``row_mask``, ``col_mask``: bool ``[B]`` and ``[C]``, False excludes
      that row (column) from every pair; its embedding may hold nan;
      ``precision``: of the dots, as ``jnp.dot``'s;
      ``config``: block sizes (None: :func:`.pallas_triton_config.choose`);
      ``interpret``: run the kernels in Pallas's interpreter (any
      backend); None: off, unless tests switched ``_INTERPRET`` on.

  Returns:
    A dict of float32 arrays: ``loss`` ``[B]`` (row sums of the element
    losses); with `grads` the derivatives of ``sum(loss)``: ``da``
    ``[B, D]``, ``db`` ``[C, D]``, ``dscale`` ``()`` and ``dbias`` (the
    shape of `bias`).

  Raises:
    NotImplementedError: for float64 inputs, or where this jax has no
      Pallas Triton backend.
    ValueError: for an unknown `rule` or missing ids.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bce_jax._tiles import pallas_triton
    >>> a = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> out = pallas_triton.sweep(a, a, 2.0, -1.0, interpret=True)  # diagonal positives
    >>> print([f"{v:.3f}" for v in out["loss"]], f"{out['dscale']:.3f}", out["db"].shape)
    ['1.940', '1.940', '2.675'] 2.291 (3, 2)
  """
  raw = parts(a, b, scale, bias, grads=grads, **options)
  out = {"loss": raw["loss"]}
  if grads:
    s = jnp.asarray(scale, jnp.float32)
    out.update(
      da=s * raw["g_b"],
      db=s * raw["gt_a"],
      dscale=jnp.sum(raw["gdot_rows"]),
      dbias=jnp.sum(raw["g_cols"]) if jnp.ndim(bias) == 0 else raw["g_cols"],
    )
  return out
