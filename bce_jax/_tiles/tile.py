"""One tile of the ``[B, D] x [C, D]`` sweep: which pairs are positive, the
element losses and their derivative in the logit.

Written with plain ``jax.numpy`` on tile-sized arrays, so the same code runs
inside an XLA loop and inside a Pallas kernel body.

Positives rules (static, by name):

* ``"diagonal"``: row ``i`` is positive with column ``j`` where their global
  indices are equal (SigLIP's image-caption pairs);
* ``"ids"``: where ``row_ids[i] == col_ids[j]`` (several captions of one
  image, or any grouping of rows by an integer id);
* ``"lists"``: where column ``j``'s global index appears in row ``i``'s list
  of positive label ids (``[rows, K]``, ``-1`` for padding; a repeated id
  counts once), as in extreme multi-label classification.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bce_jax import _logsig

RULES = ("diagonal", "ids", "lists")


def positive(
  rule: str,
  shape: tuple[int, int],
  *,
  row_start=0,
  col_start=0,
  row_ids=None,
  col_ids=None,
  lists=None,
) -> jax.Array:
  """A bool ``[rows, cols]`` tile: True where the pair is positive.

  Args:
    rule: one of :data:`RULES`.
    shape: ``(rows, cols)`` of the tile.
    row_start, col_start: global index of the tile's first row and column
      (ints or int32 scalars), for ``"diagonal"`` and ``"lists"``.
    row_ids, col_ids: ``[rows]`` and ``[cols]`` integer ids, for ``"ids"``.
    lists: ``[rows, K]`` global column ids (``-1`` pads), for ``"lists"``.
  """
  if rule == "diagonal":
    rows = row_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = col_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return rows == cols
  if rule == "ids":
    return row_ids[:, None] == col_ids[None, :]
  if rule == "lists":
    cols = col_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    out = jnp.zeros(shape, jnp.bool_)
    for k in range(lists.shape[1]):  # K is small and static: K compares, no [rows, K, cols]
      out = out | (lists[:, k : k + 1] == cols)
    return out
  raise ValueError(f"unknown positives rule {rule!r}; expected one of {RULES}")


def losses(logits: jax.Array, pos: jax.Array) -> jax.Array:
  """``softplus(-z)`` where `pos`, ``softplus(z)`` elsewhere: ``-log sigmoid(+-z)``."""
  sp_pos, sp_neg = _logsig.softplus_pair(logits)  # softplus(z), softplus(-z)
  return jnp.where(pos, sp_neg, sp_pos)


def dlogits(logits: jax.Array, pos: jax.Array) -> jax.Array:
  """The derivative of :func:`losses` in the logit: ``sigmoid(z) - [pos]``."""
  sig_pos, sig_neg = _logsig.sigmoid_pair(logits)
  return jnp.where(pos, -sig_neg, sig_pos)
