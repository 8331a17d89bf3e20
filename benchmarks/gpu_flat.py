"""The element-wise cells of the GPU benchmark: BCE, probabilities, focal.

Each cell is one shape, dtype, path and mode, with bce_jax, its peers (from
:mod:`peers`: optax, Keras where installed; torch on the ``mean`` path) and
the floors that move the same bytes, timed side by side:

* ``read floor``: one fused ``sum(x * y)`` (times the weight or mask for
  those paths): a read of the inputs;
* ``vag floor``: ``(sum(x * y), x - y)`` in one fusion: a read of the
  inputs and one write of the gradient's size (weighted and masked alike);
* ``exp+log1p``: ``sum(log1p(exp(-|x|)) * y)`` in float32: the two
  transcendental functions the loss cannot avoid (timed in the ``mean``
  forward cell of each shape and dtype).

Data are made on the device (``jax.random``): logits ~ N(0, 3^2), labels in
{0, 1}, weights ``[B]`` in [0.5, 1.5], masks 90% True.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import gpu_common
import jax
import jax.numpy as jnp
import matrix
import numpy as np
import peers
import timing
from gpu_common import Calls, Effort, Run

import bce_jax

# name -> the trailing axes; the leading one is N / prod(trailing).
SHAPES: dict[str, tuple[int, ...]] = {
  "[N]": (),
  "[N,1]": (1,),
  "[N/2,2]": (2,),
  "[N/4,4]": (4,),
  "[N/8,8]": (8,),
  "[N/16,16]": (16,),
  "[N/512,64,8]": (64, 8),  # [B, T, L]
}
CORE_SHAPES = ("[N]", "[N/8,8]", "[N,1]", "[N/512,64,8]")  # measured first
PATHS = ("mean", "weight", "mask")
MODES = ("forward", "value_and_grad")
READ, VAG, COMPUTE = "read floor", "vag floor", "exp+log1p"
NAIVE = "naive clip+log"
EPSILON = 1e-7  # Keras's clip of probabilities


def dims(shape: str, n: int) -> tuple[int, ...]:
  """The array shape of `shape` for about `n` elements."""
  tail = SHAPES[shape]
  return (n,) if not tail else (max(n // math.prod(tail), 1),) + tail


@partial(jax.jit, static_argnums=(0, 1))
def make_inputs(shape: tuple[int, ...], dtype: str, key: jax.Array) -> dict[str, jax.Array]:
  """Logits `x`, probabilities `p`, labels `y`, weight `w` ([B]) and `mask`, on the device."""
  kx, ky, kw, km = jax.random.split(key, 4)
  x = 3.0 * jax.random.normal(kx, shape, jnp.float32)
  per_sample = shape[:-1]  # () for [N]: one sample, a scalar weight and mask
  mask = jax.random.bernoulli(km, 0.9, per_sample)
  mask = mask.reshape(-1).at[0].set(True).reshape(per_sample)
  return {
    "x": x.astype(dtype),
    "p": jax.nn.sigmoid(x).astype(dtype),
    "y": jax.random.bernoulli(ky, 0.5, shape).astype(dtype),
    "w": jax.random.uniform(kw, per_sample[:1], jnp.float32, 0.5, 1.5).astype(dtype),
    "mask": mask,
  }


def _factor(x, w, mask):
  """The weight or mask of a path, broadcast against `x` (None for ``mean``)."""
  for a in (w, mask):
    if a is not None:
      return peers.expand_to(a, x.ndim).astype(x.dtype)
  return None


@jax.jit
def _read_floor(x, y, w, mask):
  f = _factor(x, w, mask)
  prod = x * y if f is None else x * y * f
  return jnp.sum(prod, dtype=jnp.float32)


@jax.jit
def _vag_floor(x, y, w, mask):
  f = _factor(x, w, mask)
  prod, diff = (x * y, x - y) if f is None else (x * y * f, (x - y) * f)
  return jnp.sum(prod, dtype=jnp.float32), diff


@jax.jit
def _compute_floor(x, y):
  x = x.astype(jnp.float32)
  return jnp.sum(jnp.log1p(jnp.exp(-jnp.abs(x))) * y.astype(jnp.float32))


# --------------------------------------------------------------------------
# torch, on the device JAX uses when torch sees it.


def torch_device() -> str | None:
  """``cuda`` or ``cpu`` as JAX's backend; None when torch is missing or cannot follow."""
  torch = peers.get("torch")
  if torch is None:
    return None
  if jax.default_backend() == "gpu":
    return "cuda" if torch.cuda.is_available() else None
  return "cpu"


