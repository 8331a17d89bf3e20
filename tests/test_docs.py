"""Every ```python block of the documentation site (docs/) runs and prints what it says.

The rules are in `tests/_doc_blocks.py`: the blocks of a page run in order in
one fresh process with 8 host devices, and a `print(...)` line's comment is
what it prints. Pages whose blocks need an extra skip, naming it, where that
extra is not installed (CI installs them all).
"""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests import _doc_blocks

DOCS = _doc_blocks.ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
# The packages a page's blocks import beyond jax and bce_jax, and their extra.
_NEEDS = {
  "guides/flax.md": (("flax", "optax"), "examples"),
  "guides/haiku.md": (("haiku", "optax"), "examples"),
  "guides/equinox.md": (("equinox", "optax"), "examples"),
  "guides/keras.md": (("keras",), "keras"),
  "devices.md": (("optax",), "examples"),
}


def _page_id(path):
  return str(path.relative_to(DOCS))


RUNNABLE = [p for p in PAGES if _doc_blocks.python_blocks(p)]


@pytest.mark.parametrize("page", RUNNABLE, ids=_page_id)
def test_page_blocks_run_and_print_what_they_say(page):
  modules, extra = _NEEDS.get(_page_id(page), ((), ""))
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"needs {', '.join(missing)}: pip install -e '.[{extra}]'")
  _doc_blocks.check_page(page)


def test_every_page_with_code_is_tested():
  # A page whose code blocks are all marked as another language would
  # silently escape the test above: the site's code is Python or shell.
  for page in PAGES:
    text = page.read_text()
    for lang in set(re.findall(r"^```(\w+)", text, re.MULTILINE)):
      assert lang in {"python", "bash", "text"}, (
        f"{_page_id(page)}: a ```{lang} block is neither run nor allowed"
      )
