"""Benchmarks bce_jax against optax, Keras (JAX backend) and PyTorch.

One process, every implementation interleaved: each repeat times every
implementation once, in turn, so a slow phase of the machine hits them all
alike. The figure reported is the median over the repeats (>= 20), after
warm-up calls that compile; every result is waited for with
``block_until_ready`` (``.item()`` for torch).

torch runs on the CPU with threads = cores, or on the GPU when JAX's
backend is a GPU and torch sees CUDA.

Groups (all mean reduction, labels in {0, 1}):

* ``logits``: forward loss from logits. Floor: ``jnp.sum(x) + jnp.sum(y)``
  under jit, a read of the same bytes.
* ``probs``: forward loss from probabilities. Same floor.
* ``grad``: ``jax.value_and_grad`` w.r.t. the logits (torch: forward and
  ``backward``). Floor: ``x * y`` under jit, a read of the same bytes and a
  write of one fresh array of N.
* ``metric``: the streaming metric over 100 batches of N / 100. bce_jax's
  state is the carry of a jitted ``lax.scan``; Keras's metric is updated in
  a Python loop, as a Keras user would. Floor: the read floor on all batches.

Usage::

  python benchmarks/bench.py              # N in 1e4, 1e6, 1e7; f32, bf16
  python benchmarks/bench.py --quick      # smoke test: small N, 5 repeats
  python benchmarks/bench.py --huge       # adds N = 1e8

The peers are optional (``pip install -e ".[bench]"``); a missing one is
reported as missing. Writes ``benchmarks/results/<tag>.json`` and
``<tag>.png`` (tag ``cpu`` or ``gpu`` by default).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# Keras reads its backend once, at import.
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bce_jax  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("logits", "probs", "grad", "metric")
METRIC_BATCHES = 100
FLOOR = "floor"
OURS = "bce_jax"
COMPUTE = "exp+log1p"

# name -> (module or None, why missing)
PEERS: dict[str, tuple[object | None, str]] = {}


def _import_peers() -> None:
  for name in ("optax", "keras", "torch"):
    try:
      module = __import__(name)
      if name == "keras" and module.backend.backend() != "jax":
        raise ImportError(f"KERAS_BACKEND is {module.backend.backend()!r}, not 'jax'")
      PEERS[name] = (module, "")
    except Exception as e:  # noqa: BLE001 - any import failure means "missing"
      PEERS[name] = (None, f"{type(e).__name__}: {e}")
  torch = PEERS["torch"][0]
  if torch is not None:
    torch.set_num_threads(os.cpu_count() or 1)
    if jax.default_backend() == "gpu" and not torch.cuda.is_available():
      print("note: torch has no CUDA here; its figures are on the CPU.")


def _peer(name: str):
  return PEERS[name][0]


# --------------------------------------------------------------------------
# The implementations. Each builder takes the data and returns a callable
# that runs once and blocks, or None when the peer is missing.


def _jax_block(fn, *args):
  return lambda: jax.block_until_ready(fn(*args))


def _torch_device() -> str:
  torch = _peer("torch")
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_sync() -> None:
  torch = _peer("torch")
  if _torch_device() == "cuda":
    torch.cuda.synchronize()


def _torch_tensor(a: np.ndarray, dtype: str):
  """`a` as a torch tensor on the device JAX uses (when torch sees it)."""
  torch = _peer("torch")
  t = torch.from_numpy(np.array(a, np.float32))  # a writable copy
  t = t.to(_torch_device())
  return t.to(torch.bfloat16) if dtype == "bfloat16" else t.contiguous()


def _forward_peers(
    preds: jax.Array, y: jax.Array, dtype: str, *, from_logits: bool
) -> dict[str, Callable[[], object] | None]:
  """Keras's and torch's forward mean loss, from logits or probabilities."""
  keras, torch = _peer("keras"), _peer("torch")
  impls: dict[str, Callable[[], object] | None] = {"keras": None, "torch": None}
  if keras is not None:
    loss = keras.losses.BinaryCrossentropy(from_logits=from_logits)
    impls["keras"] = _jax_block(jax.jit(lambda preds, y: loss(y, preds)), preds, y)
  if torch is not None:
    pt, yt = _torch_tensor(preds, dtype), _torch_tensor(y, dtype)
    functional = torch.nn.functional
    fn = (functional.binary_cross_entropy_with_logits if from_logits
          else functional.binary_cross_entropy)

    def run_torch():
      with torch.no_grad():
        return fn(pt, yt).item()

    impls["torch"] = run_torch
  return impls


def build(group: str, data: dict, dtype: str) -> dict[str, Callable[[], object] | None]:
  """The implementations of `group`, name -> callable (None if missing)."""
  x, y, p = data["x"], data["y"], data["p"]
  optax, keras, torch = _peer("optax"), _peer("keras"), _peer("torch")
  read_floor = jax.jit(lambda a, b: jnp.sum(a) + jnp.sum(b))
  impls: dict[str, Callable[[], object] | None] = {}

  if group == "logits":
    impls[FLOOR] = _jax_block(read_floor, x, y)
    # Not a floor: the cost of the one exp and one log1p the loss must pay.
    transcendentals = jax.jit(
        lambda x, y: jnp.sum(jnp.log1p(jnp.exp(-jnp.abs(x.astype(jnp.float32)))) * y)
    )
    impls[COMPUTE] = _jax_block(transcendentals, x, y)
    ours = jax.jit(lambda x, y: bce_jax.binary_crossentropy(y, x, from_logits=True).mean())
    impls[OURS] = _jax_block(ours, x, y)
    if optax is not None:
      f = jax.jit(lambda x, y: optax.sigmoid_binary_cross_entropy(x, y).mean())
      impls["optax"] = _jax_block(f, x, y)
    else:
      impls["optax"] = None
    impls.update(_forward_peers(x, y, dtype, from_logits=True))

  elif group == "probs":
    impls[FLOOR] = _jax_block(read_floor, p, y)
    ours = jax.jit(lambda p, y: bce_jax.binary_crossentropy(y, p).mean())
    impls[OURS] = _jax_block(ours, p, y)
    impls.update(_forward_peers(p, y, dtype, from_logits=False))

  elif group == "grad":
    impls[FLOOR] = _jax_block(jax.jit(lambda a, b: a * b), x, y)
    ours = jax.value_and_grad(
        lambda x, y: bce_jax.binary_crossentropy(y, x, from_logits=True).mean()
    )
    impls[OURS] = _jax_block(jax.jit(ours), x, y)
    if optax is not None:
      f = jax.value_and_grad(lambda x, y: optax.sigmoid_binary_cross_entropy(x, y).mean())
      impls["optax"] = _jax_block(jax.jit(f), x, y)
    else:
      impls["optax"] = None
    if keras is not None:
      loss = keras.losses.BinaryCrossentropy(from_logits=True)
      f = jax.value_and_grad(lambda x, y: loss(y, x))
      impls["keras"] = _jax_block(jax.jit(f), x, y)
    else:
      impls["keras"] = None
    if torch is not None:
      xt, yt = _torch_tensor(x, dtype), _torch_tensor(y, dtype)
      xt.requires_grad_(True)
      fn = torch.nn.functional.binary_cross_entropy_with_logits

      def run_torch_g():
        xt.grad = None  # a fresh gradient array, as JAX returns
        value = fn(xt, yt)
        value.backward()
        result = value.item(), xt.grad
        _torch_sync()
        return result

      impls["torch"] = run_torch_g
    else:
      impls["torch"] = None

  elif group == "metric":
    xs, ys = data["x_batches"], data["y_batches"]
    impls[FLOOR] = _jax_block(read_floor, xs, ys)
    metric = bce_jax.BinaryCrossentropyMetric(from_logits=True)

    @jax.jit
    def ours_scan(xs, ys):
      def step(state, batch):
        return metric.update(state, batch[1], batch[0]), None

      state, _ = jax.lax.scan(step, metric.init(), (xs, ys))
      return metric.result(state)

    impls[OURS] = _jax_block(ours_scan, xs, ys)
    if keras is not None:
      km = keras.metrics.BinaryCrossentropy(from_logits=True)
      x_list, y_list = list(xs), list(ys)  # device arrays, split beforehand

      def run_keras_metric():
        km.reset_state()
        for xb, yb in zip(x_list, y_list):
          km.update_state(yb, xb)
        return jax.block_until_ready(km.result())

      impls["keras"] = run_keras_metric
    else:
      impls["keras"] = None
  else:
    raise ValueError(group)
  return impls


# --------------------------------------------------------------------------
# Data and timing.


def make_data(n: int, dtype: str, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  x = (3.0 * rng.standard_normal(n)).astype(np.float32)
  y = (rng.random(n) < 0.5).astype(np.float32)
  p = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
  jdtype = jnp.dtype(dtype)
  rows = max(n // METRIC_BATCHES, 1)
  data = {
      "x": jnp.asarray(x, jdtype),
      "y": jnp.asarray(y, jdtype),
      "p": jnp.asarray(p, jdtype),
      # [batches, rows, 1]: one logit per sample, as a binary classifier.
      "x_batches": jnp.asarray(x[: rows * METRIC_BATCHES].reshape(METRIC_BATCHES, rows, 1), jdtype),
      "y_batches": jnp.asarray(y[: rows * METRIC_BATCHES].reshape(METRIC_BATCHES, rows, 1), jdtype),
  }
  jax.block_until_ready(data)
  return data


def time_interleaved(
    impls: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> tuple[dict[str, list[float]], dict[str, int]]:
  """Seconds per call of each implementation, one sample per repeat each.

  A sample of a fast call averages several back-to-back calls (``inner``,
  so that a sample lasts ~2 ms), each one blocked on.
  """
  inner = {}
  for name, fn in impls.items():
    for _ in range(warmup):
      fn()
    start = time.perf_counter()
    fn()
    inner[name] = int(min(50, max(1, 2e-3 // max(time.perf_counter() - start, 1e-9))))
  samples: dict[str, list[float]] = {name: [] for name in impls}
  for _ in range(repeats):
    for name, fn in impls.items():
      k = inner[name]
      start = time.perf_counter()
      for _ in range(k):
        fn()
      samples[name].append((time.perf_counter() - start) / k)
  return samples, inner


def run_case(group: str, n: int, dtype: str, data: dict, repeats: int) -> list[dict]:
  impls = build(group, data, dtype)
  available = {k: v for k, v in impls.items() if v is not None}
  rows = []
  errors = {}
  # A peer that fails (e.g. an unsupported dtype) is reported, not fatal.
  for name, fn in list(available.items()):
    try:
      fn()
    except Exception as e:  # noqa: BLE001
      errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      del available[name]
  n_elements = n if group != "metric" else data["x_batches"].size
  samples, inner = time_interleaved(available, repeats)
  median = {k: statistics.median(v) for k, v in samples.items()}
  for name in impls:
    row = {"group": group, "impl": name, "n": n_elements, "dtype": dtype}
    if name in median:
      row.update(
          seconds=median[name],
          ns_per_element=median[name] / n_elements * 1e9,
          ratio_to_floor=median[name] / median[FLOOR] if FLOOR in median else None,
          repeats=repeats,
          inner=inner[name],
          iqr_ns_per_element=[
              float(np.percentile(samples[name], q)) / n_elements * 1e9 for q in (25, 75)
          ],
      )
      if name not in (OURS, FLOOR, COMPUTE) and OURS in median:
        row["bce_jax_speedup"] = median[name] / median[OURS]
    elif name in errors:
      row["status"] = "error: " + errors[name]
    else:
      peer = name if name in PEERS else ""
      row["status"] = "missing: " + (PEERS[peer][1] if peer else "")
    rows.append(row)
  return rows


# --------------------------------------------------------------------------
# Accuracy (not timed): bce_jax against float64 NumPy, and against Keras.


def accuracy() -> dict:
  tiny = float(np.finfo(np.float32).tiny)
  x = np.linspace(-100, 100, 200_001, dtype=np.float32)
  x64 = x.astype(np.float64)
  out: dict = {}
  for label in (0.0, 1.0):
    y = np.full_like(x, label)
    # Loss: softplus(x) for y = 0, softplus(-x) for y = 1; gradient of the
    # element loss: sigmoid(x) for y = 0, -sigmoid(-x) for y = 1.
    sign = 1.0 if label == 0 else -1.0
    ref_loss = np.logaddexp(0.0, sign * x64)
    ref_grad = sign / (1.0 + np.exp(-sign * x64))
    # XLA on CPU flushes subnormals to zero: so does the reference.
    ref_loss = np.where(np.abs(ref_loss) < tiny, 0.0, ref_loss)
    ref_grad = np.where(np.abs(ref_grad) < tiny, 0.0, ref_grad)
    elementwise = jax.jit(
        lambda y, x: bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True)
    )
    loss = np.asarray(elementwise(y, x), np.float64)
    grad = np.asarray(
        jax.jit(jax.grad(lambda x, y: elementwise(y, x).sum()))(x, y), np.float64
    )
    key = f"y={int(label)}"
    out[f"loss_max_rel_err_{key}"] = float(
        np.max(np.abs(loss - ref_loss) / np.maximum(np.abs(ref_loss), tiny))
    )
    out[f"grad_max_rel_err_{key}"] = float(
        np.max(np.abs(grad - ref_grad) / np.maximum(np.abs(ref_grad), tiny))
    )
    optax = _peer("optax")
    if optax is not None:
      o_loss = np.asarray(jax.jit(optax.sigmoid_binary_cross_entropy)(x, y), np.float64)
      o_grad = np.asarray(
          jax.jit(jax.grad(lambda x, y: optax.sigmoid_binary_cross_entropy(x, y).sum()))(x, y),
          np.float64,
      )
      out[f"optax_loss_max_rel_err_{key}"] = float(
          np.max(np.abs(o_loss - ref_loss) / np.maximum(np.abs(ref_loss), tiny))
      )
      out[f"optax_grad_max_rel_err_{key}"] = float(
          np.max(np.abs(o_grad - ref_grad) / np.maximum(np.abs(ref_grad), tiny))
      )
  out["loss_max_rel_err"] = max(out["loss_max_rel_err_y=0"], out["loss_max_rel_err_y=1"])
  out["grad_max_rel_err"] = max(out["grad_max_rel_err_y=0"], out["grad_max_rel_err_y=1"])
  keras = _peer("keras")
  if keras is not None:
    # Probabilities on a grid with the clip edges, hard and soft labels.
    edges = np.array([0.0, 1e-8, 1e-7, 2e-7, 0.5, 1 - 2e-7, 1 - 1e-7, 1 - 5e-8, 1.0], np.float32)
    p = np.concatenate([np.linspace(0, 1, 100_001, dtype=np.float32), edges])
    worst = 0.0
    for label in (0.0, 0.3, 1.0):
      y = np.full_like(p, label)
      ours = np.asarray(bce_jax.binary_crossentropy_elementwise(y, p), np.float64)
      theirs = np.asarray(keras.losses.binary_crossentropy(y[:, None], p[:, None]), np.float64)
      # Absolute below 1, relative above (a float32 ulp of a loss of 5 is 5e-7).
      worst = max(worst, float(np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1.0))))
    out["probs_max_diff_vs_keras"] = worst
  return out


# --------------------------------------------------------------------------
# Report.

TARGETS = (
    # (description, group, kind, impl, bound)
    ("forward logits <= 3.2x read floor", "logits", "floor", OURS, 3.2),
    ("forward logits >= 3.5x faster than optax", "logits", "speedup", "optax", 3.5),
    ("forward logits >= 3.5x faster than Keras", "logits", "speedup", "keras", 3.5),
    ("value_and_grad <= 2.3x floor", "grad", "floor", OURS, 2.3),
    ("value_and_grad >= 2.5x faster than optax", "grad", "speedup", "optax", 2.5),
    ("value_and_grad >= 2.5x faster than Keras", "grad", "speedup", "keras", 2.5),
    ("probabilities >= 1.5x faster than Keras", "probs", "speedup", "keras", 1.5),
    ("metric scan >= 3x faster than Keras loop", "metric", "speedup", "keras", 3.0),
)


def evaluate_targets(rows: list[dict], acc: dict, n: int = 10**7) -> list[dict]:
  out = []
  for desc, group, kind, impl, bound in TARGETS:
    match = [
        r for r in rows
        if r["group"] == group and r["impl"] == impl and r["dtype"] == "float32"
        and abs(r["n"] - n) <= n // 100
    ]
    if not match or "seconds" not in match[0]:
      out.append({"target": desc, "measured": None, "met": None})
      continue
    r = match[0]
    value = r["ratio_to_floor"] if kind == "floor" else r["bce_jax_speedup"]
    met = value <= bound if kind == "floor" else value >= bound
    out.append({"target": desc, "measured": round(value, 2), "met": bool(met)})
  if acc:
    for key, desc, bound in (
        ("loss_max_rel_err", "loss within 2e-7 relative of float64, logits in [-100, 100]", 2e-7),
        ("grad_max_rel_err", "gradient within 2e-7 relative of float64, same logits", 2e-7),
        ("probs_max_diff_vs_keras", "probabilities within 2e-7 of Keras (relative above 1)", 2e-7),
    ):
      if key in acc:
        out.append({"target": desc, "measured": acc[key], "met": acc[key] <= bound})
  return out


def format_table(rows: list[dict]) -> str:
  peers = ("optax", "keras", "torch")
  lines = []
  header = (
      f"| {'group':7} | {'dtype':8} | {'N':>9} | {'impl':9} | {'ns/elem':>8} "
      f"| {'x floor':>7} | {'bce_jax speed-up':>16} |"
  )
  lines.append(header)
  lines.append("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
  for r in rows:
    if "seconds" in r:
      ns = f"{r['ns_per_element']:.3f}"
      ratio = f"{r['ratio_to_floor']:.2f}" if r.get("ratio_to_floor") else "-"
      speed = f"{r['bce_jax_speedup']:.2f}x" if "bce_jax_speedup" in r else ""
    else:
      ns, ratio, speed = r["status"].split(":")[0], "", ""
    if r["impl"] in peers or r["impl"] in (OURS, FLOOR, COMPUTE):
      lines.append(
          f"| {r['group']:7} | {r['dtype']:8} | {r['n']:>9.0e} | {r['impl']:9} | {ns:>8} "
          f"| {ratio:>7} | {speed:>16} |"
      )
  return "\n".join(lines)


def machine_info() -> dict:
  info = {
      "platform": platform.platform(),
      "python": sys.version.split()[0],
      "cpu_count": os.cpu_count(),
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
  }
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        info["cpu_model"] = line.split(":", 1)[1].strip()
        break
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal"):
        info["memory"] = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  try:
    info["load_average_at_start"] = os.getloadavg()
  except OSError:
    pass
  return info


def versions() -> dict:
  out = {}
  for dist in ("bce_jax", "jax", "jaxlib", "numpy", "optax", "keras", "torch"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = None
  return out


def plot(rows: list[dict], path: Path, title: str) -> bool:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is missing: no plot.")
    return False
  dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: d != "float32")
  fig, axes = plt.subplots(
      len(dtypes), len(GROUPS), figsize=(3.2 * len(GROUPS), 2.6 * len(dtypes)),
      squeeze=False, sharex=True,
  )
  styles = {
      FLOOR: ("k", ":"), COMPUTE: ("0.5", ":"), OURS: ("C3", "-"), "optax": ("C0", "--"),
      "keras": ("C2", "--"), "torch": ("C1", "--"),
  }
  for i, dtype in enumerate(dtypes):
    for j, group in enumerate(GROUPS):
      ax = axes[i][j]
      for impl, (color, ls) in styles.items():
        pts = sorted(
            (r["n"], r["ns_per_element"]) for r in rows
            if r["group"] == group and r["dtype"] == dtype and r["impl"] == impl
            and "seconds" in r
        )
        if pts:
          ax.plot(*zip(*pts), color=color, ls=ls, marker="o", ms=3, lw=1.2, label=impl)
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_title(f"{group}, {dtype}", fontsize=9)
      ax.tick_params(labelsize=7)
      ax.grid(True, which="major", lw=0.3)
      if j == 0:
        ax.set_ylabel("ns / element", fontsize=8)
      if i == len(dtypes) - 1:
        ax.set_xlabel("N", fontsize=8)
  handles, labels = [], []
  for ax in axes.flat:
    for h, label in zip(*ax.get_legend_handles_labels()):
      if label not in labels:
        handles.append(h)
        labels.append(label)
  fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
  fig.suptitle(title, fontsize=8, y=0.005, va="bottom")
  fig.tight_layout(rect=(0, 0.03, 1, 0.94))
  fig.savefig(path, dpi=72)
  plt.close(fig)
  try:  # a palette PNG is a third of the size, small enough to commit
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)
  except ImportError:
    pass
  return True


def markdown(record: dict) -> str:
  """README tables: per dtype, ns/element at each N, and ratios at the largest N."""
  rows = record["results"]
  out = []
  for dtype in sorted({r["dtype"] for r in rows}, key=lambda d: d != "float32"):
    mine = [r for r in rows if r["dtype"] == dtype]
    sizes = sorted({r["n"] for r in mine if r["group"] != "metric"})
    big = sizes[-1]
    out.append(f"**{dtype}** (ns per element; ratios at N = {big:.0e})\n")
    head = "| group | impl | " + " | ".join(f"N={n:.0e}" for n in sizes)
    out.append(head + " | x floor | bce_jax speed-up |")
    out.append("|" + "---|" * (len(sizes) + 4))
    for group in GROUPS:
      impls = [r["impl"] for r in mine if r["group"] == group and r["n"] <= sizes[0] * 1.01]
      for impl in dict.fromkeys(impls):
        cells, last = [], None
        for n in sizes:
          match = [
              r for r in mine
              if r["group"] == group and r["impl"] == impl and abs(r["n"] - n) <= n // 100
          ]
          r = match[0] if match else None
          if r is None:
            cells.append("")
          elif "seconds" in r:
            cells.append(f"{r['ns_per_element']:.3g}")
            last = r
          else:
            cells.append(r["status"].split(":")[0])
            last = r
        ratio = f"{last['ratio_to_floor']:.2f}" if last and last.get("ratio_to_floor") else ""
        speed = f"{last['bce_jax_speedup']:.2f}x" if last and "bce_jax_speedup" in last else ""
        name = f"**{impl}**" if impl == OURS else impl
        out.append(f"| {group} | {name} | " + " | ".join(cells) + f" | {ratio} | {speed} |")
    out.append("")
  return "\n".join(out)


def _plot_title(info: dict, vers: dict) -> str:
  return (
      f"{info.get('cpu_model', info['device_kind'])}, {info['cpu_count']} cores; "
      f"jax {vers['jax']}, optax {vers['optax']}, keras {vers['keras']}, torch {vers['torch']}; "
      "median of interleaved repeats"
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="smoke test: small N, 5 repeats")
  parser.add_argument("--huge", action="store_true", help="add N = 1e8 (needs ~8 GB)")
  parser.add_argument("--sizes", type=float, nargs="+", help="override the sizes N")
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
  parser.add_argument("--repeats", type=int, help="timed repeats (default 25; 5 with --quick)")
  parser.add_argument("--tag", help="output name under benchmarks/results/ (default: backend)")
  parser.add_argument("--no-plot", action="store_true")
  parser.add_argument("--no-accuracy", action="store_true")
  parser.add_argument("--markdown", metavar="JSON", help="print a results file as README tables")
  parser.add_argument("--replot", metavar="JSON", help="only redraw the plot of a results file")
  args = parser.parse_args(argv)

  if args.markdown:
    print(markdown(json.loads(Path(args.markdown).read_text())))
    return 0
  if args.replot:
    record = json.loads(Path(args.replot).read_text())
    info, vers = record["machine"], record["versions"]
    png = Path(args.replot).with_suffix(".png")
    plot(record["results"], png, _plot_title(info, vers))
    print(f"wrote {png}")
    return 0

  if args.sizes:
    sizes = [int(s) for s in args.sizes]
  elif args.quick:
    sizes = [10**4, 10**5]
  else:
    sizes = [10**4, 10**6, 10**7] + ([10**8] if args.huge else [])
  repeats = args.repeats or (5 if args.quick else 25)
  if not args.quick and repeats < 20:
    print(f"note: {repeats} repeats; the published figures use >= 20.")
  backend = jax.default_backend()
  tag = args.tag or ("quick" if args.quick else ("gpu" if backend == "gpu" else "cpu"))

  _import_peers()
  for name, (module, why) in PEERS.items():
    if module is None:
      print(f"peer {name}: MISSING ({why}); install with pip install -e '.[bench]'")
  info, vers = machine_info(), versions()
  print("machine:", json.dumps(info))
  print("versions:", json.dumps(vers))

  rows: list[dict] = []
  for dtype in args.dtypes:
    for n in sizes:
      data = make_data(n, dtype)
      for group in args.groups:
        try:
          rows.extend(run_case(group, n, dtype, data, repeats))
        except Exception:  # noqa: BLE001 - report and carry on with the rest
          traceback.print_exc()
      print(format_table([r for r in rows if r["n"] in (n, (n // METRIC_BATCHES) * METRIC_BATCHES)
                          and r["dtype"] == dtype]), flush=True)
      del data

  acc = {} if args.no_accuracy else accuracy()
  targets = evaluate_targets(rows, acc)
  print()
  print(format_table(rows))
  print()
  for key, value in acc.items():
    print(f"accuracy {key}: {value:.3g}")
  for t in targets:
    state = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT MET")
    print(f"target {t['target']}: {t['measured']} ({state})")

  RESULTS.mkdir(parents=True, exist_ok=True)
  record = {
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
      "machine": info,
      "versions": vers,
      "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
      "missing_peers": {k: why for k, (m, why) in PEERS.items() if m is None},
      "repeats": repeats,
      "results": rows,
      "accuracy": acc,
      "targets": targets,
  }
  json_path = RESULTS / f"{tag}.json"
  json_path.write_text(json.dumps(record, indent=1))
  print(f"wrote {json_path}")
  if not args.no_plot:
    png = RESULTS / f"{tag}.png"
    if plot(rows, png, _plot_title(info, vers)):
      print(f"wrote {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
