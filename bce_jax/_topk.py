"""Top-k labels without the ``[B, C]`` scores, and streaming precision@k / nDCG@k.

Synopsis::

  scores, ids = bce_jax.top_k_labels(h, w, 5, bias=bias)   # [B, 5], best first
  metric = bce_jax.TopKMetric(ks=(1, 3, 5))
  state = metric.init()
  for h, positives in batches:                              # or a lax.scan carry
    state = metric.update(state, top_k_labels(h, w, 5)[1], positives)
  metric.result(state)   # {"precision@1": .., "ndcg@1": .., ..., "ndcg@5": ..}

The state holds, for each k, the sums of the rows' precision@k and nDCG@k
and the number of rows, each as a float32 pair ``hi + lo`` with compensated
additions (as :class:`bce_jax.MetricState`), so that it stays exact over
billions of rows; ``psum`` of states across devices equals ``merge``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bce_jax import _linear, _state, _validate
from bce_jax._config import Config
from bce_jax._metric import _add, _split, _tag
from bce_jax._tiles import checks, xla

_STATE_DTYPE = jnp.float32


def top_k_labels(
  h: ArrayLike,
  w: ArrayLike,
  k: int,
  *,
  bias: ArrayLike | None = None,
  block_size: int | None = None,
  axis_name: Hashable | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The `k` highest-scoring labels of each row, without the ``[B, C]`` scores.

  Scores ``<h_b, w_c> + bias_c`` are computed tile by tile; a running
  ``[B, k]`` top-k is merged with each tile's, and across label shards.

  Every id returned is a real label id in ``[0, C)``, whatever the scores:
  -inf is a score like any other, so a row with fewer than `k` finite
  scores (or none) is filled with its -inf labels. Higher scores come first;
  equal scores go to the lower label id, and -0.0 equals 0.0. A nan score
  ranks as -inf (after every number, tied with -inf by label id) and is
  returned as nan, so ``jnp.isnan(scores).any()`` finds it. This is the
  order of a stable NumPy argsort of ``-where(isnan(s), -inf, s)``.

  Args:
    h: features ``[B, D]``, any float dtype.
    w: label embeddings ``[C, D]`` (this device's shard with `axis_name`).
    k: how many labels per row, ``1 <= k <= C`` (C over all shards).
    bias: optional ``[C]`` label biases (this device's shard).
    block_size: labels per tile; None chooses per platform, as
      :func:`bce_jax.linear_binary_crossentropy` does.
    axis_name: inside ``jax.shard_map``, the mesh axis the labels are
      sharded over (device ``i`` holds ids ``i*C/n .. (i+1)*C/n - 1``);
      every device returns the global top-k.

  Returns:
    ``(scores, ids)``: float32 ``[B, k]`` scores and int32 ``[B, k]``
    global label ids, best first.

  Raises:
    ValueError: for shapes that do not fit, or `k` outside ``[1, C]``.
    TypeError: for a non-int `k`, or non-float `h`, `w`, `bias`.

  Examples:
    >>> import jax.numpy as jnp, bce_jax
    >>> h = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    >>> scores, ids = bce_jax.top_k_labels(h, w, 2)
    >>> print(ids.tolist(), scores.round(2).tolist())
    [[0, 1], [1, 0]] [[2.0, 0.0], [2.0, 0.0]]
  """
  h, w, bias = _linear.check_features(h, w, bias)
  block_size = checks.check_block_size(block_size, "labels")
  axis_name = checks.check_axis_name(axis_name)
  devices = checks.axis_size(axis_name, "label space")
  labels = w.shape[0] * devices
  if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
    raise TypeError(f"`k` must be an int (labels per row); got {k!r}.")
  if not 1 <= k <= labels:
    raise ValueError(f"`k` must be in [1, C] = [1, {labels}] (the number of labels); got {k}.")
  k = int(k)
  offset = jnp.zeros((), jnp.int32)
  if axis_name is not None:
    offset = (jax.lax.axis_index(axis_name) * w.shape[0]).astype(jnp.int32)

  def run(block, h, w, bias, offset):
    return xla.top_k(h, w, bias, k, block=block, col_offset=offset)

  if block_size is not None:
    scores, ids = run(block_size, h, w, bias, offset)
  else:
    scores, ids = xla.at_default_block(run, h.shape[0], h, w, bias, offset)
  if axis_name is not None and devices > 1:
    # Every shard's top-k, shard 0 first (lower ids win ties), then the best k.
    all_scores = jax.lax.all_gather(scores, axis_name, axis=1, tiled=True)
    all_ids = jax.lax.all_gather(ids, axis_name, axis=1, tiled=True)
    scores, where = xla.best_k(all_scores, k)
    ids = jnp.take_along_axis(all_ids, where, axis=1)
    # Equal on every device; device 0's copy, summed over the axis, is typed
    # as replicated (and differentiable, unlike a max).
    first = jax.lax.axis_index(axis_name) == 0
    scores = jax.lax.psum(jnp.where(first, scores, jnp.zeros((), scores.dtype)), axis_name)
    ids = jax.lax.psum(jnp.where(first, ids, 0), axis_name)
  return scores.astype(jnp.float32), ids


