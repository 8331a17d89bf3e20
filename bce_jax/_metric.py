"""`BinaryCrossentropyMetric`: a streaming mean of the BCE as a pytree state.

Synopsis::

  metric = bce_jax.BinaryCrossentropyMetric(from_logits=True)
  state = metric.init()
  for y, logits in batches:                     # or a lax.scan carry
    state = metric.update(state, y, logits)
  value = metric.result(state)
  state = metric.merge(state_a, state_b)        # == psum of states
  state = metric.reduce(stacked_states)         # states stacked on axis 0

The state holds the weighted sum of per-sample losses and the total weight
(the "count"), each as an unevaluated float32 sum ``hi + lo``, packed in one
float32 array ``(total, total_err, count, count_err)``: every addition
keeps its rounding error in ``lo`` (Neumaier's two-sum), so the result stays
accurate over billions of samples where a plain float32 accumulator stalls
once its total passes 2**24 times the increment's ulp.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bce_jax import _bce, _eager, _focal, _reduce, _state
from bce_jax._config import Config
from bce_jax._state import MetricState


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``s, e`` with ``s = fl(a + b)`` and ``a + b == s + e`` exactly."""
  s = a + b
  b_virtual = s - a
  a_virtual = s - b_virtual
  return s, (a - a_virtual) + (b - b_virtual)


