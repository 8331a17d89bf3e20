"""The flat groups: data of N elements and the callables of each group.

Groups (mean reduction, labels in {0, 1}, logits ~ N(0, 3^2)):

* ``logits``: forward loss from logits. Floor: ``sum(x) + sum(y)``, a read
  of the same bytes. ``exp+log1p`` is the cost of the two transcendental
  functions the loss cannot avoid: a compute floor, not a competitor.
* ``probs``: forward loss from probabilities (their sigmoid). Same floor.
* ``grad``: ``jax.value_and_grad`` w.r.t. the logits (torch: forward and
  ``backward``). Floor: ``x * y``, a read of the bytes and a write of one
  fresh array of N.
* ``metric``: the streaming metric over 100 batches of ``[N / 100, 1]``:
  bce_jax's state is the carry of a jitted ``lax.scan``; Keras's metric is
  updated in a Python loop, as a Keras user would. Floor: the read floor.
* ``focal`` and ``focal_grad``: the focal loss, forward and
  ``value_and_grad``, once bce_jax has it (see :mod:`peers`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import peers
from timing import Pipelined, pipelined

import bce_jax

GROUPS = ("logits", "probs", "grad", "metric")
FOCAL_GROUPS = ("focal", "focal_grad")
METRIC_BATCHES = 100
FLOOR = "floor"
COMPUTE = "exp+log1p"

Calls = dict[str, Callable[[], object] | str]  # name -> callable, or why it is missing


def groups() -> tuple[str, ...]:
  """The groups this bce_jax can run (focal only once it exists)."""
  return GROUPS + (FOCAL_GROUPS if "focal" in peers.available_families() else ())


def make_data(n: int, dtype: str, seed: int = 0) -> dict[str, jax.Array]:
  """Logits `x`, labels `y`, probabilities `p` and the metric's batches."""
  rng = np.random.default_rng(seed)
  x = (3.0 * rng.standard_normal(n)).astype(np.float32)
  y = (rng.random(n) < 0.5).astype(np.float32)
  p = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
  rows = max(n // METRIC_BATCHES, 1)
  batched = (METRIC_BATCHES, rows, 1)  # one logit per sample, as a binary classifier
  arrays = {
    "x": x,
    "y": y,
    "p": p,
    "x_batches": x[: rows * METRIC_BATCHES].reshape(batched),
    "y_batches": y[: rows * METRIC_BATCHES].reshape(batched),
  }
  data = {k: jnp.asarray(v, jnp.dtype(dtype)) for k, v in arrays.items()}
  return jax.block_until_ready(data)


# --------------------------------------------------------------------------
# torch (flat groups only): on the device JAX uses, when torch sees it.


def _torch_device() -> str:
  cuda = jax.default_backend() == "gpu" and peers.get("torch").cuda.is_available()
  return "cuda" if cuda else "cpu"


def _torch_tensor(a: jax.Array, dtype: str):
  torch = peers.get("torch")
  t = torch.from_numpy(np.array(a, np.float32)).to(_torch_device())
  return t.to(torch.bfloat16) if dtype == "bfloat16" else t.contiguous()


def _torch_forward(preds: jax.Array, y: jax.Array, dtype: str, from_logits: bool) -> Calls:
  torch = peers.get("torch")
  if torch is None:
    return {"torch": peers.missing("torch")}
  pt, yt = _torch_tensor(preds, dtype), _torch_tensor(y, dtype)
  f = torch.nn.functional
  fn = f.binary_cross_entropy_with_logits if from_logits else f.binary_cross_entropy

  def run():
    with torch.no_grad():
      return fn(pt, yt)

  return {"torch": Pipelined(run, wait=lambda value: value.item())}


def _torch_grad(x: jax.Array, y: jax.Array, dtype: str) -> Calls:
  torch = peers.get("torch")
  if torch is None:
    return {"torch": peers.missing("torch")}
  xt, yt = _torch_tensor(x, dtype), _torch_tensor(y, dtype)
  xt.requires_grad_(True)

  def run():
    xt.grad = None  # a fresh gradient array, as JAX returns
    value = torch.nn.functional.binary_cross_entropy_with_logits(xt, yt)
    value.backward()
    return value.detach(), xt.grad

  def wait(result):
    if _torch_device() == "cuda":
      torch.cuda.synchronize()
    return result[0].item(), result[1]

  return {"torch": Pipelined(run, wait)}


# --------------------------------------------------------------------------
# The groups.


def _read_floor(*arrays):
  return sum(jnp.sum(a, dtype=jnp.float32) for a in arrays)


def _unweighted_mean(impl: peers.Impl) -> Callable[[jax.Array, jax.Array], jax.Array]:
  loss = impl.loss("mean")
  return lambda x, y: loss(y, x, None, None)


def _family_group(family: str, x: jax.Array, y: jax.Array, grad: bool) -> Calls:
  """A family's mean loss over flat `[N]` data, from :func:`peers.implementations`."""
  calls: Calls = {}
  if grad:
    calls[FLOOR] = pipelined(jax.jit(lambda a, b: a * b), x, y)
  else:
    calls[FLOOR] = pipelined(jax.jit(_read_floor), x, y)
  for name, impl in peers.implementations(family).items():
    if isinstance(impl, str):
      calls[name] = impl
      continue
    forward = _unweighted_mean(impl)
    calls[name] = pipelined(jax.jit(jax.value_and_grad(forward) if grad else forward), x, y)
  return calls


def _logits(data: dict[str, jax.Array], dtype: str) -> Calls:
  x, y = data["x"], data["y"]
  optax, keras = peers.get("optax"), peers.get("keras")
  tail = jax.jit(lambda x, y: jnp.sum(jnp.log1p(jnp.exp(-jnp.abs(x.astype(jnp.float32)))) * y))
  ours = jax.jit(lambda x, y: bce_jax.binary_crossentropy(y, x, from_logits=True).mean())
  calls: Calls = {
    FLOOR: pipelined(jax.jit(_read_floor), x, y),
    COMPUTE: pipelined(tail, x, y),
    peers.OURS: pipelined(ours, x, y),
    "optax": peers.missing("optax"),
    "keras": peers.missing("keras"),
  }
  if optax is not None:
    f = jax.jit(lambda x, y: optax.sigmoid_binary_cross_entropy(x, y).mean())
    calls["optax"] = pipelined(f, x, y)
  if keras is not None:
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    calls["keras"] = pipelined(jax.jit(lambda x, y: loss(y, x)), x, y)
  return calls | _torch_forward(x, y, dtype, from_logits=True)


def _probs(data: dict[str, jax.Array], dtype: str) -> Calls:
  p, y = data["p"], data["y"]
  keras = peers.get("keras")
  ours = jax.jit(lambda p, y: bce_jax.binary_crossentropy(y, p).mean())
  calls: Calls = {
    FLOOR: pipelined(jax.jit(_read_floor), p, y),
    peers.OURS: pipelined(ours, p, y),
    "keras": peers.missing("keras"),
  }
  if keras is not None:
    loss = keras.losses.BinaryCrossentropy()
    calls["keras"] = pipelined(jax.jit(lambda p, y: loss(y, p)), p, y)
  return calls | _torch_forward(p, y, dtype, from_logits=False)


def _grad(data: dict[str, jax.Array], dtype: str) -> Calls:
  x, y = data["x"], data["y"]
  optax, keras = peers.get("optax"), peers.get("keras")
  ours = jax.value_and_grad(lambda x, y: bce_jax.binary_crossentropy(y, x, from_logits=True).mean())
  calls: Calls = {
    FLOOR: pipelined(jax.jit(lambda a, b: a * b), x, y),
    peers.OURS: pipelined(jax.jit(ours), x, y),
    "optax": peers.missing("optax"),
    "keras": peers.missing("keras"),
  }
  if optax is not None:
    f = jax.value_and_grad(lambda x, y: optax.sigmoid_binary_cross_entropy(x, y).mean())
    calls["optax"] = pipelined(jax.jit(f), x, y)
  if keras is not None:
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    calls["keras"] = pipelined(jax.jit(jax.value_and_grad(lambda x, y: loss(y, x))), x, y)
  return calls | _torch_grad(x, y, dtype)


def _metric(data: dict[str, jax.Array], dtype: str) -> Calls:
  del dtype  # no torch here
  xs, ys = data["x_batches"], data["y_batches"]
  keras = peers.get("keras")
  metric = bce_jax.BinaryCrossentropyMetric(from_logits=True)

  @jax.jit
  def ours_scan(xs, ys):
    def step(state, batch):
      return metric.update(state, batch[1], batch[0]), None

    state, _ = jax.lax.scan(step, metric.init(), (xs, ys))
    return metric.result(state)

  calls: Calls = {
    FLOOR: pipelined(jax.jit(_read_floor), xs, ys),
    peers.OURS: pipelined(ours_scan, xs, ys),
    "keras": peers.missing("keras"),
  }
  if keras is not None:
    km = keras.metrics.BinaryCrossentropy(from_logits=True)
    x_list, y_list = list(xs), list(ys)  # device arrays, split beforehand

    def keras_loop():
      km.reset_state()
      for xb, yb in zip(x_list, y_list):
        km.update_state(yb, xb)
      return jax.block_until_ready(km.result())

    calls["keras"] = keras_loop
  return calls


_BUILDERS: dict[str, Callable[[dict[str, jax.Array], str], Calls]] = {
  "logits": _logits,
  "probs": _probs,
  "grad": _grad,
  "metric": _metric,
  "focal": lambda data, _: _family_group("focal", data["x"], data["y"], grad=False),
  "focal_grad": lambda data, _: _family_group("focal", data["x"], data["y"], grad=True),
}


def build(group: str, data: dict[str, jax.Array], dtype: str) -> Calls:
  """The implementations of a flat `group`: name -> callable, or why it is missing."""
  return _BUILDERS[group](data, dtype)


def elements(group: str, data: dict[str, jax.Array]) -> int:
  """How many elements one call of `group` reads."""
  return data["x_batches"].size if group == "metric" else data["x"].size
