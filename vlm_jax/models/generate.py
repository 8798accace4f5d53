"""Batched decoding with the KV cache for the LM and the VLM, jitted once per shape.

Prompts are left-padded (`attention_mask` marks real tokens); positions count
real tokens only, as Hugging Face `generate` does, so padded and unpadded
prompts decode the same tokens.
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from vlm_jax.models.lm import DecoderLM, KVCache
from vlm_jax.models.vlm import VLM


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Greedy when `temperature == 0`, else nucleus sampling over the top-p mass."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def decode_loop(first_logits: jax.Array, cache, last_positions: jax.Array, next_logits: Callable,
                max_new_tokens: int, temperature: float, top_p: float, eos_token_id: Optional[int],
                pad_token_id: int, rng: jax.Array) -> jax.Array:
  """The token loop after the prompt's forward pass, inside jit: `[b, max_new_tokens]` tokens.

  `next_logits(token [b], cache, positions [b]) -> (cache, logits [b, vocab])` runs one step;
  rows stop at `eos_token_id` (then `pad_token_id`), and the loop exits once every row has.
  At most n-1 steps run: the last token needs no forward pass of its own.
  """
  b = first_logits.shape[0]
  rngs = jax.random.split(rng, max_new_tokens)

  def pick(logits, rng_t, done):
    token = jnp.where(done, pad_token_id, sample_token(logits, rng_t, temperature, top_p))
    return token, done if eos_token_id is None else done | (token == eos_token_id)

  def unfinished(carry):
    t, _, _, _, done, _ = carry
    return (t < max_new_tokens - 1) & ~jnp.all(done)

  def step(carry):
    t, cache, logits, pos, done, tokens = carry
    token, done = pick(logits, rngs[t], done)
    cache, logits = next_logits(token, cache, pos + 1)
    return t + 1, cache, logits, pos + 1, done, tokens.at[:, t].set(token)

  tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
  carry = (jnp.int32(0), cache, first_logits, last_positions, jnp.zeros((b,), bool), tokens)
  t, _, logits, _, done, tokens = jax.lax.while_loop(unfinished, step, carry)
  last, _ = pick(logits, rngs[t], done)
  return tokens.at[:, t].set(last.astype(jnp.int32))


@functools.lru_cache(maxsize=32)
def _compiled(module_type: type, config, max_new_tokens: int, temperature: float, top_p: float,
              eos_token_id: Optional[int], pad_token_id: int):
  model = module_type(config)
  lm_config = config.text if module_type is VLM else config

  def run(params, input_ids, attention_mask, images, image_embeds, rng):
    b, p = input_ids.shape
    cache = KVCache.empty(lm_config, b, p + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    extra = dict(images=images, image_embeds=image_embeds) if module_type is VLM else {}
    out = model.apply({"params": params}, input_ids, attention_mask=attention_mask,
                      positions=positions, cache=cache, **extra)

    def next_logits(token, cache, pos):
      out = model.apply({"params": params}, token[:, None], attention_mask=jnp.ones((b, 1), bool),
                        positions=pos[:, None], cache=cache)
      return out.cache, out.logits[:, -1]

    return decode_loop(out.logits[:, -1], out.cache, positions[:, -1], next_logits, max_new_tokens,
                       temperature, top_p, eos_token_id, pad_token_id, rng)

  return jax.jit(run)


def generate_fn(model, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                eos_token_id: Optional[int] = None, pad_token_id: int = 0):
  """The jitted function `generate` runs, `(params, input_ids, attention_mask, images, image_embeds,
  rng) -> [batch, max_new_tokens]`: to lower and compile ahead of time (`launch.simulate
  --function=generate`) with `jax.ShapeDtypeStruct` arguments."""
  if not isinstance(model, (DecoderLM, VLM)):
    raise TypeError(f"generate needs a DecoderLM or a VLM, got {type(model).__name__}")
  return _compiled(type(model), model.config, max_new_tokens, float(temperature), float(top_p),
                   eos_token_id, pad_token_id)


def generate(model, params, input_ids, *, attention_mask=None, images=None, image_embeds=None,
             max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
             rng: Optional[jax.Array] = None, eos_token_id: Optional[int] = None,
             pad_token_id: int = 0) -> jax.Array:
  """Returns the `[batch, max_new_tokens]` new tokens (after `eos_token_id`: `pad_token_id`).

  model: a `DecoderLM` or a `VLM`; images as for `VLM.__call__`.
  """
  fn = generate_fn(model, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id)
  input_ids = jnp.asarray(input_ids)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  rng = jax.random.key(0) if rng is None else rng
  return fn(params, input_ids, jnp.asarray(attention_mask, jnp.int32), images, image_embeds, rng)
