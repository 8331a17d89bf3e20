"""bce_jax on several processes: one global mesh, each process holding only its rows.

What users run when one machine is not enough: N processes (one per host)
joined by ``jax.distributed.initialize``, one ``Mesh`` over the devices of
all of them, and a batch sharded over that mesh so that no process holds all
of it. Every process runs the same program:

1. generates the same synthetic data set (one seed for all) and places only
   its own rows on its devices (``jax.make_array_from_process_local_data``);
2. trains a linear multi-label classifier for a few optax SGD steps with
   ``bce_jax.BinaryCrossentropy(from_logits=True)``, per-sample weights and
   a mask (the masked rows are padding with a label of -1);
3. evaluates a ``bce_jax.BinaryCrossentropyMetric``: a ``psum`` of the
   per-shard states inside ``jax.shard_map``, and the per-shard states
   all-gathered to the host and merged there;
4. repeats steps 2 and 3 on one local device over the whole data set (the
   single-device reference) and compares: loss, gradients, parameters and
   metric must agree to float32 rounding;
5. runs ``bce_jax.checked`` on the global arrays under an Explicit and an
   Auto mesh: valid data must pass, and a negative sample weight in the
   rows of any one process must raise ``bce_jax.ValueCheckError`` in every
   process.

Each process prints the figures, a ``RESULT key=value ...`` line, a
``CHECKED case=outcome ...`` line and, last, a one-line verdict
(``VERDICT process i: PASS|FAIL, largest relative difference ...``), and
exits with status 1 if any comparison or check fails. On CPU the processes talk through the gloo
collectives, and each one gets ``--devices-per-process`` host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``, set below before jax
is imported unless XLA_FLAGS already asks for a device count). With
``--local N`` this script starts the N processes itself, on CPU, and prints
their output prefixed with ``[process i]`` (whole lines: gloo's connection
messages of several ranks arrive in any order), then the verdicts again,
one line per process.

Run::

  # N processes on this machine (coordinator on 127.0.0.1, a free port):
  python examples/multihost_eval.py --local 2            # 2 x 4 CPU devices, ~25 s on 2 cores
  python examples/multihost_eval.py --local 2 --devices-per-process 2 --fast   # ~10-20 s

  # one process per host of a cluster, with the arguments the launcher passes:
  python examples/multihost_eval.py --coordinator HOST0:1234 --num-processes 4 --process-id $RANK
  # or under Slurm, Open MPI or on Cloud TPU, where jax finds them itself:
  python examples/multihost_eval.py
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, NamedTuple

_DEFAULT_DEVICES_PER_PROCESS = 4


def _devices_per_process(argv: list[str]) -> int:
  """`--devices-per-process` from the command line, read before jax is imported."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--devices-per-process", type=int, default=_DEFAULT_DEVICES_PER_PROCESS)
  return pre.parse_known_args(argv)[0].devices_per_process


# JAX reads XLA_FLAGS when its CPU backend starts, so the flag is set before
# jax is imported; a device count already given by the caller is kept.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  _flag = f"--xla_force_host_platform_device_count={_devices_per_process(sys.argv[1:])}"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import jax  # after XLA_FLAGS
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bce_jax

# Tolerances of the comparisons with the single-device run (relative, float32).
# The loss, its gradient and the metric are sums over the batch: the sharded
# run adds the same terms in another order, a few float32 roundings apart.
# The parameters compound that over the SGD steps.
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5
PARAMS_RTOL = 1e-5
METRIC_RTOL = 1e-6


