"""Train an Equinox MLP with bce_jax and optax on the breast-cancer data set.

The same task as ``train_flax.py``, written the Equinox way: the model is a
pytree, ``eqx.filter_jit`` and ``eqx.filter_value_and_grad`` separate its
arrays from its static parts, and the model maps one sample (``jax.vmap``
batches it)::

  python examples/train_equinox.py          # ~97% validation accuracy
  python examples/train_equinox.py --fast   # 5 epochs, for tests
"""

from __future__ import annotations

import time

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import bce_jax


def main() -> None:
  args = _common.parse_args(_common.make_parser(__doc__.splitlines()[0]))
  x_train, y_train, x_val, y_val = _common.load_breast_cancer_split(args.seed)

  loss_fn = bce_jax.BinaryCrossentropy(
    from_logits=True, label_smoothing=args.label_smoothing, pos_weight=args.pos_weight
  )
  metric = bce_jax.BinaryCrossentropyMetric(
    from_logits=True, label_smoothing=args.label_smoothing, pos_weight=args.pos_weight
  )

  # One hidden layer of 32 ReLU units; maps a [30] vector to a [1] logit.
  model = eqx.nn.MLP(x_train.shape[1], 1, width_size=32, depth=1, key=jax.random.key(args.seed))
  optimizer = optax.adam(args.learning_rate)
  opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

  @eqx.filter_jit
  def train_step(model, opt_state, x, y):
    def objective(model):
      return loss_fn(y, jax.vmap(model)(x))

    loss, grads = eqx.filter_value_and_grad(objective)(model)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss

  @eqx.filter_jit
  def eval_step(model, state, correct, x, y, mask):
    logits = jax.vmap(model)(x)
    hits = ((logits[:, 0] > 0) == (y > 0.5)) & mask
    return metric.update(state, y, logits, mask=mask), correct + hits.sum()

  def evaluate(model, x, y) -> tuple[float, float]:
    state, correct = metric.init(), jnp.zeros((), jnp.int32)
    for xb, yb, mask in _common.eval_batches(x, y, batch_size=64):
      state, correct = eval_step(model, state, correct, xb, yb, mask)
    return float(metric.result(state)), int(correct) / len(x)

  shuffle_rng = np.random.default_rng(args.seed)
  history: dict[str, list[float]] = {"train": [], "validation": []}
  start = time.perf_counter()
  for _ in tqdm.trange(args.epochs, desc="equinox", unit="epoch"):
    losses = []
    for xb, yb in _common.train_batches(x_train, y_train, args.batch_size, shuffle_rng):
      model, opt_state, loss = train_step(model, opt_state, xb, yb)
      losses.append(loss)
    history["train"].append(float(jnp.mean(jnp.stack(losses))))
    history["validation"].append(evaluate(model, x_val, y_val)[0])
  seconds = time.perf_counter() - start

  metric_value, val_accuracy = evaluate(model, x_val, y_val)
  _common.save_loss_curves(history, args.plot, "Equinox MLP, breast cancer")
  _common.print_summary(
    train_loss=evaluate(model, x_train, y_train)[0],
    val_loss=float(loss_fn(y_val, jax.vmap(model)(x_val))),
    val_accuracy=val_accuracy,
    metric=metric_value,
    seconds=seconds,
  )


if __name__ == "__main__":
  main()
