"""The Mosaic-GPU kernel body of the tile sweep, without its wrapper.

One body serves both kernels. A program owns a block of ``block_own`` rows
of one side (``own``: the rows ``a`` in the row kernel, the columns ``b`` in
the column kernel) and one ``chunk`` of ``D`` of their gradient; it walks
over every block of the other side (``other``) in a TMA pipeline. Per step:

1. ``S = own @ other^T``: one warpgroup MMA, ``own`` ``[bo, Dp]`` from SMEM
   (copied once) and ``other^T`` ``[Dp, bx]`` (a pre-transposed copy, so no
   MMA operand is transposed);
2. logits ``s * S + own_bias + other_bias`` (one of the biases is zero),
   which pairs are positive (equal ids) and which count (both ``ok``), the
   element loss and ``g = sigmoid(z) - label`` in registers (the
   :func:`elementwise` formulas);
3. ``d_own += g @ other[:, chunk]``: a second MMA, ``g`` in the inputs'
   16-bit dtype through SMEM (``[bo, bx]``, 8 KiB; Mosaic-GPU interpret mode
   takes MMA operands from SMEM only, so tests run this same path), the
   accumulator in registers.

Where interpreted (``Spec.interpreted``) two things differ, both forced by
the interpreter: register layouts are not cast (it has no rule for
``layout_cast``), and ``d_own`` adds a fresh MMA accumulator instead of
accumulating in place (it has no ``run_state``). The cross-lowering tests
cover the compiled path.

The row sums of the loss and of ``g`` (and with ``gdot`` of ``g S``, from
the float32 ``g`` and logits' dot products) stay in registers; at the end a
program writes its rows' sums (the first chunk only) and its ``[bo, chunk]``
part of ``d_own``, multiplied by its rows' ``factor`` in float32 and then
cast once to ``out_dtype``, through a small SMEM buffer. Nothing of size
``[B, C]`` leaves the chip.

Refs, in order: ``scale [No]`` (float32, ``s`` on every row),
``own_bias [No]``, ``own_ok [No]`` (int32, 0 excludes), ``own_ids`` (P
arrays ``[No]`` int32), ``own [No, Dp]``, ``other_bias [Nx]``,
``other_ok [Nx]``, ``other_ids`` (P arrays ``[Nx]``), ``other [Nx, Dp]``,
``other_t [Dp, Nx]``, ``factor [No]`` (float32, what ``d_own`` is
multiplied by); then the outputs ``loss [No]`` (with ``value``), ``g_sums
[No]``, ``gdot [No]`` (with ``gdot``) and ``d_own [No, Dp]`` (with
``grads``); then the scratch: ``own_smem [bo, Dp]``, ``g_smem [bo, bx]``,
``vec_smem [3, bo]`` (float32: scale, bias and factor, later the sums), ``int_smem [1 + P, bo]`` (int32: ok and
ids), ``out_smem [bo, 64]`` and a barrier.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # absent from some jax builds
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the installed jax
  plgpu = None  # type: ignore[assignment]

EPILOGUE = 64  # columns of d_own written per SMEM round trip


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static facts of one kernel."""

  parts: int  # P, arrays of ids per side
  own_rows: int  # padded rows of own (No)
  other_rows: int  # padded rows of other (Nx)
  dim: int  # padded D (Dp)
  block_own: int  # bo
  block_other: int  # bx
  chunk: int  # columns of d_own a program accumulates
  value: bool  # write the row sums of the loss
  grads: bool  # write the row sums of g and d_own
  gdot: bool  # with grads, also the row sums of g <own_i, other_j> (float32)
  stages: int  # TMA pipeline depth
  dtype: Any  # of own and other (16-bit)
  out_dtype: Any  # of d_own
  interpreted: bool = False  # run in Mosaic-GPU interpret mode