@dataclasses.dataclass(frozen=True)
class TopKState:
  """The state of a :class:`TopKMetric`: float32 sums, each with its rounding error.

  Attributes:
    precision, precision_err: ``[len(ks)]``, the sum of the rows' precision@k.
    ndcg, ndcg_err: ``[len(ks)]``, the sum of the rows' nDCG@k.
    count, count_err: scalars, the number of rows.
    metric: the metric and configuration that made the state, as a string
      (static: part of the tree structure, not a leaf), as in
      :class:`bce_jax.MetricState`. A metric refuses a state that another
      metric or configuration (other `ks`) made, also under ``jax.jit``.

  A pytree of six arrays: a ``lax.scan`` carry, batched under ``vmap``,
  summed across devices with ``jax.lax.psum``, donated, pickled, and saved
  with ``flax.serialization`` as a :class:`bce_jax.MetricState` is.
  """

  precision: jax.Array
  precision_err: jax.Array
  ndcg: jax.Array
  ndcg_err: jax.Array
  count: jax.Array
  count_err: jax.Array
  _: dataclasses.KW_ONLY
  metric: str | None = None

  def __post_init__(self) -> None:
    _state._flax_registration(TopKState)


_DATA_FIELDS = ("precision", "precision_err", "ndcg", "ndcg_err", "count", "count_err")
jax.tree_util.register_dataclass(TopKState, data_fields=list(_DATA_FIELDS), meta_fields=["metric"])


def _check_ks(ks: Any) -> tuple[int, ...]:
  ks = (ks,) if isinstance(ks, numbers.Integral) and not isinstance(ks, bool) else ks
  try:
    ks = tuple(ks)
  except TypeError:
    raise TypeError(f"`ks` must be an int or a sequence of ints >= 1; got {ks!r}.") from None
  if any(isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) for k in ks):
    raise TypeError(f"`ks` must be an int or a sequence of ints >= 1; got {ks!r}.")
  if not ks or min(ks) < 1:
    raise ValueError(f"`ks` must be a non-empty sequence of ints >= 1; got {ks!r}.")
  return tuple(int(k) for k in ks)


def _discounts(n: int) -> np.ndarray:
  """``1 / log2(r + 2)`` for ranks ``r = 0 .. n-1``."""
  return 1.0 / np.log2(np.arange(n) + 2.0)


