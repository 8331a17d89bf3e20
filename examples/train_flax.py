"""Train a Flax NNX classifier with bce_jax on the breast-cancer data set.

The README's main example. A small MLP learns to tell benign from malignant
tumours (scikit-learn's copy of the Wisconsin data set, no download) with
``bce_jax.BinaryCrossentropy(from_logits=True)`` as the loss and optax's
Adam; evaluation streams a ``BinaryCrossentropyMetric`` state through a
jitted step. Run::

  python examples/train_flax.py                      # ~97% validation accuracy
  python examples/train_flax.py --label-smoothing 0.1 --pos-weight 0.6
  python examples/train_flax.py --fast               # 5 epochs, for tests

Needs the `examples` extra: ``pip install -e ".[examples]"``.
"""

from __future__ import annotations

import time

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

import bce_jax


class MLP(nnx.Module):
  """features -> hidden (ReLU) -> one logit."""

  def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(features, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(nnx.relu(self.hidden(x)))  # [batch, 1] logits


def main() -> None:
  args = _common.parse_args(_common.make_parser(__doc__.splitlines()[0]))
  x_train, y_train, x_val, y_val = _common.load_breast_cancer_split(args.seed)

  # The loss and the metric are frozen, hashable configs with no array
  # leaves: closing over them in a jitted function never causes a retrace.
  loss_fn = bce_jax.BinaryCrossentropy(
    from_logits=True, label_smoothing=args.label_smoothing, pos_weight=args.pos_weight
  )
  metric = bce_jax.BinaryCrossentropyMetric(
    from_logits=True, label_smoothing=args.label_smoothing, pos_weight=args.pos_weight
  )

  model = MLP(x_train.shape[1], 32, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, optax.adam(args.learning_rate), wrt=nnx.Param)

  @nnx.jit
  def train_step(model: MLP, optimizer: nnx.Optimizer, x, y) -> jax.Array:
    # y has shape [batch] and the logits [batch, 1]: bce_jax aligns the two
    # (Keras's shape policy) instead of broadcasting them to [batch, batch].
    def objective(model):
      return loss_fn(y, model(x))

    loss, grads = nnx.value_and_grad(objective)(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def eval_step(model: MLP, state: bce_jax.MetricState, correct, x, y, mask):
    # The metric state is a pytree of arrays: it goes in and comes out of
    # the jitted step like any other value. Padding rows are masked out.
    logits = model(x)
    state = metric.update(state, y, logits, mask=mask)
    hits = ((logits[:, 0] > 0) == (y > 0.5)) & mask
    return state, correct + hits.sum()

  def evaluate(x, y) -> tuple[float, float]:
    """(metric value, accuracy) over a whole split, in fixed-size batches."""
    state, correct = metric.init(), jnp.zeros((), jnp.int32)
    for xb, yb, mask in _common.eval_batches(x, y, batch_size=64):
      state, correct = eval_step(model, state, correct, xb, yb, mask)
    return float(metric.result(state)), int(correct) / len(x)

  shuffle_rng = np.random.default_rng(args.seed)
  history: dict[str, list[float]] = {"train": [], "validation": []}
  start = time.perf_counter()
  with tqdm.trange(args.epochs, desc="flax", unit="epoch") as bar:
    for _ in bar:
      losses = [
        train_step(model, optimizer, xb, yb)
        for xb, yb in _common.train_batches(x_train, y_train, args.batch_size, shuffle_rng)
      ]
      history["train"].append(float(jnp.mean(jnp.stack(losses))))
      history["validation"].append(evaluate(x_val, y_val)[0])
      bar.set_postfix(train=f"{history['train'][-1]:.4f}", val=f"{history['validation'][-1]:.4f}")
  seconds = time.perf_counter() - start

  train_loss, _ = evaluate(x_train, y_train)
  metric_value, val_accuracy = evaluate(x_val, y_val)
  val_loss = float(loss_fn(y_val, model(x_val)))  # one shot, for comparison
  _common.save_loss_curves(history, args.plot, "Flax NNX MLP, breast cancer")
  _common.print_summary(
    train_loss=train_loss,
    val_loss=val_loss,
    val_accuracy=val_accuracy,
    metric=metric_value,
    seconds=seconds,
  )


if __name__ == "__main__":
  main()
