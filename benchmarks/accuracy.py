"""Accuracy (not timed): bce_jax against float64 NumPy, and against Keras.

Logits: 200,001 points evenly spaced in [-100, 100], labels 0 and 1; the
error is relative, with ``max(|ref|, float32 tiny)`` as denominator, and the
reference is flushed to zero below float32 tiny, as XLA on CPU flushes
subnormals. Probabilities: a grid of [0, 1] plus the clip edges, labels 0,
0.3 and 1, against Keras; absolute below a loss of 1, relative above.
"""

from __future__ import annotations

import jax
import numpy as np
import peers

import bce_jax

_TINY = float(np.finfo(np.float32).tiny)


def _max_rel(values: np.ndarray, ref: np.ndarray) -> float:
  values = np.asarray(values, np.float64)
  return float(np.max(np.abs(values - ref) / np.maximum(np.abs(ref), _TINY)))


def _logits_errors(out: dict, label: float, x: np.ndarray) -> None:
  y = np.full_like(x, label)
  # Loss: softplus(x) for y = 0, softplus(-x) for y = 1; gradient of the
  # element loss: sigmoid(x) for y = 0, -sigmoid(-x) for y = 1.
  sign = 1.0 if label == 0 else -1.0
  x64 = x.astype(np.float64)
  ref_loss = np.logaddexp(0.0, sign * x64)
  ref_grad = sign / (1.0 + np.exp(-sign * x64))
  ref_loss = np.where(np.abs(ref_loss) < _TINY, 0.0, ref_loss)
  ref_grad = np.where(np.abs(ref_grad) < _TINY, 0.0, ref_grad)
  key = f"y={int(label)}"
  elementwise = jax.jit(
    lambda y, x: bce_jax.binary_crossentropy_elementwise(y, x, from_logits=True)
  )
  grad = jax.jit(jax.grad(lambda x, y: elementwise(y, x).sum()))
  out[f"loss_max_rel_err_{key}"] = _max_rel(elementwise(y, x), ref_loss)
  out[f"grad_max_rel_err_{key}"] = _max_rel(grad(x, y), ref_grad)
  optax = peers.get("optax")
  if optax is not None:
    o_loss = jax.jit(optax.sigmoid_binary_cross_entropy)(x, y)
    o_grad = jax.jit(jax.grad(lambda x, y: optax.sigmoid_binary_cross_entropy(x, y).sum()))
    out[f"optax_loss_max_rel_err_{key}"] = _max_rel(o_loss, ref_loss)
    out[f"optax_grad_max_rel_err_{key}"] = _max_rel(o_grad(x, y), ref_grad)


def _probs_vs_keras(keras) -> float:
  edges = np.array([0.0, 1e-8, 1e-7, 2e-7, 0.5, 1 - 2e-7, 1 - 1e-7, 1 - 5e-8, 1.0], np.float32)
  p = np.concatenate([np.linspace(0, 1, 100_001, dtype=np.float32), edges])
  worst = 0.0
  for label in (0.0, 0.3, 1.0):
    y = np.full_like(p, label)
    ours = np.asarray(bce_jax.binary_crossentropy_elementwise(y, p), np.float64)
    theirs = np.asarray(keras.losses.binary_crossentropy(y[:, None], p[:, None]), np.float64)
    # Absolute below 1, relative above (a float32 ulp of a loss of 5 is 5e-7).
    worst = max(worst, float(np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1.0))))
  return worst


def accuracy() -> dict[str, float]:
  """The worst errors, keyed by what they measure."""
  x = np.linspace(-100, 100, 200_001, dtype=np.float32)
  out: dict[str, float] = {}
  for label in (0.0, 1.0):
    _logits_errors(out, label, x)
  out["loss_max_rel_err"] = max(out["loss_max_rel_err_y=0"], out["loss_max_rel_err_y=1"])
  out["grad_max_rel_err"] = max(out["grad_max_rel_err_y=0"], out["grad_max_rel_err_y=1"])
  keras = peers.get("keras")
  if keras is not None:
    out["probs_max_diff_vs_keras"] = _probs_vs_keras(keras)
  return out