def make_parser() -> argparse.ArgumentParser:
  """The command line: the launcher's options, the cluster's, and the data's."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  launch = parser.add_argument_group("launching")
  launch.add_argument(
    "--local",
    type=int,
    metavar="N",
    help="start N processes on this machine, the coordinator on 127.0.0.1",
  )
  launch.add_argument(
    "--coordinator",
    help="HOST:PORT of process 0's coordinator service (default: jax's cluster detection)",
  )
  launch.add_argument("--num-processes", type=int, help="processes in the job")
  launch.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
  launch.add_argument(
    "--devices-per-process",
    type=int,
    default=_DEFAULT_DEVICES_PER_PROCESS,
    help="CPU devices of each process (ignored on accelerators)",
  )
  launch.add_argument(
    "--timeout",
    type=int,
    default=300,
    help="seconds: joining the job, a silent peer, and (with --local) the whole run",
  )
  data = parser.add_argument_group("data and training")
  data.add_argument("--batch", type=int, default=1 << 16, help="rows (a multiple of the devices)")
  data.add_argument("--features", type=int, default=16, help="inputs per row")
  data.add_argument("--labels", type=int, default=8, help="binary labels per row")
  data.add_argument("--steps", type=int, default=10, help="SGD steps")
  data.add_argument("--learning-rate", type=float, default=0.5)
  data.add_argument("--seed", type=int, default=0, help="data and initialization seed")
  data.add_argument("--fast", action="store_true", help="4096 rows and 3 steps, for tests")
  return parser


# --------------------------------------------------------------------------
# The launcher (--local N): N copies of this script on 127.0.0.1.


def _free_loopback_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _without_local(argv: list[str]) -> list[str]:
  """`argv` minus `--local N` / `--local=N`."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == "--local":
      skip = True
    elif not arg.startswith("--local="):
      out.append(arg)
  return out


VERDICT = "VERDICT "


def _forward(stream, prefix: str, verdicts: list[str]) -> None:
  """Prints each line of `stream` after `prefix`; keeps the verdict lines in `verdicts`."""
  for line in stream:
    sys.stdout.write(f"{prefix}{line}")
    sys.stdout.flush()
    if line.startswith(VERDICT):
      verdicts.append(line[len(VERDICT) :].strip())


def _end(children: list[subprocess.Popen]) -> None:
  """Ends every child still running: SIGTERM, then SIGKILL after 3 s.

  JAX's preemption notifier catches SIGTERM in a process that joined a job,
  so a child blocked in a collective usually needs the SIGKILL.
  """
  for child in children:
    if child.poll() is None:
      child.terminate()
  deadline = time.monotonic() + 3
  for child in children:
    try:
      child.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()


def launch_local(args: argparse.Namespace) -> int:
  """Runs this script as `args.local` CPU processes on 127.0.0.1.

  The processes' output is printed with a ``[process i]`` prefix. If one of
  them fails, the others get 5 s to finish and are then ended; all of them
  are ended after ``--timeout`` seconds, and on any error, Ctrl-C or SIGTERM
  here.

  Args:
    args: the parsed command line.

  Returns:
    0 if every process exited with status 0, else 1 (130 on Ctrl-C).
  """
  if args.local < 1:
    raise SystemExit("--local needs at least 1 process")
  if args.coordinator or args.num_processes is not None or args.process_id is not None:
    raise SystemExit("--local chooses --coordinator, --num-processes and --process-id itself")
  coordinator = f"127.0.0.1:{_free_loopback_port()}"
  base = [sys.executable, os.path.abspath(__file__), *_without_local(sys.argv[1:])]
  base += ["--coordinator", coordinator, "--num-processes", str(args.local)]
  # CPU devices only: N processes sharing this machine's accelerators would
  # each claim all of them.
  # Unbuffered: a child's Python lines and gloo's C++ lines share one pipe,
  # and a block-buffered stdout would cut into the middle of gloo's.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
    flag = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
  # A SIGTERM (from a job scheduler, or a test's timeout) ends the children too.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  print(f"starting {args.local} processes, coordinator {coordinator}", flush=True)
  children: list[subprocess.Popen] = []
  threads = []
  verdicts: list[list[str]] = [[] for _ in range(args.local)]
  start = time.monotonic()
  try:
    for i in range(args.local):
      child = subprocess.Popen(
        [*base, "--process-id", str(i)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      children.append(child)
      thread = threading.Thread(
        target=_forward, args=(child.stdout, f"[process {i}] ", verdicts[i]), daemon=True
      )
      thread.start()
      threads.append(thread)
    failed_at = None
    while any(child.poll() is None for child in children):
      now = time.monotonic()
      if failed_at is None and any(child.poll() not in (None, 0) for child in children):
        failed_at = now  # the others may be waiting for the one that failed
      if now > start + args.timeout or (failed_at is not None and now > failed_at + 5):
        print(f"ending the processes still running after {now - start:.0f} s", flush=True)
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    print("interrupted: ending the processes", flush=True)
    return 130
  finally:
    _end(children)
    for thread in threads:
      thread.join(timeout=5)
  codes = [child.returncode for child in children]
  print(f"exit status of each process: {codes}")
  print("verdict, one line per process:")
  for i, (code, said) in enumerate(zip(codes, verdicts, strict=True)):
    print(f"  {said[-1]}" if said else f"  process {i}: FAIL, no verdict (exit status {code})")
  return 0 if all(code == 0 for code in codes) else 1


# --------------------------------------------------------------------------
# One process of the job.


def initialize_distributed(args: argparse.Namespace) -> None:
  """Joins the job: the coordinator and ids given, or jax's cluster detection.

  A coordinator on a loopback address (``--local``) listens on that address
  only; otherwise jax's default applies (every interface, so that the other
  hosts reach it). Joining, and noticing that a peer has died, are bounded by
  ``--timeout``.
  """
  # Cross-process collectives on CPU. gloo is the default in recent JAX
  # (older versions had none); accelerators use their own and ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  given = {
    "--coordinator": args.coordinator,
    "--num-processes": args.num_processes,
    "--process-id": args.process_id,
  }
  missing = [name for name, value in given.items() if value is None]
  if 0 < len(missing) < len(given):
    raise SystemExit(f"give all of {', '.join(given)} or none of them; missing {missing}")
  bind = {}
  if args.coordinator and _is_loopback(args.coordinator.rsplit(":", 1)[0]):
    bind["coordinator_bind_address"] = args.coordinator
  timeout = max(args.timeout, 1)
  try:
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=timeout,
      heartbeat_timeout_seconds=min(timeout, 60),
      shutdown_timeout_seconds=min(timeout, 60),
      **bind,
    )
  except ValueError as e:
    if missing:  # nothing given and nothing detected
      raise SystemExit(
        f"{e}\nNo cluster detected: run with --local N on one machine, or pass "
        f"--coordinator HOST:PORT --num-processes N --process-id I."
      ) from None
    raise


