"""Runs every example in `--fast` mode in a subprocess and checks its output.

Each example ends with a ``RESULT key=value ...`` line; the tests parse it
and check accuracies against loose floors and equalities that must hold
(streamed metric == one-shot loss, bce_jax == Keras, psum == merge). An
example whose libraries are not installed is skipped, naming the missing
package and the extra that provides it; CI installs the extras, so there
nothing is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Each training example needs these (the `examples` extra) plus its framework.
TRAINING_DEPS = ("optax", "sklearn", "tqdm", "matplotlib")


def _require(*modules: str, extra: str) -> None:
  """Skips the test unless every module is installed.

  Looks the modules up without importing them: the example imports them in
  its own process, and importing Keras here would fix its backend for the
  whole test worker.
  """
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"needs {', '.join(missing)}: pip install -e '.[{extra}]'")


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> str:
  """Runs `examples/<script> --fast *args`; returns its stdout."""
  proc = subprocess.run(
    [sys.executable, str(EXAMPLES / script), "--fast", *args],
    check=False,  # a failure is reported below, with the output
    cwd=ROOT,
    env={**os.environ, **(env or {})},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, (
    f"{script} exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n"
    f"--- stderr (tail)\n{proc.stderr[-4000:]}"
  )
  return proc.stdout


def _result(stdout: str) -> dict[str, float]:
  """The key=value pairs of the last `RESULT` line."""
  lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
  assert lines, f"no RESULT line in:\n{stdout}"
  return {key: float(value) for key, value in (kv.split("=") for kv in lines[-1].split()[1:])}


def test_quickstart_matches_every_seed_value():
  stdout = _run("quickstart.py")
  assert "13 of 13 examples match." in stdout, stdout
  assert " NO" not in stdout, stdout


@pytest.mark.parametrize(
  "script, framework, extra_args",
  [
    # The main example also runs with both loss options switched on.
    ("train_flax.py", "flax", ("--label-smoothing", "0.05", "--pos-weight", "0.8")),
    ("train_haiku.py", "haiku", ()),
    ("train_equinox.py", "equinox", ()),
  ],
)
def test_training_example(tmp_path, script, framework, extra_args):
  _require(framework, *TRAINING_DEPS, extra="examples")
  plot = tmp_path / "curves.png"
  result = _result(_run(script, "--plot", str(plot), *extra_args))
  # Five epochs reach about 0.92; the full run about 0.97.
  assert result["val_accuracy"] >= 0.85, result
  # The metric, streamed in masked batches, equals the loss object applied
  # to the whole validation set at once (both printed to 6 decimals).
  assert result["metric"] == pytest.approx(result["val_loss"], abs=2e-6), result
  assert 0.0 < result["train_loss"] < 0.69, result  # below chance level, log(2)
  assert plot.read_bytes().startswith(b"\x89PNG"), "no PNG written"


def test_keras_interop():
  _require("keras", "sklearn", extra="examples,keras")
  result = _result(_run("keras_interop.py", env={"KERAS_BACKEND": "jax"}))
  assert result["batch_abs_diff"] < 1e-6, result
  assert result["weighted_abs_diff"] < 1e-6, result
  assert result["compile_abs_diff"] < 1e-6, result
  assert result["val_accuracy"] >= 0.75, result


def test_sharded_eval_on_8_cpu_devices():
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags = f"{flags} --xla_force_host_platform_device_count=8".strip()
  stdout = _run("sharded_eval.py", env={"XLA_FLAGS": flags})
  assert "mesh: 8 x" in stdout, stdout
  result = _result(stdout)
  assert result["loss_rel_diff"] < 1e-6, result
  assert result["psum_vs_merge"] < 1e-6, result
  assert result["merge_vs_one_pass"] < 1e-6, result


def test_train_siglip_ring_loss_on_8_cpu_devices(tmp_path):
  _require("flax", *TRAINING_DEPS, extra="examples")
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags = f"{flags} --xla_force_host_platform_device_count=8".strip()
  plot = tmp_path / "siglip.png"
  stdout = _run("train_siglip.py", "--plot", str(plot), env={"XLA_FLAGS": flags})
  assert "mesh: 8 x" in stdout, stdout
  result = _result(stdout)
  assert result["val_top1"] >= 0.8, result
  assert result["ring_rel_diff"] < 1e-6, result
  assert result["train_loss"] < 100, result
  assert plot.read_bytes().startswith(b"\x89PNG"), plot


def test_notebook_eval_scan_equals_one_shot():
  result = _result(_run("notebook_eval.py"))
  assert result["scan"] == pytest.approx(result["one_shot"], rel=1e-6), result
  assert result["scan_rel_err"] < 1e-5, result
