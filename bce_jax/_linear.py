r"""Linear BCE over a huge label space, without the ``[B, C]`` logits.

Extreme multi-label classification trains one sigmoid per label: logits
``h @ w.T + bias`` for features ``h`` ``[B, D]`` and a label matrix ``w``
``[C, D]``, each row with a few positive label ids. Here the labels are
swept in tiles (:mod:`bce_jax._tiles.xla`): each tile's exact losses are
summed (none skipped or sampled) and, under differentiation, the same sweep
writes ``dW[tile] = g.T h``, ``dbias[tile]`` and accumulates ``dh``; the
backward pass only scales them. Memory: ``W``, one W-sized ``dW`` and one
tile. Inside ``shard_map`` each device sweeps its own label shard and the
row sums are ``psum``-ed; ``h`` is typed as varying over the axis, so its
cotangents are summed across devices by the transpose of that cast.

On a CUDA GPU the same sweep runs as the fused Pallas-Triton kernels the
pairwise loss uses (``"lists"`` positives rule), chosen when the program is
lowered in :mod:`bce_jax._tiles.backend`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.typing import ArrayLike

from bce_jax import _checked, _validate
from bce_jax._config import Config
from bce_jax._tiles import backend, checks, xla

LABEL_REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static facts of one call."""

  block: int | None  # XLA tiles' width; None: the platform's default, chosen at lowering
  precision: Any
  dtypes: tuple[np.dtype, np.dtype, np.dtype | None]  # of h, w, bias: their cotangents
  kernel: str = "never"  # the Pallas kernels: "always", on "cuda" only, or "never"


def _weights(mask, unit, rows: int):
  """Each row's weight: `unit` for an included row, 0 for an excluded one."""
  return jnp.broadcast_to(unit, (rows,)) if mask is None else jnp.where(mask, unit, 0)


def _run_sweep(plan: _Plan, h, w, bias, lists, mask, unit, offset, *, grads: bool):
  """The sweep where the program is lowered (:mod:`bce_jax._tiles.backend`)."""

  def run(block, h, w, bias, lists, mask, unit, offset):
    weight = _weights(mask, unit, h.shape[0])
    return xla.sweep(
      h,
      w,
      bias,
      rule="lists",
      block=block,
      lists=lists,
      row_mask=mask,
      row_weight=weight,
      col_offset=offset,
      precision=plan.precision,
      grads=grads,
    )

  def kernels(h, w, bias, lists, mask, unit, offset):
    precision = backend.lax_precision(plan.precision)
    return backend.kernel_linear_sweep(
      h, w, bias, lists, mask, unit, offset, grads=grads, precision=precision
    )

  args = (h, w, bias, lists, mask, unit, offset)
  return backend.linear_by_platform(run, kernels, h.shape[0], plan.block, plan.kernel, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted_sum(plan: _Plan, h, w, bias, lists, mask, unit, offset):
  """``unit * sum_{b included} sum_c loss_bc`` over this device's labels."""
  out = _run_sweep(plan, h, w, bias, lists, mask, unit, offset, grads=False)
  return jnp.sum(_weights(mask, unit, h.shape[0]) * out["loss"])


def _weighted_sum_fwd(plan, h, w, bias, lists, mask, unit, offset):
  out = _run_sweep(plan, h, w, bias, lists, mask, unit, offset, grads=True)
  value = jnp.sum(_weights(mask, unit, h.shape[0]) * out["loss"])
  return value, (out["da"], out["db"], out.get("dbias"))


def _weighted_sum_bwd(plan, res, ct):
  da, db, dbias = res
  dh = (ct * da).astype(plan.dtypes[0])
  dw = (ct.astype(db.dtype) * db).astype(plan.dtypes[1])
  dbias = None if dbias is None else (ct * dbias).astype(plan.dtypes[2])
  return dh, dw, dbias, None, None, None, None


_weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)


