"""`BinaryCrossentropy`: the Keras-style loss object over the pure function."""

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


def weighted_losses(
    per_sample: jax.Array,
    sample_weight: ArrayLike | None,
    mask: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | int]:
  """Applies `sample_weight` and `mask` to the per-sample losses.

  `mask` comes from :func:`masked_mean_losses`: checked and in the shape
  of the losses.

  Returns:
    values: the weighted losses; masked entries are exactly 0, even where
      the loss is not finite.
    weights: the effective weights (sample weight times mask) broadcast to
      the losses' shape, or None when neither argument was given.
    valid: how many entries are unmasked (an int when there is no mask).
  """
  shape = tuple(per_sample.shape)
  weights = None
  valid: jax.Array | int = per_sample.size
  if sample_weight is not None:
    sample_weight = _checks.as_array("sample_weight", sample_weight)
    weights = _checks.weight_to_shape("sample_weight", sample_weight, shape)
    weights = weights.astype(per_sample.dtype)
    _checks.check_non_negative("sample_weight", weights)
  values = per_sample if weights is None else per_sample * weights
  if mask is not None:
    values = jnp.where(mask, values, 0)
    weights = mask.astype(per_sample.dtype) if weights is None else jnp.where(mask, weights, 0)
    valid = jnp.sum(mask, dtype=jnp.int32).astype(per_sample.dtype)
  return values, weights, valid


def _divide_or_zero(num: jax.Array, den: jax.Array | int) -> jax.Array:
  """`num / den`, and 0 (with a zero gradient) where `den == 0`."""
  den = jnp.asarray(den, num.dtype)
  zero = den == 0
  return jnp.where(zero, 0, num / jnp.where(zero, 1, den))


def reduce_losses(
    values: jax.Array,
    weights: jax.Array | None,
    valid: jax.Array | int,
    reduction: str,
) -> jax.Array:
  """Reduces weighted per-sample losses as Keras 3 does.

  ``"sum_over_batch_size"`` divides the weighted sum by the number of valid
  (unmasked) entries, ``"mean_with_sample_weight"`` by the sum of the
  effective weights; both give 0 for an empty or fully masked batch.
  """
  if reduction == "none":
    return values
  total = jnp.sum(values)
  if reduction == "sum":
    return total
  if reduction == "mean_with_sample_weight" and weights is not None:
    return _divide_or_zero(total, jnp.sum(weights))
  return _divide_or_zero(total, valid)


def _keras_dtype_ok(dtype: Any) -> bool:
  if isinstance(dtype, Mapping):  # a serialized Keras DTypePolicy
    dtype = dtype.get("config", {}).get("name")
  return dtype in (None, "float32", "mixed_float16", "mixed_bfloat16")


def config_from_mapping(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
  """Checks a config dict for `cls` and returns the keyword arguments.

  Accepts the output of ``get_config()``, Keras configs (with their ``dtype``
  key), and Keras' serialized form ``{"class_name": ..., "config": {...}}``.
  """
  if not isinstance(config, Mapping):
    raise TypeError(f"`config` must be a dict; got {type(config).__name__}.")
  if "config" in config and "class_name" in config:
    config = config["config"]
  kwargs = dict(config)
  if "dtype" in kwargs:
    dtype = kwargs.pop("dtype")
    if not _keras_dtype_ok(dtype):
      raise ValueError(
          f"config `dtype` {dtype!r} is not supported: bce_jax computes in float32 "
          f"(float64 for float64 inputs). Remove the key or use 'float32'."
      )
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
        f"Unknown config keys for {cls.__name__}: {unknown}; expected a subset of "
        f"{sorted(fields | {'dtype'})}."
    )
  return kwargs


