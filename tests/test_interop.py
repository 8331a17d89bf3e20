"""bce_jax.checked around a Flax NNX train step: the pattern the README shows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl.testing import absltest

import bce_jax

try:
  import optax
  from flax import nnx
except ImportError:  # the examples extra is not installed
  nnx = None


@absltest.skipIf(nnx is None, "flax and optax are not installed")
class FlaxCheckedTest(absltest.TestCase):
  def _model(self):
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  def test_split_state_step_is_checked(self):
    model, optimizer = self._model()
    loss_fn = bce_jax.BinaryCrossentropy(from_logits=True)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def train_step(state, x, y):
      model, optimizer = nnx.merge(graphdef, state)
      loss, grads = nnx.value_and_grad(lambda m: loss_fn(y, m(x)))(model)
      optimizer.update(model, grads)
      return nnx.state((model, optimizer)), loss

    step = bce_jax.checked(train_step)
    x, y = jnp.ones((8, 4)), jnp.ones((8, 1))
    new_state, loss = step(state, x, y)
    self.assertTrue(jnp.isfinite(loss))
    with self.assertRaisesRegex(bce_jax.ValueCheckError, r"y_true .*\[1\.0, 2\.0\]"):
      step(new_state, x, y.at[0].set(2.0))

  def test_stateful_nnx_jit_step_gets_the_pattern_in_the_error(self):
    model, optimizer = self._model()
    loss_fn = bce_jax.BinaryCrossentropy(from_logits=True)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(lambda m: loss_fn(y, m(x)))(model)
      optimizer.update(model, grads)
      return loss

    with self.assertRaisesRegex(TypeError, r"nnx\.split\(\(model, optimizer\)\)"):
      bce_jax.checked(train_step)(model, optimizer, jnp.ones((8, 4)), jnp.ones((8, 1)))


if __name__ == "__main__":
  absltest.main()
