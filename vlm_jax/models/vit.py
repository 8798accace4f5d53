"""ViT vision towers in the CLIP style and the SigLIP style.

CLIP: class token, bias-free patch conv, pre-LayerNorm, quick-GELU, the pooled
output is the post-LayerNormed class token. SigLIP: no class token, tanh-GELU,
post-LayerNorm on all tokens and an optional attention-pooling head.
"""

import dataclasses
from typing import Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.attention import attention, check_attention
from vlm_jax.models.layers import MLP, EncoderBlock, LayerNorm, Linear, activation, constrain
from vlm_jax.models.remat import remat_policy, rematerialised


POOLS = ("default", "mean_max")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  style: str = "clip"  # "clip" | "siglip"
  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  act: str = "quick_gelu"
  norm_eps: float = 1e-5
  use_head: bool = False  # SigLIP attention-pooling head
  # Channels of stride-2 3x3 convolutions run before the patch embedding (the
  # "early convolutions" of Xiao et al. 2021). Not in any Hugging Face tower;
  # () is a plain ViT.
  stem: tuple[int, ...] = ()
  # How `pooled` (the image embedding of a contrastive model) is made: "default"
  # is the reference's (CLIP: the class token; SigLIP: the head, or the mean);
  # "mean_max" concatenates the mean and the max of the last block's patch
  # tokens ([n, 2 * width]): a small object can decide the embedding, and every
  # patch token gets a gradient. Not in any Hugging Face tower.
  pool: str = "default"
  attention: str = "xla"  # the kernel, not the numbers: see vlm_jax.models.attention
  remat: Union[str, bool] = "none"  # what a block keeps for the backward pass: see vlm_jax.models.remat
  # Compute dtype (activations, matmuls); parameters (and so the optimiser state) stay `param_dtype`.
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.style not in ("clip", "siglip"):
      raise ValueError(f"ViTConfig.style must be 'clip' or 'siglip', got {self.style!r}")
    if self.image_size < self.patch_size:
      raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
    if self.pool not in POOLS:
      raise ValueError(f"ViTConfig.pool must be one of {POOLS}, got {self.pool!r}")
    check_attention(self.attention)
    object.__setattr__(self, "remat", remat_policy(self.remat))
    object.__setattr__(self, "stem", tuple(int(ch) for ch in self.stem))  # hashable; configs give lists
    if self.patch_size % self.stem_stride:
      raise ValueError(f"patch_size {self.patch_size} is not divisible by the stem's total stride "
                       f"{self.stem_stride} ({len(self.stem)} stride-2 convolutions)")

  @property
  def stem_stride(self) -> int:
    return 2 ** len(self.stem)

  @property
  def grid(self) -> int:
    # Like the reference conv: trailing pixels that fill no whole patch are
    # dropped (SigLIP so400m/14 at 384 px has a 27x27 grid).
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid ** 2 + (self.style == "clip")


@flax.struct.dataclass
class VisionOutput:
  last_hidden_state: Optional[jax.Array]  # [n, tokens, width]; post-LN for SigLIP, raw for CLIP
  pooled: Optional[jax.Array]  # [n, width]; None when only `features` were asked for
  features: Optional[jax.Array] = None  # hidden states of the requested layer


class AttentionPoolingHead(nn.Module):
  """SigLIP's multi-head attention pooling with one learned probe."""
  num_heads: int
  mlp_dim: int
  act: str
  eps: float
  attention: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, l, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
                       (1, 1, d), self.param_dtype)
    # One fused in-projection, as in torch.nn.MultiheadAttention, kept fused so
    # the Hugging Face tensor maps one to one.
    w_in = self.param("in_proj", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "heads")),
                      (d, 3 * d), self.param_dtype)
    b_in = self.param("in_proj_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)),
                      (3 * d,), self.param_dtype)
    wq, wk, wv = jnp.split(w_in, 3, axis=1)
    bq, bk, bv = jnp.split(b_in, 3)
    hd = d // self.num_heads
    q = (jnp.broadcast_to(probe, (n, 1, d)) @ wq + bq).reshape(n, 1, self.num_heads, hd)
    k = (x @ wk + bk).reshape(n, l, self.num_heads, hd)
    v = (x @ wv + bv).reshape(n, l, self.num_heads, hd)
    h = attention(q, k, v, None, self.attention).reshape(n, 1, d)
    h = Linear(d, ("heads", "embed"), use_bias=True, name="o", **kw)(h)
    h = h + MLP(self.mlp_dim, self.act, name="mlp", **kw)(LayerNorm(self.eps, name="norm", **kw)(h))
    return h[:, 0]