def _check_label_reduction(label_reduction: Any) -> str:
  if label_reduction not in LABEL_REDUCTIONS:
    msg = "'sum' (the row's loss summed over its labels) or 'mean' (averaged)"
    raise ValueError(f"`label_reduction` must be {msg}; got {label_reduction!r}.")
  return str(label_reduction)


def check_features(h: Any, w: Any, bias: Any) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """`h` ``[B, D]``, `w` ``[C, D]`` and `bias` ``[C]`` (or None), as float arrays."""
  h, w = _validate.as_array("h", h), _validate.as_array("w", w)
  for name, a, want in (
    ("h", h, "[batch, dim] features"),
    ("w", w, "[labels, dim], one row a label"),
  ):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"`{name}` must be a float array; got dtype {a.dtype}.")
    if a.ndim != 2:
      raise ValueError(f"`{name}` must have shape {want}; got shape {a.shape}.")
  if h.shape[1] != w.shape[1]:
    msg = f"got h {h.shape} and w {w.shape}."
    raise ValueError(f"`h` and `w` must have the same last dimension (the feature size); {msg}")
  if bias is not None:
    bias = _validate.as_array("bias", bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"`bias` must be a float array; got dtype {bias.dtype}.")
    if bias.shape != (w.shape[0],):
      msg = f"one per row of w; got shape {bias.shape}."
      raise ValueError(f"`bias` must have shape [labels]=({w.shape[0]},), {msg}")
  return h, w, bias


def _check_rows(h: jax.Array, positives: Any, mask: Any) -> tuple[jax.Array, jax.Array | None]:
  positives = _validate.as_array("positives", positives)
  if not jnp.issubdtype(positives.dtype, jnp.integer):
    msg = f"(label ids, -1 for padding); got dtype {positives.dtype}."
    raise TypeError(f"`positives` must be an integer array {msg}")
  if positives.ndim != 2 or positives.shape[0] != h.shape[0]:
    msg = f"one row of label ids per row of h, -1 padding; got shape {positives.shape}."
    raise ValueError(f"`positives` must have shape [batch, K]=({h.shape[0]}, K), {msg}")
  return positives.astype(jnp.int32), check_row_mask(mask, h.shape[0])


def check_row_mask(mask: Any, rows: int) -> jax.Array | None:
  """`mask` as a bool ``[rows]`` array (or None): TypeError for another dtype,
  ValueError for another shape."""
  if mask is None:
    return None
  mask = _validate.as_array("mask", mask)
  if mask.dtype != jnp.bool_:
    msg = f"got dtype {mask.dtype}; pass `mask.astype(bool)`."
    raise TypeError(f"`mask` must be a bool array (True = row included); {msg}")
  if mask.shape != (rows,):
    raise ValueError(f"`mask` must have shape [batch]=({rows},); got shape {mask.shape}.")
  return mask


