"""Mosaic-GPU interpret mode for tests: the kernels of
:mod:`bce_jax._tiles.pallas_mosaic` run on a CPU, TMA copies, barriers and
warpgroup MMAs simulated.

The parameters class is private in jax 0.10 (``jax._src``), absent in 0.9:
this helper is the one place that imports it, and :data:`PARAMS` is None
where it is missing (the tests skip).
"""

from __future__ import annotations

from typing import Any
from unittest import mock

from bce_jax._tiles import pallas_mosaic

PARAMS: Any
try:
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

  PARAMS = InterpretGPUParams()
except ImportError:  # jax < 0.10
  PARAMS = None

WHY = "this jax has no Mosaic-GPU backend or no Mosaic-GPU interpret mode"


def available() -> bool:
  return PARAMS is not None and pallas_mosaic.available()


def interpreted():
  """The loss's Mosaic kernels run in interpret mode (``implementation="mosaic"`` on CPU)."""
  return mock.patch.object(pallas_mosaic, "_INTERPRET", PARAMS)
