"""What every cell of the GPU benchmark shares: the budget, guards and timing.

A *cell* is one measurement (one shape, dtype, path and mode; one pairwise
batch size; ...). :class:`Run` runs each cell behind a guard: an error or an
out-of-memory in one cell, or in one implementation of a cell, is recorded
in its JSON record and the run goes on; once the time budget is spent the
cells left are recorded as skipped.

:func:`measure` times a cell's implementations with pipelined calls: each
trial makes K calls back to back and waits once (see :mod:`timing`), and
the figure is the median of the trials. K is chosen from one warm call so
that a trial lasts about :data:`TRIAL_S`.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import timing

TRIAL_S = 0.01  # a trial of a fast call lasts about this long
MAX_CALLS_PER_TRIAL = 50
GIB = 1 << 30

Calls = dict[str, "timing.Call | str"]  # name -> a call, or why it has no figure


@dataclasses.dataclass(frozen=True)
class Effort:
  """How hard to time: trials per implementation, and the length of a trial."""

  trials: int = 7
  slow_trials: int = 3  # for a call over SLOW_S
  trial_s: float = TRIAL_S

  SLOW_S = 0.05


SMOKE_EFFORT = Effort(trials=2, slow_trials=2, trial_s=0.0)


def describe_error(e: BaseException) -> str:
  """``out of memory: ...`` or ``error: Type: ...``, one line for the JSON and the table."""
  text = str(e).strip()
  first = (text.splitlines() or [""])[0][:300]
  if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
    return f"out of memory: {first}"
  return f"error: {type(e).__name__}: {first}"


def device_memory_limit() -> int | None:
  """Bytes the first device can hold (None where the backend does not say: CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - a backend without memory stats
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def memory_of(compiled) -> dict[str, int]:
  """Temporaries, arguments and outputs of a compiled program, in bytes."""
  m = compiled.memory_analysis()
  return {
    "temp": int(m.temp_size_in_bytes),
    "arguments": int(m.argument_size_in_bytes),
    "output": int(m.output_size_in_bytes),
  }


def too_big(memory: dict[str, int]) -> str | None:
  """Why a program of `memory` cannot run on this device (None if it fits or nobody knows)."""
  limit = device_memory_limit()
  need = memory["temp"] + memory["arguments"] + memory["output"]
  if limit is not None and need > limit:
    return f"out of memory: needs {need / GIB:.1f} GiB, the device has {limit / GIB:.1f} GiB"
  return None


@jax.jit
def _leaf_rel_diff(u, v):
  u, v = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
  scale = jnp.maximum(jnp.max(jnp.abs(v)), jnp.finfo(jnp.float32).tiny)
  return jnp.max(jnp.abs(u - v)) / scale


def rel_diff(a, b) -> float:
  """max |a - b| / max |b| over the leaves of two pytrees (on the device, in float32)."""
  worst = 0.0
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if jnp.shape(u) != jnp.shape(v):
      return float("inf")
    worst = max(worst, float(_leaf_rel_diff(u, v)))
  return worst


def measure(calls: Calls, effort: Effort, values: dict[str, object] | None = None) -> dict:
  """Times each implementation of a cell, each behind its own guard.

  Args:
    calls: name -> a call (:mod:`timing`), or a string saying why it is
      missing.
    effort: trials and trial length.
    values: if given, filled with name -> the output of the first call.

  Returns:
    name -> ``{"seconds", "samples", "calls_per_trial"}`` (seconds per
    call, the median over the trials) or ``{"status": why}``.
  """
  out: dict[str, dict] = {}
  ready: dict[str, tuple[timing.Pipelined, int, int]] = {}
  for name, call in calls.items():
    if isinstance(call, str):
      said = call.startswith(("missing", "error", "out of memory", "not available"))
      out[name] = {"status": call if said else f"missing: {call}"}
      continue
    call = timing.as_pipelined(call)
    try:
      first = call()  # compiles
      if values is not None:
        values[name] = first
      del first
      one = max(timing.sample(call, 1), 1e-9)
    except Exception as e:  # noqa: BLE001 - recorded, the cell goes on
      out[name] = {"status": describe_error(e)}
      continue
    k = max(1, min(MAX_CALLS_PER_TRIAL, round(effort.trial_s / one)))
    trials = effort.slow_trials if one > Effort.SLOW_S else effort.trials
    ready[name] = (call, k, trials)
    out[name] = {"samples": [], "calls_per_trial": k}
  gc.collect()
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    for i in range(max((t for _, _, t in ready.values()), default=0)):
      for name, (call, k, trials) in ready.items():
        if i >= trials or "status" in out[name]:
          continue
        try:
          out[name]["samples"].append(timing.sample(call, k))
        except Exception as e:  # noqa: BLE001
          out[name] = {"status": describe_error(e)}
  finally:
    if gc_was_enabled:
      gc.enable()
  for entry in out.values():
    if entry.get("samples"):
      entry["seconds"] = statistics.median(entry["samples"])
  return out


class Run:
  """The budget and the guarded cells of one benchmark run.

  Args:
    budget_s: seconds from now after which no new cell starts.
    on_section_done: called after each section (writes the files).
  """

  def __init__(self, budget_s: float, on_section_done: Callable[[], None] = lambda: None):
    self.start = time.perf_counter()
    self.budget_s = budget_s
    self.sections: dict[str, list[dict]] = {}
    self.skipped = 0
    self._done = on_section_done

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def over_budget(self) -> bool:
    return self.elapsed() > self.budget_s

  def cell(self, section: str, key: dict, body: Callable[[], dict]) -> dict:
    """Runs one cell: ``{**key, **body()}``, or the error, or "skipped" past the budget."""
    record = dict(key)
    if self.over_budget():
      self.skipped += 1
      record["skipped"] = f"the --budget of {self.budget_s:.0f} s was spent"
    else:
      started = time.perf_counter()
      try:
        record.update(body())
      except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        record["status"] = describe_error(e)
        traceback.print_exc()
      record["cell_seconds"] = round(time.perf_counter() - started, 3)
    self.sections.setdefault(section, []).append(record)
    line = " ".join(f"{k}={v}" for k, v in key.items())
    state = record.get("skipped") or record.get("status") or f"{record['cell_seconds']:.1f} s"
    print(f"[{self.elapsed():6.1f} s] {section}: {line}: {state}", flush=True)
    return record

  def section_done(self) -> None:
    self._done()
