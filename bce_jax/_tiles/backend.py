"""Where the tile sweeps run: the Pallas kernels on a CUDA GPU, XLA tiles
elsewhere, and each backend's tile size. One place for every per-backend
choice of the pairwise loss (:mod:`bce_jax._pairwise`) and the linear BCE
(:mod:`bce_jax._linear`), made when the program is lowered.

* ``implementation=None``: :func:`jax.lax.platform_dependent` picks, per
  lowering platform, the fused Pallas-Triton kernels on ``cuda`` (float16,
  bfloat16 and float32 embeddings) and the XLA tiles elsewhere. Both
  branches are traced; only the chosen one is lowered.
* ``"xla"``: the XLA tiles on every backend, ``"pallas"``: the kernels,
  refused with a clear error where they cannot run.
* ``"mosaic"`` (the pairwise loss only): the Mosaic-GPU kernels
  (:mod:`.pallas_mosaic`: warpgroup MMAs fed by TMA, for Hopper), float16
  and bfloat16 embeddings at the default precision; refused elsewhere. ``None`` keeps the Triton kernels on ``cuda`` until a
  GPU benchmark (benchmarks/gpu.py) shows the Mosaic ones faster; the
  default moves to them then.
* 16-bit embeddings where the kernels may run: the pairwise loss keeps
  ``dL/dx`` and ``dL/dy`` between its passes in their dtype, in every
  branch (``platform_dependent``'s branches return the same types): the
  Triton kernels scale their float32 sums and write them in 16 bits
  (:func:`kernel_sweep`'s `factor`), the XLA tiles cast at the end.
* Both losses run the same kernels (:mod:`.pallas_triton`): the pairwise
  loss with the ``"diagonal"``/``"ids"`` rules, the linear BCE with the
  ``"lists"`` rule, a per-label bias and unit scale.
* The pairwise XLA tiles' default size follows the backend: 512 on CPU (their
  matmuls run at the BLAS rate, benchmarks/pairwise.py), 8192 on a CUDA GPU
  (measured on an H200, value_and_grad at D = 512: B = 65,536 takes 65 ms
  with 8192 tiles against 538 ms with 512 ones, for ~1 GiB of
  temporaries).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bce_jax._tiles import pallas_mosaic, pallas_triton, xla

IMPLEMENTATIONS = (None, "xla", "pallas")
PAIRWISE_IMPLEMENTATIONS = (*IMPLEMENTATIONS, "mosaic")
_JAX = tuple(int(p) for p in jax.__version__.split(".")[:2])
_BLOCK = {"default": 512, "cuda": 8192}  # the XLA tiles' rows and columns


def check_implementation(implementation: Any, allowed: tuple[Any, ...] = IMPLEMENTATIONS) -> Any:
  if implementation not in allowed:
    raise ValueError(
      f"`implementation` must be one of {allowed} (None: the Pallas kernels on a CUDA "
      f"GPU, XLA tiles elsewhere); got {implementation!r}."
    )
  return implementation


def lax_precision(name: str | None) -> jax.lax.Precision | None:
  return None if name is None else jax.lax.Precision(name)


def kernel_refusal(
  dtype: Any, varying: bool, implementation: Any = "pallas", precision: Any = None
) -> str | None:
  """Why the kernels cannot take embeddings of `dtype` here, or None.
  `varying`: inside ``shard_map`` with ``check_vma``; `implementation`:
  ``"mosaic"`` asks about the Mosaic-GPU kernels, anything else the Triton
  ones."""
  if implementation == "mosaic":
    return pallas_mosaic.refusal(dtype, precision)
  if not pallas_triton.available():
    return "this jax has no Pallas Triton backend (jax.experimental.pallas.triton)"
  if np.dtype(dtype) == np.float64:
    return "they take float16, bfloat16 or float32 embeddings, not float64"
  if varying and _JAX < (0, 10):
    # jax 0.9's checkify rule for pallas_call loses the mesh axes of a
    # check_vma shard_map (a scan carry mismatch under bce_jax.checked).
    return "inside shard_map with check_vma they need jax >= 0.10"
  return None


def check_pallas(
  dtype: Any, varying: bool, implementation: Any = "pallas", precision: Any = None
) -> None:
  """A ValueError where ``implementation="pallas"`` (or ``"mosaic"``) cannot run."""
  why = kernel_refusal(dtype, varying, implementation, precision)
  mosaic = implementation == "mosaic"
  interpreted = pallas_mosaic._INTERPRET is not None if mosaic else pallas_triton._INTERPRET
  if why is None and jax.default_backend() != "gpu" and not interpreted:
    why = f"they need a GPU, and this process runs on {jax.default_backend()!r}"
  if why is not None:
    other = ", or 'pallas'" if mosaic else ""
    raise ValueError(
      f"`implementation`={implementation!r} cannot run: {why}. Pass implementation=None to "
      f"choose per backend, or 'xla'{other}."
    )


def choose_block(rows: int, block_size: int | None, platform: str = "default") -> int:
  """`block_size` (at most `rows`), else the backend's tile or a divisor of
  `rows` near it (no padding), or `rows` if smaller."""
  target = _BLOCK[platform]
  if block_size is not None or rows <= target:
    return min(block_size or rows, rows)
  for block in range(target, target // 2 - 1, -8):  # no padding where a multiple of 8 divides
    if rows % block == 0:
      return block
  tiles = -(-rows // target)
  return (-(-rows // tiles) + 7) // 8 * 8  # the fewest tiles, padded least


def by_platform(run, plan, plan_on_cuda, *operands):
  """``run(plan_on_cuda, *operands)`` where lowered for CUDA, else
  ``run(plan, *operands)``, chosen at lowering time."""
  if plan_on_cuda is None:
    return run(plan, *operands)
  return jax.lax.platform_dependent(
    *operands,
    cuda=lambda *a: run(plan_on_cuda, *a),
    default=lambda *a: run(plan, *a),
  )


def kernel_sweep(
  row,
  col,
  s,
  b,
  *,
  value: bool,
  grads: bool,
  precision: Any,
  kernel: Any = True,
  factor: jax.Array | None = None,
  dtypes: tuple[Any, Any] | None = None,
):
  """The kernels' version of ``_pairwise_ring._sweep``: this device's rows
  against one shard of columns, described by the same ``row`` and ``col``
  dicts (``"x"``/``"y"``, ``"ids"`` or ``"start"``, ``"ok"``); returns the row
  sums of the losses and of g, ``g y`` and ``g^T x`` (float32). `kernel`:
  ``"mosaic"`` runs the Mosaic-GPU kernels (``g y`` and ``g^T x`` then in
  the embeddings' 16-bit dtype: 64 MiB each instead of 128 at B = 65,536,
  D = 512), anything else the Triton ones.

  With `factor` (a float32 scalar) ``dx`` and ``dy`` are ``factor g y`` and
  ``factor g^T x`` in `dtypes` (of ``dx``, ``dy``; None: float32), and ``gdot`` holds the
  row sums of ``g <x_i, y_j>`` (for ``dL/dscale``, from float32 sums, not
  from a rounded ``dx``). Both kernel families scale and write them
  themselves: a 16-bit dtype is one rounding of their float32 sums, and no
  float32 ``[B, D]`` buffer exists. (The Mosaic kernels write one dtype for
  both; they take only embeddings of one 16-bit dtype, so ``dtypes`` agree.)
  """
  if "ids" in row:
    rule: dict[str, Any] = {"rule": "ids", "row_ids": row["ids"], "col_ids": col["ids"]}
  elif (
    isinstance(row["start"], int)
    and isinstance(col["start"], int)
    and (row["start"] == col["start"] == 0)
  ):
    rule = {"rule": "diagonal"}
  else:  # a ring step: global row indices as ids
    rows, cols = row["x"].shape[0], col["y"].shape[0]
    rule = {
      "rule": "ids",
      "row_ids": row["start"] + jnp.arange(rows, dtype=jnp.int32),
      "col_ids": col["start"] + jnp.arange(cols, dtype=jnp.int32),
    }
  dtypes = dtypes or (jnp.float32, jnp.float32)
  module: Any = pallas_triton
  if kernel == "mosaic":  # g y and g^T x written by the kernels, scaled by `factor` if given
    module, rule = pallas_mosaic, {**rule, "out_dtype": row["x"].dtype}
    if factor is not None and grads:
      rule.update(factor=factor, out_dtype=dtypes[0])
  elif factor is not None and grads:  # scaled and written in `dtypes` by the kernels
    rule = {**rule, "da_scale": factor, "db_scale": factor}
    rule.update(da_dtype=dtypes[0], db_dtype=dtypes[1])
  out = module.parts(
    row["x"],
    col["y"],
    s,
    b,
    row_mask=row.get("ok"),
    col_mask=col.get("ok"),
    value=value,
    grads=grads,
    precision=precision,
    **rule,
  )
  found = {"loss": out["loss"]} if value else {}
  if grads:
    found.update(g=out["g_rows"], dx=out["g_b"], dy=out["gt_a"])
  if grads and factor is not None:
    found["gdot"] = out["gdot_rows"]
    found["dy"] = found["dy"].astype(dtypes[1])  # the Mosaic kernels write dtypes[0]: no-op
  return found


def linear_by_platform(run_xla, run_kernel, rows: int, block: int | None, kernel: str, *operands):
  """The linear BCE's sweep where the program is lowered.

  `kernel`: ``"always"`` (``implementation="pallas"``), ``"cuda"`` (the
  kernels on CUDA, XLA tiles elsewhere) or ``"never"``. The XLA tiles are
  ``run_xla(block, *operands)`` with `block`, else each platform's default
  (:func:`.xla.default_block`); the kernels ``run_kernel(*operands)``.
  """
  if kernel == "always":
    return run_kernel(*operands)
  if kernel == "never":
    if block is not None:
      return run_xla(block, *operands)
    return xla.at_default_block(run_xla, rows, *operands)
  width = lambda p: xla.default_block(p, rows) if block is None else block
  branches = {p: functools.partial(run_xla, width(p)) for p in ("cpu", "rocm")}
  return jax.lax.platform_dependent(
    *operands,
    cuda=run_kernel,
    default=functools.partial(run_xla, width("default")),
    **branches,
  )


def kernel_linear_sweep(h, w, bias, lists, mask, unit, offset, *, grads: bool, precision: Any):
  """The kernels' version of the linear BCE's XLA sweep: logits ``h w^T +
  bias`` over this device's label shard (global ids ``offset + [0, C)``),
  positives from `lists`. Returns what :func:`.xla.sweep` returns for row
  weights ``unit`` on the included rows: ``loss`` ``[B]`` (unweighted row
  sums), and with `grads` ``da`` ``[B, D]`` (float32), ``db`` ``[C, D]``
  (`w`'s dtype, written by the kernel with ``unit`` applied) and
  ``dbias`` (``[C]``, absent without `bias`)."""
  labels = w.shape[0]
  here = (lists >= offset) & (lists < offset + labels)
  local = jnp.where(here, lists - offset, -1)  # another shard's ids match nothing here
  out = pallas_triton.parts(
    h,
    w,
    jnp.ones((), jnp.float32),
    jnp.zeros((), jnp.float32) if bias is None else bias,
    rule="lists",
    lists=local,
    row_mask=mask,
    value=True,
    grads=grads,
    precision=precision,
    db_scale=unit if grads else None,
    db_dtype=w.dtype,
    unpadded_columns=True,
  )
  found = {"loss": out["loss"]}
  if grads:
    unit = unit.astype(jnp.float32)
    found.update(da=unit * out["g_b"], db=out["gt_a"])
    if bias is not None:
      found["dbias"] = unit * out["g_cols"]
  return found
