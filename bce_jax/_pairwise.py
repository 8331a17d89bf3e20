r"""The pairwise sigmoid loss of SigLIP, in tiles and on a ring of devices.

The ``[B, B]`` logits are taken in ``[block, block]`` tiles inside
``lax.scan``, each one matmul, one ``exp`` and one ``log1p``. The custom VJP
has two schedules: ``"fused"`` (default), where the one forward sweep also
accumulates the gradients in x, y, scale and bias (O(B D)) as residuals and
the backward pass scales them (three matmuls a tile); ``"recompute"``, where
the backward sweep recomputes each tile as flash attention does (two sweeps,
four matmuls). An undifferentiated call computes the value alone. On a ring
the y shards go to the next device with ``ppermute``, issued before the
sweep so the transfer can overlap it; the ``dL/dy`` partials follow a step
behind and a last ``ppermute`` takes each home. The VJP is the transpose of
that SPMD program, so ``jax.grad`` of the mapped loss is the global one.
The tiles and the ring are in :mod:`bce_jax._pairwise_ring`; this module
holds the custom VJP, the public function and the loss object.

On a CUDA GPU each sweep is instead two fused Pallas kernels
(:mod:`bce_jax._tiles.pallas_triton`) that keep every tile on chip; the
choice, and each backend's tile size, is made at lowering time in
:mod:`bce_jax._tiles.backend`. With 16-bit embeddings where the kernels may
run, the residuals ``dL/dx`` and ``dL/dy`` are kept in the embeddings' dtype:
the forward pass folds ``1 / count`` (the mean's divisor) into them, the
Triton kernels round their float32 sums once and write them (no float32 ``[B, D]``
buffer on one device; at B = 65,536, D = 512, 128 MiB instead of 256), and
the backward pass multiplies by the caller's cotangent, exactly for 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bce_jax import _checked, _shard
from bce_jax import _pairwise_args as _args
from bce_jax import _pairwise_ring as _ring
from bce_jax._config import Config
from bce_jax._tiles import backend as _backend
from bce_jax._tiles import checks

# The XLA tiles' default size off a GPU (512 x 512, 1 MiB of float32 logits:
# their matmuls run at the BLAS rate on CPU); see _tiles.backend for the GPU
# and benchmarks/pairwise.py for the two schedules.
_BLOCK = _backend._BLOCK["default"]
_MODE = "fused"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _local_sum(plans: tuple[_ring.Plan, _ring.Plan | None], x, y, ids, mask, scale, bias, count):
  """``sum_{i on this device, all j} softplus(-z_ij l_ij)`` over included rows.

  `count` divides the sum afterwards (in :func:`_mean`): the cotangent that
  arrives here is the caller's over `count`. With 16-bit embeddings on the
  kernels (``plan.narrow``) the forward pass folds ``1 / count`` into the
  derivatives it keeps, rounded once to the embeddings' dtype, and the
  backward pass multiplies them by ``cotangent * count`` (1 for a plain
  ``jax.grad``: no second rounding).
  """
  return _ring.run(plans, x, y, ids, mask, scale, bias, count, value=True, grads=False)["value"]


def _local_sum_fwd(plans, *args):
  if plans[0].mode == "recompute":
    return _local_sum(plans, *args), args
  out = _ring.run(plans, *args, value=True, grads=True)
  out["count"] = args[-1]
  return out.pop("value"), out


def _times(ct: jax.Array, res: jax.Array, dtype) -> jax.Array:
  """``ct * res`` in `dtype`; bfloat16 derivatives are multiplied in
  bfloat16 (exact for ``ct`` 1), with no float32 copy of them."""
  if res.dtype == dtype == jnp.bfloat16:
    return ct.astype(dtype) * res
  return (ct * res).astype(dtype)


def _local_sum_bwd(plans, res, ct):
  plan = plans[0]
  if plan.mode == "recompute":
    count = res[-1]
    res = _ring.run(plans, *res, value=False, grads=True)
  else:
    count = res["count"]
  if plan.narrow:  # derivatives of sum / count: the caller's cotangent
    ct = ct * count
  dx, dy = _times(ct, res["dx"], plan.dtypes[0]), _times(ct, res["dy"], plan.dtypes[1])
  return dx, dy, None, None, ct * res["dscale"], ct * res["dbias"], None


_local_sum.defvjp(_local_sum_fwd, _local_sum_bwd)


def pairwise_sigmoid_loss(
  x: ArrayLike,
  y: ArrayLike,
  *,
  scale: ArrayLike,
  bias: ArrayLike,
  positives: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  block_size: int | None = None,
  axis_name: Hashable | None = None,
  precision: str | jax.lax.Precision | None = None,
  implementation: Literal["xla", "pallas", "mosaic"] | None = None,
) -> jax.Array:
  r"""The pairwise sigmoid loss of SigLIP, without the ``[B, B]`` logits.

  .. math::
    \ell = -\frac{1}{B} \sum_{i=1}^{B} \sum_{j=1}^{B}
    \log \sigma\!\left(z_{ij} (s \langle x_i, y_j \rangle + b)\right)

  with ``z_ij = +1`` for a positive pair (``i == j``, or equal `positives`)
  and -1 otherwise; each ``-log sigmoid`` is one ``exp`` and one ``log1p``,
  accurate in both tails. The logits are computed in tiles inside a loop
  (memory O(B D + block^2)); the gradient is a custom VJP, accumulated in
  the same sweep as the value (``jax.jvp`` is not supported). On a CUDA GPU
  two fused Pallas kernels compute each tile's logits, loss and gradient on
  chip and never write a tile to memory (memory O(B D)).

  Args:
    x: embeddings of one tower, ``[B, D]``, any float dtype (float16 and
      bfloat16 are computed and accumulated in float32; their gradients
      are those float32 sums rounded once, twice for a cotangent other
      than 1, and what the backward pass keeps of them is in their dtype).
    y: embeddings of the other tower, the same shape; row ``i`` of `y` is
      the positive partner of row ``i`` of `x`.
    scale: ``s``, a scalar; it may be traced and trained (SigLIP learns
      ``log s`` from ``log 10``).
    bias: ``b``, a scalar (SigLIP starts it at -10).
    positives: optional integer ids ``[B]``: pairs with equal ids are
      positive (several captions of one image). None: only ``i == j``.
      Distinct ids stay distinct: a NumPy int64 array (hashed ids) is
      compared in full even with 64-bit types off. A jitted function's
      int64 argument, though, is narrowed to int32 by JAX before this
      function sees it: there, pass ids that fit in int32 (e.g.
      ``np.unique(ids, return_inverse=True)[1]``) or enable
      ``jax_enable_x64``.
    mask: optional bool ``[B]``, False for a row that does not count (e.g.
      padding up to a multiple of the device count). An excluded row is
      neither an anchor nor a negative: the value is that of the batch
      without it, averaged over the included rows (of every device on the
      ring; 0 if there are none), and its entries in `x` and `y`, which
      may hold anything, nan included, get zero gradients.
    block_size: rows and columns per tile of the XLA tiles (need not
      divide ``B``; the GPU kernels choose their own). None: 512 (CPU, TPU)
      or 8192 (CUDA GPU), or a divisor of ``B`` near it, or ``B`` if
      smaller.
    axis_name: inside ``jax.shard_map``, the mesh axis the batch is sharded
      over: `x`, `y` (and `positives`, `mask`) are this device's shards
      ``[B / n, D]``. The y shards travel around the ring; the loss of the
      global batch is returned on every device, and ``jax.grad`` of the
      mapped function is the single-device gradient.
    precision: of the matmuls, as ``jnp.dot``'s: None (the backend's
      default), a ``jax.lax.Precision`` or its name (``"default"``,
      ``"high"``, ``"highest"``). None and ``"default"`` let a GPU run
      float32 embeddings' matmuls in TF32 (10-bit mantissas; on an H200 the
      value at B = 64 came out 4.5e-6 from float64, against 1e-7 on CPU)
      and a TPU in bfloat16 passes; ``"highest"`` asks for full float32
      everywhere, at a lower rate. With 16-bit embeddings the GPU kernels round ``g = sigmoid(z) -
      label`` to their dtype for the two gradient matmuls, unless
      ``"highest"``.
    implementation: None: the Pallas kernels where the program is lowered
      for a CUDA GPU (float16, bfloat16 and float32 embeddings), XLA tiles
      elsewhere; ``"xla"``: XLA tiles everywhere; ``"pallas"``: the kernels
      (a ValueError where they cannot run: no GPU, float64); ``"mosaic"``:
      the Mosaic-GPU (Hopper) kernels, float16 or bfloat16 embeddings.

  Returns:
    The loss, a scalar: float32, or float64 for float64 inputs.

  Raises:
    ValueError: if `x` and `y` differ in shape or are not ``[B, D]``, `scale`
      or `bias` is not a scalar, `positives` or `mask` is not ``[B]``,
      `block_size` is below 1, `axis_name` is not a mesh axis of an
      enclosing ``shard_map``, `precision` or `implementation` is not one
      of the above, or ``implementation="pallas"`` cannot run here.
    TypeError: for non-float embeddings, non-integer `positives`, a non-bool
      `mask`, or a `block_size` that is not an int.
    bce_jax.ValueCheckError: under :func:`bce_jax.checked`, for a nan or an
      infinity in `x` or `y` (in included rows), `scale` or `bias`.

  References:
    Zhai, Mustafa, Kolesnikov and Beyer, "Sigmoid Loss for Language Image
    Pre-Training", ICCV 2023.

  Examples:
    >>> import jax, jax.numpy as jnp, bce_jax
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> scale, bias = jnp.array(10.0), jnp.array(-5.0)
    >>> print(f"{bce_jax.pairwise_sigmoid_loss(x, x, scale=scale, bias=bias):.4f}")
    0.0134
    >>> loss = lambda x, y, s, b: bce_jax.pairwise_sigmoid_loss(x, y, scale=s, bias=b)
    >>> dx, dy, ds, db = jax.grad(loss, argnums=(0, 1, 2, 3))(x, x, scale, bias)
    >>> print(dx.shape, f"{ds:.4f}", f"{db:.4f}")
    (2, 2) -0.0067 0.0000
    >>> padded = jnp.concatenate([x, jnp.full((1, 2), jnp.nan)])  # one padding row
    >>> mask = jnp.array([True, True, False])
    >>> value = bce_jax.pairwise_sigmoid_loss(padded, padded, scale=scale, bias=bias, mask=mask)
    >>> print(f"{value:.4f}")
    0.0134
  """
  args = _args.check_inputs(x, y, scale, bias, positives, mask)
  x, y, mask = args.x, args.y, args.mask
  options = checks.check_options(
    block_size, axis_name, precision, implementation, "rows", _backend.PAIRWISE_IMPLEMENTATIONS
  )
  block_size, axis_name, precision, implementation = options
  devices, rows = checks.axis_size(axis_name, "batch"), x.shape[0]
  dtype = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
  rows_ok = None if mask is None else mask[:, None]  # padding may hold anything
  _checked.check_finite("x", x, "finite embeddings", rows_ok)
  _checked.check_finite("y", y, "finite embeddings", rows_ok)
  _checked.check_finite("scale", args.scale, "a finite number")
  _checked.check_finite("bias", args.bias, "a finite number")
  if rows == 0:
    return jnp.zeros((), dtype)
  operands: tuple[jax.Array | None, ...]
  operands = (x, y, args.ids, mask, args.scale.astype(dtype), args.bias.astype(dtype))
  # Inside shard_map every argument of the custom VJP varies over the same
  # axes: the ring's and any that another argument varies over.
  ring = () if axis_name is None else axis_name if isinstance(axis_name, tuple) else (axis_name,)
  present = [a for a in operands if a is not None]
  varying = set().union(*map(_shard.varying_axes, present))
  axes = tuple(sorted(varying.union(ring), key=str))
  if axes:
    operands = tuple(None if a is None else _shard.varying(a, axes) for a in operands)
  dtypes = (np.dtype(x.dtype), np.dtype(y.dtype))
  plan = _ring.Plan(rows, 0, devices, axis_name, _MODE, dtypes, precision)
  on_cuda = dataclasses.replace(plan, block=rows, kernel=True)  # the kernels need no padding
  embeddings = jnp.promote_types(x.dtype, y.dtype)
  if implementation in ("pallas", "mosaic"):
    _backend.check_pallas(embeddings, bool(varying), implementation, precision)
    kernel = dataclasses.replace(on_cuda, kernel=implementation)
    plans: tuple[_ring.Plan, _ring.Plan | None] = (kernel, None)
  else:
    if implementation == "xla" or _backend.kernel_refusal(embeddings, bool(varying)):
      on_cuda = dataclasses.replace(plan, block=_backend.choose_block(rows, block_size, "cuda"))
    plans = (dataclasses.replace(plan, block=_backend.choose_block(rows, block_size)), on_cuda)
  # 16-bit embeddings where the kernels may run: 16-bit residuals, in every
  # branch (platform_dependent's branches return the same types).
  if all(d.itemsize == 2 for d in dtypes) and any(p is not None and p.kernel for p in plans):
    narrow = functools.partial(dataclasses.replace, narrow=True)
    plans = (narrow(plans[0]), None if plans[1] is None else narrow(plans[1]))
  return _mean(plans, *operands)


@functools.partial(jax.jit, static_argnums=0)
def _mean(plans: tuple[_ring.Plan, _ring.Plan | None], x, y, ids, mask, scale, bias) -> jax.Array:
  """The loss over the included rows of every device. Jitted: called eagerly
  it is one program, compiled as it is inside a caller's ``jax.jit``, so
  both give the same bits (the per-platform choice is one ``cond``)."""
  plan, axis_name = plans[0], plans[0].axis_name
  if mask is None:
    divisor = jnp.asarray(plan.rows * plan.devices, scale.dtype)
  else:
    count = jnp.sum(mask, dtype=jnp.int32)  # the included rows
    count = count if axis_name is None else jax.lax.psum(count, axis_name)
    divisor = jnp.maximum(count.astype(scale.dtype), 1)
  # An argument of the custom VJP: varying over the axes the others vary over.
  varying = _shard.varying(divisor, _shard.varying_axes(x))
  total = _local_sum(plans, x, y, ids, mask, scale, bias, varying)
  total = total if axis_name is None else jax.lax.psum(total, axis_name)
  if mask is None:
    return total / (plan.rows * plan.devices)
  return jnp.where(count > 0, total / divisor, 0)  # no rows: 0, not nan


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PairwiseSigmoidLoss(Config):
  """:func:`pairwise_sigmoid_loss` as a frozen, hashable loss object.

  Args:
    block_size: rows and columns per tile; None chooses from the batch.
    axis_name: the ``shard_map`` mesh axis the batch is sharded over (the
      ring), or None on one device.
    precision: of the matmuls, by name (``"highest"``...), or None.
    implementation: None (per backend), ``"xla"``, ``"pallas"`` or ``"mosaic"``.

  ``loss(x, y, scale, bias, positives=None, mask=None)`` is
  :func:`pairwise_sigmoid_loss`; ``get_config()`` and ``from_config()``
  round-trip the configuration (JSON).

  References:
    Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023.

  Examples:
    >>> import jax.numpy as jnp, bce_jax
    >>> loss = bce_jax.PairwiseSigmoidLoss(block_size=256)
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> print(f"{loss(x, x, jnp.array(10.0), jnp.array(-5.0)):.4f}")
    0.0134
    >>> loss.get_config()
    {'block_size': 256, 'axis_name': None, 'precision': None, 'implementation': None}
  """

  block_size: int | None = None
  axis_name: Hashable | None = None
  precision: str | None = None
  implementation: Literal["xla", "pallas", "mosaic"] | None = None

  def __post_init__(self) -> None:
    super().__post_init__()
    checks.check_config_options(self, "rows", _backend.PAIRWISE_IMPLEMENTATIONS)

  def __call__(
    self, x: ArrayLike, y: ArrayLike, scale, bias, positives=None, mask=None
  ) -> jax.Array:
    """The loss of a batch of pairs; see :func:`pairwise_sigmoid_loss`."""
    return pairwise_sigmoid_loss(
      x,
      y,
      scale=scale,
      bias=bias,
      positives=positives,
      mask=mask,
      block_size=self.block_size,
      axis_name=self.axis_name,
      precision=self.precision,
      implementation=self.implementation,
    )
