"""Building blocks shared by every tower: linears, norms, RoPE, encoder attention.

Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`,
`vocab`); a config maps them to mesh axes, so the modules never name a mesh.
All linear kernels are 2-D `[in, out]` matrices, which keeps pruning, LoRA and
Hugging Face conversion one rule each (a transpose).
"""

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.attention import attention

Dtype = jnp.dtype

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Annotates an activation with logical axes (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


class Linear(nn.Module):
  """`y = x @ kernel + bias` with a 2-D kernel `[in, out]` named by logical axes.

  Leading axes are flattened into one around the product, so the kernel's gradient is
  a plain 2-D matmul: XLA:CPU copies a 3-D `[batch, length, in]` activation into a
  transposed layout for it (a quarter of a small model's train step).
  """
  features: int
  axes: tuple[Optional[str], Optional[str]]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    y = jnp.dot(rows, kernel.astype(self.dtype)).reshape(*x.shape[:-1], self.features)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """LLaMA's RMSNorm, computed in float32 like the reference."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with logically named scale and bias."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (d,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale + bias).astype(self.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, linear_scaling: float = 1.0) -> jax.Array:
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  return inv / linear_scaling


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               linear_scaling: float = 1.0) -> jax.Array:
  """Rotary embedding in the "rotate half" layout used by LLaMA and Qwen2.

  x: [batch, length, heads, head_dim]; positions: [batch, length].
  """
  inv = rope_inverse_frequencies(x.shape[-1], theta, linear_scaling)
  angles = positions.astype(jnp.float32)[..., None] * inv  # [b, l, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x.astype(jnp.float32) * jnp.cos(angles) + rotated.astype(jnp.float32) * jnp.sin(angles)
  return out.astype(x.dtype)


class MLP(nn.Module):
  """Two-layer MLP `fc2(act(fc1(x)))` of the ViT and text towers."""
  hidden: int
  act: str
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    h = Linear(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
    h = constrain(activation(self.act)(h), ("batch", "length", "mlp"))
    return Linear(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


class EncoderAttention(nn.Module):
  """Multi-head self-attention with biases, as in CLIP/SigLIP encoders."""
  num_heads: int
  attention: str = "xla"  # see vlm_jax.models.attention
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    b, l, d = x.shape
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda t: t.reshape(b, l, self.num_heads, d // self.num_heads)
    q = split(Linear(d, ("embed", "heads"), name="q", **kw)(x))
    k = split(Linear(d, ("embed", "heads"), name="k", **kw)(x))
    v = split(Linear(d, ("embed", "heads"), name="v", **kw)(x))
    out = attention(q, k, v, mask, self.attention).reshape(b, l, d)
    return Linear(d, ("heads", "embed"), name="o", **kw)(out)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block of the CLIP/SigLIP towers."""
  num_heads: int
  mlp_dim: int
  act: str
  eps: float
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(self.eps, name="attn_norm", **kw)(x)
    x = x + EncoderAttention(self.num_heads, self.attention, name="attn", **kw)(h, mask)
    h = LayerNorm(self.eps, name="mlp_norm", **kw)(x)
    x = x + MLP(self.mlp_dim, self.act, name="mlp", **kw)(h)
    return constrain(x, ("batch", "length", "embed"))
