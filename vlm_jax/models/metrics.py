"""Metrics over logits, written the way XLA:CPU computes fast."""

import jax
import jax.numpy as jnp


def argmax_equals(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`argmax(logits, -1) == targets`, ties broken as argmax does (the first maximum), without the
  argmax: XLA:CPU runs an argmax as a scalar (value, index) reduction (~5% of a small model's
  train step), and this as one vectorised comparison and `any`. Shapes: [..., V] and [...]."""
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)
  earlier = jnp.arange(logits.shape[-1]) < targets[..., None]
  return ~jnp.any(jnp.where(earlier, logits >= target, logits > target), axis=-1)
