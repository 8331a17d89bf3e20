"""bce_jax as the loss of a Keras 3 model on the JAX backend.

Keras calls a loss as ``loss(y_true, y_pred)`` and then applies the sample
weights, the mask and the reduction itself (a callable that is not a
``keras.losses.Loss`` is wrapped in ``keras.losses.LossFunctionWrapper``).
So hand Keras a bce_jax loss with ``reduction=None``: bce_jax returns the
per-sample losses and Keras weights and averages them exactly as it does for
its own losses. A loss with the default reduction returns an already
averaged scalar, which Keras then multiplies by the weights: right without
``sample_weight`` / ``class_weight``, wrong with them (shown below). Run::

  python examples/keras_interop.py          # needs the `keras` and `examples` extras
  python examples/keras_interop.py --fast
"""

from __future__ import annotations

import argparse
import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported

import _common
import keras
import numpy as np

import bce_jax


def build_model(features: int, seed: int) -> keras.Model:
  keras.utils.set_random_seed(seed)  # the same initial weights every time
  return keras.Sequential(
    [keras.Input((features,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)]
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--fast", action="store_true", help="3 epochs, for tests")
  args = parser.parse_args()
  epochs = min(args.epochs, 3) if args.fast else args.epochs
  x_train, y_train, x_val, y_val = _common.load_breast_cancer_split(args.seed)

  # 1. Train a Keras model with bce_jax as its loss.
  model = build_model(x_train.shape[1], args.seed)
  model.compile(
    optimizer=keras.optimizers.Adam(1e-3),
    loss=bce_jax.BinaryCrossentropy(from_logits=True, reduction=None),
    metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],  # logits: the threshold is 0
  )
  history = model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
  val_loss, val_accuracy = model.evaluate(x_val, y_val, verbose=0)
  print(
    f"fit {epochs} epochs: train loss {history.history['loss'][0]:.4f} -> "
    f"{history.history['loss'][-1]:.4f}; val loss {val_loss:.4f}, "
    f"val accuracy {val_accuracy:.4f}"
  )

  # 2. On one batch, bce_jax's value equals Keras's own loss.
  y_batch, logits = y_val[:64], np.asarray(model(x_val[:64]))
  weights = np.random.default_rng(args.seed).uniform(0.0, 2.0, len(y_batch)).astype(np.float32)
  ours = bce_jax.BinaryCrossentropy(from_logits=True)
  theirs = keras.losses.BinaryCrossentropy(from_logits=True)
  diff = abs(float(ours(y_batch, logits)) - float(theirs(y_batch, logits)))
  weighted_diff = abs(
    float(ours(y_batch, logits, sample_weight=weights))
    - float(theirs(y_batch, logits, sample_weight=weights))
  )
  print(
    f"one batch: bce_jax {float(ours(y_batch, logits)):.8f}  "
    f"keras {float(theirs(y_batch, logits)):.8f}  |diff| {diff:.2e}"
  )
  print(f"same batch with sample_weight: |diff| {weighted_diff:.2e}")
  assert diff < 1e-6 and weighted_diff < 1e-6, (diff, weighted_diff)

  # 3. Inside compile/evaluate, with sample weights: reduction=None matches
  #    Keras; the default reduction (a pre-averaged scalar) does not.
  def weighted_evaluate(loss) -> float:
    probe = build_model(x_train.shape[1], args.seed)
    probe.set_weights(model.get_weights())
    probe.compile(loss=loss)
    return float(
      probe.evaluate(
        x_val,
        y_val,
        sample_weight=np.linspace(0.1, 2.0, len(y_val)),
        batch_size=len(y_val),
        verbose=0,
      )
    )

  keras_weighted = weighted_evaluate(keras.losses.BinaryCrossentropy(from_logits=True))
  per_sample = weighted_evaluate(bce_jax.BinaryCrossentropy(from_logits=True, reduction=None))
  pre_averaged = weighted_evaluate(bce_jax.BinaryCrossentropy(from_logits=True))
  compile_diff = abs(per_sample - keras_weighted)
  print(
    f"evaluate with sample_weight: keras {keras_weighted:.6f}  "
    f"bce_jax(reduction=None) {per_sample:.6f}  "
    f"bce_jax(default reduction) {pre_averaged:.6f}  <- Keras re-weights a scalar"
  )
  assert compile_diff < 1e-6, compile_diff

  print(
    f"RESULT val_accuracy={val_accuracy:.6f} batch_abs_diff={diff:.3e} "
    f"weighted_abs_diff={weighted_diff:.3e} compile_abs_diff={compile_diff:.3e}"
  )


if __name__ == "__main__":
  main()
