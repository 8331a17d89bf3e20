"""Measured failures and accuracy of the Keras 3, optax and bce_jax focal losses.

Float32, jitted, elementwise from logits, gamma in {0, 0.5, 1, 2, 5}, no class balancing, against
the float64 reference in tests/_reference.py. Relative errors are |got - want| / max(|want|, 1e-30)
(float32 results below 1e-30 may be flushed denormals); for soft-label gradients the denominator is
the sum of the terms' magnitudes, since those gradients cross zero.

  python benchmarks/focal_accuracy.py
"""

import os
import pathlib
import sys
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root
warnings.filterwarnings("ignore")

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax

import bce_jax
from tests import _reference as ref

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
NAMES = ("keras", "optax", "bce_jax")


def implementations(gamma):
  keras_fn = keras.losses.binary_focal_crossentropy
  return {
    "keras": lambda y, x: keras_fn(y[:, None], x[:, None], gamma=gamma, from_logits=True),
    "optax": lambda y, x: optax.sigmoid_focal_loss(x, y, gamma=gamma),
    "bce_jax": lambda y, x: bce_jax.binary_focal_crossentropy_elementwise(
      y, x, gamma=gamma, from_logits=True
    ),
  }


def calculus(f):
  """Jitted value, gradient and Hessian in the logits, element by element."""

  def scalar(x, y):
    return f(y[None], x[None])[0]

  def all_of(y, x):
    grad, hess = jax.vmap(jax.grad(scalar)), jax.vmap(jax.hessian(scalar))
    return jax.vmap(scalar)(x, y), grad(x, y), hess(x, y)

  return jax.jit(all_of)


def relative(got, want, scale):
  got = np.asarray(got, np.float64)
  return np.where(np.isfinite(got), np.abs(got - want) / np.maximum(scale, 1e-30), np.inf)


def main():
  print(f"jax {jax.__version__}, optax {optax.__version__}, keras {keras.__version__}")
  for gamma in (2.0, 0.5):
    values = {
      name: round(float(jax.jit(f)(jnp.array([1.0]), jnp.array([-100.0]))[0]), 4)
      for name, f in implementations(gamma).items()
    }
    print(f"value at x = -100, y = 1, gamma = {gamma} (truth 100): {values}")
  saturated = np.array([-1e4, -100, -30, 30, 100, 1e4], np.float32)
  ys = np.repeat([0.0, 1.0], len(saturated)).astype(np.float32)
  xs = np.tile(saturated, 2)
  print(f"non-finite value/gradient/Hessian of {len(xs)} elements, x in {saturated.tolist()}:")
  for gamma in GAMMAS:
    row = {
      name: "/".join(str(int((~np.isfinite(np.asarray(z))).sum())) for z in calculus(f)(ys, xs))
      for name, f in implementations(gamma).items()
    }
    print(f"  gamma = {gamma}: {row}")
  magnitudes = np.concatenate([[0.0], np.logspace(-3, 4, 281)])
  grid = np.concatenate([-magnitudes[::-1], magnitudes[1:]]).astype(np.float32)
  labels = {"hard": [0.0, 1.0], "soft": [1e-6, 0.1, 0.3, 0.5, 0.7, 0.9, 1 - 2**-20]}
  for kind, values in labels.items():
    y, x = (a.ravel() for a in np.meshgrid(np.array(values, np.float32), grid, indexing="ij"))
    moderate = np.abs(x) <= 30
    print(
      f"worst relative error, {kind} labels, x in [-1e4, 1e4]: value / gradient / Hessian (|x| <= 30)"
    )
    for gamma in GAMMAS:
      want_value = ref.focal_elementwise(y, x, True, 0.0, gamma)
      want_grad, want_hess = ref.focal_derivatives_logits(y, x, 0.0, gamma)
      scale = ref.focal_gradient_scale(y, x, 0.0, gamma) if kind == "soft" else np.abs(want_grad)
      hess_scale = np.abs(want_hess[moderate]) + 1e-3 * scale[moderate]
      cells = []
      for name, f in implementations(gamma).items():
        value, grad, hess = calculus(f)(y, x)
        errors = (
          relative(value, want_value, np.abs(want_value)).max(),
          relative(grad, want_grad, scale).max(),
          relative(np.asarray(hess)[moderate], want_hess[moderate], hess_scale).max(),
        )
        cells.append(f"{name} " + "/".join(f"{e:.1e}" for e in errors))
      print(f"  gamma = {gamma}: " + "  ".join(cells))


if __name__ == "__main__":
  main()
