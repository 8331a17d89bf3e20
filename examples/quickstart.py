"""Every example from the Keras reference pages, computed with bce_jax.

Prints bce_jax's value beside the value the Keras documentation prints, the
difference and how much is allowed, and exits with status 1 if any pair
differs by more than that.
Needs nothing beyond jax and bce_jax::

  python examples/quickstart.py

The reference pages are the tf.keras ``BinaryCrossentropy`` loss and metric
pages, the tf.keras ``binary_crossentropy`` function page and the R Keras 3
``loss_binary_crossentropy`` page.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import bce_jax

# The Python pages' example: two samples of two probabilities.
Y_TRUE = [[0.0, 1.0], [0.0, 0.0]]
Y_PROB = [[0.6, 0.4], [0.4, 0.6]]
# The R page's logits example, as one sample of four and as two samples of two.
R_TRUE = [0.0, 1.0, 0.0, 0.0]
R_LOGITS = [-18.6, 0.51, 2.94, -12.8]
R_TRUE_2x2 = [[0.0, 1.0], [0.0, 0.0]]
R_LOGITS_2x2 = [[-18.6, 0.51], [2.94, -12.8]]

# A reference is matched to its last printed digit, but never tighter than
# this many float32 epsilons relative to its size: the 7th and 8th digits of
# a float32 result depend on the order of its sums and on details of the
# formula (tf.keras 2, which printed the metric page, takes log(p + 1e-7)).
_F32_SLACK = 4 * float(np.finfo(np.float32).eps)


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _metric_value(sample_weight=None) -> jax.Array:
  metric = bce_jax.BinaryCrossentropyMetric()
  state = metric.update(metric.init(), _f32(Y_TRUE), _f32(Y_PROB), sample_weight=sample_weight)
  return metric.result(state)


def _r_function_float64() -> jax.Array:
  # R passes float64 matrices; with x64 enabled bce_jax computes in float64.
  with jax.enable_x64(True):
    return bce_jax.binary_crossentropy(np.array(Y_TRUE), np.array(Y_PROB))


def _cases() -> list[tuple[str, Callable[[], jax.Array], list[str], bool]]:
  """(description, computation, printed reference values, is float64)."""
  logits_loss = bce_jax.BinaryCrossentropy(from_logits=True)
  return [
    (
      "loss: BinaryCrossentropy()",
      lambda: bce_jax.BinaryCrossentropy()(Y_TRUE, Y_PROB),
      ["0.815"],
      False,
    ),
    (
      "loss: sample_weight=[1, 0]",
      lambda: bce_jax.BinaryCrossentropy()(Y_TRUE, Y_PROB, sample_weight=[1.0, 0.0]),
      ["0.458"],
      False,
    ),
    (
      "loss: reduction='sum'",
      lambda: bce_jax.BinaryCrossentropy(reduction="sum")(Y_TRUE, Y_PROB),
      ["1.630"],
      False,
    ),
    (
      "loss: reduction=None",
      lambda: bce_jax.BinaryCrossentropy(reduction=None)(Y_TRUE, Y_PROB),
      ["0.916", "0.714"],
      False,
    ),
    (
      "function: binary_crossentropy",
      lambda: bce_jax.binary_crossentropy(Y_TRUE, Y_PROB),
      ["0.916", "0.714"],
      False,
    ),
    ("R function, float64", _r_function_float64, ["0.91629073", "0.71355818"], True),
    (
      "R logits: 1 sample of 4",
      lambda: logits_loss(_f32(R_TRUE), _f32(R_LOGITS)),
      ["0.865458"],
      False,
    ),
    (
      "R logits: 2 samples of 2",
      lambda: logits_loss(_f32(R_TRUE_2x2), _f32(R_LOGITS_2x2)),
      ["0.865458"],
      False,
    ),
    (
      "R logits: sample_weight=c(0.8, 0.2)",
      lambda: logits_loss(_f32(R_TRUE_2x2), _f32(R_LOGITS_2x2), sample_weight=_f32([0.8, 0.2])),
      ["0.2436386"],
      False,
    ),
    (
      "R logits: reduction='sum'",
      lambda: bce_jax.BinaryCrossentropy(from_logits=True, reduction="sum")(
        _f32(R_TRUE_2x2), _f32(R_LOGITS_2x2)
      ),
      ["1.730916"],
      False,
    ),
    (
      "R logits: reduction=NULL",
      lambda: bce_jax.BinaryCrossentropy(from_logits=True, reduction=None)(
        _f32(R_TRUE_2x2), _f32(R_LOGITS_2x2)
      ),
      ["0.23515666", "1.4957594"],
      False,
    ),
    ("metric: update_state", _metric_value, ["0.81492424"], False),
    (
      "metric: sample_weight=[1, 0]",
      lambda: _metric_value(sample_weight=_f32([1.0, 0.0])),
      ["0.9162905"],
      False,
    ),
  ]


def _decimals(printed: str) -> int:
  return len(printed.partition(".")[2])


def _allowed(printed: str, is_float64: bool) -> float:
  """How far bce_jax may be from a printed reference: half its last digit,
  and never less than 4 float32 epsilons of its size for float32 results."""
  allowed = 0.5 * 10.0 ** -_decimals(printed)
  if not is_float64:
    allowed = max(allowed, _F32_SLACK * abs(float(printed)))
  return allowed


def main() -> int:
  header = (
    f"{'example':<38} {'bce_jax':<24} {'Keras reference':<24} {'|difference| <= allowed':<24} match"
  )
  print(header)
  print("-" * len(header))
  failures = 0
  for description, compute, reference, is_float64 in _cases():
    values = np.atleast_1d(np.asarray(compute(), np.float64))
    assert values.size == len(reference), description
    # Print bce_jax's value to as many decimals as the reference shows.
    shown = " ".join(f"{v:.{_decimals(r)}f}" for v, r in zip(values, reference))
    # The comparison shown is that of the value nearest its limit.
    diffs = [abs(v - float(r)) for v, r in zip(values, reference)]
    allowed = [_allowed(r, is_float64) for r in reference]
    worst = max(range(len(diffs)), key=lambda i: diffs[i] / allowed[i])
    # The 1e-12 absorbs the binary representation of the decimal limit.
    ok = all(d <= a + 1e-12 for d, a in zip(diffs, allowed))
    failures += not ok
    comparison = f"{diffs[worst]:.1e} {'<=' if ok else '>'} {allowed[worst]:.1e}"
    print(
      f"{description:<38} {shown:<24} {' '.join(reference):<24} {comparison:<24} "
      f"{'yes' if ok else 'NO'}"
    )
  print()
  print(
    "allowed: half a unit of the reference's last printed digit, or 4 float32 epsilons\n"
    "of its size if that is more. The metric page's two values come from tf.keras 2,\n"
    "which takes log(p + 1e-7); Keras 3 clips p and takes log(p), and its metric\n"
    "returns 0.8149245 and 0.91629076 (float32), as bce_jax does."
  )
  print(f"\n{len(_cases()) - failures} of {len(_cases())} examples match.")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