def _is_loopback(host: str) -> bool:
  host = host.strip("[]")
  try:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


class Batch(NamedTuple):
  """The data set: a pytree whose leaves keep this order."""

  x: Any  # [batch, features] float32 inputs
  y: Any  # [batch, labels] float32 labels in {0, 1}; -1 in padding rows
  weight: Any  # [batch] float32 sample weights in [0, 2)
  mask: Any  # [batch] bool, False for padding rows


def make_data(args: argparse.Namespace) -> Batch:
  """The whole data set as NumPy arrays, the same in every process (same seed).

  Multi-label targets drawn from a noisy linear model of ``x``; about 10% of
  the rows are padding, masked out, with a label of -1 that ``checked``
  must not reject.
  """
  rng = np.random.default_rng(args.seed)
  x = rng.normal(size=(args.batch, args.features)).astype(np.float32)
  true_w = rng.normal(size=(args.features, args.labels)) / np.sqrt(args.features)
  noisy = x @ true_w + rng.normal(scale=0.5, size=(args.batch, args.labels))
  y = (rng.uniform(size=noisy.shape) < 1 / (1 + np.exp(-3 * noisy))).astype(np.float32)
  mask = rng.uniform(size=args.batch) > 0.1
  y[~mask] = -1.0
  weight = rng.uniform(0.0, 2.0, size=args.batch).astype(np.float32)
  return Batch(x, y, weight, mask)


def init_params(args: argparse.Namespace) -> dict[str, np.ndarray]:
  """The linear model's initial weights, the same in every process."""
  rng = np.random.default_rng(args.seed + 1)
  w = rng.normal(scale=0.1, size=(args.features, args.labels)).astype(np.float32)
  return {"w": w, "b": np.zeros(args.labels, np.float32)}


