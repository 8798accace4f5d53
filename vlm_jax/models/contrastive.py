"""Two-tower contrastive models (CLIP, SigLIP) and their losses.

CLIP's text tower is causal and pools the end-of-text token; SigLIP's is
bidirectional, pools the last token and has a biased head. CLIP scores are
`exp(t)·cos`, SigLIP's `exp(t)·cos + b`.
"""

import dataclasses
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlm_jax.models.attention import STRUCTURED, Segments, check_attention
from vlm_jax.models.layers import EncoderBlock, LayerNorm, Linear, constrain
from vlm_jax.models.metrics import argmax_equals
from vlm_jax.models.vit import ViTConfig, VisionTower


@dataclasses.dataclass(frozen=True)
class TextConfig:
  style: str = "clip"  # "clip" | "siglip"
  vocab_size: int = 49408
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  max_len: int = 77
  act: str = "quick_gelu"
  norm_eps: float = 1e-5
  eos_token_id: int = 2
  # CLIP's pooled token: "eos" as Hugging Face (the first eos_token_id; for the
  # legacy eos_token_id == 2, the largest id), or "last": the last token the
  # attention mask keeps (right padding), for a vocabulary whose eos id is 2.
  pool: str = "eos"
  attention: str = "xla"  # the kernel, not the numbers: see vlm_jax.models.attention
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.pool not in ("eos", "last"):
      raise ValueError(f"TextConfig.pool must be 'eos' or 'last', got {self.pool!r}")
    check_attention(self.attention)


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  vision: ViTConfig = ViTConfig()
  text: TextConfig = TextConfig()
  projection_dim: int = 512
  logit_scale_init: float = 2.6592  # log(1/0.07)
  logit_bias_init: float = -10.0  # SigLIP only

  @property
  def style(self) -> str:
    return self.text.style


@flax.struct.dataclass
class ContrastiveOutput:
  image_embeds: jax.Array  # L2-normalised [n_images, projection_dim]
  text_embeds: jax.Array  # L2-normalised [n_texts, projection_dim]
  logits_per_text: jax.Array  # [n_texts, n_images]
  logit_scale: jax.Array
  logit_bias: Optional[jax.Array] = None


class TextTower(nn.Module):
  config: TextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """Returns the pooled text feature [batch, width]."""
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    b, l = input_ids.shape
    tok = nn.Embed(c.vocab_size, c.width, param_dtype=kw["param_dtype"], name="token_embed",
                   embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
                     (c.max_len, c.width), kw["param_dtype"])
    x = tok(input_ids).astype(kw["dtype"]) + pos[:l].astype(kw["dtype"])[None]
    x = constrain(x, ("batch", "length", "embed"))
    keys = jnp.ones((b, l), bool) if attention_mask is None else attention_mask.astype(bool)
    if c.attention in STRUCTURED:  # a kernel takes the structure, never [b, l, l]
      mask = Segments.of(keys, causal=c.style == "clip")
    else:
      mask = jnp.broadcast_to(keys[:, None, :], (b, l, l))
      if c.style == "clip":
        mask = mask & jnp.tril(jnp.ones((l, l), bool))[None]
    for i in range(c.depth):
      x = EncoderBlock(c.num_heads, c.mlp_dim, c.act, c.norm_eps, c.attention, name=f"layers_{i}", **kw)(x, mask)
    x = LayerNorm(c.norm_eps, name="final_norm", **kw)(x)
    if c.style == "siglip":
      return x[:, -1]
    if c.pool == "last":
      return x[jnp.arange(b), jnp.sum(keys, axis=-1) - 1]
    if c.eos_token_id == 2:  # the original CLIP vocabulary: end-of-text is the largest id
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
    return x[jnp.arange(b), eos]


def _normalise(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ContrastiveModel(nn.Module):
  """`apply({'params': p}, images, input_ids) -> ContrastiveOutput`.

  Also `method=ContrastiveModel.embed_images` / `embed_texts` for one tower.
  """
  config: ContrastiveConfig

  def setup(self):
    c = self.config
    siglip = c.style == "siglip"
    self.vision = VisionTower(c.vision)
    self.text = TextTower(c.text)
    # SigLIP's projections live inside the towers' heads: its vision head is
    # the attention pool, its text head a biased Dense.
    self.vision_proj = None if siglip else Linear(c.projection_dim, ("embed", "proj"))
    self.text_proj = Linear(c.projection_dim, ("embed", "proj"), use_bias=siglip)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init), ())
    if siglip:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(c.logit_bias_init), ())

  def embed_images(self, images: jax.Array) -> jax.Array:
    pooled = self.vision(images).pooled
    return _normalise(pooled if self.vision_proj is None else self.vision_proj(pooled))

  def embed_texts(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
    return _normalise(self.text_proj(self.text(input_ids, attention_mask)))

  def __call__(self, images: jax.Array, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None) -> ContrastiveOutput:
    img = self.embed_images(images)
    txt = self.embed_texts(input_ids, attention_mask)
    logits = jnp.exp(self.logit_scale) * txt @ img.T
    bias = None
    if self.config.style == "siglip":
      bias = self.logit_bias
      logits = logits + bias
    return ContrastiveOutput(img, txt, logits, self.logit_scale, bias)

  def train_loss(self, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """CLIP's softmax or SigLIP's sigmoid loss over a pipeline batch of image–caption pairs
    (row i: its first image slot with its caption; every other row is a negative, so the
    batch is never split into microbatches).

    Metrics: `accuracy` (top-1 retrieval, text -> image and image -> text averaged) and
    `temperature` (the learned logit scale, exp(t)).
    """
    del rng  # the objective is deterministic
    out = self(batch["images"][:, 0], batch["input_ids"], batch["attention_mask"])
    logits = out.logits_per_text
    loss = (siglip_loss if self.config.style == "siglip" else clip_loss)(logits)
    pairs = jnp.arange(logits.shape[0])
    accuracy = (jnp.mean(argmax_equals(logits, pairs)) + jnp.mean(argmax_equals(logits.T, pairs))) / 2
    return loss, {"accuracy": accuracy, "temperature": jnp.exp(out.logit_scale)}


def clip_loss(logits_per_text: jax.Array) -> jax.Array:
  """Symmetric softmax cross-entropy; pair i of the batch is text i with image i."""
  labels = jnp.arange(logits_per_text.shape[0])
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits_per_text, labels).mean()
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits_per_text.T, labels).mean()
  return (t2i + i2t) / 2


def siglip_loss(logits_per_text: jax.Array) -> jax.Array:
  """Pairwise sigmoid loss: −Σ_j log σ(z_ij·logit_ij), averaged over texts i (z=+1 on the diagonal)."""
  n = logits_per_text.shape[0]
  z = 2 * jnp.eye(n, logits_per_text.shape[1]) - 1
  return -jnp.sum(jax.nn.log_sigmoid(z * logits_per_text), axis=-1).mean()
