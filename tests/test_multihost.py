"""Several processes, one global mesh: bce_jax gives the single-device figures.

Two tests, each one subprocess run (JAX fixes its device count when its
backend starts, so the devices these tests need cannot come from this
process):

* ``examples/multihost_eval.py --local 2 --devices-per-process 2 --fast``:
  two processes joined by ``jax.distributed.initialize`` on 127.0.0.1, CPU
  collectives through gloo, a 4-device mesh. Every process must print the
  loss, parameter checksum and metric of the single-device run, pass
  ``bce_jax.checked`` on valid sharded data under an Explicit and an Auto
  mesh, and raise ``ValueCheckError`` for a negative weight in the rows of
  either process, also the other one's.
* one process with 8 host devices: ``bce_jax.checked`` on sharded arrays
  under an Explicit and an Auto mesh, valid inputs passing and each kind of
  bad value raising, wherever its shard lives.

The multi-process test is skipped only where optax (which the example trains
with) is not installed, jaxlib has no gloo collectives (it builds them for
Linux and macOS) or no loopback TCP is available.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap

from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "multihost_eval.py"
PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 120  # a whole run; it takes 10-20 s on 2 shared CPU cores
# What the example promises (its LOSS_RTOL etc.): float32 sums over the
# batch in another order. The figures are printed with 8 decimals.
FIGURE_RTOL = 1e-6
DIFF_LIMITS = {
  "loss_rel_diff": 1e-6,
  "grad_rel_diff": 1e-5,
  "logits_grad_rel_diff": 1e-5,
  "params_rel_diff": 1e-5,
  "metric_rel_diff": 1e-6,
  "merge_rel_diff": 1e-6,
}


def _env(device_count: int) -> dict[str, str]:
  """This environment on CPU, with `device_count` host devices and this checkout's bce_jax."""
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if "xla_force_host_platform_device_count" not in f
  ]
  flags.append(f"--xla_force_host_platform_device_count={device_count}")
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
  return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
  """Runs `cmd` in its own process group; ends the whole group after TIMEOUT_S."""
  proc = subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=env,
    stdin=subprocess.DEVNULL,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,  # the group holds the example's own children
  )
  try:
    out, err = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    for sig in (signal.SIGTERM, signal.SIGKILL):
      try:
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=10)
        break
      except (ProcessLookupError, subprocess.TimeoutExpired):
        continue
    else:
      out, err = "", ""
    raise AssertionError(
      f"{cmd[1:]} ran past {TIMEOUT_S} s and was ended\n--- stdout\n{out}\n--- stderr\n{err}"
    ) from None
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _cannot_run_reason() -> str | None:
  """Why this platform cannot run the multi-process example, or None."""
  if importlib.util.find_spec("optax") is None:  # looked up, not imported
    return "needs optax, which the example trains with: pip install -e '.[examples]'"
  if sys.platform not in ("linux", "darwin"):
    return f"jaxlib's gloo CPU collectives exist on Linux and macOS only, not {sys.platform}"
  try:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.bind(("127.0.0.1", 0))
  except OSError as e:
    return f"no TCP on the loopback address 127.0.0.1: {e}"
  return None


def _key_values(line: str) -> dict[str, str]:
  return dict(kv.split("=", 1) for kv in line.split()[1:])


class MultiProcessTest(absltest.TestCase):
  def test_two_processes_agree_with_one_device(self):
    reason = _cannot_run_reason()
    if reason:
      self.skipTest(reason)
    cmd = [sys.executable, str(EXAMPLE), "--local", str(PROCESSES), "--fast"]
    cmd += ["--devices-per-process", str(DEVICES_PER_PROCESS), "--timeout", "90"]
    proc = _run(cmd, _env(DEVICES_PER_PROCESS))
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    if "gloo_tcp_collectives only implemented" in proc.stdout:
      self.skipTest("this jaxlib has no gloo CPU collectives")

    # Every process's lines, by process index.
    lines: dict[int, list[str]] = {}
    for line in proc.stdout.splitlines():
      match = re.match(r"\[process (\d+)\] (.*)", line)
      if match:
        lines.setdefault(int(match.group(1)), []).append(match.group(2))
    self.assertEqual(sorted(lines), list(range(PROCESSES)), output)

    results, checked = {}, {}
    for p, printed in lines.items():
      result = [line for line in printed if line.startswith("RESULT ")]
      check = [line for line in printed if line.startswith("CHECKED ")]
      self.assertLen(result, 1, f"process {p}: no RESULT line\n{output}")
      results[p] = _key_values(result[0])
      self.assertLen(check, 1, f"process {p}: no CHECKED line\n{output}")
      checked[p] = _key_values(check[0])

    with self.subTest("every process prints the same figures"):
      figures = [{k: v for k, v in r.items() if k != "process"} for r in results.values()]
      for other in figures[1:]:
        self.assertEqual(other, figures[0], output)

    for p, result in results.items():
      own = f"process {p} printed:\n" + "\n".join(lines[p])
      with self.subTest("figures equal the single-device run", process=p):
        for name in ("loss", "params_checksum", "metric"):
          multi, single = float(result[name]), float(result[f"{name}_single"])
          self.assertAlmostEqual(
            multi, single, delta=FIGURE_RTOL * abs(single), msg=f"{name}\n{own}"
          )
        self.assertAlmostEqual(
          float(result["metric_merge"]),
          float(result["metric_single"]),
          delta=FIGURE_RTOL * abs(float(result["metric_single"])),
          msg=own,
        )
        for name, limit in DIFF_LIMITS.items():
          self.assertLessEqual(float(result[name]), limit, f"{name}\n{own}")

    for p, outcomes in checked.items():
      own = "\n".join(line for line in lines[p] if "checked" in line.lower())
      for kind in ("explicit", "auto"):
        with self.subTest("checked() passes on valid sharded data", process=p, mesh=kind):
          self.assertEqual(outcomes.get(f"{kind}_valid"), "pass", own)
        for owner in range(PROCESSES):
          with self.subTest(
            "a negative weight in one process's rows raises in every process",
            process=p,
            mesh=kind,
            rows_of_process=owner,
          ):
            self.assertEqual(outcomes.get(f"{kind}_bad_weight_in_process_{owner}"), "raised", own)

    with self.subTest("every process exits with status 0"):
      self.assertEqual(proc.returncode, 0, output)
      self.assertIn(f"exit status of each process: {[0] * PROCESSES}", proc.stdout, output)

    with self.subTest("the run ends with one PASS verdict per process"):
      tail = proc.stdout.rstrip().splitlines()[-PROCESSES - 1 :]
      self.assertEqual(tail[0], "verdict, one line per process:", output)
      for p, line in enumerate(tail[1:]):
        self.assertTrue(line.startswith(f"  process {p}: PASS, largest relative"), output)
        worst = float(re.search(r"one device (\S+) ", line).group(1))
        self.assertLessEqual(worst, max(DIFF_LIMITS.values()), line)
        cases = 2 * (1 + PROCESSES)  # two meshes: valid data, a bad weight in each process
        self.assertIn(f"checked() {cases} of {cases} as expected", line)


