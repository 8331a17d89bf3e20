"""The README's code runs as written and prints what its comments say.

Every ```python block of the README runs, in order, in one fresh process with
8 host devices (the rules are in `tests/_doc_blocks.py`), so the ring and
the sharded metric run as a reader would run them.
"""

from tests import _doc_blocks

README = _doc_blocks.ROOT / "README.md"


def test_readme_blocks_run_and_print_what_they_say():
  assert _doc_blocks.check_page(README) >= 5


def test_ci_runs_the_readme_test_command():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  command = next(
    line for line in text.splitlines() if line.startswith("python3 -m venv") and "pytest" in line
  )
  assert command in ci.splitlines()


def test_readme_stays_short():
  # The details live in docs/; the README is read in five minutes.
  assert len(README.read_text().splitlines()) <= 200
