"""The timing loop: interleaved repeats, medians, calls pipelined.

Every implementation is warmed up (which compiles it), then each repeat
times every implementation once, in turn, so that a slow phase of a shared
machine hits them all alike. A sample is `inner` calls made back to back
and one wait for the last result: the device runs the calls one after the
other while Python dispatches the next, as in a training loop. Waiting after
every call would measure the dispatch round trip instead of the kernel (on a
GPU it made a 0.3 ms loss look 4x slower than it is).

A call is a callable that starts the work and returns its result, or a
:class:`Pipelined` when waiting for that result takes more than
``jax.block_until_ready`` (a torch tensor on a GPU). :func:`blocking` makes
a call that waits itself: for eager calls, whose cost is the round trip.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

MIN_SAMPLE_S = 2e-3  # a sample of a fast call lasts at least this long
MAX_INNER = 50


@dataclasses.dataclass
class Timing:
  """The samples of one implementation, in seconds per call."""

  samples: list[float]
  inner: int

  @property
  def median(self) -> float:
    return statistics.median(self.samples)

  @property
  def iqr(self) -> tuple[float, float]:
    return tuple(float(np.percentile(self.samples, q)) for q in (25, 75))

  def to_json(self) -> dict:
    return {"seconds": self.median, "iqr_seconds": list(self.iqr), "inner": self.inner}


@dataclasses.dataclass(frozen=True)
class Pipelined:
  """A call that returns before its work is done, and how to wait for it.

  Attributes:
    run: starts one call; returns its result (not waited for).
    wait: waits until a result of `run` is computed (the device's queue is
      in order, so waiting for the last of several calls waits for all).
  """

  run: Callable[[], object]
  wait: Callable[[object], object] = jax.block_until_ready

  def __call__(self) -> object:
    """One call, waited for."""
    return self.wait(self.run())


Call = Callable[[], object] | Pipelined


def pipelined(fn: Callable, *args) -> Pipelined:
  """``fn(*args)`` as a call that does not wait (JAX dispatches asynchronously)."""
  return Pipelined(lambda: fn(*args))


def blocking(fn: Callable, *args) -> Callable[[], object]:
  """A callable that runs ``fn(*args)`` once and waits for the result."""
  return lambda: jax.block_until_ready(fn(*args))


def as_pipelined(call: Call) -> Pipelined:
  """`call` as a :class:`Pipelined` (a plain callable is waited for with JAX)."""
  return call if isinstance(call, Pipelined) else Pipelined(call)


def sample(call: Pipelined, k: int) -> float:
  """Seconds per call of `k` calls back to back, with one wait at the end."""
  start = time.perf_counter()
  out = None
  for _ in range(k):
    out = call.run()
  call.wait(out)
  return (time.perf_counter() - start) / k


def _warm_up(call: Pipelined, calls: int) -> int:
  """Calls `call` `calls` (>= 1) times; returns the calls per sample the last one suggests."""
  for _ in range(calls):
    elapsed = max(sample(call, 1), 1e-9)
  return int(min(MAX_INNER, max(1, MIN_SAMPLE_S // elapsed)))


def time_interleaved(
  calls: dict[str, Call],
  repeats: int,
  *,
  warmup: int = 2,
  inner: int | None = None,
) -> dict[str, Timing]:
  """Seconds per call of each of `calls`, one sample per repeat each.

  Args:
    calls: name -> a call (see the module docstring).
    repeats: samples per implementation; the figure is their median.
    warmup: untimed calls first (at least one; the first one compiles).
    inner: calls per sample; None picks enough for a ~2 ms sample (<= 50).

  Returns:
    name -> its :class:`Timing`.
  """
  runs = {name: as_pipelined(call) for name, call in calls.items()}
  counts = {}
  for name, call in runs.items():
    suggested = _warm_up(call, max(warmup, 1))
    counts[name] = inner if inner is not None else suggested
  samples: dict[str, list[float]] = {name: [] for name in runs}
  gc.collect()
  gc_was_enabled = gc.isenabled()
  gc.disable()  # a collection inside one sample would land on one implementation
  try:
    for _ in range(repeats):
      for name, call in runs.items():
        samples[name].append(sample(call, counts[name]))
  finally:
    if gc_was_enabled:
      gc.enable()
  return {name: Timing(samples[name], counts[name]) for name in runs}
