"""`checked()`: opt-in, data-dependent value checks, compiled into jitted code.

Shapes and configuration are checked in Python at every call
(:mod:`bce_jax._validate`). A probability of 1.3 or a nan label is only
visible in the data, so those checks are off by default and cost nothing:
no check, no branch is traced. :func:`checked` traces a function with them
on, through :mod:`jax.experimental.checkify`.

The switch is a ``jax.make_user_context``: part of the key of every jit
cache, so a function jitted before it was wrapped is traced again with the
checks, and traced without them again outside. Only this module reads it;
nothing in the environment can turn it on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax.experimental import checkify

_F = TypeVar("_F", bound=Callable[..., Any])

_VALUE_CHECKS = jax.make_user_context(default_value=False)


def value_checks_on() -> bool:
  """Whether the function being traced runs under :func:`checked`."""
  return bool(_VALUE_CHECKS.value)


class ValueCheckError(ValueError):
  """Raised by a function wrapped in :func:`checked` when an input value is bad.

  The message names the argument (``y_true``, ``y_pred``, ``sample_weight``
  or ``pos_weight``; ``x``, ``y``, ``scale`` or ``bias`` of the pairwise
  loss) and the range it violated.
  """


ValueCheckError.__module__ = "bce_jax"


def checked(fn: _F) -> _F:
  """Returns `fn` with bce_jax's data-dependent value checks switched on.

  By default bce_jax checks only what it can see while tracing: shapes,
  dtypes and configuration. ``checked(fn)`` traces `fn` with the value checks
  on and raises, after `fn` has run, if any input to a bce_jax function
  inside it was bad:

  * ``y_pred`` outside ``[0, 1]`` when ``from_logits=False``;
  * ``y_true`` outside ``[0, 1]``;
  * ``sample_weight`` or ``pos_weight`` negative;
  * a nan in any of them;
  * a nan or an infinity in the pairwise loss's ``x``, ``y``, ``scale`` or
    ``bias``.

  Entries excluded by a mask (or a zero weight) are not checked: padding may
  hold anything. `fn` may be anything that calls bce_jax: a loss object, a
  whole train step with ``jax.value_and_grad`` inside, a ``jax.jit``-compiled
  function (it is traced again, with the checks), on sharded arrays under
  any mesh. Under ``jax.vmap`` the message gives the range of one failing
  example. Inside ``jax.shard_map`` (the pairwise loss's ring), JAX's
  checkify works only over a mesh of Auto axes with no ``jax.set_mesh``
  around the call; elsewhere it fails while tracing (jax-ml/jax#40907).
  The wrapper returns exactly what `fn` returns. The other order,
  ``jax.jit(checked(step))`` (or ``vmap`` or ``grad`` of it), cannot raise
  from inside the trace and is refused with a TypeError saying so.

  Args:
    fn: the function to check.

  Returns:
    A function with the signature and outputs of `fn`.

  Raises:
    ValueCheckError: from the returned function, if an input value is out of
      range; the message names the argument and the expected range.

  Examples:
    >>> import jax.numpy as jnp, bce_jax
    >>> safe = bce_jax.checked(bce_jax.binary_crossentropy)
    >>> print(f"{safe(jnp.array([1.0, 0.0]), jnp.array([0.8, 0.3])):.4f}")
    0.2899
    >>> safe(jnp.array([1.0, 0.0]), jnp.array([1.5, 0.3]))
    Traceback (most recent call last):
      ...
    bce_jax.ValueCheckError: y_pred must hold probabilities in [0, 1] ...
  """
  checkified = checkify.checkify(fn, errors=checkify.user_checks)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    # Traced arguments: refused before checkify sees them (under grad, a
    # custom VJP inside `fn` would fail in checkify with an unrelated error).
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((args, kwargs))):
      raise TypeError(_TRACED)
    with _VALUE_CHECKS(True):
      try:
        err, out = checkified(*args, **kwargs)
      except Exception as e:
        if type(e).__name__ != "TraceContextError":  # flax's, for a stateful nnx.jit step
          raise
        raise TypeError(
          "bce_jax.checked(f) traces f again as a pure function, so f cannot mutate "
          "Flax NNX objects created outside it (an nnx.jit step does). Split the "
          "model: graphdef, state = nnx.split((model, optimizer)); write a jax.jit "
          "step that calls nnx.merge(graphdef, state) and returns nnx.state(...); "
          "then wrap that step. The README's Flax section shows it."
        ) from e
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(err)):
      raise TypeError(_TRACED)  # `fn` closes over a tracer
    message = err.get()
    if message is not None:
      raise ValueCheckError(_first_line(message))
    return out

  return wrapper  # type: ignore[return-value]


_TRACED = (
  "bce_jax.checked(f) raises on the host, so it cannot itself be traced by jax.jit, "
  "vmap or grad. Put the transformation inside instead: bce_jax.checked(jax.jit(f))."
)


def _first_line(message: str) -> str:
  # checkify appends where the check was traced and a "(`check` failed)"
  # tag; the first line without the tag is the message we wrote.
  first = message.strip().splitlines()[0]
  return first.replace(" (`check` failed)", "")


def _value_check(ok: jax.Array, message: str, *values: jax.Array) -> None:
  checkify.check(ok, message, *values)


def _as_float(x: jax.Array) -> jax.Array:
  """`x` in its own float dtype (ints and bools as float32): no rounding of floats."""
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _range(x: jax.Array, where: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The min and max of `x` over `where`, without reshaping or growing `x`.

  A reduction with an `initial` value keeps any sharding of `x` valid (an
  appended sentinel would not divide evenly over a mesh axis).
  """
  lo = jnp.min(x, initial=jnp.inf, where=where)
  hi = jnp.max(x, initial=-jnp.inf, where=where)
  return lo, hi


def _not_nan(
  name: str, x: jax.Array, expected: str, where: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
  """Checks `x` for nan where `where` holds; returns `x` as float and the
  elements left to check (checked and not nan)."""
  x = _as_float(x)
  where = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(where, x.shape)
  nan = jnp.isnan(x)
  _value_check(~jnp.any(nan & where), f"{name} contains nan; expected {expected}.")
  return x, where & ~nan


def check_in_unit_interval(
  name: str, x: jax.Array, what: str, where: jax.Array | None = None
) -> None:
  """Value check: every element of `x` is in [0, 1] and not nan.

  Elements where `where` is False (masked padding) are not checked. The
  reported range covers every checked element of the call; under
  ``jax.vmap``, checkify reports one failing example, and the range is that
  example's.
  """
  if not value_checks_on():
    return
  x, valid = _not_nan(name, x, f"{what} in [0, 1]", where)
  lo, hi = _range(x, valid)
  ok = ~jnp.any(valid & ((x < 0) | (x > 1)))
  _value_check(ok, f"{name} must hold {what} in [0, 1]; got values in [{{0}}, {{1}}].", lo, hi)


def check_not_nan(name: str, x: jax.Array, what: str, where: jax.Array | None = None) -> None:
  """Value check: `x` has no nan (infinities are allowed, e.g. for logits)."""
  if not value_checks_on():
    return
  nan = jnp.isnan(_as_float(x))
  if where is not None:
    nan = nan & where
  _value_check(~jnp.any(nan), f"{name} contains nan; expected {what}.")


def check_finite(name: str, x: jax.Array, what: str, where: jax.Array | None = None) -> None:
  """Value check: `x` has no nan and no infinity, where `where` holds."""
  if not value_checks_on():
    return
  bad = ~jnp.isfinite(_as_float(x))
  if where is not None:
    bad = bad & where
  _value_check(~jnp.any(bad), f"{name} contains nan or inf; expected {what}.")


def check_non_negative(name: str, x: jax.Array, where: jax.Array | None = None) -> None:
  """Value check: `x` is >= 0 and has no nan, where `where` holds."""
  if not value_checks_on():
    return
  x, valid = _not_nan(name, x, "weights >= 0", where)
  lo, _ = _range(x, valid)
  _value_check(~jnp.any(valid & (x < 0)), f"{name} must be >= 0; got a minimum of {{0}}.", lo)


def check_smoothing(label_smoothing: jax.Array) -> None:
  """Value check for a traced `label_smoothing` (a Python float is checked statically)."""
  if value_checks_on() and isinstance(label_smoothing, jax.core.Tracer):
    check_in_unit_interval("label_smoothing", label_smoothing, "a value")
