"""Decoder-only language model of the LLaMA family (LLaMA, Qwen2, ...).

RMSNorm, RoPE, grouped-query attention, SwiGLU, optional q/k/v bias and tied
embeddings. The KV cache is an explicit pytree (`KVCache`) passed in and
returned, so decoding stays a pure function that jits and shards like training.
"""

import dataclasses
from typing import Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.attention import STRUCTURED, Segments, attention, check_attention, xla_attention
from vlm_jax.models.layers import Linear, RMSNorm, apply_rope, constrain
from vlm_jax.models.remat import remat_policy, rematerialised


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int = 32000
  embed_dim: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  rope_linear_scaling: float = 1.0
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  tie_embeddings: bool = False
  max_position: int = 4096
  scan_layers: bool = False
  remat: Union[str, bool] = "none"  # what a layer keeps for the backward pass: see vlm_jax.models.remat
  attention: str = "xla"  # the kernel, not the numbers: see vlm_jax.models.attention
  # Compute dtype (activations, matmuls); parameters (and so the optimiser state) stay `param_dtype`.
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    check_attention(self.attention)
    object.__setattr__(self, "remat", remat_policy(self.remat))


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, `[layers, batch, kv_heads, slots, head_dim]`.

  Head-major, so attention reads a layer's keys without a transpose, and each
  step writes its new keys into the full array in place.

  `key_mask[b, s]` says which slots hold real tokens (left padding is masked);
  `end` is the next slot to write.
  """
  k: jax.Array
  v: jax.Array
  key_mask: jax.Array
  end: jax.Array

  @classmethod
  def empty(cls, config: LMConfig, batch: int, slots: int) -> "KVCache":
    shape = (config.num_layers, batch, config.num_kv_heads, slots, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class LMOutput:
  logits: jax.Array
  cache: Optional[KVCache] = None
  hidden: Optional[jax.Array] = None


def attention_mask_matrix(key_mask: jax.Array, query_slots: jax.Array, key_slots: jax.Array,
                          segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """[b, queries, keys] boolean mask: causal over slots, valid keys only, within a packed segment."""
  mask = key_mask[:, None, :] & (key_slots[None, None, :] <= query_slots[None, :, None])
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


class DecoderBlock(nn.Module):
  """One pre-norm decoder layer. Scan-compatible: `(x, ..., kv) -> (x, new kv)`.

  kv: None (no cache), or (k, v, layer) where k, v are `[..., b, kv_heads,
  slots, d]` with a leading layer axis when `layer` is an int (the new keys
  are written into that layer of the full cache in place), or without one
  when `layer` is None (scan hands each layer its own slice).
  mask: [b, l, slots] bool, or `Segments` for a kernel that takes the structure.
  """
  config: LMConfig

  @nn.compact
  def __call__(self, x, positions, mask, write_at, kv):
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    b, l, _ = x.shape

    h = RMSNorm(c.norm_eps, name="attn_norm", **kw)(x)
    q = Linear(c.num_heads * c.head_dim, ("embed", "heads"), c.qkv_bias, name="q", **kw)(h)
    k = Linear(c.num_kv_heads * c.head_dim, ("embed", "kv"), c.qkv_bias, name="k", **kw)(h)
    v = Linear(c.num_kv_heads * c.head_dim, ("embed", "kv"), c.qkv_bias, name="v", **kw)(h)
    q = q.reshape(b, l, c.num_heads, c.head_dim)
    k = k.reshape(b, l, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, l, c.num_kv_heads, c.head_dim)
    q = apply_rope(q, positions, c.rope_theta, c.rope_linear_scaling)
    k = apply_rope(k, positions, c.rope_theta, c.rope_linear_scaling)
    new_kv = None
    if kv is None:
      attn = attention(q, k, v, mask, c.attention)
    else:
      k_cache, v_cache, layer = kv
      new = (k.transpose(0, 2, 1, 3).astype(k_cache.dtype), v.transpose(0, 2, 1, 3).astype(v_cache.dtype))
      if layer is None:
        k_cache = jax.lax.dynamic_update_slice(k_cache, new[0], (0, 0, write_at, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, new[1], (0, 0, write_at, 0))
        k_layer, v_layer = k_cache, v_cache
      else:
        k_cache = jax.lax.dynamic_update_slice(k_cache, new[0][None], (layer, 0, 0, write_at, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, new[1][None], (layer, 0, 0, write_at, 0))
        k_layer, v_layer = k_cache[layer], v_cache[layer]
      new_kv = (k_cache, v_cache)
      attn = xla_attention(q, k_layer, v_layer, mask, heads_major=True)  # decoding: see models.attention
    attn = attn.reshape(b, l, c.num_heads * c.head_dim)
    attn = constrain(attn, ("batch", "length", "heads"))
    x = x + Linear(c.embed_dim, ("heads", "embed"), name="o", **kw)(attn)

    h = RMSNorm(c.norm_eps, name="mlp_norm", **kw)(x)
    gate = Linear(c.mlp_dim, ("embed", "mlp"), name="gate", **kw)(h)
    up = Linear(c.mlp_dim, ("embed", "mlp"), name="up", **kw)(h)
    hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    x = x + Linear(c.embed_dim, ("mlp", "embed"), name="down", **kw)(hidden)
    return constrain(x, ("batch", "length", "embed")), new_kv


class DecoderLM(nn.Module):
  """`apply({'params': p}, input_ids) -> LMOutput(logits [batch, length, vocab])`.

  Parameter tree: `embed`, `layers_{i}` (or `layers`, stacked on a leading axis,
  when `scan_layers`), `norm`, and `lm_head` unless embeddings are tied.
  """
  config: LMConfig

  def setup(self):
    c = self.config
    self.embedder = nn.Embed(
        c.vocab_size, c.embed_dim, param_dtype=jnp.dtype(c.param_dtype),
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        name="embed")
    block = rematerialised(DecoderBlock, c.remat, scanned=c.scan_layers)
    if c.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=c.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")
    else:
      self.layers = [block(c, name=f"layers_{i}") for i in range(c.num_layers)]
    self.norm = RMSNorm(c.norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    if not c.tie_embeddings:
      self.lm_head = Linear(c.vocab_size, ("embed", "vocab"), dtype=jnp.dtype(c.dtype),
                            param_dtype=jnp.dtype(c.param_dtype))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings `[batch, length, embed]` (the VLM splices images into these)."""
    return self.embedder(input_ids).astype(jnp.dtype(self.config.dtype))

  def __call__(self, input_ids: Optional[jax.Array] = None, *,
               attention_mask: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None,
               inputs_embeds: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None,
               cache: Optional[KVCache] = None) -> LMOutput:
    """Runs the decoder.

    attention_mask: [batch, length], 1 for real tokens (padding anywhere).
    positions: [batch, length] RoPE positions; default `0..length-1` (plus the
      cache's end when decoding).
    segment_ids: [batch, length] for packed rows: a token attends only to
      earlier tokens of its own segment (give `positions` restarting per segment).
    cache: if given, the new keys/values are written at `cache.end` and the
      updated cache is returned; queries attend to all earlier valid slots.
    """
    c = self.config
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
    b, l, _ = x.shape
    x = constrain(x, ("batch", "length", "embed"))
    if attention_mask is None:
      attention_mask = jnp.ones((b, l), bool)
    attention_mask = attention_mask.astype(bool)
    start = cache.end if cache is not None else jnp.zeros((), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(l), (b, l))

    query_slots = start + jnp.arange(l)
    if cache is None:
      key_mask, key_slots = attention_mask, jnp.arange(l)
    else:
      key_mask = jax.lax.dynamic_update_slice(cache.key_mask, attention_mask, (0, start))
      key_slots = jnp.arange(cache.key_mask.shape[1])
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids (packing) are for training, not for decoding with a cache")
    if cache is None and c.attention in STRUCTURED:  # a kernel takes the structure, never [b, l, l]
      mask = Segments.of(attention_mask, segment_ids, causal=True)
    else:
      mask = attention_mask_matrix(key_mask, query_slots, key_slots, segment_ids)

    if c.scan_layers:
      xs = None if cache is None else (cache.k, cache.v, None)
      x, new_kv = self.layers(x, positions, mask, start, xs)
    else:
      new_kv = None if cache is None else (cache.k, cache.v)
      for i, layer in enumerate(self.layers):
        x, kv = layer(x, positions, mask, start, None if cache is None else (*new_kv, i))
        new_kv = kv if cache is not None else None

    new_cache = None
    if cache is not None:
      new_cache = KVCache(new_kv[0], new_kv[1], key_mask, start + l)
    hidden = self.norm(x)
    return LMOutput(logits=self.head(hidden), cache=new_cache, hidden=hidden)

  def head(self, hidden: jax.Array) -> jax.Array:
    """Final hidden states `[..., embed]` -> float32 logits `[..., vocab]`.

    Its own method so the training loss can run it on a slice of the sequence at a
    time (`loss_chunk`) instead of on the whole batch.
    """
    c = self.config
    if c.tie_embeddings:
      logits = self.embedder.attend(hidden.astype(jnp.dtype(c.param_dtype)))
    else:
      logits = self.lm_head(hidden)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
