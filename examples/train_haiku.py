"""Train a Haiku MLP with bce_jax and optax on the breast-cancer data set.

The same task as ``train_flax.py``, written the Haiku way: a transformed
function, explicit parameters and optimizer state, and ``jax.jit``::

  python examples/train_haiku.py          # ~97% validation accuracy
  python examples/train_haiku.py --fast   # 5 epochs, for tests
"""

from __future__ import annotations

import time

import _common
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import bce_jax


def forward(x: jax.Array) -> jax.Array:
  return hk.nets.MLP([32, 1])(x)  # ReLU between layers; [batch, 1] logits


def main() -> None:
  args = _common.parse_args(_common.make_parser(__doc__.splitlines()[0]))
  x_train, y_train, x_val, y_val = _common.load_breast_cancer_split(args.seed)

  loss_fn = bce_jax.BinaryCrossentropy(
    from_logits=True, label_smoothing=args.label_smoothing, pos_weight=args.pos_weight
  )
  metric = bce_jax.BinaryCrossentropyMetric(
    from_logits=True, label_smoothing=args.label_smoothing, pos_weight=args.pos_weight
  )

  model = hk.without_apply_rng(hk.transform(forward))
  params = model.init(jax.random.key(args.seed), x_train[:1])
  optimizer = optax.adam(args.learning_rate)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(y, model.apply(p, x)))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def eval_step(params, state, correct, x, y, mask):
    logits = model.apply(params, x)
    hits = ((logits[:, 0] > 0) == (y > 0.5)) & mask
    return metric.update(state, y, logits, mask=mask), correct + hits.sum()

  def evaluate(params, x, y) -> tuple[float, float]:
    state, correct = metric.init(), jnp.zeros((), jnp.int32)
    for xb, yb, mask in _common.eval_batches(x, y, batch_size=64):
      state, correct = eval_step(params, state, correct, xb, yb, mask)
    return float(metric.result(state)), int(correct) / len(x)

  shuffle_rng = np.random.default_rng(args.seed)
  history: dict[str, list[float]] = {"train": [], "validation": []}
  start = time.perf_counter()
  for _ in tqdm.trange(args.epochs, desc="haiku", unit="epoch"):
    losses = []
    for xb, yb in _common.train_batches(x_train, y_train, args.batch_size, shuffle_rng):
      params, opt_state, loss = train_step(params, opt_state, xb, yb)
      losses.append(loss)
    history["train"].append(float(jnp.mean(jnp.stack(losses))))
    history["validation"].append(evaluate(params, x_val, y_val)[0])
  seconds = time.perf_counter() - start

  metric_value, val_accuracy = evaluate(params, x_val, y_val)
  _common.save_loss_curves(history, args.plot, "Haiku MLP, breast cancer")
  _common.print_summary(
    train_loss=evaluate(params, x_train, y_train)[0],
    val_loss=float(loss_fn(y_val, model.apply(params, x_val))),
    val_accuracy=val_accuracy,
    metric=metric_value,
    seconds=seconds,
  )


if __name__ == "__main__":
  main()
