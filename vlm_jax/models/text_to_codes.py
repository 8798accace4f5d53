"""Synth²'s text-to-image generator as one trainable model: caption -> VQ code grid.

`TextToCodes` holds the image tokenizer (`vq`, the same parameter key as the tokenizer run
and the code-reading VLM, so `config.init_parts = {"vq": "checkpoint:<tokenizer run>"}`
gives it the trained tokenizer; its optimizer group freezes it) and the MaskGIT
`generator`. Its objective reads an ordinary pipeline batch of caption records: the
tokenizer turns the first image slot into the target code grid, and the caption is the
target span of the rendered text (`caption_tokens`), so training needs no data format of
its own and generation conditions on captions rendered exactly as in training.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.maskgit import CodeGenerator, MaskGITConfig
from vlm_jax.models.vq import VQAutoencoder, VQConfig


@dataclasses.dataclass(frozen=True)
class TextToCodesConfig:
  vq: VQConfig = VQConfig()
  generator: MaskGITConfig = MaskGITConfig()

  def __post_init__(self):
    g, q = self.generator, self.vq
    if (g.codebook_size, g.num_tokens) != (q.codebook_size, q.num_tokens):
      raise ValueError(f"the generator predicts {g.num_tokens} codes of {g.codebook_size}, but the tokenizer "
                       f"makes {q.num_tokens} codes of {q.codebook_size}: set generator.codebook_size and "
                       f"generator.num_tokens to the tokenizer's")


def caption_tokens(input_ids: jax.Array, loss_mask: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  """The target tokens of rendered caption records, moved to the front of each row (in order)
  and cut or padded to `length`: (ids [B, length] with 0 where padded, mask [B, length])."""
  keep = loss_mask > 0
  order = jnp.argsort(~keep, axis=1, stable=True)
  ids = jnp.take_along_axis(input_ids, order, axis=1)[:, :length]
  mask = jnp.take_along_axis(keep, order, axis=1)[:, :length]
  pad = length - ids.shape[1]
  if pad > 0:
    ids, mask = jnp.pad(ids, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
  return jnp.where(mask, ids, 0), mask


class TextToCodes(nn.Module):
  """The model of kind "text_to_codes": `apply({'params': p}, text_ids, text_mask, codes)` gives
  the generator's logits [B, T, K]; the engine trains it on `train_loss`.
  Parameters: `vq` (the tokenizer, frozen by the run's optimizer groups) and `generator`."""
  config: TextToCodesConfig

  def setup(self):
    self.vq = VQAutoencoder(self.config.vq)
    self.generator = CodeGenerator(self.config.generator)

  def __call__(self, text_ids: jax.Array, text_mask: jax.Array, codes: jax.Array) -> jax.Array:
    if self.is_initializing():  # create the tokenizer's parameters too
      s = self.config.vq.image_size
      self.vq(jnp.zeros((1, s, s, 3), jnp.dtype(self.config.vq.dtype)))
    return self.generator(text_ids, text_mask, codes)

  def train_loss(self, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """MaskGIT's masked-code loss: targets are the tokenizer's codes of the batch's first image
    slot, the condition its caption tokens."""
    codes = jax.lax.stop_gradient(self.vq.encode(batch["images"][:, 0]))
    text_ids, text_mask = caption_tokens(batch["input_ids"], batch["loss_mask"],
                                         self.config.generator.max_text_len)
    loss, metrics = self.generator.train_loss(text_ids, text_mask, codes, rng)
    return loss, {**metrics, "caption_tokens": jnp.mean(jnp.sum(text_mask, axis=1))}
