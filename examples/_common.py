"""Shared plumbing for the training examples: data, batches, CLI, plot, summary.

Everything framework-specific (the model, the train step, the eval step)
lives in the example scripts; this module only holds what they all need so
that each script shows its own library's idiom and nothing else.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Iterator

import numpy as np

DEFAULT_PLOT = pathlib.Path(__file__).resolve().parent / "out" / "loss_curves.png"


def make_parser(description: str, *, epochs: int = 60) -> argparse.ArgumentParser:
  """The command line every training example accepts."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--epochs", type=int, default=epochs, help="passes over the training set")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument(
    "--label-smoothing", type=float, default=0.0, help="s in [0, 1]: labels become y(1-s)+s/2"
  )
  parser.add_argument(
    "--pos-weight",
    type=float,
    default=None,
    help="weight of the positive term (label 1, benign: 63%% of samples); default 1",
  )
  parser.add_argument("--seed", type=int, default=0, help="split, shuffling and init seed")
  parser.add_argument(
    "--plot", type=pathlib.Path, default=DEFAULT_PLOT, help="where to save the loss curves PNG"
  )
  parser.add_argument("--fast", action="store_true", help="5 epochs: a smoke test for CI")
  return parser


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
  args = parser.parse_args()
  if args.fast:
    args.epochs = min(args.epochs, 5)
  return args


def load_breast_cancer_split(
  seed: int = 0, val_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's breast-cancer data (shipped with the package, no download).

  569 samples, 30 features, label 1 = benign (63%). Returns
  ``x_train, y_train, x_val, y_val`` as float32, the split stratified and
  fixed by `seed`, features standardized with the training statistics only.
  """
  from sklearn.datasets import load_breast_cancer
  from sklearn.model_selection import train_test_split

  x, y = load_breast_cancer(return_X_y=True)
  x_train, x_val, y_train, y_val = train_test_split(
    x, y, test_size=val_fraction, random_state=seed, stratify=y
  )
  mean, std = x_train.mean(axis=0), x_train.std(axis=0)
  x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
  return (
    x_train.astype(np.float32),
    y_train.astype(np.float32),
    x_val.astype(np.float32),
    y_val.astype(np.float32),
  )


def train_batches(
  x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One shuffled epoch of full batches (the remainder is dropped, so every
  batch has the same shape and the jitted step compiles once)."""
  order = rng.permutation(len(x))
  for start in range(0, len(x) - batch_size + 1, batch_size):
    idx = order[start : start + batch_size]
    yield x[idx], y[idx]


def eval_batches(
  x: np.ndarray, y: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Every sample once, in batches of one fixed shape: the last batch is
  padded, and the padding is marked False in the returned `mask`."""
  for start in range(0, len(x), batch_size):
    xb, yb = x[start : start + batch_size], y[start : start + batch_size]
    pad = batch_size - len(xb)
    mask = np.concatenate([np.ones(len(xb), bool), np.zeros(pad, bool)])
    yield np.pad(xb, ((0, pad), (0, 0))), np.pad(yb, (0, pad)), mask


def save_loss_curves(history: dict[str, list[float]], path: pathlib.Path, title: str) -> None:
  """Plots each named curve against the epoch and writes a PNG to `path`."""
  import matplotlib

  matplotlib.use("Agg")  # files only, no display needed
  import matplotlib.pyplot as plt

  path.parent.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, values in history.items():
    ax.plot(range(1, len(values) + 1), values, label=label)
  ax.set(xlabel="epoch", ylabel="binary cross-entropy", title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"saved loss curves to {path}")


def print_summary(
  *, train_loss: float, val_loss: float, val_accuracy: float, metric: float, seconds: float
) -> None:
  """The human-readable summary and one `RESULT key=value ...` line for tests."""
  print(f"train loss      {train_loss:.4f}")
  print(f"val loss        {val_loss:.4f}   (loss object, whole validation set at once)")
  print(f"val metric      {metric:.4f}   (BinaryCrossentropyMetric, streamed in batches)")
  print(f"val accuracy    {val_accuracy:.4f}")
  print(f"training time   {seconds:.1f} s")
  print(
    f"RESULT train_loss={train_loss:.6f} val_loss={val_loss:.6f} "
    f"val_accuracy={val_accuracy:.6f} metric={metric:.6f}"
  )
