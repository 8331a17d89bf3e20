"""Extreme multi-label classification over 100,000 labels with Equinox and optax.

A synthetic XMC task the script generates (no download): a hidden linear
teacher scores every label for each input, label popularity follows a power
law (Zipf), and each row's 1 to 5 positive labels are the teacher's best,
with some noise. An Equinox model (an MLP encoder and a ``[C, D]`` label
matrix with biases) is trained with Adam on
``bce_jax.LinearBinaryCrossentropy``, which never builds the ``[B, C]``
logits, and evaluated with ``bce_jax.top_k_labels`` and a streaming
``bce_jax.TopKMetric``. The script prints and plots (``examples/out/``):

* the training loss going down;
* P@1/3/5 and nDCG@5 against predicting the most popular labels, and
  against the same model trained with optax's dense
  ``sigmoid_binary_cross_entropy`` on the materialized logits;
* the train step's peak memory, linear against dense, at this C
  and at 3M labels (read from the compiled programs, never run).

Run::

  python examples/train_xmc.py            # C = 100,000: ~1-2 min on 2 CPU cores
  python examples/train_xmc.py --quick    # C = 20,000, a few steps: a smoke test (< 30 s)
"""

from __future__ import annotations

import argparse
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import bce_jax

OUT = pathlib.Path(__file__).resolve().parent / "out"


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--labels", type=int, default=100_000, help="C, the label space")
  parser.add_argument("--train", type=int, default=16_384, help="training rows")
  parser.add_argument("--test", type=int, default=2_048, help="test rows")
  parser.add_argument("--steps", type=int, default=120, help="training steps per model")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--dim", type=int, default=48, help="label embedding size D")
  parser.add_argument("--learning-rate", type=float, default=1e-2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-dense", action="store_true", help="skip the dense optax run")
  parser.add_argument("--plot", type=pathlib.Path, default=OUT / "train_xmc.png")
  parser.add_argument("--quick", "--fast", action="store_true", help="a small smoke test")
  args = parser.parse_args()
  if args.quick:
    args.labels, args.train, args.test, args.steps = 20_000, 2_048, 512, 25
  return args


# --------------------------------------------------------------------------
# Data: a hidden linear teacher and power-law label popularity.

FEATURES, MAX_POSITIVES = 32, 5


def make_data(args: argparse.Namespace):
  """Inputs, positive-id lists (``-1`` padded) for train and test, and the label frequencies."""
  rng = np.random.default_rng(args.seed)
  rows = args.train + args.test
  x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
  teacher = (rng.normal(size=(args.labels, FEATURES)) / np.sqrt(FEATURES) * 4).astype(np.float32)
  rank = rng.permutation(args.labels)  # label c is the rank[c]-th most popular
  popularity = (-1.5 * np.log1p(rank)).astype(np.float32)  # Zipf-like prior
  # The teacher's best labels, found tile by tile with bce_jax itself.
  top = jax.jit(lambda x: bce_jax.top_k_labels(x, teacher, MAX_POSITIVES, bias=popularity)[1])
  best = np.concatenate([np.asarray(top(x[i : i + 1024])) for i in range(0, rows, 1024)])
  count = rng.integers(1, MAX_POSITIVES + 1, rows)  # 1 to 5 positives a row
  noise = rng.uniform(size=best.shape) < 0.1  # some positives replaced at random
  positives = np.where(noise, rng.integers(0, args.labels, best.shape), best)
  positives = np.where(np.arange(MAX_POSITIVES) < count[:, None], positives, -1).astype(np.int32)
  freq = np.bincount(positives[: args.train][positives[: args.train] >= 0], minlength=args.labels)
  split = args.train
  return (x[:split], positives[:split]), (x[split:], positives[split:]), freq


# --------------------------------------------------------------------------
# The model: an MLP encoder and one embedding and bias per label.


class XMCModel(eqx.Module):
  encoder: eqx.nn.MLP
  labels: jax.Array  # [C, D]
  bias: jax.Array  # [C]

  def __init__(self, num_labels: int, dim: int, key: jax.Array):
    k1, k2 = jax.random.split(key)
    self.encoder = eqx.nn.MLP(FEATURES, dim, width_size=128, depth=1, key=k1)
    self.labels = jax.random.normal(k2, (num_labels, dim)) * 0.01
    self.bias = jnp.full(num_labels, -np.log(num_labels), jnp.float32)  # rare positives

  def features(self, x: jax.Array) -> jax.Array:
    return jax.vmap(self.encoder)(x)  # [B, D]


LINEAR = bce_jax.LinearBinaryCrossentropy()  # label_reduction="sum", as XMC trains


def linear_loss(model: XMCModel, x, positives):
  return LINEAR(model.features(x), model.labels, positives, bias=model.bias)


def dense_loss(model: XMCModel, x, positives):
  """The textbook way: materialize the [B, C] logits and 0/1 labels, then optax."""
  logits = model.features(x) @ model.labels.T + model.bias
  rows = jnp.arange(positives.shape[0])[:, None]
  cols = jnp.where(positives < 0, logits.shape[1], positives)  # padding: out of range, dropped
  labels = jnp.zeros_like(logits).at[rows, cols].set(1.0, mode="drop")
  return optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1).mean()