def _add(hi: jax.Array, lo: jax.Array, x_hi: jax.Array, x_lo: jax.Array):
  """Adds the double-float ``x_hi + x_lo`` to ``hi + lo``, renormalized."""
  s, err = _two_sum(hi, x_hi)
  return _two_sum(s, lo + x_lo + err)


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A float32/float64 scalar as a float32 pair ``hi + lo``."""
  hi = x.astype(_state.STATE_DTYPE)
  lo = (x - hi.astype(x.dtype)).astype(_state.STATE_DTYPE)
  return hi, lo


class Metric(Config):
  """Base of the metric objects: a streaming weighted mean of a formula's losses."""

  axis: int | tuple[int, ...]
  label_smoothing: float

  def formula(self) -> _reduce.Formula:
    raise NotImplementedError

  def init(self) -> MetricState:
    """An empty state; its result is 0.0. Its one array is fresh (donatable)."""
    return _init(_tag(self))

  def update(
    self,
    state: MetricState,
    y_true: ArrayLike,
    y_pred: ArrayLike,
    sample_weight: ArrayLike | None = None,
    mask: ArrayLike | None = None,
  ) -> MetricState:
    """Returns `state` with one batch added.

    Args:
      state: the state so far.
      y_true: labels, shape `[batch, d0, .., dN]`.
      y_pred: probabilities or logits, same shape.
      sample_weight: a scalar, `[batch]`, or a shape broadcastable to the
        per-sample losses, as for the loss. A scalar weights every sample.
      mask: optional bool array; masked entries add neither loss nor weight,
        and contribute nothing to any derivative.

    Returns:
      The new state. An empty batch adds nothing.
    """
    tag = _tag(self)
    if _state.eager_state(state, tag, _eager.CONCRETE):
      # The state's array is checked where the inputs are: as the call is traced.
      # The class and the tag (its configuration) key the eager callable: a str
      # hashes once, the metric's fields would be hashed on every call.
      checked = (_checked_update, tag)
      head = (type(self), tag)
      eager = _eager.eager(head, self.call_config, checked, y_true, y_pred, sample_weight, mask)
      if eager is not None:
        sums = eager.call(state.sums, y_true, y_pred, eager.pos_weight, sample_weight, mask)
        return _state.from_sums(sums, tag)
    state = _state.check_state(state, tag)
    formula, layout, arrays = _reduce.prepare_object_call(self, y_true, y_pred, sample_weight, mask)
    _eager.note_concrete(y_true, y_pred, sample_weight, mask)
    sums = _update(formula, layout, state.sums, *arrays)
    return _state.from_sums(sums, tag)

  def merge(self, state: MetricState, *others: MetricState) -> MetricState:
    """Combines states, as if one state had seen all their batches.

    Associative and commutative. Summing the states across devices with
    ``jax.lax.psum`` adds the same numbers in another order: equal up to
    float32 rounding of the leading parts (equal in every test we run).

    Every method takes only states made by a metric of this class and
    configuration (the `name` aside): another metric's state, or one with
    another `gamma`, raises a ValueError, under ``jax.jit`` at trace time. A
    metric class defined outside bce_jax refuses a bce_jax metric's states
    (and they its), even where both classes have one name.
    """
    tag = _tag(self)
    concrete = _eager.CONCRETE
    if (
      others
      and _state.eager_state(state, tag, concrete)
      and all(_state.eager_state(o, tag, concrete) for o in others)
    ):
      sums = _eager.bound(_checked_merge, tag)(state.sums, *(o.sums for o in others))
      return _state.from_sums(sums, tag)
    merged = _state.check_state(state, tag)
    if not others:
      raise TypeError("merge() needs at least one state besides `state`.")
    others = tuple(_state.check_state(o, tag, f"others[{i}]") for i, o in enumerate(others))
    return _merge(merged, others)

  def reduce(self, states: MetricState) -> MetricState:
    """Folds states stacked on a leading axis into one, as a loop of merges would.

    Args:
      states: a MetricState whose `sums` is a `[K, 4]` array, K >= 1: the output
        of ``vmap``, of a ``scan`` that keeps per-step states, or of an
        all-gather across devices.

    Returns:
      One state, equal to ``merge(states[0], ..., states[K-1])``.
    """
    states = _state.check_state(states, _tag(self), "states", stacked=True)
    if states.sums.shape[0] == 0:
      raise ValueError("reduce() needs at least one stacked state; got K = 0.")
    return _reduce_stacked(states)

  def result(self, state: MetricState) -> jax.Array:
    """The weighted mean loss so far: a float32 scalar, 0.0 for an empty state."""
    tag = _tag(self)
    if _state.eager_state(state, tag, _eager.CONCRETE):
      return _eager.bound(_checked_result, tag)(state.sums)
    return _result(_state.check_state(state, tag))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BinaryCrossentropyMetric(Metric):
  """The mean binary cross-entropy over a stream, as ``keras.metrics.BinaryCrossentropy``.

  A frozen, hashable configuration with no array leaves; the data lives in a
  separate :class:`MetricState` pytree. Every method is pure and jittable.

  Args:
    from_logits: whether `y_pred` holds logits rather than probabilities.
    label_smoothing: `s` in [0, 1]; labels become ``y * (1 - s) + 0.5 * s``.
    name: a name, for configs and logging.
    axis: axis or axes averaged over to give per-sample losses (keyword).
    pos_weight: weight of the positive term (keyword), as in the loss.

  The result is the weighted mean of the per-sample losses: the sum of
  ``sample_weight * loss`` over the sum of ``sample_weight``. Per-sample
  losses with extra axes (`[batch, T]`) are averaged over those axes first,
  as Keras does, so each sample counts once. A scalar `sample_weight` weights
  every sample: a batch of B samples adds ``w * B`` to the count.

  Rank-1 inputs `[B]` are one sample with B features (Keras's rule): each
  batch then adds one sample. For one sample per element pass `[B, 1]`.

  Examples:
    >>> import jax, jax.numpy as jnp, bce_jax
    >>> m = bce_jax.BinaryCrossentropyMetric()
    >>> y_true = jnp.array([[0, 1], [0, 0]])
    >>> y_pred = jnp.array([[0.6, 0.4], [0.4, 0.6]])
    >>> state = m.update(m.init(), y_true, y_pred)
    >>> print(f"{m.result(state):.6f}")
    0.814924
    >>> state = m.update(m.init(), y_true, y_pred, sample_weight=jnp.array([1, 0]))
    >>> print(f"{m.result(state):.6f}")
    0.916291
    >>> both = m.merge(m.update(m.init(), y_true[:1], y_pred[:1]),
    ...                m.update(m.init(), y_true[1:], y_pred[1:]))
    >>> print(f"{m.result(both):.6f}")
    0.814924
    >>> stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
    ...     m.update(m.init(), y_true[:1], y_pred[:1]),
    ...     m.update(m.init(), y_true[1:], y_pred[1:]))
    >>> print(f"{m.result(m.reduce(stacked)):.6f}")
    0.814924

  References:
    Keras 3, ``keras.metrics.BinaryCrossentropy``; A. Neumaier, "Rundungsfehleranalyse
    einiger Verfahren zur Summation endlicher Summen", ZAMM 54 (1974), for the
    compensated sums.
  """

  from_logits: bool = False
  label_smoothing: float = 0.0
  name: str = "binary_crossentropy"
  _: dataclasses.KW_ONLY
  axis: int | tuple[int, ...] = -1
  pos_weight: float | tuple[float, ...] | None = None

  def formula(self) -> _reduce.Formula:
    return _bce.formula(self.from_logits)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BinaryFocalCrossentropyMetric(Metric):
  """The mean binary focal cross-entropy over a stream (Keras has no such metric).

  The options are :class:`bce_jax.BinaryFocalCrossentropy`'s; the state,
  weights and methods are :class:`BinaryCrossentropyMetric`'s.
  """

  apply_class_balancing: bool = False
  alpha: float = 0.25
  gamma: float = 2.0
  from_logits: bool = False
  label_smoothing: float = 0.0
  name: str = "binary_focal_crossentropy"
  _: dataclasses.KW_ONLY
  axis: int | tuple[int, ...] = -1
  pos_weight: float | tuple[float, ...] | None = None

  def formula(self) -> _reduce.Formula:
    return _focal.formula(self.from_logits, self.apply_class_balancing, self.alpha, self.gamma)

  _ELEMENTWISE: ClassVar[str] = _focal.ELEMENTWISE


