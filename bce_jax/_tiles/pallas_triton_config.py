"""Tile choices for the Pallas-Triton tile sweep (:mod:`.pallas_triton`).

A program of the row kernel holds one ``[block_rows, D]`` block of ``a``
and its ``dL/da`` accumulator (float32) while it walks over ``[block_cols,
D]`` blocks of ``b``; the column kernel mirrors it. Triton needs every
block dimension to be a power of two, so ``D`` is padded to one (zeros add
nothing to a dot product).

These defaults are chosen from the register budget, not measured: at
``D = 512`` a ``[64, 512]`` float32 accumulator is 128 KiB, 128 registers a
thread over 8 warps. Tune them on the GPU (``benchmarks/``) before trusting
them for speed.
"""

from __future__ import annotations

import dataclasses


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
  """

  block_rows: int = 64
  block_cols: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self) -> None:
    for name in ("block_rows", "block_cols"):
      value = getattr(self, name)
      if not (isinstance(value, int) and _pow2(value) and value >= 16):
        raise ValueError(f"`{name}` must be a power of two >= 16 (a Triton block); got {value!r}.")
    if not (isinstance(self.num_warps, int) and _pow2(self.num_warps)):
      raise ValueError(f"`num_warps` must be a power of two; got {self.num_warps!r}.")
    if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
      raise ValueError(f"`num_stages` must be an int >= 1; got {self.num_stages!r}.")


def padded_dim(dim: int) -> int:
  """The feature dimension padded to a power of two, at least 16 (the
  smallest contraction Triton's ``dot`` takes)."""
  return max(16, 1 << max(dim - 1, 0).bit_length())


def choose(rows: int, cols: int, dim: int) -> Config:
  """The default :class:`Config` for ``[rows, dim] x [cols, dim]``.

  Small problems take blocks no larger than they need (16 at least); wide
  features take more warps, so that the ``[block, D]`` float32 accumulator
  fits in registers.
  """
  dim_p = padded_dim(dim)

  def block(n: int) -> int:
    return min(64, max(16, 1 << max(n - 1, 0).bit_length()))

  warps = 8 if dim_p >= 256 else 4
  return Config(block_rows=block(rows), block_cols=block(cols), num_warps=warps)