# Run in a fresh interpreter with 8 host devices: bce_jax.checked on
# arrays sharded by rows over an Explicit and an Auto mesh. Prints one JSON
# object, {case: outcome}, the outcome "pass", "raised: <message>" or the
# unexpected exception.
_SINGLE_PROCESS_SCRIPT = textwrap.dedent(
  """
    import json

    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import bce_jax

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    batch, labels = 4096, 8
    y = rng.integers(0, 2, (batch, labels)).astype(np.float32)
    logits = rng.normal(0.0, 3.0, (batch, labels)).astype(np.float32)
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    weight = rng.uniform(0.0, 2.0, batch).astype(np.float32)
    mask = rng.uniform(size=batch) > 0.1
    padded = np.where(mask[:, None], y, -1.0).astype(np.float32)  # padding labelled -1
    row = batch - 3  # on the last device, in an unmasked row
    mask[row] = True
    padded[row] = y[row]

    def changed(a, value):
      a = a.copy()
      a[row] = value
      return a

    logits_loss = bce_jax.BinaryCrossentropy(from_logits=True)
    probs_loss = bce_jax.BinaryCrossentropy()
    fns = {
        # The issue's call, then with a mask, then from probabilities.
        "weights": lambda y, x, w: logits_loss(y, x, sample_weight=w),
        "weights_mask": lambda y, x, w, m: logits_loss(y, x, sample_weight=w, mask=m),
        "probs": lambda y, p, w: probs_loss(y, p, sample_weight=w),
    }
    cases = {
        "valid": ("weights", (y, logits, weight)),
        "valid_masked_padding": ("weights_mask", (padded, logits, weight, mask)),
        "valid_probabilities": ("probs", (y, probs, weight)),
        "bad_negative_weight": ("weights", (y, logits, changed(weight, -0.5))),
        "bad_negative_weight_masked": ("weights_mask", (padded, logits, changed(weight, -0.5), mask)),
        "bad_label": ("weights_mask", (changed(padded, 2.0), logits, weight, mask)),
        "bad_nan_logit": ("weights_mask", (padded, changed(logits, np.nan), weight, mask)),
        "bad_probability": ("probs", (y, changed(probs, 1.5), weight)),
    }
    out = {}
    for axis_type in (AxisType.Explicit, AxisType.Auto):
      mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
      rows = NamedSharding(mesh, P("data"))
      steps = {name: jax.jit(fn) for name, fn in fns.items()}
      for case, (fn, arrays) in cases.items():
        name = f"{axis_type.name.lower()}/{case}"
        args = [jax.device_put(a, rows) for a in arrays]
        try:
          value = bce_jax.checked(steps[fn])(*args)
          plain = steps[fn](*args)
          close = abs(float(value) - float(plain)) <= 1e-6 * abs(float(plain))
          out[name] = "pass" if close else f"{value} != unchecked {plain}"
        except bce_jax.ValueCheckError as e:
          out[name] = f"raised: {e}"
        except Exception as e:
          out[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(json.dumps(out))
    """
)


class SingleProcessShardedCheckedTest(absltest.TestCase):
  def test_checked_on_sharded_arrays_under_explicit_and_auto_meshes(self):
    proc = _run([sys.executable, "-c", _SINGLE_PROCESS_SCRIPT], _env(8))
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    self.assertEqual(proc.returncode, 0, output)
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    # The argument each bad value must be reported under.
    expected_names = {
      "bad_negative_weight": "sample_weight",
      "bad_negative_weight_masked": "sample_weight",
      "bad_label": "y_true",
      "bad_nan_logit": "y_pred",
      "bad_probability": "y_pred",
    }
    for kind in ("explicit", "auto"):
      for case in ("valid", "valid_masked_padding", "valid_probabilities"):
        with self.subTest(mesh=kind, case=case):
          self.assertEqual(outcomes[f"{kind}/{case}"], "pass")
      for case, argname in expected_names.items():
        with self.subTest(mesh=kind, case=case):
          outcome = outcomes[f"{kind}/{case}"]
          self.assertTrue(outcome.startswith("raised: "), outcome)
          self.assertIn(argname, outcome)


if __name__ == "__main__":
  absltest.main()
