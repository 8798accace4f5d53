"""Projectors from vision width to LM width (METHODS §1)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.layers import LayerNorm, Linear, activation

PROJECTORS = ("linear", "mlp2x_gelu", "downsample")


def downsample_2x2(x: jax.Array) -> jax.Array:
  """Concatenates each 2×2 block of a square token grid: [n, g*g, c] -> [n, ceil(g/2)^2, 4c].

  An odd grid is padded with zeros on the bottom and right, as VILA does.
  """
  n, t, c = x.shape
  g = int(round(t ** 0.5))
  if g * g != t:
    raise ValueError(f"downsample needs a square token grid, got {t} tokens")
  x = x.reshape(n, g, g, c)
  if g % 2:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    g += 1
  x = x.reshape(n, g // 2, 2, g // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (g // 2) ** 2, 4 * c)


def projected_tokens(kind: str, vision_tokens: int) -> int:
  """How many LM tokens one image becomes."""
  if kind == "downsample":
    g = int(round(vision_tokens ** 0.5))
    return ((g + 1) // 2) ** 2
  return vision_tokens


class Projector(nn.Module):
  kind: str
  out_dim: int
  use_bias: bool = True
  act: str = "gelu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == "linear":
      return Linear(self.out_dim, ("vision_embed", "embed"), name="linear_1", **kw)(x)
    if self.kind == "downsample":
      x = downsample_2x2(x)
      x = LayerNorm(1e-5, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    elif self.kind != "mlp2x_gelu":
      raise ValueError(f"unknown projector {self.kind!r}; known: {PROJECTORS}")
    x = Linear(self.out_dim, ("vision_embed", "mlp"), name="linear_1", **kw)(x)
    x = activation(self.act)(x)
    return Linear(self.out_dim, ("mlp", "embed"), name="linear_2", **kw)(x)
