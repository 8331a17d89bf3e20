r"""The ``[B, D] x [C, D]`` tile sweep as two Mosaic-GPU kernels (Hopper).

The same sums as :mod:`.pallas_triton` (see :func:`sweep`), for the
pairwise loss's positives rules ``"diagonal"`` and ``"ids"`` (the linear
BCE's ``"lists"`` runs on the Triton kernels only), with warpgroup MMAs fed
by TMA copies, the layout Mosaic GPU reaches 430-700 TFLOP/s with on an
H200 where the Triton backward kernels run far below the matmul rate.

Design (:mod:`.pallas_mosaic_kernel` holds the one-warpgroup body,
:mod:`.pallas_mosaic_kernel2` the two-warpgroup one):

* **Two kernels, no atomics, as in the Triton version.** The row kernel
  owns blocks of ``a`` and walks over ``b``: loss and ``g`` row sums and
  ``g b``. The column kernel owns blocks of ``b`` and walks over ``a``,
  recomputing the logits: ``g`` column sums and ``g^T a``. One body serves
  both (``own`` and ``other`` sides); the bias rides on whichever side holds
  the columns.
* **No transposed MMA operand.** The logits' MMA reads ``other^T`` from a
  pre-transposed copy (``a^T`` and ``b^T``, ``(B + C) D`` elements in the
  inputs' dtype: 128 MiB at B = C = 65,536, D = 512, bfloat16). Mosaic-GPU
  interpret mode on jax 0.10 rejects transposed operands, and float32
  (TF32) MMAs take none on the hardware.
* **Only 16-bit inputs.** float16 and bfloat16 embeddings with float32
  accumulation; ``g`` is rounded to the inputs' dtype for the gradients'
  MMA (as the Triton kernels do). float32 inputs and
  ``precision="highest"``/``"high"`` are refused with a ValueError (their
  MMAs would run in TF32 at best): use the Triton kernels or XLA tiles.
* **Scaled in the kernels, rounded once.** ``g b`` and ``g^T a`` leave
  as ``factor`` (a float32 scalar: the pairwise loss's ``s / count``) times
  the float32 accumulators, cast once to ``out_dtype``; the row kernel also
  sums ``g_ij <a_i, b_j>`` from the float32 ``g`` and dot products (for
  ``dL/dscale``), so no float32 ``[B, D]`` tensor is needed outside.
* **Mosaic-lowerable tile math.** No ``log1p`` nor ``custom_jvp`` (no
  lowering rules in Mosaic GPU): softplus and sigmoid come from one ``exp``,
  a ``log`` and a division (:func:`.pallas_mosaic_kernel.elementwise`).
* **Masks as selects.** Excluded and padded rows are zeroed here (nan
  reaches no product) and marked not ``ok``: they are neither anchors nor
  negatives.

Tile sizes (H100/H200: 227 KiB SMEM a block, 64K 32-bit registers a
multiprocessor, at most 255 a thread; one warpgroup is 128 threads):

* ``block_own = block_other = 64``: one warpgroup MMA's M; the ``[64, 64]``
  float32 logits take 32 registers a thread.
* ``warpgroups=1`` (the default where ``Dp <= 256``): one warpgroup holds a
  ``chunk`` of ``D`` of ``d_own`` (float32 ``[64, chunk]``: ``chunk / 2``
  registers a thread, 128 at ``chunk = 256``; all of ``[64, 512]`` would
  need 256, more than a thread has). The chunks are a grid axis and each
  recomputes the logits: with ``n = Dp / chunk`` each kernel does ``n``
  logits passes and one gradient pass of ``2 B C D`` FLOP, ``4 (n + 1) B C
  D`` in all: ``8 B C D`` at ``D <= 256``, ``12 B C D`` at ``D = 512``.
* ``warpgroups=2`` (the default where ``256 < Dp <= 512``): a TMA producer
  and two consumer warpgroups a block. Consumer ``w`` computes the logits
  of 32 of the tile's 64 columns over all of ``D`` (``[64, 32]``), their
  loss and ``g``, writes its ``g`` columns into a shared SMEM tile, and after
  one barrier of both does ``d_own[:, half_w] += g @ other[:, half_w]``
  (``[64, Dp / 2]``: 128 registers at ``Dp = 512``). One logits pass:
  ``8 B C D`` at any ``D <= 512``; no element is computed twice and no
  float32 partial logits cross SMEM (splitting ``D`` between the consumers
  instead would need a ``[64, 64]`` float32 exchange, 32 KiB that do not fit
  beside a stage at D = 512).
* SMEM, one warpgroup: ``own`` ``[64, Dp]`` (64 KiB at D = 512, bfloat16),
  ``g`` (8 KiB), the float32 ``[64, 64]`` write-out buffer (16 KiB), plus
  per pipeline stage ``other^T`` ``[Dp, 64]`` (64 KiB) and
  ``other[:, chunk]`` ``[64, 256]`` (32 KiB): D = 512 fits one stage (184
  KiB), ``D <= 256`` two; ``block_other=32`` halves a stage (two at D =
  512) for a narrower logits MMA, and D above 704 does not fit (refused).
* SMEM, two warpgroups: ``own`` (64 KiB), ``g`` in two slots (16 KiB), two
  8 KiB write-out buffers, plus per stage ``other^T`` and all of ``other``
  (64 + 64 KiB at D = 512): one stage at D = 512 (221 of 227 KiB), two at
  ``D <= 256``. With one stage, each consumer releases ``other^T`` right
  after its logits (the producer refills it during the element math and the
  gradient's MMA), but the next ``other`` (64 KiB) only arrives after the
  gradient's MMA: that load is exposed each step.

Estimate at B = C = 65,536, D = 512, bfloat16 (value_and_grad): the
floor is ``6 B^2 D`` = 1.3e13 FLOP (16.7 ms at 790 TFLOP/s). One warpgroup
does ``12 B^2 D`` = 2.6e13 (~44 ms at 600 TFLOP/s, ~38 at 700); two do
``8 B^2 D`` = 1.8e13: ~29 ms at 600 TFLOP/s, ~25 at 700, if the MMAs run
at that rate. Two things may keep them below it: the logits' MMA is narrow
(N = 32 a consumer, both operands from SMEM) and the exposed ``other`` load
of the one-stage pipeline. On hardware, 16-bit MMAs take a transposed
operand (``plgpu.transpose_ref``): reading ``other^T`` from ``other``'s
stage would halve a stage (two stages at D = 512) and drop the transposed
copies, once interpret mode can test it (jax 0.10.2 rejects transposed
refs). Bytes moved: ``O((B + C) D)`` a block row, negligible.
Temporaries: the transposed copies (128 MiB) and ``g b``, ``g^T a`` (64 MiB
each in bfloat16, as the pairwise loss asks for them; float32 by default
here): ~256 MiB. Nothing here has run on a GPU: the kernels are tested in
Mosaic-GPU interpret mode and by lowering for CUDA on a CPU; the estimate
is arithmetic, not a measurement.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bce_jax import _shard
from bce_jax._tiles import pallas_mosaic_kernel as _kernel
from bce_jax._tiles import pallas_mosaic_kernel2 as _kernel2

# Where a call leaves `interpret` unset: None (compile for the GPU), or the
# Mosaic-GPU interpret parameters a test puts here (mock.patch) to run the
# kernels on a CPU.
_INTERPRET: Any = None

RULES = ("diagonal", "ids")
BLOCK = 64  # rows a program owns, and rows of the other side a pipeline step
CHUNK = 256  # columns of D a program's gradient accumulator holds
WIDEST_SPLIT = 512  # the widest padded D two consumer warpgroups take (an MMA's N <= 256)
_SMEM = 227 * 1024
_JAX = tuple(int(p) for p in jax.__version__.split(".")[:2])


def available() -> bool:
  """Whether this jax has the Pallas Mosaic-GPU backend as the kernels use it
  (``plgpu.kernel`` with ``out_type`` and ``interpret``: jax >= 0.10)."""
  return _kernel.plgpu is not None and _JAX >= (0, 10)


def refusal(dtype: Any, precision: Any = None) -> str | None:
  """Why the kernels cannot take embeddings of `dtype` at `precision`, or None."""
  if np.dtype(dtype) not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
    return f"they take float16 or bfloat16 embeddings, not {np.dtype(dtype).name}"
  if isinstance(precision, str):
    precision = jax.lax.Precision(precision)
  if precision not in (None, jax.lax.Precision.DEFAULT):
    return f"they run 16-bit MMAs with float32 accumulation, not precision={precision}"
  if not available():
    return f"they need jax >= 0.10's jax.experimental.pallas.mosaic_gpu; this is {jax.__version__}"
  return None


def _stages(dim: int, chunk: int, itemsize: int, other: int = BLOCK, warpgroups: int = 1) -> int:
  """Pipeline stages (1 or 2) that fit in SMEM beside the owned block; 0 if none does.

  `chunk`: columns of ``other`` a stage holds (0 without gradients). With two
  consumer warpgroups, ``g`` has two slots and each consumer its own
  vectors and write-out buffer (64-byte rows).
  """
  fixed = BLOCK * dim * itemsize + warpgroups * (BLOCK * other * itemsize + 8 * 4 * BLOCK)
  fixed += BLOCK * 64 * 4 if warpgroups == 1 else 2 * BLOCK * _kernel2.OUT_BYTES
  stage = (dim * other + other * chunk) * itemsize + 4 * 4 * other  # + bias, ok, 2 id parts
  return max(0, min(2, (_SMEM - fixed) // stage))


def _pad(x: jax.Array, n: int, dim: int | None = None) -> jax.Array:
  widths = [(0, n - x.shape[0])] + ([] if x.ndim == 1 else [(0, (dim or 0) - x.shape[1])])
  return jnp.pad(x, widths) if any(w[1] for w in widths) else x


def parts(
  a: jax.Array,
  b: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  *,
  rule: str = "diagonal",
  row_ids: jax.Array | None = None,
  col_ids: jax.Array | None = None,
  row_mask: jax.Array | None = None,
  col_mask: jax.Array | None = None,
  value: bool = True,
  grads: bool = True,
  precision: Any = None,
  out_dtype: Any = jnp.float32,
  factor: jax.Array | float = 1.0,
  chunk: int | None = None,
  block_other: int = BLOCK,
  warpgroups: int | None = None,
  interpret: Any = None,
) -> dict[str, jax.Array]:
  """The sweep's raw sums, before the scale is applied (see :func:`sweep`).

  Returns:
    A dict: with `value`, ``loss`` ``[B]`` (row sums of the element losses,
    float32); with `grads`, for ``g = sigmoid(z) - label`` (0 for excluded
    pairs): ``g_rows`` ``[B]`` and ``g_cols`` ``[C]`` (float32 row and
    column sums), ``gdot_rows`` ``[B]`` (float32 row sums of ``g <a_i,
    b_j>``, from the float32 ``g`` and dot products), ``g_b`` ``[B, D]``
    and ``gt_a`` ``[C, D]`` (``factor g b`` and ``factor g^T a``: float32
    sums times `factor`, a scalar, rounded once to `out_dtype` by the
    kernels).
  """
  if rule not in RULES:
    raise ValueError(f"unknown positives rule {rule!r} for the Mosaic kernels; expected {RULES}")
  dtype = jnp.promote_types(a.dtype, b.dtype)
  why = refusal(dtype, precision)
  if why is not None:
    raise ValueError(f"the Mosaic-GPU kernels cannot run: {why}.")
  (rows, dim), cols = a.shape, b.shape[0]
  dim_p = -(-dim // 64) * 64  # whole 128-byte swizzle rows
  if warpgroups is None:  # two consumers where one would need two passes over the logits
    split = CHUNK < dim_p <= WIDEST_SPLIT and grads and chunk is None and block_other == BLOCK
    warpgroups = 2 if split else 1
  if warpgroups not in (1, 2):
    raise ValueError(f"`warpgroups` must be 1 or 2; got {warpgroups!r}.")
  if warpgroups == 2:
    if dim_p > WIDEST_SPLIT or chunk is not None or block_other != BLOCK:
      raise ValueError(
        f"`warpgroups=2` takes D up to {WIDEST_SPLIT}, block_other={BLOCK} and no `chunk` (each "
        f"consumer holds half of D); got D = {dim}, block_other={block_other}, chunk={chunk}. "
        "Use warpgroups=1 for these."
      )
    chunk = dim_p
  if chunk is None:  # the widest multiple of 64 up to CHUNK that divides Dp
    chunk = next(c for c in range(min(CHUNK, dim_p), 0, -64) if dim_p % c == 0)
  if dim_p % chunk or chunk % _kernel.EPILOGUE:
    raise ValueError(f"`chunk` must divide the padded D {dim_p} in multiples of 64; got {chunk}.")
  rows_p, cols_p = -(-rows // BLOCK) * BLOCK, -(-cols // BLOCK) * BLOCK
  if block_other not in (32, 64):
    raise ValueError(f"`block_other` must be 32 or 64; got {block_other!r}.")
  itemsize = np.dtype(dtype).itemsize
  stages = _stages(dim_p, chunk if grads else 0, itemsize, block_other, warpgroups)
  if stages == 0:
    raise ValueError(
      f"the Mosaic-GPU kernels hold a [{BLOCK}, D] block and a [D, {block_other}] one in shared "
      f"memory: D = {dim} needs more than {_SMEM // 1024} KiB. Use implementation='pallas' or "
      "'xla' for embeddings wider than 704."
    )

  def side(x, mask, n):
    ok = jnp.ones(x.shape[0], jnp.int32) if mask is None else mask.astype(jnp.int32)
    x = x.astype(dtype)
    if mask is not None:  # a select, not a product: nan in an excluded row stays out
      x = jnp.where(mask[:, None], x, jnp.zeros((), dtype))
    return _pad(x, n, dim_p), _pad(ok, n)

  a_p, row_ok = side(a, row_mask, rows_p)
  b_p, col_ok = side(b, col_mask, cols_p)
  if rule == "ids":
    if row_ids is None or col_ids is None:
      raise ValueError("the 'ids' rule needs `row_ids` and `col_ids`.")
    row_parts = list((row_ids if row_ids.ndim == 2 else row_ids[:, None]).astype(jnp.int32).T)
    col_parts = list((col_ids if col_ids.ndim == 2 else col_ids[:, None]).astype(jnp.int32).T)
    row_parts = [_pad(x, rows_p) for x in row_parts]
    col_parts = [_pad(x, cols_p) for x in col_parts]
  else:  # global indices: equal on the diagonal
    row_parts, col_parts = (
      [jnp.arange(rows_p, dtype=jnp.int32)],
      [jnp.arange(cols_p, dtype=jnp.int32)],
    )
  s = jnp.asarray(scale, jnp.float32).reshape(())
  bias_p = _pad(jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (cols,)), cols_p)
  out_dtype = np.dtype(out_dtype)
  interpret = _INTERPRET if interpret is None else interpret

  def spec(own, other, value, gdot):
    return _kernel.Spec(
      parts=len(row_parts),
      own_rows=own,
      other_rows=other,
      dim=dim_p,
      block_own=BLOCK,
      block_other=block_other,
      chunk=chunk if grads and warpgroups == 1 else dim_p,
      value=value,
      grads=grads,
      gdot=gdot,
      stages=stages,
      dtype=np.dtype(dtype),
      out_dtype=out_dtype,
      interpreted=interpret is not None,
    )

  zeros_rows, zeros_cols = jnp.zeros(rows_p, jnp.float32), jnp.zeros(cols_p, jnp.float32)
  f = jnp.asarray(factor, jnp.float32).reshape(())
  row_args = [jnp.full(rows_p, s), zeros_rows, row_ok, *row_parts, a_p]
  col_args = [bias_p, col_ok, *col_parts, b_p, b_p.T, jnp.full(rows_p, f)]
  call = _kernel.call if warpgroups == 1 else _kernel2.call

  def sums(v):  # per consumer warpgroup with two: [2, N]
    return v if v.ndim == 1 else jnp.sum(v, axis=0)

  found = call(spec(rows_p, cols_p, value, grads), _same_axes(row_args + col_args), interpret)
  names = (["loss"] if value else []) + (["g_rows", "gdot_rows", "g_b"] if grads else [])
  found = [v[:rows, :dim] if n == "g_b" else sums(v)[:rows] for n, v in zip(names, found)]
  out = dict(zip(names, found))
  if grads:
    own = [jnp.full(cols_p, s), bias_p, col_ok, *col_parts, b_p]
    other = [zeros_rows, row_ok, *row_parts, a_p, a_p.T, jnp.full(cols_p, f)]
    g_cols, gt_a = call(spec(cols_p, rows_p, False, False), _same_axes(own + other), interpret)
    out.update(g_cols=sums(g_cols)[:cols], gt_a=gt_a[:cols, :dim])
  del zeros_cols
  return out


def _same_axes(args: list[jax.Array]) -> list[jax.Array]:
  """`args`, each marked varying over every ``shard_map`` axis any of them varies over."""
  axes = sorted(frozenset().union(*map(_shard.varying_axes, args)), key=str)
  return [_shard.varying(x, axes) for x in args]


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
    a: rows ``[B, D]``, float16 or bfloat16.
    b: columns ``[C, D]``, float16 or bfloat16.
    scale: ``s``, a scalar.
    bias: a scalar, or one value per column ``[C]``.
    grads: also compute the derivatives.
    **options: of :func:`parts`:
      ``rule``: ``"diagonal"`` (row ``i`` positive with column ``i``) or
      ``"ids"`` (where ``row_ids == col_ids``; ``[B]`` and ``[C]``, or
      ``[B, P]`` and ``[C, P]`` parts that must all agree);
      ``row_mask``, ``col_mask``: bool ``[B]`` and ``[C]``, False excludes
      that row (column) from every pair; its embedding may hold nan;
      ``precision``: None or ``"default"`` only;
      ``out_dtype``: of ``g b`` and ``g^T a`` as the kernels write them
      (float32 by default);
      ``chunk``: columns of ``D`` a program accumulates (a multiple of 64);
      ``block_other``: rows of the other side a pipeline step, 64 or 32
      (32 halves each stage's SMEM: two stages at D = 512, for a narrower
      logits MMA; which is faster is for the GPU benchmark to say);
      ``warpgroups``: 1 (``chunk`` of ``D`` a program) or 2 (two consumer
      warpgroups, half of ``D`` each: one pass over the logits; ``D <=
      512``, ``block_other=64``, no ``chunk``); None: 2 where
      ``256 < D <= 512`` with gradients, else 1;
      ``interpret``: Mosaic-GPU interpret parameters to run on any backend;
      None: compiled, unless tests set ``_INTERPRET``.

  Returns:
    A dict: ``loss`` ``[B]`` (float32 row sums of the element losses); with
    `grads` the derivatives of ``sum(loss)``: ``da`` ``[B, D]``, ``db``
    ``[C, D]``, ``dscale`` ``()`` and ``dbias`` (the shape of `bias`).

  Raises:
    ValueError: for inputs other than float16/bfloat16, a `precision`
      above DEFAULT, an unknown `rule` or missing ids, or where this jax has
      no Mosaic-GPU backend.

  Examples:
    The kernels compile for a Hopper GPU (tests run them in Mosaic-GPU
    interpret mode); what they refuse is known anywhere:

    >>> import jax.numpy as jnp
    >>> from bce_jax._tiles import pallas_mosaic
    >>> print(pallas_mosaic.refusal(jnp.float32))
    they take float16 or bfloat16 embeddings, not float32
    >>> print(pallas_mosaic.refusal(jnp.bfloat16, "highest"))
    they run 16-bit MMAs with float32 accumulation, not precision=HIGHEST
  """
  raw = parts(a, b, scale, bias, grads=grads, **options)
  out = {"loss": raw["loss"]}
  if grads:
    s = jnp.asarray(scale, jnp.float32)
    out.update(
      da=s * raw["g_b"].astype(jnp.float32),
      db=s * raw["gt_a"].astype(jnp.float32),
      dscale=jnp.sum(raw["gdot_rows"]),  # sum_ij g_ij <a_i, b_j>
      dbias=jnp.sum(raw["g_cols"]) if jnp.ndim(bias) == 0 else raw["g_cols"],
    )
  return out