def elementwise(logits: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The element loss ``-log sigmoid(+-z)`` and ``g = sigmoid(z) - [pos]``.

  Built only from primitives the Mosaic-GPU lowering has (``exp``, ``log``,
  division, selects), sharing one ``exp``: with ``w = -z`` where `pos`
  else ``z`` and ``t = exp(-|w|)``, the loss is ``softplus(w) = max(w, 0) +
  log1p(t)`` and ``sigmoid(w)`` is ``1 / (1 + t)`` or ``t / (1 + t)``.
  ``log1p(t)`` is ``log(u) * t / (u - 1)`` with ``u = 1 + t`` (exact to a
  few ulps: the rounding of ``u`` cancels in the ratio), and ``t`` where
  ``u`` rounds to 1.

  Examples:
    >>> import jax.numpy as jnp
    >>> loss, g = elementwise(jnp.array([-30.0, 0.0, 2.0]), jnp.array([False, True, True]))
    >>> print([f"{v:.4g}" for v in loss], [f"{v:.4g}" for v in g])
    ['9.358e-14', '0.6931', '0.1269'] ['9.358e-14', '-0.5', '-0.1192']
  """
  w = jnp.where(pos, -logits, logits)
  t = jnp.exp(-jnp.abs(w))
  u = 1.0 + t
  ratio = t / jnp.where(u == 1.0, 1.0, u - 1.0)
  log1p = jnp.where(u == 1.0, t, jnp.log(u) * ratio)
  loss = jnp.maximum(w, 0.0) + log1p
  r = 1.0 / u
  sig = jnp.where(w >= 0.0, r, t * r)
  return loss, jnp.where(pos, -sig, sig)


def add_tile(spec: Spec, ok, loss, g, dots, sums, gdot: bool):
  """A tile's row sums added to `sums` ``(loss_sum, g_sum, gdot_sum)``: of the
  loss, of ``g`` and (with `gdot`) of ``g`` times the tile's float32 dot
  products `dots`, over the pairs `ok` keeps. Returns the new sums and ``g``
  with the other pairs zeroed (the gradient MMAs' left operand)."""
  loss_sum, g_sum, gdot_sum = sums
  if spec.value:
    loss_sum = loss_sum + jnp.sum(jnp.where(ok, loss, 0.0), axis=1)
  if spec.grads:
    g = jnp.where(ok, g, 0.0)
    g_sum = g_sum + jnp.sum(g, axis=1)
    if gdot:  # float32 g and dot products: no rounded operand
      gdot_sum = gdot_sum + jnp.sum(g * dots, axis=1)
  return (loss_sum, g_sum, gdot_sum), g


def _swizzled(minor: int, dtype: Any, at_most: int = 128) -> tuple[Any, ...]:
  """SMEM tiling and swizzle for rows of `minor` elements (`at_most` bytes)."""
  swizzle = min(plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8), at_most)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _mma_swizzled(spec: Spec, minor: int) -> tuple[Any, ...]:
  """The MMA operands' layout: one swizzle for all (an MMA's two operands
  must agree), the widest that ``block_other`` columns allow (128 bytes at
  64 16-bit values, 64 at 32)."""
  return _swizzled(minor, spec.dtype, spec.block_other * jnp.dtype(spec.dtype).itemsize)


def _vec_layout(axis: int) -> Any:
  """The layout of a per-row (axis 1 reduced) or per-column vector of a tile."""
  return plgpu.Layout.WGMMA.reduce(axis)


def _cast(spec: Spec, x: jax.Array, layout: Any) -> jax.Array:
  """`x` in register `layout` (the interpreter has no layouts, nor a rule for
  the cast)."""
  return x if spec.interpreted else plgpu.layout_cast(x, layout)


def _load(spec: Spec, ref, axis: int) -> jax.Array:
  """A vector from SMEM in the layout of a tile's rows (axis 1) or columns (0)."""
  return _cast(spec, ref[...], _vec_layout(axis))


class Refs(NamedTuple):
  """A kernel body's references, in the order :func:`call` passes them (one
  layout for both bodies); outputs not asked for are None."""

  scale: Any
  own_bias: Any
  own_ok: Any
  own_ids: tuple[Any, ...]
  own: Any
  other_bias: Any
  other_ok: Any
  other_ids: tuple[Any, ...]
  other: Any
  other_t: Any
  factor: Any
  loss_out: Any
  gsum_out: Any
  gdot_out: Any
  down_out: Any
  scratch: tuple[Any, ...]


def unpack(refs: tuple[Any, ...], spec: Spec) -> Refs:
  """`refs` as :class:`Refs`: the inputs, the outputs `spec` asks for, then the scratch."""
  p = spec.parts
  inputs, rest = refs[: 9 + 2 * p], refs[9 + 2 * p :]
  gdot = spec.grads and spec.gdot
  n_out = int(spec.value) + 2 * int(spec.grads) + int(gdot)
  outs, scratch = list(rest[:n_out]), tuple(rest[n_out:])
  loss_out = outs.pop(0) if spec.value else None
  gsum_out = outs.pop(0) if spec.grads else None
  gdot_out = outs.pop(0) if gdot else None
  down_out = outs.pop(0) if spec.grads else None
  own_ids, other_ids = tuple(inputs[3 : 3 + p]), tuple(inputs[6 + p : 6 + 2 * p])
  scale, own_bias, own_ok, own = inputs[0], inputs[1], inputs[2], inputs[3 + p]
  other_bias, other_ok = inputs[4 + p], inputs[5 + p]
  other, other_t, factor = inputs[6 + 2 * p], inputs[7 + 2 * p], inputs[8 + 2 * p]
  return Refs(
    scale,
    own_bias,
    own_ok,
    own_ids,
    own,
    other_bias,
    other_ok,
    other_ids,
    other,
    other_t,
    factor,
    loss_out,
    gsum_out,
    gdot_out,
    down_out,
    scratch,
  )


def out_types(spec: Spec, lead: tuple[int, ...] = ()) -> list[jax.ShapeDtypeStruct]:
  """The outputs of :func:`unpack`'s order: float32 row sums (each with the
  `lead` axes, one per consumer) and ``d_own`` in ``spec.out_dtype``."""
  row = jax.ShapeDtypeStruct((*lead, spec.own_rows), jnp.float32)
  outs = [row] if spec.value else []
  if spec.grads:
    outs += [row, row] if spec.gdot else [row]
    outs.append(jax.ShapeDtypeStruct((spec.own_rows, spec.dim), spec.out_dtype))
  return outs


def body(*refs, spec: Spec) -> None:
  p = spec.parts
  r = unpack(refs, spec)
  scale_ref, obias_ref, ook_ref, oids, own_ref = r[:5]
  xbias_ref, xok_ref, xids, other_ref, other_t_ref, factor_ref = r[5:11]
  loss_out, gsum_out, gdot_out, down_out = r.loss_out, r.gsum_out, r.gdot_out, r.down_out
  own_smem, g_smem, vec_smem, int_smem, out_smem, barrier = r.scratch
  gdot = gdot_out is not None

  bo, bx, chunk = spec.block_own, spec.block_other, spec.chunk
  i, k = lax.axis_index("own"), lax.axis_index("chunk")
  rows = pl.ds(i * bo, bo)
  plgpu.copy_gmem_to_smem(own_ref.at[rows], own_smem, barrier)
  plgpu.barrier_wait(barrier)

  def own_vec(ref, smem):  # this program's rows of a [No] vector, per row of a tile
    plgpu.copy_gmem_to_smem(ref.at[rows], smem, barrier)  # each in its own slot: no reuse
    plgpu.barrier_wait(barrier)
    return _load(spec, smem, 1)

  row_vec = lambda x: lax.broadcast_in_dim(x, (bo, bx), [0])
  col_vec = lambda x: lax.broadcast_in_dim(x, (bo, bx), [1])
  scale = row_vec(own_vec(scale_ref, vec_smem.at[0]))
  obias = row_vec(own_vec(obias_ref, vec_smem.at[1]))
  ook = row_vec(own_vec(ook_ref, int_smem.at[0])) != 0
  own_ids = [row_vec(own_vec(r, int_smem.at[1 + n])) for n, r in enumerate(oids)]

  def step(_, *refs_and_carry):
    xbias, xok, *rest = refs_and_carry
    xids, rest = rest[:p], rest[p:]
    other_chunk, (other_t, carry) = (rest[0], rest[1:]) if spec.grads else (None, rest)
    xids = [col_vec(_load(spec, r, 0)) for r in xids]

    def dots(acc_ref):
      plgpu.wgmma(acc_ref, own_smem, other_t)
      return acc_ref[...]

    s = pl.run_scoped(dots, plgpu.ACC((bo, bx), jnp.float32))
    bias = col_vec(_load(spec, xbias, 0))
    logits = scale * s + obias + bias
    ok = ook & (col_vec(_load(spec, xok, 0)) != 0)
    pos = own_ids[0] == xids[0]
    for o, x in zip(own_ids[1:], xids[1:]):
      pos = pos & (o == x)
    loss, g = elementwise(logits, pos)
    *sums, d_own = carry  # None without grads (gdot_sum: without gdot)
    (loss_sum, g_sum, gdot_sum), g = add_tile(spec, ok, loss, g, s, sums, gdot)
    if spec.grads:
      g_smem[...] = g.astype(spec.dtype)  # the MMA's left operand, from SMEM
      plgpu.commit_smem()

      def grad(acc_ref):  # returns nothing: run_state's outputs are its refs
        plgpu.wgmma(acc_ref, g_smem, other_chunk)

      if spec.interpreted:  # the interpreter has no run_state: a fresh accumulator, added
        d_own = d_own + pl.run_scoped(
          lambda r: (grad(r), r[...])[1], plgpu.ACC((bo, chunk), jnp.float32)
        )
      else:  # accumulate in the MMA's registers
        d_own = pl.run_state(grad)(plgpu.ACC.init(d_own))
    return loss_sum, g_sum, gdot_sum, d_own

  zeros = lambda shape, layout: _cast(spec, jnp.zeros(shape, jnp.float32), layout)
  init = (  # no [bo, chunk] accumulator without grads: it would take registers
    zeros((bo,), _vec_layout(1)),
    zeros((bo,), _vec_layout(1)) if spec.grads else None,
    zeros((bo,), _vec_layout(1)) if gdot else None,
    zeros((bo, chunk), plgpu.Layout.WGMMA) if spec.grads else None,
  )
  vec_spec = plgpu.BlockSpec((bx,), lambda j: (j,))
  other_spec = plgpu.BlockSpec((bx, chunk), lambda j: (j, 0), transforms=_mma_swizzled(spec, chunk))
  other_chunk = [other_ref.at[:, pl.ds(k * chunk, chunk)]] if spec.grads else []
  pipeline = plgpu.emit_pipeline(
    step,
    grid=(spec.other_rows // bx,),
    in_specs=[
      vec_spec,
      vec_spec,
      *([vec_spec] * p),
      *([other_spec] if spec.grads else []),
      plgpu.BlockSpec((spec.dim, bx), lambda j: (0, j), transforms=_mma_swizzled(spec, bx)),
    ],
    max_concurrent_steps=spec.stages,
    init_carry=init,
  )
  loss_sum, g_sum, gdot_sum, d_own = pipeline(xbias_ref, xok_ref, *xids, *other_chunk, other_t_ref)

  def write_vec(x, out):  # through slot 0, read into registers long before
    vec_smem[0] = x
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(vec_smem.at[0], out.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(k == 0)
  def _():
    if spec.value:
      write_vec(loss_sum, loss_out)
    if spec.grads:
      write_vec(g_sum, gsum_out)
    if gdot:
      write_vec(gdot_sum, gdot_out)

  if spec.grads:  # scaled in float32, then one cast to out_dtype
    d_own = d_own * lax.broadcast_in_dim(own_vec(factor_ref, vec_smem.at[2]), (bo, chunk), [0])
    for e in range(chunk // EPILOGUE):
      cols = slice(e * EPILOGUE, (e + 1) * EPILOGUE)
      out_smem[...] = d_own[:, cols].astype(spec.out_dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
        out_smem, down_out.at[rows, pl.ds(k * chunk + e * EPILOGUE, EPILOGUE)]
      )
      plgpu.wait_smem_to_gmem(0)


def call(spec: Spec, args: list[jax.Array], interpret: Any) -> list[jax.Array]:
  """Runs :func:`body` over a grid of own blocks x chunks of ``D``."""
  no = spec.own_rows
  outs = out_types(spec)
  scratch: list[Any] = [
    plgpu.SMEM((spec.block_own, spec.dim), spec.dtype, transforms=_mma_swizzled(spec, spec.dim)),
    plgpu.SMEM(
      (spec.block_own, spec.block_other),
      spec.dtype,
      transforms=_mma_swizzled(spec, spec.block_other),
    ),
    plgpu.SMEM((3, spec.block_own), jnp.float32),
    plgpu.SMEM((1 + spec.parts, spec.block_own), jnp.int32),
    plgpu.SMEM(
      (spec.block_own, EPILOGUE),
      spec.out_dtype,
      transforms=_swizzled(EPILOGUE, spec.out_dtype),
    ),
    plgpu.Barrier(num_barriers=1),
  ]
  kernel = plgpu.kernel(
    functools.partial(body, spec=spec),
    out_type=outs,
    scratch_types=scratch,
    grid=(no // spec.block_own, spec.dim // spec.chunk if spec.grads else 1),
    grid_names=("own", "chunk"),
    interpret=interpret,
  )
  return list(kernel(*args))
