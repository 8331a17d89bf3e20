"""The timing loop: interleaved repeats, medians, every call waited for.

Every implementation is warmed up (which compiles it), then each repeat
times every implementation once, in turn, so that a slow phase of a shared
machine hits them all alike. A sample of a fast call averages `inner`
back-to-back calls, each one blocked on (the callables block themselves:
``jax.block_until_ready`` for JAX, ``.item()`` for torch).
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


def blocking(fn: Callable, *args) -> Callable[[], object]:
  """A callable that runs ``fn(*args)`` once and waits for the result."""
  return lambda: jax.block_until_ready(fn(*args))


def _warm_up(fn: Callable[[], object], calls: int) -> int:
  """Calls `fn` `calls` (>= 1) times; returns the calls per sample the last one suggests."""
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    elapsed = max(time.perf_counter() - start, 1e-9)
  return int(min(MAX_INNER, max(1, MIN_SAMPLE_S // elapsed)))


def time_interleaved(
  calls: dict[str, Callable[[], object]],
  repeats: int,
  *,
  warmup: int = 2,
  inner: int | None = None,
) -> dict[str, Timing]:
  """Seconds per call of each of `calls`, one sample per repeat each.

  Args:
    calls: name -> a callable that runs once and blocks.
    repeats: samples per implementation; the figure is their median.
    warmup: untimed calls first (at least one; the first one compiles).
    inner: calls per sample; None picks enough for a ~2 ms sample (<= 50).

  Returns:
    name -> its :class:`Timing`.
  """
  counts = {}
  for name, fn in calls.items():
    suggested = _warm_up(fn, max(warmup, 1))
    counts[name] = inner if inner is not None else suggested
  samples: dict[str, list[float]] = {name: [] for name in calls}
  gc.collect()
  gc_was_enabled = gc.isenabled()
  gc.disable()  # a collection inside one sample would land on one implementation
  try:
    for _ in range(repeats):
      for name, fn in calls.items():
        k = counts[name]
        start = time.perf_counter()
        for _ in range(k):
          fn()
        samples[name].append((time.perf_counter() - start) / k)
  finally:
    if gc_was_enabled:
      gc.enable()
  return {name: Timing(samples[name], counts[name]) for name in calls}
