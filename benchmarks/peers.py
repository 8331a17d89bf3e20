"""The implementations compared, behind one interface.

Peers are optional: :func:`load` imports optax, Keras (JAX backend) and
torch, and records why one is missing instead of failing.

A loss *family* (``"bce"``; ``"focal"`` once bce_jax has it) maps each
implementation name to an :class:`Impl`, or to a string saying why it is
missing. Every implementation's loss has one signature,
``fn(y, x, sample_weight, mask)`` on logits `x`, jittable, with Keras's
semantics: element losses averaged over the last axis give per-sample losses;
`sample_weight` (``[B]`` or a scalar) weights whole samples; `mask` (bool, the
per-sample shape) drops samples, and the mean is then over the valid ones.
The peers are written as a competent user would write them with each library.

Adding a family is one function that returns its implementations, plus a
line in :data:`FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

# Keras reads its backend once, at import.
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp

import bce_jax

OURS = "bce_jax"
PEER_NAMES = ("optax", "keras", "torch")
FOCAL_GAMMA = 2.0  # no class balancing: optax's alpha=None, Keras's default

_MODULES: dict[str, Any] = {}
_MISSING: dict[str, str] = {}

LossFn = Callable[[jax.Array, jax.Array, jax.Array | None, jax.Array | None], jax.Array]


class MetricFns(NamedTuple):
  """A streaming mean: ``init() -> state``, ``update(state, y, x)``, ``result(state)``."""

  init: Callable[[], Any]
  update: Callable[[Any, jax.Array, jax.Array], Any]
  result: Callable[[Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Impl:
  """One implementation of a loss family.

  Attributes:
    loss: ``reduction -> fn(y, x, sample_weight, mask)``, where reduction is
      ``"mean"`` (Keras's ``sum_over_batch_size``) or ``"none"`` (the
      weighted per-sample losses).
    metric: ``() -> MetricFns``, or None when the library has no such metric.
  """

  loss: Callable[[str], LossFn]
  metric: Callable[[], MetricFns] | None = None


def load(skip: tuple[str, ...] = ()) -> dict[str, str]:
  """Imports the peers once; returns ``name -> why missing`` for those that are not.

  Args:
    skip: peers not to import (reported as missing), on the first call only.
  """
  if _MODULES or _MISSING:
    return dict(_MISSING)
  for name in PEER_NAMES:
    if name in skip:
      _MISSING[name] = "left out (--skip-peers)"
      continue
    try:
      module = __import__(name)
      if name == "keras" and module.backend.backend() != "jax":
        raise ImportError(f"KERAS_BACKEND is {module.backend.backend()!r}, not 'jax'")
      _MODULES[name] = module
    except Exception as e:  # noqa: BLE001 - any import failure means "missing"
      _MISSING[name] = f"{type(e).__name__}: {e}"
  torch = _MODULES.get("torch")
  if torch is not None:
    torch.set_num_threads(os.cpu_count() or 1)
    if jax.default_backend() == "gpu" and not torch.cuda.is_available():
      print("note: torch has no CUDA here; its figures are on the CPU.")
  return dict(_MISSING)


def install_hint(name: str) -> str:
  """How to install peer `name`: optax and Keras come with the ``bench`` extra, torch does not."""
  if name == "torch":
    return (
      "install torch separately: pip install torch (a CUDA build on Linux); on a CPU-only "
      "machine pip install torch --index-url https://download.pytorch.org/whl/cpu"
    )
  return "install with pip install -e '.[bench]'"


def get(name: str) -> Any:
  """The imported peer module, or None when it is missing."""
  load()
  return _MODULES.get(name)


def missing(name: str) -> str:
  """Why peer `name` is missing ('' when it is not)."""
  load()
  return _MISSING.get(name, "")


# --------------------------------------------------------------------------
# What a user writes around an element-wise loss.


def expand_to(a: jax.Array, ndim: int) -> jax.Array:
  """`a` with trailing axes of size 1 up to rank `ndim` (``[B] -> [B, 1]``)."""
  return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def user_reduce(per_sample: jax.Array, w, mask, reduction: str) -> jax.Array:
  """Weights, mask and mean over per-sample losses, as a user of optax writes them.

  Args:
    per_sample: the per-sample losses, `[B]` or `[B, T]` (or a scalar).
    w: None, or sample weights `[B]` (or a scalar), broadcast over `T`.
    mask: None, or a bool array of the per-sample shape.
    reduction: ``"mean"`` (over the valid samples) or ``"none"``.

  Returns:
    The mean, or the weighted per-sample losses (0 where masked).
  """
  if w is not None:
    per_sample = per_sample * expand_to(w, per_sample.ndim)
  if mask is not None:
    per_sample = jnp.where(mask, per_sample, 0)
  if reduction == "none":
    return per_sample
  if mask is None:
    return jnp.mean(per_sample)
  return jnp.sum(per_sample) / jnp.sum(mask)


def _optax_impl(elementwise: Callable[[jax.Array, jax.Array], jax.Array]) -> Impl:
  """An optax element-wise loss ``(logits, labels)``, mean over the last axis."""

  def loss(reduction: str) -> LossFn:
    def fn(y, x, w, mask):
      return user_reduce(jnp.mean(elementwise(x, y), axis=-1), w, mask, reduction)

    return fn

  def metric() -> MetricFns:
    # optax has no metric: a (sum, count) pair is what a user keeps.
    def update(state, y, x):
      per_sample = jnp.mean(elementwise(x, y), axis=-1)
      return state[0] + jnp.sum(per_sample, dtype=jnp.float32), state[1] + per_sample.size

    zero = jnp.zeros((), jnp.float32)
    return MetricFns(lambda: (zero, zero), update, lambda state: state[0] / state[1])

  return Impl(loss, metric)


def _keras_impl(loss_cls, metric_cls=None, **config) -> Impl:
  """A Keras loss class (and metric class) under jax.jit, with logits."""

  def loss(reduction: str) -> LossFn:
    keras_reduction = None if reduction == "none" else "sum_over_batch_size"
    obj = loss_cls(from_logits=True, reduction=keras_reduction, **config)

    def fn(y, x, w, mask):
      # A Keras loss takes a mask only on a Keras-masked tensor: fold it into
      # the weights, scaled so the mean is over the valid samples (as Keras
      # does internally).
      if mask is not None:
        mask_w = mask.astype(jnp.float32)
        if reduction != "none":
          mask_w = mask_w * (mask.size / jnp.sum(mask_w))
        w = mask_w if w is None else expand_to(w, mask.ndim) * mask_w
      if w is not None:  # [B] against [B, T] losses needs the [B, 1] shape
        w = expand_to(w, x.ndim - 1)
      return obj(y, x, sample_weight=w)

    return fn

  def metric() -> MetricFns:
    m = metric_cls(from_logits=True, **config)
    return MetricFns(
      lambda: [v.value for v in m.variables],
      m.stateless_update_state,
      m.stateless_result,
    )

  return Impl(loss, metric if metric_cls is not None else None)


# --------------------------------------------------------------------------
# The families.


def _bce() -> dict[str, Impl | str]:
  def loss(reduction: str) -> LossFn:
    obj = bce_jax.BinaryCrossentropy(from_logits=True, reduction=reduction)
    return lambda y, x, w, mask: obj(y, x, sample_weight=w, mask=mask)

  def metric() -> MetricFns:
    m = bce_jax.BinaryCrossentropyMetric(from_logits=True)
    return MetricFns(m.init, m.update, m.result)

  impls: dict[str, Impl | str] = {OURS: Impl(loss, metric)}
  optax, keras = get("optax"), get("keras")
  impls["optax"] = _optax_impl(optax.sigmoid_binary_cross_entropy) if optax else missing("optax")
  impls["keras"] = (
    _keras_impl(keras.losses.BinaryCrossentropy, keras.metrics.BinaryCrossentropy)
    if keras
    else missing("keras")
  )
  return impls


def _focal() -> dict[str, Impl | str]:
  impls: dict[str, Impl | str] = {}
  if hasattr(bce_jax, "BinaryFocalCrossentropy"):

    def loss(reduction: str) -> LossFn:
      obj = bce_jax.BinaryFocalCrossentropy(
        from_logits=True, gamma=FOCAL_GAMMA, reduction=reduction
      )
      return lambda y, x, w, mask: obj(y, x, sample_weight=w, mask=mask)

    def metric() -> MetricFns:
      m = bce_jax.BinaryFocalCrossentropyMetric(from_logits=True, gamma=FOCAL_GAMMA)
      return MetricFns(m.init, m.update, m.result)

    has_metric = hasattr(bce_jax, "BinaryFocalCrossentropyMetric")
    impls[OURS] = Impl(loss, metric if has_metric else None)
  else:
    impls[OURS] = "bce_jax has no BinaryFocalCrossentropy yet"
  optax, keras = get("optax"), get("keras")
  impls["optax"] = (
    _optax_impl(lambda x, y: optax.sigmoid_focal_loss(x, y, gamma=FOCAL_GAMMA))
    if optax
    else missing("optax")
  )
  impls["keras"] = (
    _keras_impl(keras.losses.BinaryFocalCrossentropy, gamma=FOCAL_GAMMA)
    if keras
    else missing("keras")
  )
  return impls


FAMILIES: dict[str, Callable[[], dict[str, Impl | str]]] = {"bce": _bce, "focal": _focal}


def available_families() -> list[str]:
  """The families bce_jax implements (focal only once its API exists)."""
  return ["bce"] + (["focal"] if hasattr(bce_jax, "BinaryFocalCrossentropy") else [])


def implementations(family: str) -> dict[str, Impl | str]:
  """``name -> Impl`` (or why it is missing) for `family`, bce_jax first."""
  return FAMILIES[family]()


def has_metric(family: str) -> bool:
  """Whether bce_jax has a metric in `family`."""
  ours = implementations(family)[OURS]
  return isinstance(ours, Impl) and ours.metric is not None