def torch_why_missing() -> str:
  if peers.get("torch") is None:
    return peers.missing("torch")
  return "torch has no CUDA here (its figures would be on the CPU)"


def to_torch(a: jax.Array):
  """`a` as a torch tensor of its own on the torch device (DLPack, else through NumPy)."""
  torch = peers.get("torch")
  try:
    return torch.from_dlpack(a).clone()
  except Exception:  # noqa: BLE001 - an old DLPack path; NumPy has no bfloat16
    t = torch.from_numpy(np.asarray(jnp.asarray(a, jnp.float32)))
    t = t.to(torch_device())
    return t.to(torch.bfloat16) if a.dtype == jnp.bfloat16 else t.contiguous()


def _torch_wait(result):
  torch = peers.get("torch")
  if torch_device() == "cuda":
    torch.cuda.synchronize()
  return result


def torch_calls(x: jax.Array, y: jax.Array, mode: str) -> timing.Pipelined | str:
  """torch's ``binary_cross_entropy_with_logits`` (mean), forward or forward + backward."""
  device = torch_device()
  if device is None:
    return torch_why_missing()
  torch = peers.get("torch")
  xt, yt = to_torch(x), to_torch(y)
  fn = torch.nn.functional.binary_cross_entropy_with_logits
  if mode == "forward":

    def forward():
      with torch.no_grad():
        return fn(xt, yt)

    return timing.Pipelined(forward, _torch_wait)
  xt.requires_grad_(True)

  def forward_backward():
    xt.grad = None  # a fresh gradient array, as JAX returns
    value = fn(xt, yt)
    value.backward()
    return value.detach()

  return timing.Pipelined(forward_backward, _torch_wait)


# --------------------------------------------------------------------------
# The cells.


def _peer_calls(family: str, path: str, mode: str, data: dict) -> tuple[Calls, dict, dict]:
  """bce_jax and its peers of `family` on one path and mode.

  Returns:
    The calls; the path's ``w`` and ``mask``; and name -> a function that
    turns an output into the value compared across implementations (a
    metric state into its result).
  """
  x, y = data["x"], data["y"]
  w = data["w"] if path == "weight" else None
  mask = data["mask"] if path == "mask" else None
  calls: Calls = {}
  results: dict[str, Callable] = {}
  for name, impl in peers.implementations(family).items():
    if isinstance(impl, str):
      calls[name] = impl
    elif path == "metric":
      if impl.metric is None:
        calls[name] = "no metric in this library"
        continue
      m = impl.metric()
      update = jax.jit(lambda state, x, y, m=m: m.update(state, y, x))
      calls[name] = timing.pipelined(update, m.init(), x, y)
      results[name] = m.result
    else:
      loss = impl.loss("mean")
      f = lambda x, y, w, mask, loss=loss: loss(y, x, w, mask)
      f = f if mode == "forward" else jax.value_and_grad(f)
      calls[name] = timing.pipelined(jax.jit(f), x, y, w, mask)
  return calls, {"w": w, "mask": mask}, results


def _checks(values: dict, dtype: str, family: str) -> tuple[dict, list[str]]:
  """Each peer's output against bce_jax's: relative differences and mismatches."""
  ours = values.get(peers.OURS)
  diffs, mismatches = {}, []
  tol = max(matrix.TOLERANCE.get(dtype, 1e-5), matrix.FAMILY_TOLERANCE.get(family, 0.0))
  for name, value in values.items():
    if name == peers.OURS or ours is None or name.endswith("floor") or name == COMPUTE:
      continue
    if name == "torch":  # the value only; torch's gradient stays on its side
      value = float(value[0] if isinstance(value, tuple) else value)
      ref = float(ours[0] if isinstance(ours, tuple) else ours)
      diff = abs(value - ref) / max(abs(ref), 1e-30)
    else:
      diff = gpu_common.rel_diff(value, ours)
    diffs[name] = diff
    if not diff <= tol:
      mismatches.append(f"{name} differs from bce_jax by {diff:.2e} (relative)")
  return diffs, mismatches


def _loss_cell(family: str, path: str, mode: str, data: dict, effort: Effort) -> dict:
  calls, args, results = _peer_calls(family, path, mode, data)
  x, y = data["x"], data["y"]
  floors: Calls = {}
  if mode == "forward":
    floors[READ] = timing.pipelined(_read_floor, x, y, args["w"], args["mask"])
    if path == "mean" and family == "bce":
      floors[COMPUTE] = timing.pipelined(_compute_floor, x, y)
  else:
    floors[VAG] = timing.pipelined(_vag_floor, x, y, args["w"], args["mask"])
  if family == "bce" and path == "mean":
    try:  # a torch that cannot reach the device costs its column, not the cell
      calls["torch"] = torch_calls(x, y, mode)
    except Exception as e:  # noqa: BLE001
      calls["torch"] = gpu_common.describe_error(e)
  values: dict = {}
  impls = gpu_common.measure({**floors, **calls}, effort, values)
  values = {k: results[k](v) if k in results else v for k, v in values.items()}
  diffs, mismatches = _checks(values, str(x.dtype), family)
  for name, diff in diffs.items():
    impls[name]["rel_diff"] = diff
  return {"dims": list(x.shape), "impls": impls, "mismatches": mismatches}


