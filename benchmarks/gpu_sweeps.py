"""The matmul-bound cells of the GPU benchmark: ceilings, the pairwise and linear sweeps.

* Ceilings: a copy (``x + 1``: read and write) and a read (``sum(x)``) in
  bytes per second, and the matmul rate of one ``[M, M] @ [M, M]`` bfloat16
  product (M = 8192) in FLOP/s: what the sweeps are compared with.
* Pairwise: ``jax.value_and_grad`` of ``bce_jax.pairwise_sigmoid_loss``
  w.r.t. x, y, scale and bias at D = 512 (unit-norm rows, scale 10, bias
  -10), with its default tiles, explicit ``block_size`` values, the dense
  ``x @ y.T`` formulation where it fits, and every extra implementation
  :func:`pairwise_extras` finds. FLOP are counted as 6 B^2 D (three
  matmuls); temporaries come from the compiled program.
* Linear: ``jax.value_and_grad`` of ``bce_jax.linear_binary_crossentropy``
  w.r.t. h and w, B = 1024, D = 512, 8 positive labels per row, bfloat16 h
  and w, over a sweep of label counts C, beside optax's
  ``sigmoid_binary_cross_entropy`` on the materialized ``[B, C]`` logits
  until it no longer fits. FLOP: 6 B C D.

Adding a pairwise implementation: a line in :data:`PAIRWISE_EXTRAS`
(name -> a function returning ``fn(x, y, scale, bias)`` or why it is not
available), or ``--pairwise-impl VALUE`` for a value of
``pairwise_sigmoid_loss``'s ``implementation=`` argument.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import gpu_common
import jax
import jax.numpy as jnp
import peers
import timing
from gpu_common import Effort, Run

import bce_jax

SCALE, BIAS = 10.0, -10.0
POSITIVES_PER_ROW = 8
# Values of implementation= tried when its annotation names none.
IMPLEMENTATION_GUESSES = ("pallas", "triton", "mosaic_gpu", "kernel")

PairwiseFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# name -> a builder returning the loss fn(x, y, scale, bias), or why it is not available.
PAIRWISE_EXTRAS: dict[str, Callable[[], PairwiseFn | str]] = {}


def ceilings(run: Run, n: int, matmul_m: int, effort: Effort) -> dict:
  """Copy and read rates of `n` float32 elements, and the bfloat16 matmul rate."""
  out: dict = {}

  def memory():
    x = jax.block_until_ready(jax.random.normal(jax.random.key(1), (n,), jnp.float32))
    calls = {
      "copy": timing.pipelined(jax.jit(lambda a: a + 1), x),
      "read": timing.pipelined(jax.jit(lambda a: jnp.sum(a)), x),
    }
    impls = gpu_common.measure(calls, effort)
    for name, moved in (("copy", 2 * x.nbytes), ("read", x.nbytes)):
      if "seconds" in impls[name]:
        impls[name]["bytes_per_s"] = moved / impls[name]["seconds"]
    return {"n": n, "impls": impls}

  def matmul():
    k1, k2 = jax.random.split(jax.random.key(2))
    a = jax.random.normal(k1, (matmul_m, matmul_m), jnp.bfloat16)
    b = jax.random.normal(k2, (matmul_m, matmul_m), jnp.bfloat16)
    impls = gpu_common.measure({"dot": timing.pipelined(jax.jit(jnp.dot), a, b)}, effort)
    if "seconds" in impls["dot"]:
      impls["dot"]["flop_per_s"] = 2 * matmul_m**3 / impls["dot"]["seconds"]
    return {"m": matmul_m, "impls": impls}

  mem = run.cell("ceilings", {"name": "memory", "dtype": "float32"}, memory)
  mm = run.cell("ceilings", {"name": "matmul", "dtype": "bfloat16"}, matmul)
  out["copy_bytes_per_s"] = mem.get("impls", {}).get("copy", {}).get("bytes_per_s")
  out["read_bytes_per_s"] = mem.get("impls", {}).get("read", {}).get("bytes_per_s")
  out["matmul_flop_per_s"] = mm.get("impls", {}).get("dot", {}).get("flop_per_s")
  return out


# --------------------------------------------------------------------------
# Pairwise.


def dense_pairwise(x, y, scale, bias):
  """The textbook formulation: the ``[B, B]`` logits, then ``log_sigmoid``, autodiff."""
  logits = scale * (x @ y.T) + bias
  labels = 2 * jnp.eye(x.shape[0], dtype=logits.dtype) - 1
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / x.shape[0]


def _blockwise(**kwargs) -> PairwiseFn:
  return lambda x, y, s, b: bce_jax.pairwise_sigmoid_loss(x, y, scale=s, bias=b, **kwargs)


def implementation_values(extra: tuple[str, ...] = ()) -> tuple[list[str], str]:
  """The values of ``pairwise_sigmoid_loss(implementation=...)`` to try, and why none.

  The values are those quoted in the argument's annotation (a ``Literal``),
  else :data:`IMPLEMENTATION_GUESSES`, plus `extra`; none when the argument
  does not exist.
  """
  params = inspect.signature(bce_jax.pairwise_sigmoid_loss).parameters
  if "implementation" not in params:
    return [], "not available: pairwise_sigmoid_loss has no implementation= argument"
  named = re.findall(r"['\"]([A-Za-z0-9_\-]+)['\"]", str(params["implementation"].annotation))
  default = params["implementation"].default
  values = [v for v in dict.fromkeys(named or IMPLEMENTATION_GUESSES) if v != default]
  return list(dict.fromkeys([*values, *extra])), ""


def pairwise_impls(blocks: tuple[int, ...], extra_values: tuple[str, ...]) -> dict:
  """name -> ``fn(x, y, scale, bias)`` or why it is not available."""
  impls: dict[str, PairwiseFn | str] = {"default": _blockwise()}
  for block in blocks:
    impls[f"block {block}"] = _blockwise(block_size=block)
  impls["dense"] = dense_pairwise
  values, why = implementation_values(extra_values)
  if why:
    impls["implementation="] = why
  backend = jax.default_backend()
  for value in values:
    if value in ("pallas", "mosaic") and backend != "gpu":  # the kernels refuse other backends
      impls[f"implementation={value}"] = (
        f"not available: the Pallas kernels need a GPU, not {backend}"
      )
      continue
    impls[f"implementation={value}"] = _blockwise(implementation=value)
  for name, build in PAIRWISE_EXTRAS.items():
    impls[name] = build()
  return impls


def _unit_rows(key, batch: int, dim: int, dtype: str) -> jax.Array:
  a = jax.random.normal(key, (batch, dim), jnp.float32)
  return (a / jnp.linalg.norm(a, axis=1, keepdims=True)).astype(dtype)


def _compiled_cell(fns: dict, args: tuple, argnums: tuple[int, ...], flop: float, effort):
  """Compiles `fns` (value_and_grad w.r.t. `argnums`), checks memory, times what fits."""
  impls: dict[str, dict] = {}
  calls: dict = {}
  for name, fn in fns.items():
    if isinstance(fn, str):
      impls[name] = {"status": fn}
      continue
    try:
      step = jax.jit(jax.value_and_grad(fn, argnums=argnums))
      compiled = step.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - recorded; the other implementations go on
      impls[name] = {"status": gpu_common.describe_error(e)}
      continue
    memory = gpu_common.memory_of(compiled)
    impls[name] = {"memory": memory}
    why = gpu_common.too_big(memory)
    if why:
      impls[name]["status"] = why
      continue
    calls[name] = timing.pipelined(compiled, *args)
  values: dict = {}
  for name, entry in gpu_common.measure(calls, effort, values).items():
    impls[name].update(entry)
    if "seconds" in entry:
      impls[name]["flop_per_s"] = flop / entry["seconds"]
  # Values against the dense formulation's, where it ran.
  reference = next((values[k] for k in values if k.startswith("dense")), None)
  for name, value in values.items():
    if reference is not None and value is not reference:
      impls[name]["value_rel_diff"] = gpu_common.rel_diff(value[0], reference[0])
  return impls


def pairwise_cells(
  run: Run, sizes, dim: int, dtypes, blocks, extra_values, effort: Effort, matmul: float | None
) -> None:
  """The pairwise sweep: value_and_grad w.r.t. x, y, scale and bias."""
  fns = pairwise_impls(tuple(blocks), tuple(extra_values))
  for batch in sizes:
    for dtype in dtypes:

      def body(batch=batch, dtype=dtype):
        kx, ky = jax.random.split(jax.random.key(3))
        args = (
          _unit_rows(kx, batch, dim, dtype),
          _unit_rows(ky, batch, dim, dtype),
          jnp.float32(SCALE),
          jnp.float32(BIAS),
        )
        flop = 6.0 * batch * batch * dim
        impls = _compiled_cell(fns, args, (0, 1, 2, 3), flop, effort)
        if matmul:
          for entry in impls.values():
            if "flop_per_s" in entry:
              entry["of_matmul_rate"] = entry["flop_per_s"] / matmul
        return {"flop": flop, "impls": impls}

      run.cell("pairwise", {"B": batch, "D": dim, "dtype": dtype}, body)


# --------------------------------------------------------------------------
# Linear BCE over many labels.


def dense_linear(optax):
  """optax's BCE on the materialized ``[B, C]`` logits, summed over labels, mean over rows."""

  def loss(h, w, positives):
    logits = jnp.dot(h, w.T, preferred_element_type=jnp.float32)
    rows = jnp.arange(h.shape[0])[:, None]
    labels = jnp.zeros(logits.shape, jnp.float32).at[rows, positives].set(1.0)
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1))

  return loss