def config_to_json(obj: Any) -> dict[str, Any]:
  """The dataclass fields of `obj` as a JSON-serialisable dict."""
  config = {}
  for field in dataclasses.fields(obj):
    value = getattr(obj, field.name)
    config[field.name] = list(value) if isinstance(value, tuple) else value
  return config


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BinaryCrossentropy:
  r"""Binary cross-entropy loss with Keras 3 reductions, weights and masks.

  A frozen, hashable dataclass with no array leaves: close over it or pass
  it through ``jax.jit`` freely; equal configurations never retrace.

  Args:
    from_logits: whether `y_pred` holds logits (recommended) or probabilities.
    label_smoothing: `s` in [0, 1]; labels become ``y * (1 - s) + 0.5 * s``.
    axis: axis or tuple of axes the element losses are averaged over to give
      per-sample losses.
    reduction: ``"sum_over_batch_size"`` (alias ``"mean"``): the mean of the
      weighted per-sample losses (over the unmasked ones when a mask is
      given); ``"sum"``; ``"mean_with_sample_weight"``: the weighted sum
      divided by the sum of the weights (broadcast to the losses);
      ``None``/``"none"``: the weighted per-sample losses.
    name: a name, for configs and logging.
    pos_weight: weight of the positive term, a float or a tuple of floats over
      the last axis (beyond Keras; as PyTorch's ``pos_weight``). None is 1.

  Call arguments:
    y_true: labels, shape `[batch, d0, .., dN]`.
    y_pred: probabilities or logits, same shape.
    sample_weight: a scalar, shape `[batch]` (weights whole samples, also for
      `[batch, T]` losses), or a shape that broadcasts to the per-sample
      losses `[batch, d0, .., dN-1]`.
    mask: optional bool array, same rules as `sample_weight`; masked
      entries contribute nothing, and a fully masked batch gives 0.

  Returns (from a call):
    A float32 scalar, or the per-sample losses for ``reduction=None``.

  Raises:
    ValueError: at construction for a bad configuration; at call time for
      shapes that do not match.

  Examples:
    >>> import jax.numpy as jnp, bce_jax
    >>> y_true = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    >>> y_pred = jnp.array([[0.6, 0.4], [0.4, 0.6]])
    >>> bce = bce_jax.BinaryCrossentropy()
    >>> print(f"{bce(y_true, y_pred):.3f}")
    0.815
    >>> print(f"{bce(y_true, y_pred, sample_weight=jnp.array([1.0, 0.0])):.3f}")
    0.458
    >>> print(f"{bce_jax.BinaryCrossentropy(reduction='sum')(y_true, y_pred):.3f}")
    1.630
  """

  from_logits: bool = False
  label_smoothing: float = 0.0
  axis: int | tuple[int, ...] = -1
  reduction: str | None = "sum_over_batch_size"
  name: str = "binary_crossentropy"
  pos_weight: float | tuple[float, ...] | None = None

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    set_("from_logits", _checks.check_bool("from_logits", self.from_logits))
    set_("label_smoothing", _checks.static_label_smoothing(self.label_smoothing))
    set_("axis", _checks.check_static_axis(self.axis))
    set_("reduction", _checks.check_reduction(self.reduction))
    if not isinstance(self.name, str):
      raise TypeError(f"`name` must be a str; got {self.name!r}.")
    set_("pos_weight", _checks.check_static_pos_weight(self.pos_weight))

  def __call__(
      self,
      y_true: ArrayLike,
      y_pred: ArrayLike,
      sample_weight: ArrayLike | None = None,
      mask: ArrayLike | None = None,
  ) -> jax.Array:
    # Convert here, outside the jit, so that a bad input is reported by name
    # rather than by jax.jit's argument check.
    y_true = _checks.as_array("y_true", y_true)
    y_pred = _checks.as_array("y_pred", y_pred)
    if sample_weight is not None:
      sample_weight = _checks.as_array("sample_weight", sample_weight)
    if mask is not None:
      mask = _checks.as_array("mask", mask)
    return _call_loss(self, y_true, y_pred, sample_weight, mask)

  def get_config(self) -> dict[str, Any]:
    """The configuration as a JSON-serialisable dict."""
    return config_to_json(self)

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> BinaryCrossentropy:
    """Builds a loss from `get_config()` output or a Keras loss config."""
    return cls(**config_from_mapping(cls, config))


@functools.partial(jax.jit, static_argnums=0)
def _call_loss(loss, y_true, y_pred, sample_weight, mask):
  per_sample, mask = masked_mean_losses(
      y_true,
      y_pred,
      mask,
      from_logits=loss.from_logits,
      label_smoothing=loss.label_smoothing,
      axis=loss.axis,
      pos_weight=loss.pos_weight,
  )
  values, weights, valid = weighted_losses(per_sample, sample_weight, mask)
  return reduce_losses(values, weights, valid, loss.reduction)