def make_step(loss_fn, optimizer, static):
  """One Adam step on the model's arrays (`static` holds the rest of the model)."""

  @jax.jit
  def step(params, opt_state, x, positives):
    grad_fn = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static), x, positives))
    loss, grads = grad_fn(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _is_leaf_array(a) -> bool:
  return isinstance(a, (jax.Array, jax.ShapeDtypeStruct))


def peak_temp_bytes(loss_fn, num_labels: int, args) -> int:
  """Peak memory of one compiled train step at `num_labels` (compiled, not run)."""
  model = eqx.filter_eval_shape(XMCModel, num_labels, args.dim, jax.random.key(0))
  params, static = eqx.partition(model, _is_leaf_array)
  optimizer = optax.adam(args.learning_rate)
  opt_state = jax.eval_shape(optimizer.init, params)
  x = jax.ShapeDtypeStruct((args.batch_size, FEATURES), jnp.float32)
  pos = jax.ShapeDtypeStruct((args.batch_size, MAX_POSITIVES), jnp.int32)
  compiled = make_step(loss_fn, optimizer, static).lower(params, opt_state, x, pos).compile()
  m = compiled.memory_analysis()
  # Arguments (parameters, Adam state, batch), outputs and temporaries, once each.
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return total + m.temp_size_in_bytes


def train(name: str, loss_fn, train_data, args) -> tuple[XMCModel, list[float], float]:
  model = XMCModel(args.labels, args.dim, jax.random.key(args.seed))
  params, static = eqx.partition(model, eqx.is_array)
  optimizer = optax.adam(args.learning_rate)
  opt_state = optimizer.init(params)
  step = make_step(loss_fn, optimizer, static)
  x, positives = train_data
  rng = np.random.default_rng(args.seed + 1)
  losses, start = [], time.perf_counter()
  for _ in tqdm.trange(args.steps, desc=f"{name:>6}", unit="step", leave=True):
    idx = rng.integers(0, len(x), args.batch_size)
    params, opt_state, loss = step(params, opt_state, x[idx], positives[idx])
    losses.append(float(loss))
  return eqx.combine(params, static), losses, time.perf_counter() - start


METRIC = bce_jax.TopKMetric(ks=(1, 3, 5))


@eqx.filter_jit
def evaluate_batch(model: XMCModel, state, x, positives):
  _, ids = bce_jax.top_k_labels(model.features(x), model.labels, 5, bias=model.bias)
  return METRIC.update(state, ids, positives)


def evaluate(model: XMCModel, test_data, batch_size: int) -> dict[str, float]:
  x, positives = test_data
  state = METRIC.init()
  for start in range(0, len(x), batch_size):
    state = evaluate_batch(
      model, state, x[start : start + batch_size], positives[start : start + batch_size]
    )
  return {k: float(v) for k, v in METRIC.result(state).items()}


def popularity_baseline(freq: np.ndarray, test_data) -> dict[str, float]:
  """Every row gets the 5 most frequent training labels."""
  _, positives = test_data
  top = np.argsort(-freq, kind="stable")[:5].astype(np.int32)
  state = METRIC.update(METRIC.init(), np.tile(top, (len(positives), 1)), positives)
  return {k: float(v) for k, v in METRIC.result(state).items()}


def plot(path: pathlib.Path, curves: dict, scores: dict, memory: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path.parent.mkdir(parents=True, exist_ok=True)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for (name, losses), style in zip(curves.items(), ("-", "--")):
    axes[0].plot(losses, style, label=name)
  axes[0].set(xlabel="step", ylabel="loss (sum over labels, mean over rows)", yscale="log")
  axes[0].set_title("training loss")
  ks = ["precision@1", "precision@3", "precision@5", "ndcg@5"]
  width = 0.8 / len(scores)
  for i, (name, result) in enumerate(scores.items()):
    axes[1].bar(np.arange(len(ks)) + i * width, [result[k] for k in ks], width, label=name)
  axes[1].set_xticks(np.arange(len(ks)) + 0.4 - width / 2, ["P@1", "P@3", "P@5", "nDCG@5"])
  axes[1].set_title("test set")
  labels = list(memory)
  for i, kind in enumerate(("linear", "dense")):
    values = [memory[c][kind] / 2**20 for c in labels]
    axes[2].bar(np.arange(len(labels)) + i * 0.4, values, 0.4, label=kind)
  axes[2].set_xticks(np.arange(len(labels)) + 0.2, [f"C={c:,}" for c in labels])
  axes[2].set(ylabel="MiB", yscale="log", title="train step peak memory")
  for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"saved plots to {path}")


def main() -> None:
  args = parse_args()
  t0 = time.perf_counter()
  train_data, test_data, freq = make_data(args)
  print(
    f"C = {args.labels:,} labels, {args.train:,} training rows, "
    f"{np.mean(train_data[1] >= 0) * MAX_POSITIVES:.1f} positives a row; "
    f"the 1% most popular labels hold {np.sort(freq)[::-1][: args.labels // 100].sum() / freq.sum():.0%} "
    f"of the positives ({time.perf_counter() - t0:.1f} s)"
  )

  curves, scores = {}, {"popularity": popularity_baseline(freq, test_data)}
  model, curves["linear"], seconds = train("linear", linear_loss, train_data, args)
  scores["bce_jax linear"] = evaluate(model, test_data, args.batch_size)
  times = {"linear": seconds}
  if not args.no_dense:
    dense_model, curves["dense"], times["dense"] = train("dense", dense_loss, train_data, args)
    scores["optax dense"] = evaluate(dense_model, test_data, args.batch_size)

  memory = {}
  for c in (args.labels, 3_000_000):
    memory[c] = {
      k: peak_temp_bytes(f, c, args) for k, f in (("linear", linear_loss), ("dense", dense_loss))
    }

  first, last = np.mean(curves["linear"][:5]), np.mean(curves["linear"][-5:])
  print(f"\nloss (linear): {first:.2f} over the first 5 steps -> {last:.2f} over the last 5")
  print(f"{'':16} {'P@1':>6} {'P@3':>6} {'P@5':>6} {'nDCG@5':>7}")
  for name, r in scores.items():
    print(
      f"{name:16} {r['precision@1']:6.3f} {r['precision@3']:6.3f} {r['precision@5']:6.3f} {r['ndcg@5']:7.3f}"
    )
  print("train step peak memory (arguments + outputs + temporaries, from the compiled step):")
  for c, m in memory.items():
    print(
      f"  C = {c:>9,}: linear {m['linear'] / 2**20:9.1f} MiB, dense {m['dense'] / 2**20:9.1f} MiB"
    )
  print(
    "time: "
    + ", ".join(f"{k} {v:.1f} s ({v / args.steps * 1e3:.0f} ms a step)" for k, v in times.items())
  )
  plot(args.plot, curves, scores, memory)
  dense_p1 = scores.get("optax dense", {}).get("precision@1", float("nan"))
  print(
    f"RESULT loss_first={first:.6f} loss_last={last:.6f} "
    f"p1={scores['bce_jax linear']['precision@1']:.6f} "
    f"p5={scores['bce_jax linear']['precision@5']:.6f} "
    f"popularity_p1={scores['popularity']['precision@1']:.6f} dense_p1={dense_p1:.6f} "
    f"mem_linear={memory[args.labels]['linear']} mem_dense={memory[args.labels]['dense']}"
  )


if __name__ == "__main__":
  main()
