"""The shape matrix: every shape x path x dtype x mode, bce_jax beside its peers.

Shapes hold N elements (fewer where N does not divide): ``[N]`` (one sample
in Keras's convention, so its weight and mask are scalars), ``[N, 1]``,
``[N/8, 8]``, ``[N/64, 64]``, ``[N/1000, 1000]`` and ``[N/512, 64, 8]`` (a
``[B, T, L]`` sequence). Paths, all from logits:

* ``mean``: the default reduction, the mean of the per-sample losses;
* ``weight``: the same with a ``[B]`` sample weight in [0.5, 1.5];
* ``mask``: the same with a bool mask (``[B]``, ``[B, T]`` for the 3-D
  shape; 90% True), the mean over the valid samples;
* ``none``: ``reduction="none"``, the per-sample losses (their sum is
  differentiated);
* ``metric``: one metric ``update`` of a given state (forward only).

Modes: ``forward``, and ``value_and_grad`` w.r.t. the logits. Floors:
forward reads every input once (``sum(x) + sum(y)``, plus the weight or the
mask; for ``none`` that sum is also written out in the per-sample shape, as
the call must write its output); ``value_and_grad`` reads them and writes one
array of the input's shape (``x * y``, times the weight or mask broadcast).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import peers
import timing

SHAPES: dict[str, tuple[int, ...]] = {  # name -> the trailing axes
  "[N]": (),
  "[N,1]": (1,),
  "[N/8,8]": (8,),
  "[N/64,64]": (64,),
  "[N/1000,1000]": (1000,),
  "[N/512,64,8]": (64, 8),
}
FLAT = "[N]"
PATHS = ("mean", "weight", "mask", "none", "metric")
MODES = ("forward", "value_and_grad")
FLOOR = "floor"
MASK_TRUE = 0.9
# Values must agree with bce_jax's to this, relative to the largest value. In
# bfloat16 optax computes in bfloat16: its gradient is up to ~2.3e-2 of the
# largest one away, where a wrong mean, weight or mask is off by > 1e-1.
# Keras's focal factor (1 - sigmoid)^gamma cancels in float32: ~2e-5 off.
TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2}
FAMILY_TOLERANCE = {"focal": 1e-4}


@dataclasses.dataclass(frozen=True)
class Cell:
  """One cell of the matrix."""

  family: str
  shape: str
  path: str
  mode: str
  dtype: str

  @classmethod
  def of(cls, record: dict) -> Cell:
    """The cell of a JSON record."""
    return cls(*(record[f.name] for f in dataclasses.fields(cls)))

  @property
  def key(self) -> str:
    return f"{self.family}|{self.shape}|{self.path}|{self.mode}|{self.dtype}"


def dims(shape: str, n: int) -> tuple[int, ...]:
  """The array shape of `shape` for about `n` elements."""
  tail = SHAPES[shape]
  return (n,) if not tail else (n // math.prod(tail),) + tail


def cells(families, dtypes, shapes=tuple(SHAPES), paths=PATHS, modes=MODES) -> list[Cell]:
  """The cells in run order: flat ``[N]`` first, so later cells can be compared to it.

  The metric path is left out for a family whose bce_jax has no metric.
  """
  shapes = sorted(shapes, key=lambda s: s != FLAT)
  with_metric = {f for f in families if peers.has_metric(f)}
  return [
    Cell(family, shape, path, mode, dtype)
    for family in families
    for dtype in dtypes
    for shape in shapes
    for path in paths
    for mode in modes
    if path != "metric" or (mode == "forward" and family in with_metric)
  ]


def make_inputs(shape: tuple[int, ...], dtype: str, seed: int = 0) -> dict[str, jax.Array]:
  """Logits `x` ~ N(0, 9), labels `y` in {0, 1}, weight `w` ([B]) and `mask`."""
  rng = np.random.default_rng(seed)
  per_sample = shape[:-1]  # () for [N]: one sample, scalar weight and mask
  arrays = {
    "x": (3.0 * rng.standard_normal(shape)).astype(np.float32),
    "y": (rng.random(shape) < 0.5).astype(np.float32),
    "w": rng.uniform(0.5, 1.5, per_sample[:1]).astype(np.float32),
  }
  out = {k: jnp.asarray(v, jnp.dtype(dtype)) for k, v in arrays.items()}
  mask = rng.random(per_sample) < MASK_TRUE
  out["mask"] = jnp.asarray(np.logical_or(mask, np.arange(mask.size).reshape(mask.shape) == 0))
  return jax.block_until_ready(out)


def _path_args(path: str, inputs: dict) -> tuple[jax.Array | None, jax.Array | None]:
  return (inputs["w"] if path == "weight" else None, inputs["mask"] if path == "mask" else None)


def _floor(cell: Cell, inputs: dict) -> Callable[[], object]:
  w, mask = _path_args(cell.path, inputs)
  if cell.mode == "forward":

    def read(x, y, w, mask):
      extra = [a for a in (w, mask) if a is not None]
      total = sum(jnp.sum(a, dtype=jnp.float32) for a in (x, y, *extra))
      # "none" must also write its per-sample output: the floor writes as much.
      return jnp.broadcast_to(total, x.shape[:-1]) if cell.path == "none" else total

    return timing.pipelined(jax.jit(read), inputs["x"], inputs["y"], w, mask)

  def write(x, y, w, mask):
    out = x * y
    for a in (w, mask):
      if a is not None:
        out = out * peers.expand_to(a, x.ndim).astype(x.dtype)
    return out

  return timing.pipelined(jax.jit(write), inputs["x"], inputs["y"], w, mask)


def _impl_call(impl: peers.Impl, cell: Cell, inputs: dict):
  """``(run, values)`` for one implementation in `cell`, or why it cannot run.

  `run()` is the timed call; ``values(out)`` turns its output into the
  arrays compared across implementations.
  """
  x, y = inputs["x"], inputs["y"]
  if cell.path == "metric":
    if impl.metric is None:
      return "no metric in this library"
    m = impl.metric()
    update = jax.jit(lambda state, x, y: m.update(state, y, x))
    return timing.pipelined(update, m.init(), x, y), lambda out: (m.result(out),)
  reduction = "none" if cell.path == "none" else "mean"
  loss = impl.loss(reduction)
  w, mask = _path_args(cell.path, inputs)

  def forward(x, y, w, mask):
    out = loss(y, x, w, mask)
    return jnp.sum(out) if cell.mode != "forward" and reduction == "none" else out

  fn = forward if cell.mode == "forward" else jax.value_and_grad(forward)
  values = (lambda out: (out,)) if cell.mode == "forward" else (lambda out: tuple(out))
  return timing.pipelined(jax.jit(fn), x, y, w, mask), values


def _as_f64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _rel_err(values, reference) -> float:
  """The largest difference over the arrays, relative to each reference's largest value."""
  worst = 0.0
  for a, b in zip(values, reference, strict=True):
    a, b = _as_f64(a), _as_f64(b)
    if a.shape != b.shape:
      return math.inf
    scale = max(float(np.max(np.abs(b), initial=0.0)), np.finfo(np.float32).tiny)
    worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / scale)
  return worst


