"""Runs the ```python blocks of a Markdown page, as a reader would, and checks them.

The rules, shared by the README (`tests/test_readme.py`) and the
documentation site (`tests/test_docs.py`):

* The blocks of one page run in order in one namespace, in a fresh Python
  process with 8 host devices (`--xla_force_host_platform_device_count=8`) and
  `KERAS_BACKEND=jax`, from the repository root. A page is one reader's
  session: a later block may use what an earlier one defined.
* Each `print(...)` line of a block that ends in a `# comment` says what it
  prints: the comment, up to a remark in parentheses after a space (so
  `# 0.815 (as Keras)` expects `0.815`). A block's printed lines must equal
  those comments, in order: a block prints nothing else.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

# Runs in the child: reads [[label, code], ...] as JSON on stdin, executes the
# blocks in one namespace and writes one JSON line per block: what it printed,
# or the traceback that stopped it (the later blocks are then not run).
_RUNNER = r"""
import contextlib, io, json, sys, traceback
namespace = {"__name__": "__doc_page__"}
for label, code in json.load(sys.stdin):
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      exec(compile(code, label, "exec"), namespace)
  except BaseException:
    print(json.dumps({"label": label, "printed": out.getvalue(), "error": traceback.format_exc()}))
    break
  print(json.dumps({"label": label, "printed": out.getvalue(), "error": None}))
"""


def python_blocks(path: pathlib.Path) -> list[tuple[str, str]]:
  """The page's ```python blocks as (`path:line`, code), in order."""
  text = path.read_text()
  blocks = []
  for match in _BLOCK.finditer(text):
    line = text.count("\n", 0, match.start(1)) + 1
    blocks.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
  return blocks


def expected_prints(code: str) -> list[str]:
  """What the block says it prints: the comments of its print lines."""
  return [
    line.split("#", 1)[1].strip().split(" (", 1)[0].strip()
    for line in code.splitlines()
    if line.lstrip().startswith("print(") and "#" in line
  ]


def check_page(path: pathlib.Path, timeout: float = 300) -> int:
  """Runs every ```python block of `path`; fails naming the block. Returns the count."""
  blocks = python_blocks(path)
  assert blocks, f"{path} has no ```python block"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env = {
    **os.environ,
    "XLA_FLAGS": " ".join([*flags, "--xla_force_host_platform_device_count=8"]),
    "JAX_PLATFORMS": "cpu",
    "KERAS_BACKEND": "jax",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  }
  proc = subprocess.run(
    [sys.executable, "-c", _RUNNER],
    input=json.dumps(blocks),
    check=False,  # reported below, with the output
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert proc.returncode == 0 and results, (
    f"{path}: the runner exited with {proc.returncode}\n{proc.stderr[-4000:]}"
  )
  for (label, code), result in zip(blocks, results):
    assert result["error"] is None, f"{label} raised:\n{result['error']}"
    printed = result["printed"].strip().splitlines()
    assert printed == expected_prints(code), (
      f"{label} printed {printed}, its comments say {expected_prints(code)}"
    )
  assert len(results) == len(blocks), f"{path}: only {len(results)} of {len(blocks)} blocks ran"
  return len(blocks)
