"""Train a two-tower SigLIP model on 8 devices with bce_jax's ring sigmoid loss.

An image tower (an MLP on scikit-learn's 8x8 digits, shipped with the
package, no download) and a text tower (one learned "caption" embedding per
digit) are trained with ``bce_jax.pairwise_sigmoid_loss`` in Flax NNX: the
batch is sharded over 8 devices and the loss runs inside ``jax.shard_map``
with ``axis_name``, so the text embeddings travel around the ring of devices
and no device ever holds the ``[B, B]`` logits. Images of the same digit are
positives of each other (``positives=labels``). The scale and bias are
learned as in the paper: ``log scale`` from ``log 10``, the bias from -10.

Evaluation is retrieval: each held-out image is matched to the nearest of
the 10 captions (image -> text top-1). On a CPU-only machine JAX is asked
for 8 host devices (``XLA_FLAGS``, set below). Run::

  python examples/train_siglip.py           # 0.986 image -> text top-1 after 40 epochs
  python examples/train_siglip.py --fast    # 8 epochs (~0.9), for tests
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

# JAX reads XLA_FLAGS when its CPU backend starts, so the flag is set before
# jax is imported; a device count already given by the caller is kept.
_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  flag = f"--xla_force_host_platform_device_count={_DEVICES}"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bce_jax

DEFAULT_PLOT = pathlib.Path(__file__).resolve().parent / "out" / "siglip_loss.png"
CLASSES = 10


def load_digits_split(seed: int, val_fraction: float = 0.2):
  """scikit-learn's digits: 1797 images of 8x8 pixels in [0, 16], scaled to [0, 1]."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  x, y = load_digits(return_X_y=True)
  x_train, x_val, y_train, y_val = train_test_split(
    x / 16.0, y, test_size=val_fraction, random_state=seed, stratify=y
  )
  return (
    x_train.astype(np.float32),
    y_train.astype(np.int32),
    x_val.astype(np.float32),
    y_val.astype(np.int32),
  )


def _unit(z: jax.Array) -> jax.Array:
  return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


