"""Captions -> image embeddings (VQ code grids) with the trained text-to-codes generator.

The condition is the caption rendered exactly as the generator's training batches rendered
it (a caption record through `rendering.render`, its target tokens moved to the front by
`caption_tokens`), so generation sees what training saw. Every caption gets its own random
key, folded from the seed and the caption's index: a caption's codes do not depend on the
batch it falls in, so a resumed generation rewrites nothing differently.
"""

import functools
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from vlm_jax.data import rendering
from vlm_jax.data.schema import IMAGE_PLACEHOLDER
from vlm_jax.models.maskgit import CodeGenerator, generate_codes
from vlm_jax.models.text_to_codes import TextToCodes, caption_tokens


def condition(captions: Sequence[str], tokenizer, max_text_len: int, chat_template=None) -> tuple[np.ndarray, np.ndarray]:
  """Captions -> the generator's condition (text ids [n, max_text_len], mask [n, max_text_len]),
  as the pipeline renders caption records for a model without image tokens."""
  encoder = rendering.TextEncoder(tokenizer)
  rows = []
  for caption in captions:
    record = {"kind": "caption", "codes": [np.zeros(1, np.int32)],
              "turns": [{"role": "user", "content": IMAGE_PLACEHOLDER}, {"role": "assistant", "content": caption}]}
    rows.append(rendering.render(record, encoder, tokens_per_image=0, image_token_id=-1,
                                 chat_template=chat_template)[:2])
  width = max(len(ids) for ids, _ in rows)
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), np.float32)
  for i, (row_ids, row_mask) in enumerate(rows):
    ids[i, :len(row_ids)], mask[i, :len(row_mask)] = row_ids, row_mask
  text_ids, text_mask = caption_tokens(ids, mask, max_text_len)
  return np.asarray(text_ids), np.asarray(text_mask)


def generate_embeddings(model: TextToCodes, params: dict, tokenizer, captions: Sequence[str], *,
                        steps: int = 8, temperature: float = 1.0, guidance_scale: float = 0.0,
                        batch_size: int = 64, seed: int = 0, first_index: int = 0, progress: bool = True,
                        chat_template=None) -> np.ndarray:
  """One code grid per caption: int32 [len(captions), T], ids in [0, K).

  `first_index`: the index of captions[0] in the whole synthetic set (its random key is
  folded from it). The last batch is filled up with copies, so decoding compiles once.
  """
  if not captions:
    return np.zeros((0, model.config.vq.num_tokens), np.int32)
  generator = CodeGenerator(model.config.generator)
  text_ids, text_mask = condition(captions, tokenizer, model.config.generator.max_text_len, chat_template)
  n = len(captions)
  rows = -(-n // batch_size) * batch_size
  fill = np.arange(rows) % n
  text_ids, text_mask = text_ids[fill], text_mask[fill]
  key = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + fill)
  out = []
  for b in tqdm(range(rows // batch_size), desc="code grids", disable=not progress, dynamic_ncols=True):
    sl = slice(b * batch_size, (b + 1) * batch_size)
    out.append(np.asarray(generate_codes(generator, params["generator"], text_ids[sl], text_mask[sl], keys[sl],
                                         steps=steps, temperature=temperature, guidance_scale=guidance_scale)))
  return np.concatenate(out)[:n].astype(np.int32)


@functools.partial(jax.jit, static_argnames="model")
def _vq_decode(model: TextToCodes, params: dict, codes: jax.Array) -> jax.Array:
  return model.apply({"params": params}, codes, method=lambda m, c: m.vq.decode(c))


@functools.partial(jax.jit, static_argnames="model")
def _vq_encode(model: TextToCodes, params: dict, images: jax.Array) -> jax.Array:
  return model.apply({"params": params}, images, method=lambda m, x: m.vq.encode(x))


def _in_batches(fn, model: TextToCodes, params: dict, x: np.ndarray, batch_size: int) -> np.ndarray:
  return np.concatenate([np.asarray(fn(model, params, x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def decode_to_pixels(model: TextToCodes, params: dict, codes: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """Code grids -> images (normalised like the pipeline's): for inspection, and for the
  cost of the pixel-space route Synth² avoids (generate, decode, re-encode). Compiled once
  per model and batch shape, so timing repeated calls times no compilation."""
  return _in_batches(_vq_decode, model, params, codes, batch_size)


def encode_pixels(model: TextToCodes, params: dict, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """Images -> code grids through the tokenizer's encoder (real images, or decoded ones)."""
  return _in_batches(_vq_encode, model, params, images, batch_size)
