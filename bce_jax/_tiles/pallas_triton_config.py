"""Tile choices for the Pallas-Triton tile sweep (:mod:`.pallas_triton`).

A program of the row kernel holds one ``[block_rows, D]`` block of ``a``
and its ``dL/da`` accumulator (float32) while it walks over ``[block_cols,
D]`` blocks of ``b``; the column kernel mirrors it. Triton needs every
block dimension to be a power of two, so ``D`` is padded to one (zeros add
nothing to a dot product).

The row kernel's programs are row blocks x ``col_chunks`` chunks of the
column blocks. A big batch fills the GPU with row blocks alone (one chunk:
the sums are those of one walk over all columns); a small batch against a
huge label set (extreme classification: B = 1024 is 16 row blocks, for a
GPU of 132 SMs) is split into chunks until about :data:`PROGRAMS` programs
run, each chunk writing its own float32 partial ``[B, D]`` sum of ``dL/da``
(at most :data:`PARTIALS_BYTES` for all chunks together) that the wrapper
adds.

These defaults are chosen from the register budget, not measured: at
``D = 512`` a ``[64, 512]`` float32 accumulator is 128 KiB, 128 registers a
thread over 8 warps. Tune them on the GPU (``benchmarks/``) before trusting
them for speed.
"""

from __future__ import annotations

import dataclasses

PROGRAMS = 264  # two programs per SM of an H100/H200 (132 SMs)
FILLED = 128  # row blocks from which one chunk is enough
MIN_BLOCKS_PER_CHUNK = 4  # column blocks a chunk walks at least
PARTIALS_BYTES = 64 << 20  # all chunks' float32 partial dL/da together


def _pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class Config:
  """Block sizes and launch options of one sweep.

  Attributes:
    block_rows: rows of ``a`` per tile (a power of two, >= 16).
    block_cols: rows of ``b`` (columns of the logits) per tile (a power of
      two, >= 16).
    num_warps: warps per program (a power of two).
    num_stages: software-pipelining stages Triton uses for the tile loop.
    col_chunks: chunks of column blocks the row kernel splits its walk
      into (>= 1), each a program per row block.
  """

  block_rows: int = 64
  block_cols: int = 64
  num_warps: int = 4
  num_stages: int = 2
  col_chunks: int = 1

  def __post_init__(self) -> None:
    for name in ("block_rows", "block_cols"):
      value = getattr(self, name)
      if not (isinstance(value, int) and _pow2(value) and value >= 16):
        raise ValueError(f"`{name}` must be a power of two >= 16 (a Triton block); got {value!r}.")
    if not (isinstance(self.num_warps, int) and _pow2(self.num_warps)):
      raise ValueError(f"`num_warps` must be a power of two; got {self.num_warps!r}.")
    if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
      raise ValueError(f"`num_stages` must be an int >= 1; got {self.num_stages!r}.")
    if not (isinstance(self.col_chunks, int) and self.col_chunks >= 1):
      raise ValueError(f"`col_chunks` must be an int >= 1; got {self.col_chunks!r}.")


def padded_dim(dim: int) -> int:
  """The feature dimension padded to a power of two, at least 16 (the
  smallest contraction Triton's ``dot`` takes)."""
  return max(16, 1 << max(dim - 1, 0).bit_length())


def choose(rows: int, cols: int, dim: int) -> Config:
  """The default :class:`Config` for ``[rows, dim] x [cols, dim]``.

  Small problems take blocks no larger than they need (16 at least); wide
  features take more warps, so that the ``[block, D]`` float32 accumulator
  fits in registers; few row blocks take column chunks (see
  :func:`col_chunks`).
  """
  dim_p = padded_dim(dim)

  def block(n: int) -> int:
    return min(64, max(16, 1 << max(n - 1, 0).bit_length()))

  warps = 8 if dim_p >= 256 else 4
  bm, bn = block(rows), block(cols)
  chunks = col_chunks(-(-rows // bm) * bm, -(-cols // bn), dim_p, bm)
  return Config(block_rows=bm, block_cols=bn, num_warps=warps, col_chunks=chunks)


def col_chunks(padded_rows: int, col_blocks: int, dim_p: int, block_rows: int) -> int:
  """Chunks of the `col_blocks` column blocks for the row kernel: enough
  that row blocks x chunks reach :data:`PROGRAMS`, each chunk at least
  :data:`MIN_BLOCKS_PER_CHUNK` blocks, and the chunks' float32 partial sums
  of ``dL/da`` (``padded_rows x dim_p`` each) within :data:`PARTIALS_BYTES`.

  >>> col_chunks(1024, 46875, 512, 64), col_chunks(65536, 1024, 512, 64)
  (17, 1)
  """
  row_blocks = padded_rows // block_rows
  if row_blocks >= FILLED:
    return 1
  wanted = -(-PROGRAMS // row_blocks)
  fits = PARTIALS_BYTES // (4 * padded_rows * dim_p)
  return max(1, min(wanted, col_blocks // MIN_BLOCKS_PER_CHUNK, fits))