def flat_cells(run: Run, n: int, shapes, dtypes, effort: Effort, key: jax.Array, only=None) -> None:
  """The BCE cells: every shape x dtype x path x mode, and the metric update.

  Args:
    only: None, or the ``(path, mode)`` pairs to measure (a smoke run).
  """
  for shape in shapes:
    for dtype in dtypes:
      if run.over_budget():
        data = None
      else:
        data = jax.block_until_ready(make_inputs(dims(shape, n), dtype, key))
      for path in (*PATHS, "metric"):
        for mode in MODES if path != "metric" else ("forward",):
          if only is not None and (path, mode) not in only:
            continue
          cell_key = {"family": "bce", "shape": shape, "dtype": dtype, "path": path, "mode": mode}
          run.cell(
            "flat", cell_key, lambda p=path, m=mode, d=data: _loss_cell("bce", p, m, d, effort)
          )
      del data


def probability_cells(run: Run, n: int, dtypes, effort: Effort, key: jax.Array) -> None:
  """From probabilities, ``[N/8, 8]``: bce_jax against a naive ``clip + log`` formula."""

  def ours(p, y):
    return bce_jax.binary_crossentropy(y, p).mean()

  def naive(p, y):
    p, y = p.astype(jnp.float32), y.astype(jnp.float32)
    p = jnp.clip(p, EPSILON, 1 - EPSILON)
    return -jnp.mean(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))

  for dtype in dtypes:
    data = None if run.over_budget() else make_inputs(dims("[N/8,8]", n), dtype, key)
    for mode in MODES:

      def body(mode=mode, data=data):
        p, y = data["p"], data["y"]
        wrap = (lambda f: f) if mode == "forward" else jax.value_and_grad
        calls: Calls = {
          peers.OURS: timing.pipelined(jax.jit(wrap(ours)), p, y),
          NAIVE: timing.pipelined(jax.jit(wrap(naive)), p, y),
        }
        if mode == "forward":
          calls[READ] = timing.pipelined(_read_floor, p, y, None, None)
        else:
          calls[VAG] = timing.pipelined(_vag_floor, p, y, None, None)
        values: dict = {}
        impls = gpu_common.measure(calls, effort, values)
        if peers.OURS in values and NAIVE in values:
          impls[NAIVE]["rel_diff"] = gpu_common.rel_diff(values[NAIVE], values[peers.OURS])
        return {"dims": list(p.shape), "impls": impls}

      key_ = {"family": "bce", "shape": "[N/8,8]", "dtype": dtype, "path": "probs", "mode": mode}
      run.cell("probabilities", key_, body)


def focal_cells(run: Run, n: int, dtypes, effort: Effort, key: jax.Array) -> None:
  """The focal loss (gamma 2, logits), ``[N/8, 8]``, mean path: bce_jax against its peers."""
  for dtype in dtypes:
    data = None if run.over_budget() else make_inputs(dims("[N/8,8]", n), dtype, key)
    for mode in MODES:
      cell_key = {"family": "focal", "shape": "[N/8,8]", "dtype": dtype, "path": "mean"}
      run.cell(
        "focal",
        {**cell_key, "mode": mode},
        lambda m=mode, d=data: _loss_cell("focal", "mean", m, d, effort),
      )


def eager_cells(run: Run, effort: Effort) -> None:
  """Eager calls on ``[256]``: each call waited for, against a bare jitted one-liner."""
  import eager  # the eager table of bench.py

  def body():
    smoke = effort.trial_s == 0
    timings = timing.time_interleaved(
      eager.calls((256,)), 2 if smoke else 7, warmup=3, inner=5 if smoke else 100
    )
    base = timings[eager.BASELINE].median
    rows = [
      {
        "call": name,
        "us_per_call": t.median * 1e6,
        "ratio_to_baseline": t.median / base,
        "peer": name.startswith("peer:"),
      }
      for name, t in timings.items()
    ]
    return {"baseline": eager.BASELINE, "rows": rows}

  run.cell("eager", {"shape": "[256]", "dtype": "float32"}, body)
