"""Training on one fixed batch: the end-to-end check that a model's loss and gradients work."""

import jax
import jax.numpy as jnp
import optax

from r1jax.train.step import LossConfig, init_state, make_train_step


def train_on_one_batch(model, tokens, steps: int):
  """Adam(3e-3) from init key 4, LM + 0.3 MTP + balance loss, `steps` steps on `tokens`.

  Returns the final state, every step's loss, and the last step's metrics."""
  optimizer = optax.adam(3e-3)
  state = init_state(model, tokens, optimizer, jax.random.key(4))
  step = make_train_step(model, optimizer, LossConfig(mtp_weight=0.3))
  mask = jnp.ones_like(tokens)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, tokens, mask)
    losses.append(float(metrics["loss"]))
  return state, losses, metrics