def run_cell(cell: Cell, inputs: dict, repeats: int) -> dict:
  """Checks and times every implementation of `cell`.

  Args:
    cell: the cell.
    inputs: :func:`make_inputs` for the cell's shape and dtype.
    repeats: timed samples per implementation.

  Returns:
    The cell's JSON record: its fields, ``dims`` and ``n``, and ``impls``:
    name -> ``seconds``, ``iqr_seconds``, ``inner`` and ``rel_err`` (to
    ``reference``), or ``status`` (why it is missing or failed); and
    ``mismatches``, the values outside the tolerance.
  """
  record = {**dataclasses.asdict(cell), "dims": list(inputs["x"].shape), "n": inputs["x"].size}
  results: dict[str, dict] = {}
  calls = {FLOOR: _floor(cell, inputs)}
  values = {}
  for name, impl in peers.implementations(cell.family).items():
    built = impl if isinstance(impl, str) else _impl_call(impl, cell, inputs)
    if isinstance(built, str):
      results[name] = {"status": "missing: " + built}
      continue
    run, to_values = built
    try:  # the first call compiles; a peer that fails is reported, not fatal
      values[name] = to_values(run())
      calls[name] = run
    except Exception as e:  # noqa: BLE001
      results[name] = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  reference = peers.OURS if peers.OURS in values else next(iter(values), None)
  mismatches = []
  for name, value in values.items():
    err = _rel_err(value, values[reference])
    results.setdefault(name, {})["rel_err"] = err
    if err > max(TOLERANCE.get(cell.dtype, 1e-5), FAMILY_TOLERANCE.get(cell.family, 0.0)):
      mismatches.append(f"{name} differs from {reference} by {err:.2e} (relative)")
  for name, t in timing.time_interleaved(calls, repeats, warmup=1).items():
    results.setdefault(name, {}).update(t.to_json())
  record.update(impls=results, reference=reference, mismatches=mismatches)
  return record


def run(
  todo: list[Cell],
  n: int,
  repeats: int,
  done: dict[str, dict],
  on_cell: Callable[[dict], None],
) -> None:
  """Runs the cells of `todo`, in order, one shape's data in memory at a time.

  Args:
    todo: the cells, from :func:`cells`.
    n: elements per array.
    repeats: timed samples per implementation.
    done: key -> record of cells already measured (skipped).
    on_cell: called with each new record as soon as it is measured.
  """
  cached: dict[tuple, dict] = {}
  for cell in todo:
    if cell.key in done:
      continue
    data_key = (dims(cell.shape, n), cell.dtype)
    if data_key not in cached:
      cached.clear()  # one shape's data at a time
      cached[data_key] = make_inputs(*data_key)
    on_cell(run_cell(cell, cached[data_key], repeats))