def predict(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """[batch, labels] logits of a linear model."""
  return x @ params["w"] + params["b"]


def process_rows(sharding: NamedSharding, num_rows: int, process: int | None = None) -> np.ndarray:
  """The indices of the rows of a row-sharded [num_rows, ...] array that `process` holds.

  Args:
    sharding: a sharding of axis 0 over a mesh of all devices.
    num_rows: the length of axis 0.
    process: a process index; this process by default.

  Returns:
    The row indices in ascending order, the order in which
    ``jax.make_array_from_process_local_data`` takes a process's rows (with
    ``jax.make_mesh`` over all devices they are one contiguous block).
  """
  process = jax.process_index() if process is None else process
  blocks = sorted(
    {
      index[0].indices(num_rows)[:2]
      for device, index in sharding.devices_indices_map((num_rows,)).items()
      if device.process_index == process
    }
  )
  return np.concatenate([np.arange(start, stop) for start, stop in blocks])


def place(data: Batch, sharding: NamedSharding) -> Batch:
  """Global arrays sharded by rows, each process passing only its own rows."""
  rows = process_rows(sharding, len(data.x))
  return Batch(*(jax.make_array_from_process_local_data(sharding, a[rows], a.shape) for a in data))


LOSS = bce_jax.BinaryCrossentropy(from_logits=True)
METRIC = bce_jax.BinaryCrossentropyMetric(from_logits=True)


def objective(params, x, y, weight, mask) -> jax.Array:
  """The training loss: weighted, padding masked out."""
  return LOSS(y, predict(params, x), sample_weight=weight, mask=mask)


@jax.jit
def logits_grad(params, batch: Batch) -> jax.Array:
  """The gradient of the loss with respect to each logit, [batch, labels]."""
  x, y, weight, mask = batch
  return jax.grad(lambda z: LOSS(y, z, sample_weight=weight, mask=mask))(predict(params, x))


def metric_state(params, batch: Batch) -> bce_jax.MetricState:
  """The metric state of one batch (or of one shard of it)."""
  x, y, weight, mask = batch
  return METRIC.update(METRIC.init(), y, predict(params, x), sample_weight=weight, mask=mask)


class Figures(NamedTuple):
  """What a run produces, on the host: one run sharded, one on one device."""

  losses: list[float]  # the loss before each step
  grads: list[dict[str, np.ndarray]]  # the parameter gradient of each step
  logits_grad: np.ndarray  # the gradient w.r.t. the logits, first step
  params: dict[str, np.ndarray]  # after the last step
  metric: float  # the metric of the trained model (psum of shard states)
  metric_merge: float  # the same from the shards' states gathered and merged


def train(args: argparse.Namespace, params, batch: Batch):
  """`args.steps` optax SGD steps; returns the parameters, losses and gradients."""
  optimizer = optax.sgd(args.learning_rate)

  @jax.jit
  def train_step(params, opt_state, batch: Batch):
    loss, grads = jax.value_and_grad(objective)(params, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = optimizer.init(params)
  losses, grads = [], []
  for _ in range(args.steps):
    params, opt_state, loss, grad = train_step(params, opt_state, batch)
    losses.append(float(loss))
    grads.append(grad)
  return params, losses, grads


def run_sharded(args: argparse.Namespace, mesh: jax.sharding.Mesh, host: Batch) -> Figures:
  """Training and evaluation on the global mesh, each process placing its rows."""
  data = place(host, NamedSharding(mesh, P("data")))
  # Parameters are replicated: every process passes the same values.
  params0 = jax.device_put(init_params(args), NamedSharding(mesh, P()))
  params, losses, grads = train(args, params0, data)

  # The metric of the trained model, two ways: each shard's state summed
  # with psum inside shard_map, and the states of all shards gathered to
  # every host and merged there.
  specs = (P(), Batch(*(P("data"),) * 4))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=specs, out_specs=P())
  def psum_state(params, shard):
    return jax.lax.psum(metric_state(params, shard), "data")

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=specs, out_specs=P("data"))
  def stacked_states(params, shard):
    return jax.tree.map(lambda leaf: leaf[None], metric_state(params, shard))

  summed = METRIC.result(psum_state(params, data))
  stacked = multihost_utils.process_allgather(stacked_states(params, data), tiled=True)
  states = [jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), stacked) for i in range(mesh.size)]
  merged = METRIC.result(METRIC.merge(*states))
  # Replicated results can be read in every process; a sharded one (the
  # logits gradient) is all-gathered first.
  return Figures(
    losses=losses,
    grads=jax.device_get(grads),
    logits_grad=multihost_utils.process_allgather(logits_grad(params0, data), tiled=True),
    params=jax.device_get(params),
    metric=float(summed),
    metric_merge=float(merged),
  )


