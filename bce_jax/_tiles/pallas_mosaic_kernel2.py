"""The Mosaic-GPU tile sweep with two consumer warpgroups a block (``D <= 512``).

The same refs and sums as :mod:`.pallas_mosaic_kernel` (one body for the
row and the column kernel), laid out so that ``D`` up to 512 needs no second
pass over the logits. A program owns ``bo = 64`` rows of one side and all of
``D``; three warpgroups share it:

* a producer (``plgpu.emit_pipeline_warp_specialized``) streams blocks of
  ``bx = 64`` rows of the other side by TMA: ``other^T`` ``[Dp, bx]`` for the
  logits, ``other`` ``[bx, Dp]`` for the gradient, the per-column vectors;
* consumer ``w`` (0 or 1) takes columns ``w bx/2 .. (w+1) bx/2`` of the tile:
  ``S_w = own @ other^T[:, cols_w]`` (``[64, 32]``, all of ``D``: no partial
  logits to exchange), the element loss and ``g`` of its 32 columns (each
  element once: nothing duplicated), and writes its ``g`` columns into a
  shared ``[64, bx]`` SMEM tile;
* a barrier of both consumers, then consumer ``w`` does ``d_own[:, half_w]
  += g @ other[:, half_w]`` with all of the tile's ``g`` (``K = bx``) and
  its half of ``D`` (``[64, Dp/2]`` float32: 128 registers a thread at
  ``Dp = 512``, the most one warpgroup can hold beside the logits).

FLOP per kernel: ``2 B C D`` (logits) + ``2 B C D`` (gradient), ``8 B C D``
for the two kernels, against ``12 B C D`` for one warpgroup at ``D = 512``
(two chunks of ``D``, each recomputing the logits).

Ordering between the consumers: ``g`` lives in two SMEM slots by step
parity, and the one barrier a step (both arrive, both wait) is all the
ordering they need: a consumer writing slot ``j % 2`` at step ``j + 2`` has
passed step ``j + 1``'s barrier, which the other consumer reaches only after
its step-``j`` MMA (read of that slot) has completed. Each consumer releases
``other^T`` and the column vectors right after the logits (the producer
refills them during the element math and the gradient's MMA) and ``other``
after the gradient's MMA.

Row sums (loss, ``g``, with ``gdot`` ``g S``) leave as ``[2, No]`` (one
row per consumer, added by the wrapper); ``d_own``'s halves, multiplied by
the rows' ``factor`` in float32 and cast once, leave through a small
per-consumer SMEM buffer. Where
interpreted, layouts are not cast and ``d_own`` adds a fresh accumulator
(the interpreter has no ``layout_cast`` rule nor ``run_state``), as in the
one-warpgroup body.

Refs, in order: as :mod:`.pallas_mosaic_kernel`, then the outputs ``loss
[2, No]`` (with ``value``), ``g_sums [2, No]``, ``gdot [2, No]`` (with
``gdot``) and ``d_own [No, Dp]`` (with ``grads``), then the scratch:
``own_smem [bo, Dp]``, ``g_smem [2, bo, bx]``, ``vec_smem [2, 3, bo]`` (float32, per consumer), ``int_smem [2, 1 + P,
bo]``, ``out_smem [2, bo, E]`` and the barriers (own block, per-consumer
vectors, the consumers' step barrier).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from bce_jax._tiles import pallas_mosaic_kernel as _one
from bce_jax._tiles.pallas_mosaic_kernel import Spec, plgpu

CONSUMERS = 2
SWIZZLE = 64  # bytes: a consumer's 32 16-bit columns of the tile, shared by every MMA operand
OUT_BYTES = 64  # bytes a row of the d_own write-out buffer holds


def _mma_swizzled(spec: Spec, minor: int) -> tuple[Any, ...]:
  return _one._swizzled(minor, spec.dtype, SWIZZLE)


def _out_cols(spec: Spec) -> int:
  return OUT_BYTES // jnp.dtype(spec.out_dtype).itemsize


def body(*refs, spec: Spec) -> None:
  p = spec.parts
  r = _one.unpack(refs, spec)
  scale_ref, obias_ref, ook_ref, oids, own_ref = r[:5]
  xbias_ref, xok_ref, xids, other_ref, other_t_ref, factor_ref = r[5:11]
  loss_out, gsum_out, gdot_out, down_out = r.loss_out, r.gsum_out, r.gdot_out, r.down_out
  own_smem, g_smem, vec_smem, int_smem, out_smem, own_bar, vec_bar, step_bar = r.scratch
  gdot = gdot_out is not None

  bo, bx, dim = spec.block_own, spec.block_other, spec.dim
  cols, half = bx // CONSUMERS, dim // CONSUMERS
  i, wg = lax.axis_index("own"), lax.axis_index("wg")
  rows = pl.ds(i * bo, bo)
  row_vec = lambda x: lax.broadcast_in_dim(x, (bo, cols), [0])
  col_vec = lambda x: lax.broadcast_in_dim(x, (bo, cols), [1])
  mine = pl.ds(wg * cols, cols)  # this consumer's columns of the tile

  def load(ref, axis):
    return _one._load(spec, ref, axis)

  def step(indices, *refs_and_carry):
    xbias, xok, *rest = refs_and_carry
    xid_refs, rest = rest[:p], rest[p:]
    n_in = 3 + p + int(spec.grads)
    other_t, other_chunk = rest[0], (rest[1] if spec.grads else None)
    done, carry = rest[n_in - 2 - p : 2 * n_in - 2 - p], rest[-1]
    done_vecs, done_t = done[: 2 + p], done[2 + p]
    (scale, obias, ook, own_ids), (*sums, d_own) = carry

    def dots(acc_ref):
      plgpu.wgmma(acc_ref, own_smem, other_t.at[:, mine])
      return acc_ref[...]

    s = pl.run_scoped(dots, plgpu.ACC((bo, cols), jnp.float32))
    plgpu.barrier_arrive(done_t)  # the producer may refill other^T now
    bias = col_vec(load(xbias.at[mine], 0))
    ok = (row_vec(ook) != 0) & (col_vec(load(xok.at[mine], 0)) != 0)
    pos = None
    for o, r in zip(own_ids, xid_refs):
      same = row_vec(o) == col_vec(load(r.at[mine], 0))
      pos = same if pos is None else pos & same
    for barrier in done_vecs:
      plgpu.barrier_arrive(barrier)
    loss, g = _one.elementwise(row_vec(scale) * s + row_vec(obias) + bias, pos)
    (loss_sum, g_sum, gdot_sum), g = _one.add_tile(spec, ok, loss, g, s, sums, gdot)
    if spec.grads:
      slot = g_smem.at[lax.rem(indices[0], 2)]  # by step parity
      slot.at[:, mine][...] = g.astype(spec.dtype)
      plgpu.commit_smem()
      plgpu.barrier_arrive(step_bar)  # both consumers' g columns are in the slot
      plgpu.barrier_wait(step_bar)
      mine_d = other_chunk.at[:, pl.ds(wg * half, half)]

      def grad(acc_ref):
        plgpu.wgmma(acc_ref, slot, mine_d)

      if spec.interpreted:
        d_own = d_own + pl.run_scoped(
          lambda r: (grad(r), r[...])[1], plgpu.ACC((bo, half), jnp.float32)
        )
      else:
        d_own = pl.run_state(grad)(plgpu.ACC.init(d_own))
      plgpu.barrier_arrive(done[-1])  # other: released after the gradient's MMA
    return (scale, obias, ook, own_ids), (loss_sum, g_sum, gdot_sum, d_own)

  def consumer(run):
    @pl.when(wg == 0)
    def _():
      plgpu.copy_gmem_to_smem(own_ref.at[rows], own_smem, own_bar)

    def own_vec(ref, smem):  # this consumer's copy of a [No] vector's rows
      plgpu.copy_gmem_to_smem(ref.at[rows], smem, vec_bar.at[wg])
      plgpu.barrier_wait(vec_bar.at[wg])
      return load(smem, 1)

    vecs, ints = vec_smem.at[wg], int_smem.at[wg]
    fixed = (
      own_vec(scale_ref, vecs.at[0]),
      own_vec(obias_ref, vecs.at[1]),
      own_vec(ook_ref, ints.at[0]),
      [own_vec(r, ints.at[1 + n]) for n, r in enumerate(oids)],
    )
    plgpu.barrier_wait(own_bar)
    zeros = lambda shape, layout: _one._cast(spec, jnp.zeros(shape, jnp.float32), layout)
    init = (
      zeros((bo,), _one._vec_layout(1)),
      zeros((bo,), _one._vec_layout(1)) if spec.grads else None,
      zeros((bo,), _one._vec_layout(1)) if gdot else None,
      zeros((bo, half), plgpu.Layout.WGMMA) if spec.grads else None,
    )
    _, (loss_sum, g_sum, gdot_sum, d_own) = run((fixed, init))

    def write_vec(x, out):
      vecs[0] = x
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(vecs.at[0], out.at[wg, rows])
      plgpu.wait_smem_to_gmem(0)

    if spec.value:
      write_vec(loss_sum, loss_out)
    if spec.grads:
      write_vec(g_sum, gsum_out)
      if gdot:
        write_vec(gdot_sum, gdot_out)
      # scaled in float32, then one cast to out_dtype
      d_own = d_own * lax.broadcast_in_dim(own_vec(factor_ref, vecs.at[2]), (bo, half), [0])
      width, buf = _out_cols(spec), out_smem.at[wg]
      for e in range(half // width):
        buf[...] = d_own[:, e * width : (e + 1) * width].astype(spec.out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, down_out.at[rows, pl.ds(wg * half + e * width, width)])
        plgpu.wait_smem_to_gmem(0)

  vec_spec = plgpu.BlockSpec((bx,), lambda j: (j,))
  in_specs = [vec_spec, vec_spec, *([vec_spec] * p)]
  in_specs.append(plgpu.BlockSpec((dim, bx), lambda j: (0, j), transforms=_mma_swizzled(spec, bx)))
  if spec.grads:
    in_specs.append(
      plgpu.BlockSpec((bx, dim), lambda j: (j, 0), transforms=_mma_swizzled(spec, dim))
    )
  pipeline = plgpu.emit_pipeline_warp_specialized(
    step,
    grid=(spec.other_rows // bx,),
    memory_registers=40,
    in_specs=in_specs,
    max_concurrent_steps=spec.stages,
    wg_axis="wg",
    num_compute_wgs=CONSUMERS,
    manual_consumed_barriers=True,
    compute_context=consumer,
  )
  pipeline(xbias_ref, xok_ref, *xids, other_t_ref, *([other_ref] if spec.grads else []))


def call(spec: Spec, args: list[jax.Array], interpret: Any) -> list[jax.Array]:
  """Runs :func:`body` over a grid of own blocks (``spec.chunk`` is ignored:
  each consumer holds half of ``D``)."""
  no, bo, dim = spec.own_rows, spec.block_own, spec.dim
  outs = _one.out_types(spec, (CONSUMERS,))
  width = _out_cols(spec)
  scratch: list[Any] = [
    plgpu.SMEM((bo, dim), spec.dtype, transforms=_mma_swizzled(spec, dim)),
    plgpu.SMEM(
      (2, bo, spec.block_other), spec.dtype, transforms=_mma_swizzled(spec, spec.block_other)
    ),
    plgpu.SMEM((CONSUMERS, 3, bo), jnp.float32),
    plgpu.SMEM((CONSUMERS, 1 + spec.parts, bo), jnp.int32),
    plgpu.SMEM(
      (CONSUMERS, bo, width), spec.out_dtype, transforms=_one._swizzled(width, spec.out_dtype)
    ),
    plgpu.Barrier(num_barriers=1),
    plgpu.Barrier(num_barriers=CONSUMERS),
    plgpu.Barrier(num_arrivals=CONSUMERS),
  ]
  kernel = plgpu.kernel(
    functools.partial(body, spec=spec),
    out_type=outs,
    scratch_types=scratch,
    grid=(no // bo,),
    grid_names=("own",),
    num_threads=CONSUMERS + 1,
    thread_name="wg",
    interpret=interpret,
  )
  return list(kernel(*args))