def linear_binary_crossentropy(
  h: ArrayLike,
  w: ArrayLike,
  positives: ArrayLike,
  *,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  label_reduction: str = "sum",
  block_size: int | None = None,
  axis_name: Hashable | None = None,
  precision: Any = None,
  implementation: Literal["xla", "pallas"] | None = None,
) -> jax.Array:
  r"""One-vs-all BCE from logits ``h @ w.T + bias``, without the ``[B, C]`` logits.

  .. math::
    \ell = \frac{1}{|M|} \sum_{b \in M} r\Big(\sum_{c \in P_b}
    \mathrm{softplus}(-z_{bc}) + \sum_{c \notin P_b} \mathrm{softplus}(z_{bc})\Big),
    \qquad z_{bc} = \langle h_b, w_c \rangle + \mathrm{bias}_c

  over the included rows ``M`` (`mask`), with ``P_b`` the positive labels of
  row ``b`` and ``r`` the identity (``"sum"``) or ``1/C`` (``"mean"``). The
  labels are swept in tiles; each tile's losses are computed exactly. Under
  ``jax.grad`` the same sweep gives the gradients in `h`, `w` and `bias`
  (a custom VJP; ``jax.jvp`` is not supported). Memory: ``W``, a W-sized
  gradient buffer and one ``[B, block_size]`` tile.

  Args:
    h: features, ``[B, D]``, any float dtype.
    w: label embeddings, ``[C, D]``, one row a label; bfloat16 `h` and `w`
      are multiplied in bfloat16 and accumulated in float32.
    positives: int ``[B, K]``: each row's positive label ids, ``-1`` for
      padding (a row may have 0 to K positives; a repeated id counts once;
      an id outside ``[0, C)`` matches no label, and ``bce_jax.checked``
      reports it). Every other label is negative.
    bias: optional ``[C]`` label biases.
    mask: optional bool ``[B]``: rows to include. Excluded rows may hold
      anything (nan too); they add nothing to the value and get exactly zero
      gradients. No included row: the loss is 0.
    label_reduction: ``"sum"`` (a row's losses summed over the labels, as XMC
      systems train) or ``"mean"`` (averaged: equals
      ``BinaryCrossentropy(from_logits=True)`` on the dense logits and 0/1
      labels).
    block_size: labels per tile (need not divide C). None: chosen per
      platform when the program is lowered (``2^21 / B`` labels on CPU,
      ``2^25 / B`` on GPU, as powers of two in [128, 131072]).
    axis_name: inside ``jax.shard_map``, the mesh axis the labels are
      sharded over: `w` and `bias` are this device's shard ``[C / n, D]``,
      holding the global ids ``i*C/n .. (i+1)*C/n - 1`` on device ``i``;
      `h`, `positives` and `mask` are replicated. The value and ``jax.grad``
      equal the single-device ones (``dh`` summed over devices, ``dw``
      local).
    precision: ``jax.lax.Precision`` (or its name) for every matmul; None is
      the backend's default (TF32 for float32 on recent NVIDIA GPUs).
    implementation: None: the fused Pallas-Triton kernels where the program
      is lowered for a CUDA GPU (float16, bfloat16 and float32 inputs; the
      pairwise loss's kernels, with a chunked walk over the labels for small
      batches), the XLA tiles elsewhere, chosen at lowering time; ``"xla"``:
      the XLA tiles everywhere; ``"pallas"``: the kernels (a ValueError
      where they cannot run). `block_size` sizes the XLA tiles only.

  Returns:
    The loss, a float32 scalar (float64 for float64 inputs).

  Raises:
    ValueError: for shapes that do not fit (`h` ``[B, D]``, `w` ``[C, D]``,
      `bias` ``[C]``, `positives` ``[B, K]``, `mask` ``[B]``), an unknown
      `label_reduction`, `precision` or `implementation`, a `block_size`
      below 1, an `axis_name` no enclosing ``shard_map`` binds, or
      ``implementation="pallas"`` where the kernels cannot run.
    TypeError: for non-float `h`, `w` or `bias`, non-integer `positives`, a
      non-bool `mask`, or a `block_size` that is not an int.

  Examples:
    >>> import jax, jax.numpy as jnp, bce_jax
    >>> h = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    >>> positives = jnp.array([[0, -1], [1, 2]])  # row 1: labels 1 and 2
    >>> print(f"{bce_jax.linear_binary_crossentropy(h, w, positives):.4f}")
    2.0402
    >>> loss = lambda h, w: bce_jax.linear_binary_crossentropy(h, w, positives)
    >>> dh, dw = jax.grad(loss, argnums=(0, 1))(h, w)
    >>> print(dh.shape, dw.shape, f"{dw[2, 1]:.4f}")
    (2, 2) (3, 2) -0.8808
  """
  h, w, bias = check_features(h, w, bias)
  lists, mask = _check_rows(h, positives, mask)
  label_reduction = _check_label_reduction(label_reduction)
  options = checks.check_options(block_size, axis_name, precision, implementation, "labels")
  block_size, axis_name, precision, implementation = options
  devices = checks.axis_size(axis_name, "label space")
  rows, local_labels = h.shape[0], w.shape[0]
  labels = local_labels * devices
  acc = jnp.promote_types(jnp.promote_types(h.dtype, w.dtype), jnp.float32)
  if bias is not None:
    acc = jnp.promote_types(acc, bias.dtype)
  if _checked.value_checks_on():
    checkify.check(
      jnp.all((lists >= -1) & (lists < labels)),
      f"`positives` must hold label ids in [0, {labels}) or -1 for padding; got {{}}.",
      jnp.where((lists >= -1) & (lists < labels), -1, lists).min(initial=0),
    )
  if rows == 0 or local_labels == 0:
    return jnp.zeros((), acc)
  count = jnp.asarray(rows, acc) if mask is None else jnp.sum(mask.astype(acc))
  per_row = jnp.maximum(count, 1) * (labels if label_reduction == "mean" else 1)
  unit = 1 / per_row  # the weight of an included row
  offset = jnp.zeros((), jnp.int32)
  if axis_name is not None:
    offset = (jax.lax.axis_index(axis_name) * local_labels).astype(jnp.int32)
  dtypes = (np.dtype(h.dtype), np.dtype(w.dtype), None if bias is None else np.dtype(bias.dtype))
  args = [h, w, bias, lists, mask, unit, offset]
  # Inside shard_map every argument varies over the same axes: the labels'
  # axis and any that another argument varies over.
  ring = () if axis_name is None else axis_name if isinstance(axis_name, tuple) else (axis_name,)
  varying = set().union(*(xla.varying_axes(a) for a in args if a is not None))
  axes = tuple(sorted(varying.union(ring), key=str))
  kernel = "never"
  if implementation == "pallas":
    backend.check_pallas(acc, bool(varying))
    kernel = "always"
  elif implementation is None and backend.kernel_refusal(acc, bool(varying)) is None:
    kernel = "cuda"
  plan = _Plan(block_size, precision, dtypes, kernel)
  if axes:
    args = [None if a is None else xla.as_varying(a, axes) for a in args]
  total = _weighted_sum(plan, *args)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return total


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LinearBinaryCrossentropy(Config):
  """:func:`linear_binary_crossentropy` as a frozen, hashable loss object.

  Args:
    label_reduction: ``"sum"`` or ``"mean"`` over the labels of a row.
    block_size: labels per tile; None chooses per platform.
    axis_name: the ``shard_map`` mesh axis the labels are sharded over, or None.
    precision: the matmul precision (a ``jax.lax.Precision`` name) or None.
    implementation: None (the kernels on a CUDA GPU, XLA tiles elsewhere),
      ``"xla"`` or ``"pallas"``.

  ``loss(h, w, positives, bias=None, mask=None)`` is
  :func:`linear_binary_crossentropy`; ``get_config()`` and
  ``from_config()`` round-trip the configuration (JSON).

  Examples:
    >>> import jax.numpy as jnp, bce_jax
    >>> loss = bce_jax.LinearBinaryCrossentropy(label_reduction="mean")
    >>> h = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    >>> print(f"{loss(h, w, jnp.array([[0, -1], [1, 2]])):.4f}")
    0.6801
    >>> loss.get_config()
    {'label_reduction': 'mean', 'block_size': None, 'axis_name': None, 'precision': None,
     'implementation': None}
  """

  label_reduction: str = "sum"
  block_size: int | None = None
  axis_name: Hashable | None = None
  precision: str | None = None
  implementation: Literal["xla", "pallas"] | None = None

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "label_reduction", _check_label_reduction(self.label_reduction))
    checks.check_config_options(self, "labels")

  def __call__(
    self,
    h: ArrayLike,
    w: ArrayLike,
    positives: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
  ) -> jax.Array:
    """The loss of a batch; see :func:`linear_binary_crossentropy`."""
    return linear_binary_crossentropy(
      h,
      w,
      positives,
      bias=bias,
      mask=mask,
      label_reduction=self.label_reduction,
      block_size=self.block_size,
      axis_name=self.axis_name,
      precision=self.precision,
      implementation=self.implementation,
    )