def _tag(metric: Config) -> str:
  """What a state records of the metric that made it: its class and configuration.

  A class defined in bce_jax is named bare, one defined elsewhere with its
  module (see :func:`bce_jax._state.make_tag`). The name is left out: it
  labels a metric in logs and does not change what it measures. Equal
  configurations of a class give equal tags, so with the class the tag also
  keys a metric's eager callables. It is kept on the (frozen) metric once
  made: an eager update reads it without hashing the metric. It is a slot
  of :class:`Config`, not a field: equality, hashing, configs, ``vars()``,
  pickles and copies ignore it (a copy makes it again).
  """
  try:
    return metric._state_tag
  except AttributeError:
    pass
  fields = dataclasses.fields(metric)  # type: ignore[arg-type]
  config = ", ".join(f"{f.name}={getattr(metric, f.name)!r}" for f in fields if f.name != "name")
  tag = _state.make_tag(type(metric), config)
  object.__setattr__(metric, "_state_tag", tag)
  return tag


def _init(tag: str | None) -> MetricState:
  return MetricState(jnp.zeros((len(_state.SUMS),), _state.STATE_DTYPE), metric=tag)


def _packed(total, total_err, count, count_err) -> jax.Array:
  """The four sums as one `sums` array, on a new last axis.

  Concatenated rather than stacked: under ``vmap`` over a batch axis
  sharded on an Explicit mesh, a batch's total is batched (and sharded)
  while an unweighted count is not, and jax 0.10's stack gives the
  broadcast count no sharding and refuses the mix; concatenate shards it
  as the batched operand.
  """
  return jnp.concatenate([part[..., None] for part in (total, total_err, count, count_err)], -1)


def _update_value(formula, layout, sums, *arrays):
  # The state's one array in and out, not the pytree: an eager call
  # dispatches faster with plain arguments.
  batch_total, batch_count = _reduce.batch_sums(formula, layout, *arrays)
  # The batch as a state of its own, merged in.
  return _merge_sums(sums, _packed(*_split(batch_total), *_split(batch_count)))


_update = jax.jit(_update_value, static_argnums=(0, 1))


def _checked_update(formula, label_smoothing, axis, axis_types, elementwise, tag, sums, *arrays):
  # An eager update, checked as it is traced (see bce_jax._eager): the
  # state first, then the inputs, as a traced update checks them.
  del axis_types
  _state.check_state(MetricState(sums, metric=tag), tag)
  layout, arrays = _reduce.checked_call(label_smoothing, axis, elementwise, *arrays)
  return _update_value(formula, layout, sums, *arrays)


def _merge_sums(a: jax.Array, b: jax.Array) -> jax.Array:
  """Two states' `sums` (any equal leading axes) added as double-float sums."""
  total, total_err = _add(a[..., 0], a[..., 1], b[..., 0], b[..., 1])
  count, count_err = _add(a[..., 2], a[..., 3], b[..., 2], b[..., 3])
  return _packed(total, total_err, count, count_err)


@jax.jit
def _merge(state: MetricState, others: tuple[MetricState, ...]) -> MetricState:
  sums = state.sums
  for other in others:
    sums = _merge_sums(sums, other.sums)
  return MetricState(sums, metric=state.metric)


def _checked_merge(tag: str, *sums) -> jax.Array:
  # An eager merge of concrete states: their arrays are checked as it is traced.
  states = [MetricState(s, metric=tag) for s in sums]
  state = _state.check_state(states[0], tag)
  others = tuple(_state.check_state(o, tag, f"others[{i}]") for i, o in enumerate(states[1:]))
  return _merge(state, others).sums


def _unsharded(leaf: jax.Array) -> jax.Array:
  """`leaf` replicated if its type says it is sharded (explicit mesh axes).

  A scan over a stack sharded on its leading axis is refused; the stack is
  K states of four float32 sums, so gathering it costs nothing.
  """
  sharding = getattr(jax.typeof(leaf), "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return leaf
  if any(part is not None for part in sharding.spec):
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.sharding.reshard(leaf, replicated)
  return leaf


@jax.jit
def _reduce_stacked(states: MetricState) -> MetricState:
  # From an empty state, merge by merge: merging into zeros is exact.
  stacked = _unsharded(states.sums)
  init = _init(states.metric).sums
  sums = jax.lax.scan(lambda acc, s: (_merge_sums(acc, s), None), init, stacked)[0]
  return MetricState(sums, metric=states.metric)


def _checked_result(tag: str, sums) -> jax.Array:
  # An eager result of a concrete state: its array is checked as it is traced.
  return _result(_state.check_state(MetricState(sums, metric=tag), tag))


@jax.jit
def _result(state: MetricState) -> jax.Array:
  total = state.total + state.total_err
  count = state.count + state.count_err
  empty = count == 0
  return jnp.where(empty, 0.0, total / jnp.where(empty, 1.0, count))
