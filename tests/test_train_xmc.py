"""Runs ``examples/train_xmc.py --quick`` in a subprocess and checks its RESULT line.

The loss must go down, bce_jax's model must rank as well as the same model
trained with the dense optax loss (and at least as well as the popularity
baseline), with less memory. Skipped, naming the extra, where the example's
libraries are not installed.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_train_xmc_quick(tmp_path):
  missing = [
    m for m in ("equinox", "optax", "tqdm", "matplotlib") if not importlib.util.find_spec(m)
  ]
  if missing:
    pytest.skip(f"needs {', '.join(missing)}: pip install -e '.[examples]'")
  plot = tmp_path / "xmc.png"
  proc = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "train_xmc.py"), "--quick", "--plot", str(plot)],
    cwd=ROOT,
    env={
      **os.environ,
      "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    },
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert lines, proc.stdout
  result = {k: float(v) for k, v in (kv.split("=") for kv in lines[-1].split()[1:])}
  assert result["loss_last"] < 0.9 * result["loss_first"], result
  assert result["p1"] >= result["popularity_p1"] - 0.02, result
  assert abs(result["p1"] - result["dense_p1"]) < 0.05, result
  assert result["mem_linear"] < result["mem_dense"], result
  assert plot.exists()
