"""The VLM: vision tower -> projector -> decoder LM, images anywhere in the text.

The text holds one image token per image feature (as the Hugging Face LLaVA
processor lays it out); the projected image features replace those tokens'
embeddings in order: image 0's features fill the first run of image tokens,
and so on, across the whole batch.
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.lm import DecoderLM, KVCache, LMConfig, LMOutput
from vlm_jax.models.projector import Projector, projected_tokens
from vlm_jax.models.vit import ViTConfig, VisionTower


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  vision: ViTConfig = ViTConfig()
  text: LMConfig = LMConfig()
  projector: str = "mlp2x_gelu"
  projector_act: str = "gelu"
  projector_bias: bool = True
  feature_layer: int = -2
  # As in Hugging Face LLaVA: "default" drops the first token (CLIP's class
  # token), "full" keeps all (use it for SigLIP towers).
  feature_select: str = "default"
  image_token_id: int = 32000

  @property
  def tokens_per_image(self) -> int:
    vision_tokens = self.vision.num_tokens - (self.feature_select == "default")
    return projected_tokens(self.projector, vision_tokens)


def splice_images(text_embeds: jax.Array, image_features: jax.Array, is_image: jax.Array) -> jax.Array:
  """Puts image features, in order, where `is_image` is True.

  text_embeds: [b, l, d]; is_image: [b, l].
  image_features: [n, t, d], consumed in order across the whole batch (the
    Hugging Face layout), or [b, m, t, d], row i's image tokens taking row i's
    images in order (the training layout: m image slots per row, unused slots
    padded and never referenced).
  """
  if image_features.ndim == 4:
    b, m, t, d = image_features.shape
    index = jnp.cumsum(is_image, axis=1) - 1 + (jnp.arange(b) * m * t)[:, None]
  else:
    index = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(is_image.shape)
  flat = image_features.reshape(-1, image_features.shape[-1]).astype(text_embeds.dtype)
  gathered = flat[jnp.clip(index, 0, flat.shape[0] - 1)]
  return jnp.where(is_image[..., None], gathered, text_embeds)


def check_image_tokens(input_ids, image_token_id: int, num_images: int, tokens_per_image: int):
  """Raises a clear error when the image tokens and the images disagree (eager inputs only)."""
  if isinstance(input_ids, jax.core.Tracer):
    return
  found = int((input_ids == image_token_id).sum())
  if found != num_images * tokens_per_image:
    raise ValueError(
        f"input_ids hold {found} image tokens (id {image_token_id}) but {num_images} image(s) "
        f"x {tokens_per_image} tokens per image = {num_images * tokens_per_image} were given")


def projector_of(c: VLMConfig) -> Projector:
  """The VLM's projector (also run on its own by layer-wise calibration)."""
  return Projector(c.projector, c.text.embed_dim, c.projector_bias, c.projector_act,
                   dtype=jnp.dtype(c.text.dtype), param_dtype=jnp.dtype(c.text.param_dtype))


class VLM(nn.Module):
  """`apply({'params': p}, input_ids, images=...) -> LMOutput`.

  images: [num_images, h, w, 3], already normalised, taken in order by the
  image tokens of the whole batch (as Hugging Face LLaVA does); or
  [batch, slots, h, w, 3], each row's image tokens taking that row's images.
  image_embeds: the same with [..., tokens, lm_width] features instead, to
  skip the vision tower and projector (e.g. Synth² synthetic embeddings).
  Parameters: `vision`, `projector`, `lm`.
  """
  config: VLMConfig

  def setup(self):
    c = self.config
    self.vision = VisionTower(c.vision)
    self.projector = projector_of(c)
    self.lm = DecoderLM(c.text)

  def encode_images(self, images: jax.Array) -> jax.Array:
    """Images [..., h, w, 3] -> projected features [..., tokens_per_image, lm_width]."""
    c = self.config
    lead = images.shape[:-3]
    feats = self.vision(images.reshape(-1, *images.shape[-3:]), feature_layer=c.feature_layer).features
    if c.feature_select == "default":
      feats = feats[:, 1:]
    feats = self.projector(feats)
    return feats.reshape(*lead, *feats.shape[1:])

  def input_embeddings(self, input_ids: jax.Array, image_embeds: Optional[jax.Array] = None) -> jax.Array:
    """What the decoder's first layer sees: token embeddings with the image features spliced in."""
    c = self.config
    embeds = self.lm.embed(jnp.where(input_ids == c.image_token_id, 0, input_ids)
                           if c.image_token_id >= c.text.vocab_size else input_ids)
    if image_embeds is None:
      return embeds
    if image_embeds.ndim == 3:
      check_image_tokens(input_ids, c.image_token_id, image_embeds.shape[0], image_embeds.shape[1])
    return splice_images(embeds, image_embeds, input_ids == c.image_token_id)

  def __call__(self, input_ids: jax.Array, images: Optional[jax.Array] = None, *,
               image_embeds: Optional[jax.Array] = None,
               attention_mask: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None,
               cache: Optional[KVCache] = None) -> LMOutput:
    if images is not None and image_embeds is not None:
      raise ValueError("pass either images or image_embeds, not both")
    if images is not None:
      image_embeds = self.encode_images(images)
    elif self.is_initializing():
      self.encode_images(jnp.zeros((1, self.config.vision.image_size, self.config.vision.image_size, 3)))
    embeds = self.input_embeddings(input_ids, image_embeds)
    return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions,
                   segment_ids=segment_ids, cache=cache)

  def head(self, hidden: jax.Array) -> jax.Array:
    """The decoder's output head (see `DecoderLM.head`)."""
    return self.lm.head(hidden)