class TwoTower(nnx.Module):
  """Image MLP and caption embeddings, both L2-normalized; SigLIP's scale and bias."""

  def __init__(self, pixels: int, dim: int, *, rngs: nnx.Rngs):
    self.image_hidden = nnx.Linear(pixels, 128, rngs=rngs)
    self.image_out = nnx.Linear(128, dim, rngs=rngs)
    self.captions = nnx.Embed(CLASSES, dim, rngs=rngs)
    self.log_scale = nnx.Param(jnp.asarray(np.log(10.0), jnp.float32))
    self.bias = nnx.Param(jnp.asarray(-10.0, jnp.float32))

  def images(self, x: jax.Array) -> jax.Array:
    return _unit(self.image_out(nnx.relu(self.image_hidden(x))))

  def texts(self, labels: jax.Array) -> jax.Array:
    return _unit(self.captions(labels))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--batch-size", type=int, default=256, help="global, a multiple of 8")
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--dim", type=int, default=32, help="embedding size")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot", type=pathlib.Path, default=DEFAULT_PLOT)
  parser.add_argument("--fast", action="store_true", help="8 epochs: a smoke test for CI")
  args = parser.parse_args()
  if args.fast:
    args.epochs = min(args.epochs, 8)
  if args.batch_size % _DEVICES:
    raise SystemExit(f"--batch-size must be a multiple of {_DEVICES}")
  if len(jax.devices()) < _DEVICES:
    raise SystemExit(f"needs {_DEVICES} devices, found {jax.devices()}; check XLA_FLAGS")

  # Auto axes: jit places the towers' work by the batch's sharding itself.
  mesh = jax.make_mesh(
    (_DEVICES,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:_DEVICES]
  )
  rows = NamedSharding(mesh, P("data"))
  print(f"mesh: {_DEVICES} x {jax.devices()[0].platform} devices, axis 'data'")
  x_train, y_train, x_val, y_val = load_digits_split(args.seed)
  print(f"digits: {len(x_train)} training images, {len(x_val)} held out")

  # The loss of the whole batch: each device holds B/8 image and caption
  # embeddings; the captions go round the ring. Returned on every device.
  @jax.shard_map(mesh=mesh, in_specs=(P("data"), P("data"), P(), P(), P("data")), out_specs=P())
  def ring_loss(z_img, z_txt, scale, bias, labels):
    return bce_jax.pairwise_sigmoid_loss(
      z_img, z_txt, scale=scale, bias=bias, positives=labels, axis_name="data"
    )

  model = TwoTower(x_train.shape[1], args.dim, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, optax.adam(args.learning_rate), wrt=nnx.Param)

  @nnx.jit
  def train_step(model: TwoTower, optimizer: nnx.Optimizer, x, labels) -> jax.Array:
    def objective(model: TwoTower) -> jax.Array:
      # The towers run on the sharded batch (jit partitions them); the loss
      # is the ring, inside shard_map.
      scale = jnp.exp(model.log_scale[...])
      return ring_loss(model.images(x), model.texts(labels), scale, model.bias[...], labels)

    loss, grads = nnx.value_and_grad(objective)(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def evaluate(model: TwoTower, x, labels):
    """(image -> text top-1 over the 10 captions, loss of the split on one device)."""
    z_img, captions = model.images(x), model.texts(jnp.arange(CLASSES))
    top1 = jnp.mean(jnp.argmax(z_img @ captions.T, axis=1) == labels)
    scale, bias = jnp.exp(model.log_scale[...]), model.bias[...]
    loss = bce_jax.pairwise_sigmoid_loss(
      z_img, model.texts(labels), scale=scale, bias=bias, positives=labels
    )
    return top1, loss

  @nnx.jit
  def compare(model: TwoTower, x, labels):
    """The loss of one batch: the ring on 8 devices, and one device."""
    z_img, z_txt = model.images(x), model.texts(labels)
    scale, bias = jnp.exp(model.log_scale[...]), model.bias[...]
    one = bce_jax.pairwise_sigmoid_loss(z_img, z_txt, scale=scale, bias=bias, positives=labels)
    return ring_loss(z_img, z_txt, scale, bias, labels), one

  first_batch = (x_train[: args.batch_size], y_train[: args.batch_size])
  history: dict[str, list[float]] = {"train": [], "held out": []}
  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  with jax.set_mesh(mesh), tqdm.trange(args.epochs, desc="siglip", unit="epoch") as bar:
    for _ in bar:
      losses = []
      for xb, yb in _common.train_batches(x_train, y_train, args.batch_size, rng):
        xb, yb = jax.device_put(xb, rows), jax.device_put(yb, rows)
        losses.append(train_step(model, optimizer, xb, yb))
      history["train"].append(float(jnp.mean(jnp.stack(losses))))
      top1, val_loss = evaluate(model, x_val, y_val)
      history["held out"].append(float(val_loss))
      bar.set_postfix(loss=f"{history['train'][-1]:.3f}", top1=f"{float(top1):.3f}")
    seconds = time.perf_counter() - start

    # The ring on 8 devices and one device give the same loss for a batch.
    ring, one = compare(model, *(jax.device_put(a, rows) for a in first_batch))
    ring_diff = abs(float(ring) - float(one)) / abs(float(one))

  top1, val_loss = (float(v) for v in evaluate(model, x_val, y_val))
  # As many training images as held out: the same shapes, no new compile.
  train_top1, _ = evaluate(model, x_train[: len(x_val)], y_train[: len(x_val)])
  _common.save_loss_curves(history, args.plot, "SigLIP two towers, digits (8-device ring)")
  print(f"train loss      {history['train'][-1]:.4f}   (ring, 8 devices)")
  # Each row sums over the B pairs it is in: the held-out B is 360, not 256.
  print(f"held-out loss   {val_loss:.4f}   (one device, blockwise, B = {len(x_val)})")
  print(f"image -> text top-1: held out {top1:.4f}, train {float(train_top1):.4f}")
  scale, bias = float(jnp.exp(model.log_scale[...])), float(model.bias[...])
  print(f"scale {scale:.2f}, bias {bias:.2f}; ring vs one device {ring_diff:.1e}")
  print(f"training time   {seconds:.1f} s")
  print(
    f"RESULT train_loss={history['train'][-1]:.6f} val_loss={val_loss:.6f} "
    f"val_top1={top1:.6f} scale={scale:.6f} bias={bias:.6f} "
    f"ring_rel_diff={ring_diff:.3e}"
  )


if __name__ == "__main__":
  main()