def encoder_block(c: ViTConfig, name: Optional[str] = None) -> EncoderBlock:
  """Block `i` of the tower, rematerialised by `c.remat` (also run on its own by layer-wise calibration)."""
  block = rematerialised(EncoderBlock, c.remat, scanned=False)
  return block(c.num_heads, c.mlp_dim, c.act, c.norm_eps, c.attention, name=name,
               dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))


class VisionTower(nn.Module):
  """`apply({'params': p}, images [n, h, w, 3]) -> VisionOutput`.

  `feature_layer` follows Hugging Face `hidden_states` indexing: 0 is the
  embedding output, i the output of block i, -1 the last block, -2 the
  penultimate (what LLaVA and VILA feed the projector). Blocks after the
  requested one are skipped at run time (they still exist in the parameters).
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array, feature_layer: Optional[int] = None) -> VisionOutput:
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    kw = dict(dtype=dtype, param_dtype=pdtype)
    n = images.shape[0]
    x = images.astype(dtype)
    for i, channels in enumerate(c.stem):
      x = nn.Conv(channels, (3, 3), strides=2, padding=((1, 1), (1, 1)), name=f"stem_{i}", **kw,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None,) * 4),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x)
      x = activation(c.act)(x)
    patch = c.patch_size // c.stem_stride  # what is left of the patch after the stem's strides
    x = nn.Conv(c.width, (patch, patch), strides=patch, padding="VALID",
                use_bias=c.style == "siglip", name="patch_embed", **kw,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x)
    x = x.reshape(n, -1, c.width)
    if c.style == "clip":
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                       (c.width,), pdtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (n, 1, c.width)), x], axis=1)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                     (c.num_tokens, c.width), pdtype)
    x = x + pos.astype(dtype)[None]
    if c.style == "clip":
      x = LayerNorm(c.norm_eps, name="pre_norm", **kw)(x)
    x = constrain(x, ("batch", "length", "embed"))

    last = c.depth if feature_layer is None else feature_layer % (c.depth + 1)
    run_all = feature_layer is None or self.is_initializing()
    features = x if last == 0 else None
    for i in range(c.depth):
      if i >= last and not run_all:
        break
      x = encoder_block(c, name=f"layers_{i}")(x)
      if i + 1 == last:
        features = x
    if not run_all:
      # Only the blocks up to the requested features ran.
      return VisionOutput(last_hidden_state=None, pooled=None, features=features)

    if c.pool == "mean_max":
      patches = x[:, 1:] if c.style == "clip" else x
      return VisionOutput(last_hidden_state=x, features=features,
                          pooled=jnp.concatenate([patches.mean(axis=1), patches.max(axis=1)], axis=-1))
    post_norm = LayerNorm(c.norm_eps, name="post_norm", **kw)
    if c.style == "clip":
      pooled = post_norm(x[:, 0])
      last_hidden = x
    else:
      last_hidden = post_norm(x)
      pooled = last_hidden.mean(axis=1)
      if c.use_head:
        head = AttentionPoolingHead(c.num_heads, c.mlp_dim, c.act, c.norm_eps, c.attention, name="head", **kw)
        pooled = head(last_hidden)
    return VisionOutput(last_hidden_state=last_hidden, pooled=pooled, features=features)
