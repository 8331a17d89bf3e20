"""Runs a test script in a fresh Python process with N host (CPU) devices.

The device count is fixed when jax starts, so tests of rings and shards run
their script in a child process: the repository on its path, CPU only, and
`--xla_force_host_platform_device_count=N` in place of any count already set.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(script: str, devices: int, timeout: int) -> subprocess.CompletedProcess:
  """`python -c script` with `devices` host devices; the finished process."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
  env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
  return subprocess.run(
    [sys.executable, "-c", script],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