def run_single_device(args: argparse.Namespace, host: Batch) -> Figures:
  """The reference: the same computation on the whole data, on one local device."""
  device = jax.local_devices()[0]
  data = jax.device_put(host, device)
  params0 = jax.device_put(init_params(args), device)
  params, losses, grads = train(args, params0, data)
  value = float(METRIC.result(jax.jit(metric_state)(params, data)))
  return Figures(
    losses=losses,
    grads=jax.device_get(grads),
    logits_grad=np.asarray(logits_grad(params0, data)),
    params=jax.device_get(params),
    metric=value,
    metric_merge=value,
  )


def max_rel_diff(a, b) -> float:
  """max |a - b| / max |b| over the leaves of two pytrees, in float64."""
  diffs = [
    np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))
    / max(np.max(np.abs(np.asarray(v, np.float64))), 1e-30)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return float(max(diffs))


def checksum(params) -> float:
  """The sum of |p| over every parameter, in float64."""
  return float(sum(np.abs(np.asarray(p, np.float64)).sum() for p in jax.tree.leaves(params)))


def run_checked(args: argparse.Namespace, host: Batch, params) -> dict[str, str]:
  """``bce_jax.checked`` on global arrays, under an Explicit and an Auto mesh.

  Under each mesh, valid data must pass and give the unchecked loss, and a
  negative sample weight in the first unmasked row of process q must raise
  ``bce_jax.ValueCheckError`` here, for every q: also when the bad row lives
  only on another process's devices.

  Args:
    args: the parsed command line.
    host: the whole data set, on the host.
    params: the model's parameters, on the host.

  Returns:
    ``{case: outcome}``, the outcome "pass" or "raised" when as expected,
    else what happened instead.
  """
  step = jax.jit(objective)
  safe_step = bce_jax.checked(step)
  outcomes = {}
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    kind = axis_type.name.lower()
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis_type,))
    rows = NamedSharding(mesh, P("data"))
    params_g = jax.device_put(params, NamedSharding(mesh, P()))
    data = place(host, rows)
    try:
      value, plain = float(safe_step(params_g, *data)), float(step(params_g, *data))
      ok = abs(value - plain) <= LOSS_RTOL * abs(plain)
      outcomes[f"{kind}_valid"] = "pass" if ok else f"gave {value}, unchecked {plain}"
    except (ValueError, TypeError, RuntimeError) as e:  # reported; the run fails
      outcomes[f"{kind}_valid"] = f"{type(e).__name__}: {_first_line(e)}"
    for owner in range(jax.process_count()):
      owned = process_rows(rows, args.batch, owner)
      bad = host._replace(weight=host.weight.copy())
      bad.weight[owned[np.argmax(host.mask[owned])]] = -1.0
      case = f"{kind}_bad_weight_in_process_{owner}"
      try:
        safe_step(params_g, *place(bad, rows))
        outcomes[case] = "no error raised"
      except bce_jax.ValueCheckError as e:
        outcomes[case] = "raised" if "sample_weight" in str(e) else f"wrong message: {e}"
      except (ValueError, TypeError, RuntimeError) as e:  # reported; the run fails
        outcomes[case] = f"{type(e).__name__}: {_first_line(e)}"
  return outcomes


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0]


