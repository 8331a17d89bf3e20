"""Sphinx configuration for the bce_jax documentation.

Build it from the repository root (after ``pip install -e ".[docs]"``)::

  sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import pathlib
import sys

# Document the checkout next to this folder, installed or not.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import bce_jax

project = "bce_jax"
author = "bce_jax developers"
copyright = "bce_jax developers"
version = release = bce_jax.__version__

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# Docstrings are Google style and mark code with single backticks.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
default_role = "code"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True}

html_theme = "furo"
html_title = f"bce_jax {release}"
# Show jax's array alias by name, not as the union it expands to.
autodoc_type_aliases = {"ArrayLike": "jax.typing.ArrayLike"}
# MetricState's fields are described in words ("four float32 scalars"); the
# annotation would print jax's internal class path.
napoleon_attr_annotations = False


def _tidy_alias_reprs(app, domain, objtype, contentnode):
  """Prints `ArrayLike | None` by name: Sphinx shows the alias's repr inside a union."""
  annotations = getattr(app.env.current_document, "autodoc_annotations", {})
  for hints in annotations.values():
    for key, hint in hints.items():
      hints[key] = hint.replace(
        "TypeAliasForwardRef('jax.typing.ArrayLike')", "jax.typing.ArrayLike"
      )


def setup(app):
  # Before sphinx.ext.autodoc merges the hints into the descriptions (priority 500).
  app.connect("object-description-transform", _tidy_alias_reprs, priority=400)
