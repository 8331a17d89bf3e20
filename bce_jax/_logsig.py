"""Log-sigmoid building blocks shared by the element formulas.

``softplus(x) = -log(1 - sigmoid(x))`` and ``softplus(-x) = -log(sigmoid(x))``
share one ``exp`` and one ``log1p``; the two sigmoids share one ``exp``. Each
is taken on the side where it cannot round away, so both tails keep their
digits. The clip rule for probabilities lives here too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-7


def clip_bounds(dtype: Any) -> tuple[float, float]:
  """``(eps, 1 - eps)`` for probabilities computed in `dtype`.

  Keras's 1e-7, widened where the dtype cannot represent ``1 - 1e-7`` (it
  would round to 1 and ``log(1 - p)`` would be ``-inf``). The upper bound is
  ``1 - eps`` rounded in `dtype`, as Keras's clip gives.
  """
  eps = max(_EPS, float(np.finfo(dtype).epsneg))
  return eps, float(np.asarray(1 - eps, dtype))


def clipped_logs(probs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(log(pc), log(1 - pc))`` for ``pc = clip(probs, eps, 1 - eps)``.

  Each bound is applied on its own side of the log (``min(log(max(p, eps)),
  log(1 - eps))``): XLA on CPU compiles a ``min(max(..))`` chain into a
  reduction ~2x slower, and the bounds on the logs give the same values.
  ``log1p(-p)`` keeps the digits of a small `p`.
  """
  lo, hi = clip_bounds(probs.dtype)
  log_hi, log1m_lo = float(np.log(np.asarray(hi, probs.dtype))), float(np.log1p(-lo))
  log_p = jnp.minimum(jnp.log(jnp.maximum(probs, lo)), log_hi)
  log_1mp = jnp.minimum(jnp.log1p(-jnp.minimum(probs, hi)), log1m_lo)
  return log_p, log_1mp


def fresh(value: float, dtype: Any) -> jax.Array:
  """`value` as a scalar XLA cannot merge with the same constant elsewhere.

  A derivative pass that broadcasts the literal 1 (or a clip bound) shares
  that broadcast with the loss's reduction, and XLA on CPU then writes the
  shared broadcast out as a full-size array. The derivative rules take their
  constants from here.
  """
  return jax.lax.optimization_barrier(jnp.asarray(value, dtype))


def clip_probs(probs: jax.Array) -> jax.Array:
  """``clip(probs, eps, 1 - eps)``, for derivatives (elementwise passes only)."""
  lo, hi = clip_bounds(probs.dtype)
  return jnp.minimum(jnp.maximum(probs, fresh(lo, probs.dtype)), fresh(hi, probs.dtype))


def sigmoid_pair(x: jax.Array, one: Any = 1) -> tuple[jax.Array, jax.Array]:
  """``(sigmoid(x), sigmoid(-x))``, both accurate in their tails, from one exp.

  `one` is 1, or :func:`fresh` ``(1)`` in a derivative pass.
  """
  e = jnp.exp(-jnp.abs(x))
  big = one / (one + e)  # sigmoid(|x|)
  small = e * big  # sigmoid(-|x|)
  pos = x >= 0
  return jnp.where(pos, big, small), jnp.where(pos, small, big)


@jax.custom_jvp
def softplus_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(softplus(x), softplus(-x))`` from one exp and one log1p.

  ``log1p(exp(-|x|))`` is the part the two share, in ``(0, log 2]``; it never
  overflows, and ``max(±x, 0)`` carries the magnitude. Exact for infinite `x`.
  """
  tail = jnp.log1p(jnp.exp(-jnp.abs(x)))
  return jnp.maximum(x, 0) + tail, jnp.maximum(-x, 0) + tail


@softplus_pair.defjvp
def _softplus_pair_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  sig_pos, sig_neg = sigmoid_pair(x)
  return softplus_pair(x), (sig_pos * dx, -sig_neg * dx)