def linear_cells(
  run: Run, label_counts, batch: int, dim: int, effort: Effort, matmul: float | None
) -> None:
  """The linear sweep: bce_jax's linear BCE against dense optax, over C, until dense is too big."""
  linear = getattr(bce_jax, "linear_binary_crossentropy", None)
  optax = peers.get("optax")
  dense_out_at = None
  for count in label_counts:

    def body(count=count):
      nonlocal dense_out_at
      kh, kw, kp = jax.random.split(jax.random.key(4), 3)
      h = (jax.random.normal(kh, (batch, dim), jnp.float32) / dim**0.5).astype(jnp.bfloat16)
      w = (jax.random.normal(kw, (count, dim), jnp.float32) / dim**0.5).astype(jnp.bfloat16)
      positives = jax.random.randint(kp, (batch, POSITIVES_PER_ROW), 0, count, jnp.int32)
      fns: dict = {}
      if linear is None:
        fns[peers.OURS] = "not available: bce_jax has no linear_binary_crossentropy"
      else:
        fns[peers.OURS] = lambda h, w, p: linear(h, w, p)
      if optax is None:
        fns["dense optax"] = peers.missing("optax")
      elif dense_out_at is not None:
        fns["dense optax"] = f"out of memory already at C = {dense_out_at}"
      else:
        fns["dense optax"] = dense_linear(optax)
      flop = 6.0 * batch * count * dim
      impls = _compiled_cell(fns, (h, w, positives), (0, 1), flop, effort)
      if impls["dense optax"].get("status", "").startswith("out of memory") and not dense_out_at:
        dense_out_at = count
      if matmul:
        for entry in impls.values():
          if "flop_per_s" in entry:
            entry["of_matmul_rate"] = entry["flop_per_s"] / matmul
      return {"flop": flop, "impls": impls}

    run.cell("linear", {"B": batch, "D": dim, "C": count, "dtype": "bfloat16"}, body)
