"""The README's quick start runs and prints what its comments say."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_prints_what_it_says():
  text = README.read_text()
  block = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
  expected = [
    line.split("#", 1)[1].strip().split(",")[0].split(" as ")[0].strip()
    for line in block.splitlines()
    if line.startswith("print(") and "#" in line
  ]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(block, str(README), "exec"), {})  # noqa: S102 - our own README
  printed = out.getvalue().strip().splitlines()
  assert printed == expected


def test_ci_runs_the_readme_test_command():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  command = next(
    line for line in text.splitlines() if line.startswith("python3 -m venv") and "pytest" in line
  )
  assert command in ci.splitlines()
