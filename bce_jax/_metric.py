"""`BinaryCrossentropyMetric`: a streaming mean of the BCE as a pytree state.

Synopsis::

  metric = bce_jax.BinaryCrossentropyMetric(from_logits=True)
  state = metric.init()
  for y, logits in batches:                     # or a lax.scan carry
    state = metric.update(state, y, logits)
  value = metric.result(state)
  state = metric.merge(state_a, state_b)        # == psum of states

The state holds the weighted sum of per-sample losses and the total weight
(the "count"), each as an unevaluated float32 sum ``hi + lo``: every addition
keeps its rounding error in ``lo`` (Neumaier's two-sum), so the result stays
accurate over billions of samples where a plain float32 accumulator stalls
once its total passes 2**24 times the increment's ulp.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bce_jax import _checks
from bce_jax._functional import masked_mean_losses
from bce_jax._loss import config_from_mapping, config_to_json, weighted_losses

_STATE_DTYPE = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MetricState:
  """The state of a :class:`BinaryCrossentropyMetric`: four float32 scalars.

  Attributes:
    total: the weighted sum of per-sample losses (leading part).
    total_err: the rounding error of `total` (trailing part).
    count: the sum of sample weights (the number of samples if unweighted).
    count_err: the rounding error of `count`.

  A plain pytree of arrays: a ``lax.scan`` carry, batched under ``vmap``,
  and summed across devices with ``jax.lax.psum``.
  """

  total: jax.Array
  total_err: jax.Array
  count: jax.Array
  count_err: jax.Array


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
  hi = x.astype(_STATE_DTYPE)
  lo = (x - hi.astype(x.dtype)).astype(_STATE_DTYPE)
  return hi, lo


def _check_state(state: Any, argname: str = "state") -> MetricState:
  if not isinstance(state, MetricState):
    raise TypeError(
        f"`{argname}` must be a bce_jax.MetricState (from metric.init()); got "
        f"{type(state).__name__}."
    )
  for field in dataclasses.fields(MetricState):
    value = getattr(state, field.name)
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape != () or dtype != _STATE_DTYPE:
      raise ValueError(
          f"`{argname}.{field.name}` must be a float32 scalar; got shape {shape} and "
          f"dtype {dtype}. Under vmap, map over states built by init()/update()."
      )
  return state


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BinaryCrossentropyMetric:
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

  Examples:
    >>> import jax.numpy as jnp, bce_jax
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
  """

  from_logits: bool = False
  label_smoothing: float = 0.0
  name: str = "binary_crossentropy"
  _: dataclasses.KW_ONLY
  axis: int | tuple[int, ...] = -1
  pos_weight: float | tuple[float, ...] | None = None

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    set_("from_logits", _checks.check_bool("from_logits", self.from_logits))
    set_("label_smoothing", _checks.static_label_smoothing(self.label_smoothing))
    set_("axis", _checks.check_static_axis(self.axis))
    if not isinstance(self.name, str):
      raise TypeError(f"`name` must be a str; got {self.name!r}.")
    set_("pos_weight", _checks.check_static_pos_weight(self.pos_weight))

  def init(self) -> MetricState:
    """An empty state; its result is 0.0."""
    zero = jnp.zeros((), _STATE_DTYPE)
    return MetricState(zero, zero, zero, zero)

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
        per-sample losses, as for the loss.
      mask: optional bool array; masked entries add neither loss nor weight.

    Returns:
      The new state.
    """
    state = _check_state(state)
    per_sample, mask = masked_mean_losses(
        y_true,
        y_pred,
        mask,
        from_logits=self.from_logits,
        label_smoothing=self.label_smoothing,
        axis=self.axis,
        pos_weight=self.pos_weight,
    )
    values, weights, _ = weighted_losses(per_sample, sample_weight, mask)
    # Keras averages over the axes after the batch axis, so each sample
    # counts once; the factor cancels in the result but sets the count.
    if per_sample.ndim == 0:
      per_row, batch = 1, 1
    else:
      per_row, batch = max(_checks.prod(per_sample.shape[1:]), 1), per_sample.shape[0]
    batch_total = jnp.sum(values) / per_row
    if weights is None:
      batch_count = jnp.asarray(batch, per_sample.dtype)
    else:
      batch_count = jnp.sum(weights) / per_row
    total, total_err = _add(state.total, state.total_err, *_split(batch_total))
    count, count_err = _add(state.count, state.count_err, *_split(batch_count))
    return MetricState(total, total_err, count, count_err)

  def merge(self, state: MetricState, *others: MetricState) -> MetricState:
    """Combines states, as if one state had seen all their batches.

    Associative and commutative. ``jax.lax.psum`` of the states across
    devices gives the same result up to float32 rounding of the leading parts.
    """
    merged = _check_state(state)
    if not others:
      raise TypeError("merge() needs at least one state besides `state`.")
    for i, other in enumerate(others):
      other = _check_state(other, f"others[{i}]")
      total, total_err = _add(merged.total, merged.total_err, other.total, other.total_err)
      count, count_err = _add(merged.count, merged.count_err, other.count, other.count_err)
      merged = MetricState(total, total_err, count, count_err)
    return merged

  def result(self, state: MetricState) -> jax.Array:
    """The weighted mean loss so far: a float32 scalar, 0.0 for an empty state."""
    state = _check_state(state)
    total = state.total + state.total_err
    count = state.count + state.count_err
    empty = count == 0
    return jnp.where(empty, 0.0, total / jnp.where(empty, 1.0, count))

  def get_config(self) -> dict[str, Any]:
    """The configuration as a JSON-serialisable dict."""
    return config_to_json(self)

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> BinaryCrossentropyMetric:
    """Builds a metric from `get_config()` output or a Keras metric config."""
    return cls(**config_from_mapping(cls, config))