def run_process(args: argparse.Namespace) -> int:
  """One process of the job: train, evaluate, check, compare; returns the exit status."""
  initialize_distributed(args)
  me = jax.process_index()
  devices = jax.devices()
  if args.batch % len(devices):
    raise SystemExit(f"--batch {args.batch} is not a multiple of the {len(devices)} devices")
  mesh = jax.make_mesh((len(devices),), ("data",))
  rows = process_rows(NamedSharding(mesh, P("data")), args.batch)
  print(
    f"process {me} of {jax.process_count()}: {jax.local_device_count()} of {len(devices)} "
    f"{devices[0].platform} devices in the mesh, axis 'data' {mesh.axis_types[0].name}; "
    f"batch {args.batch} x {args.labels} labels, this process holds {len(rows)} rows, "
    f"{rows[0]} to {rows[-1]}",
    flush=True,
  )

  host = make_data(args)
  sharded = run_sharded(args, mesh, host)
  single = run_single_device(args, host)

  failures = []

  def compare(name: str, diff: float, tol: float) -> float:
    if not diff <= tol:  # also catches nan
      failures.append(f"{name} differs by {diff:.3e} (relative), more than {tol:.0e}")
    return diff

  loss_diff = compare("loss", max_rel_diff(sharded.losses, single.losses), LOSS_RTOL)
  grad_diff = compare("gradient", max_rel_diff(sharded.grads, single.grads), GRAD_RTOL)
  logits_grad_diff = compare(
    "logits gradient", max_rel_diff(sharded.logits_grad, single.logits_grad), GRAD_RTOL
  )
  params_diff = compare("parameters", max_rel_diff(sharded.params, single.params), PARAMS_RTOL)
  metric_diff = compare("metric", max_rel_diff(sharded.metric, single.metric), METRIC_RTOL)
  merge_diff = compare(
    "merged metric", max_rel_diff(sharded.metric_merge, single.metric), METRIC_RTOL
  )
  for step, (a, b) in enumerate(zip(sharded.losses, single.losses, strict=True), 1):
    print(f"step {step:3d}   loss {a:.8f}   single device {b:.8f}")
  sums = checksum(sharded.params), checksum(single.params)
  print(f"loss          relative diff {loss_diff:.2e} (largest over the steps)")
  print(f"gradient      relative diff {grad_diff:.2e} (parameters, largest over the steps)")
  print(f"              relative diff {logits_grad_diff:.2e} (logits, all-gathered)")
  print(
    f"parameters    checksum {sums[0]:.8f}   single device {sums[1]:.8f}   "
    f"relative diff {params_diff:.2e} (max |diff| / max |value|)"
  )
  print(
    f"metric psum   {sharded.metric:.8f}   single device {single.metric:.8f}   "
    f"relative diff {metric_diff:.2e}"
  )
  print(
    f"metric merge  {sharded.metric_merge:.8f}   single device {single.metric:.8f}   "
    f"relative diff {merge_diff:.2e}"
  )
  print(
    f"RESULT process={me} loss={sharded.losses[-1]:.8f} loss_single={single.losses[-1]:.8f} "
    f"params_checksum={sums[0]:.8f} params_checksum_single={sums[1]:.8f} "
    f"metric={sharded.metric:.8f} metric_merge={sharded.metric_merge:.8f} "
    f"metric_single={single.metric:.8f} loss_rel_diff={loss_diff:.3e} "
    f"grad_rel_diff={grad_diff:.3e} logits_grad_rel_diff={logits_grad_diff:.3e} "
    f"params_rel_diff={params_diff:.3e} metric_rel_diff={metric_diff:.3e} "
    f"merge_rel_diff={merge_diff:.3e}",
    flush=True,
  )

  outcomes = run_checked(args, host, sharded.params)
  print(
    "CHECKED "
    + " ".join(
      f"{case}={outcome.split(':')[0].replace(' ', '_')}" for case, outcome in outcomes.items()
    ),
    flush=True,
  )
  for case, outcome in outcomes.items():
    if outcome not in ("pass", "raised"):
      failures.append(f"checked {case}: {outcome}")
  for failure in failures:
    print(f"FAILED {failure}")
  diffs = {
    "loss": loss_diff,
    "gradient": max(grad_diff, logits_grad_diff),
    "parameters": params_diff,
    "metric": max(metric_diff, merge_diff),
  }
  worst = max(diffs, key=lambda k: diffs[k])
  as_expected = sum(outcome in ("pass", "raised") for outcome in outcomes.values())
  verdict = "FAIL" if failures else "PASS"
  tail = f"; {len(failures)} failed, first: {failures[0]}" if failures else ""
  print(
    f"{VERDICT}process {me}: {verdict}, largest relative difference from one device "
    f"{diffs[worst]:.2e} ({worst}), checked() {as_expected} of {len(outcomes)} as expected"
    f"{tail}",
    flush=True,
  )
  return 1 if failures else 0


def main() -> None:
  args = make_parser().parse_args()
  if args.fast:
    args.batch, args.steps = min(args.batch, 4096), min(args.steps, 3)
  if args.local is not None:
    sys.exit(launch_local(args))
  sys.exit(run_process(args))


if __name__ == "__main__":
  main()
