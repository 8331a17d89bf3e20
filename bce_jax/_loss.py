"""Loss objects: thin frozen dataclasses over an element formula.

:class:`Loss` holds what every loss shares (the reduction, the call with
`sample_weight` and `mask`); a loss adds its fields and names its formula.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
from jax.typing import ArrayLike

from bce_jax import _bce, _focal, _reduce
from bce_jax._config import NOT_IN_CONFIG, Config


class Loss(Config):
  """Base of the loss objects: a configured formula, reduced as Keras 3 does."""

  axis: int | tuple[int, ...]
  label_smoothing: float
  reduction: str | None

  def formula(self) -> _reduce.Formula:
    raise NotImplementedError

  def __call__(
    self,
    y_true: ArrayLike,
    y_pred: ArrayLike,
    sample_weight: ArrayLike | None = None,
    mask: ArrayLike | None = None,
  ) -> jax.Array:
    """The loss of a batch, weighted, masked and reduced.

    Args:
      y_true: labels in [0, 1], shape `[batch, d0, .., dN]`.
      y_pred: probabilities or logits, the same shape.
      sample_weight: a scalar, shape `[batch]` (weights whole samples, also
        for `[batch, T]` losses), or a shape that broadcasts to the
        per-sample losses `[batch, d0, .., dN-1]`. An entry of weight 0
        contributes exactly 0 to the value and every derivative.
      mask: optional bool array, with the same shape rules as
        `sample_weight`. Masked entries contribute exactly 0 to the value and
        every derivative, whatever they hold (nan, inf, a label of -1);
        ``"sum_over_batch_size"`` averages over the unmasked entries, and a
        fully masked batch gives 0.

    Returns:
      A scalar, or the per-sample losses for ``reduction=None``: float32
      (float64 for float64 `y_pred` under ``jax_enable_x64``).

    Raises:
      ValueError: if the shapes do not match, or a weight or mask does not
        broadcast to the per-sample losses.
      TypeError: for non-numeric inputs, a non-bool `mask`, or a Python
        bool as `sample_weight` (``from_logits`` belongs on the constructor).
    """
    return _reduce.object_loss(self, y_true, y_pred, sample_weight, mask)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BinaryCrossentropy(Loss):
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
    pos_weight: weight of the positive term (beyond Keras; as PyTorch's
      ``pos_weight``): a float, or (nested) tuples of floats that broadcast to
      the element losses without changing their shape. None is 1. Each call
      takes it in its compute dtype: whole in float64 for float64 `y_pred`
      under ``jax_enable_x64``, rounded to float32 otherwise.
    dtype: Keras's compute-dtype argument, refused unless None (keyword).
      bce_jax computes in float32 (float64 for float64 `y_pred` under
      ``jax_enable_x64``) whatever the input dtype and returns that dtype, so
      float16 and bfloat16 inputs never overflow; cast the result for another
      dtype. Keras configs with ``"dtype": "float32"`` load with
      :meth:`from_config`.

  The call, ``loss(y_true, y_pred, sample_weight=None, mask=None)``, is
  described in :meth:`Loss.__call__`.

  Raises:
    ValueError: at construction for a bad configuration (a `dtype` included);
      at call time for shapes that do not match.

  References:
    Keras 3, ``keras.losses.BinaryCrossentropy``; PyTorch,
    ``torch.nn.BCEWithLogitsLoss`` (``pos_weight``).

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
  pos_weight: float | tuple[Any, ...] | None = None
  _: dataclasses.KW_ONLY
  dtype: None = dataclasses.field(default=None, repr=False, compare=False, metadata=NOT_IN_CONFIG)

  def formula(self) -> _reduce.Formula:
    return _bce.formula(self.from_logits)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BinaryFocalCrossentropy(Loss):
  r"""Binary focal cross-entropy loss, as ``keras.losses.BinaryFocalCrossentropy``.

  ``c (1 - p_t)**gamma BCE`` per element (see
  :func:`bce_jax.binary_focal_crossentropy_elementwise`), averaged over
  `axis`, then weighted, masked and reduced as :class:`BinaryCrossentropy`.

  Args:
    apply_class_balancing: whether to weight class 1 by `alpha` and class 0
      by ``1 - alpha``.
    alpha: the class-1 weight, in [0, 1].
    gamma: the focusing exponent, ``>= 0``; 0 gives the BCE exactly.
    from_logits: whether `y_pred` holds logits (recommended) or probabilities.
    label_smoothing: `s` in [0, 1]; labels become ``y * (1 - s) + 0.5 * s``.
    axis: axis or axes the element losses are averaged over.
    reduction: as for :class:`BinaryCrossentropy`.
    name: a name, for configs and logging.
    pos_weight: weight of the positive BCE term only (beyond Keras), as for
      :class:`BinaryCrossentropy`.
    dtype: refused unless None, as for :class:`BinaryCrossentropy`.

  References:
    Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017; Keras 3,
    ``keras.losses.BinaryFocalCrossentropy``.

  Examples:
    >>> import jax.numpy as jnp, bce_jax
    >>> y_true = jnp.array([[0, 1], [0, 0]])
    >>> y_pred = jnp.array([[-18.6, 0.51], [2.94, -12.8]])
    >>> loss = bce_jax.BinaryFocalCrossentropy(gamma=3, from_logits=True)
    >>> print(f"{loss(y_true, y_pred):.3f}")
    0.647
    >>> print(f"{loss(y_true, y_pred, sample_weight=jnp.array([0.8, 0.2])):.3f}")
    0.133
  """

  apply_class_balancing: bool = False
  alpha: float = 0.25
  gamma: float = 2.0
  from_logits: bool = False
  label_smoothing: float = 0.0
  axis: int | tuple[int, ...] = -1
  reduction: str | None = "sum_over_batch_size"
  name: str = "binary_focal_crossentropy"
  pos_weight: float | tuple[Any, ...] | None = None
  _: dataclasses.KW_ONLY
  dtype: None = dataclasses.field(default=None, repr=False, compare=False, metadata=NOT_IN_CONFIG)

  _ELEMENTWISE: ClassVar[str] = _focal.ELEMENTWISE

  def formula(self) -> _reduce.Formula:
    return _focal.formula(self.from_logits, self.apply_class_balancing, self.alpha, self.gamma)