@functools.partial(jax.jit, static_argnums=(0,))
def _row_scores(ks: tuple[int, ...], ids, positives, mask):
  """Per-row sums of precision@k and nDCG@k for every k, and the row count."""
  valid = positives >= 0
  # A repeated positive id counts once: only its first occurrence is kept.
  earlier = jnp.tril(jnp.ones((positives.shape[1],) * 2, jnp.bool_), -1)
  repeat = jnp.any((positives[:, :, None] == positives[:, None, :]) & earlier, axis=2)
  distinct = valid & ~repeat
  n_pos = jnp.sum(distinct, axis=1)
  hits = jnp.any((ids[:, :, None] == positives[:, None, :]) & distinct[:, None, :], axis=2)
  hits = hits.astype(jnp.float32)
  disc = jnp.asarray(_discounts(max(ks)), jnp.float32)
  ideal = jnp.cumsum(disc)  # IDCG with n positives: ideal[n - 1]
  include = jnp.ones(ids.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
  prec, ndcg = [], []
  for k in ks:
    prec.append(jnp.sum(include * jnp.sum(hits[:, :k], axis=1)) / k)
    dcg = jnp.sum(hits[:, :k] * disc[:k], axis=1)
    best = jnp.where(n_pos > 0, ideal[jnp.clip(jnp.minimum(n_pos, k) - 1, 0)], 1.0)
    ndcg.append(jnp.sum(include * jnp.where(n_pos > 0, dcg / best, 0.0)))
  return jnp.stack(prec), jnp.stack(ndcg), jnp.sum(include)


def _merge_two(a: TopKState, b: TopKState) -> TopKState:
  return TopKState(
    *_add(a.precision, a.precision_err, b.precision, b.precision_err),
    *_add(a.ndcg, a.ndcg_err, b.ndcg, b.ndcg_err),
    *_add(a.count, a.count_err, b.count, b.count_err),
    metric=a.metric,
  )


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TopKMetric(Config):
  """Streaming precision@k and nDCG@k of ranked label ids, for each k in `ks`.

  ``precision@k`` is the number of a row's top-k labels that are positive,
  over k; ``nDCG@k`` is ``sum_r hit_r / log2(r + 2)`` over the top k ranks,
  over its best possible value with the row's positives (0 for a row with
  no positives). Both are averaged over the rows (the XMC convention).

  A frozen, hashable configuration; the data lives in a :class:`TopKState`
  pytree. ``init / update / merge / reduce / result`` are pure and jittable;
  the state works as a ``lax.scan`` carry and ``jax.lax.psum`` of states
  across devices equals ``merge``. ``result`` of an empty state is 0.

  Args:
    ks: the cut-offs, e.g. ``(1, 3, 5)``.
    name: a name, for configs and logging.

  Examples:
    >>> import jax.numpy as jnp, bce_jax
    >>> m = bce_jax.TopKMetric(ks=(1, 2))
    >>> ids = jnp.array([[3, 1], [0, 2]])            # ranked, best first
    >>> positives = jnp.array([[1, -1], [0, 2]])
    >>> r = m.result(m.update(m.init(), ids, positives))
    >>> print({k: round(float(v), 4) for k, v in r.items()})
    {'precision@1': 0.5, 'ndcg@1': 0.5, 'precision@2': 0.75, 'ndcg@2': 0.8155}
  """

  ks: tuple[int, ...] = (1, 3, 5)
  name: str = "top_k"

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "ks", _check_ks(self.ks))

  def init(self) -> TopKState:
    """An empty state; its results are 0. No two leaves share a buffer."""
    n = len(self.ks)
    z = lambda *shape: jnp.zeros(shape, _STATE_DTYPE)
    return TopKState(z(n), z(n), z(n), z(n), z(), z(), metric=_tag(self))

  def _check_state(self, state: Any, argname: str = "state", stacked: bool = False) -> TopKState:
    if not isinstance(state, TopKState):
      msg = f"got {type(state).__name__}."
      raise TypeError(f"`{argname}` must be a bce_jax.TopKState (from metric.init()); {msg}")
    lead = (getattr(state.count, "shape", (None,))[:1]) if stacked else ()
    want = {"count": lead, "count_err": lead}
    for name in _DATA_FIELDS:
      value = getattr(state, name)
      shape = want.get(name, (*lead, len(self.ks)))
      if getattr(value, "shape", None) != shape or getattr(value, "dtype", None) != _STATE_DTYPE:
        got = f"got shape {getattr(value, 'shape', None)} and dtype {getattr(value, 'dtype', None)}"
        what = f"float32 of shape {shape}" + (" (states stacked on axis 0)" if stacked else "")
        raise ValueError(f"`{argname}.{name}` must be {what} for ks={self.ks}; {got}.")
    _state.check_tag(state.metric, _tag(self), argname)
    return state

  def update(
    self, state: TopKState, ids: ArrayLike, positives: ArrayLike, mask: ArrayLike | None = None
  ) -> TopKState:
    """Returns `state` with one batch of ranked predictions added.

    Args:
      state: the state so far.
      ids: int ``[B, k]`` label ids, best first (``top_k_labels(...)[1]``),
        with ``k >= max(ks)``.
      positives: int ``[B, K]`` positive label ids, ``-1`` for padding.
      mask: optional bool ``[B]``: rows to include.

    Raises:
      TypeError: for non-integer `ids` or `positives`, a non-bool `mask`, or
        a `state` that is not a :class:`TopKState`.
      ValueError: for shapes that do not fit, or a state of other `ks`.
    """
    state = self._check_state(state)
    ids, positives = _validate.as_array("ids", ids), _validate.as_array("positives", positives)
    for name, a in (("ids", ids), ("positives", positives)):
      if not jnp.issubdtype(a.dtype, jnp.integer):
        raise TypeError(f"`{name}` must be an integer array of label ids; got dtype {a.dtype}.")
      if a.ndim != 2:
        raise ValueError(f"`{name}` must have shape [batch, n]; got shape {a.shape}.")
    if ids.shape[1] < max(self.ks):
      msg = f"ranked labels for the largest k in ks={self.ks}; got shape {ids.shape}."
      raise ValueError(f"`ids` must have at least {max(self.ks)} columns of {msg}")
    if positives.shape[0] != ids.shape[0]:
      msg = f"got ids {ids.shape} and positives {positives.shape}."
      raise ValueError(f"`ids` and `positives` must have the same number of rows; {msg}")
    mask = _linear.check_row_mask(mask, ids.shape[0])
    prec, ndcg, count = _row_scores(self.ks, ids, positives, mask)
    batch = TopKState(*_split(prec), *_split(ndcg), *_split(count))
    return _merge_two(state, batch)

  def merge(self, state: TopKState, *others: TopKState) -> TopKState:
    """Combines states, as if one state had seen all their batches."""
    merged = self._check_state(state)
    if not others:
      raise TypeError("merge() needs at least one state besides `state`.")
    for i, other in enumerate(others):
      merged = _merge_two(merged, self._check_state(other, f"others[{i}]"))
    return merged

  def reduce(self, states: TopKState) -> TopKState:
    """Folds states stacked on a leading axis (vmap, scan, all-gather) into one."""
    states = self._check_state(states, "states", stacked=True)
    return jax.lax.scan(lambda acc, s: (_merge_two(acc, s), None), self.init(), states)[0]

  def result(self, state: TopKState) -> dict[str, jax.Array]:
    """``{"precision@k": .., "ndcg@k": ..}`` for each k: float32 scalars (0 when empty)."""
    state = self._check_state(state)
    count = state.count + state.count_err
    safe = jnp.where(count == 0, 1.0, count)
    prec = jnp.where(count == 0, 0.0, (state.precision + state.precision_err) / safe)
    ndcg = jnp.where(count == 0, 0.0, (state.ndcg + state.ndcg_err) / safe)
    out = {}
    for i, k in enumerate(self.ks):
      out[f"precision@{k}"], out[f"ndcg@{k}"] = prec[i], ndcg[i]
    return out
