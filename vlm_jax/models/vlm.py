"""The VLM: vision tower -> projector -> decoder LM, images anywhere in the text.

With `vision_input="vq"` the vision tower is a VQ tokenizer and a small code encoder:
images -> codes (`VQAutoencoder.encode`) -> codebook rows -> code encoder -> projector.
Codes may also be given directly (Synth²'s synthetic images are code grids, never pixels):
real and synthetic slots of one batch then take the same path from the codes on.

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

from vlm_jax.models.layers import LayerNorm, Linear, constrain
from vlm_jax.models.lm import DecoderLM, KVCache, LMConfig, LMOutput
from vlm_jax.models.projector import Projector, projected_tokens
from vlm_jax.models.vit import ViTConfig, VisionTower, encoder_block
from vlm_jax.models.vq import VQAutoencoder, VQConfig, check_codes

VISION_INPUTS = ("vit", "vq")


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
  # "vit": the vision tower; "vq": the `vq` tokenizer's codes through a code encoder of
  # `code_layers` blocks shaped by `vision` (width, heads, mlp_dim, act; its depth is unused).
  vision_input: str = "vit"
  vq: VQConfig = VQConfig()
  code_layers: int = 2

  def __post_init__(self):
    if self.vision_input not in VISION_INPUTS:
      raise ValueError(f"VLMConfig.vision_input must be one of {VISION_INPUTS}, got {self.vision_input!r}")
    if self.vision_input == "vq" and self.vision.image_size != self.vq.image_size:
      raise ValueError(f"vision_input='vq' needs vision.image_size ({self.vision.image_size}), the size the "
                       f"data pipeline renders, equal to vq.image_size ({self.vq.image_size})")

  @property
  def tokens_per_image(self) -> int:
    if self.vision_input == "vq":
      return projected_tokens(self.projector, self.vq.num_tokens)
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


class CodeEncoder(nn.Module):
  """Codebook rows [n, T, code_dim] -> features [n, T, vision.width]: a linear map, learned
  positions over the row-major grid, `code_layers` ViT encoder blocks and a LayerNorm."""
  config: VLMConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    v = c.vision
    kw = dict(dtype=jnp.dtype(v.dtype), param_dtype=jnp.dtype(v.param_dtype))
    x = Linear(v.width, (None, "embed"), use_bias=True, name="in_proj", **kw)(x)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                     (c.vq.num_tokens, v.width), kw["param_dtype"])
    x = constrain(x + pos.astype(kw["dtype"])[None], ("batch", "length", "embed"))
    for i in range(c.code_layers):
      x = encoder_block(v, name=f"layers_{i}")(x)
    return LayerNorm(v.norm_eps, name="norm", **kw)(x)


class VLM(nn.Module):
  """`apply({'params': p}, input_ids, images=...) -> LMOutput`.

  images: [num_images, h, w, 3], already normalised, taken in order by the
  image tokens of the whole batch (as Hugging Face LLaVA does); or
  [batch, slots, h, w, 3], each row's image tokens taking that row's images.
  image_embeds: the same with [..., tokens, lm_width] features instead, to
  skip the vision tower and projector (e.g. Synth² synthetic embeddings).
  With vision_input="vq": image_codes int32 [..., T] (leading dims like images')
  instead of images, or beside them with code_given [...] (nonzero: the slot's codes
  are given; zero: its pixels are encoded); see `codes_of`.
  Parameters: `vision`, `projector`, `lm`; with "vq", `vq` and `code_encoder` for `vision`.
  """
  config: VLMConfig

  def setup(self):
    c = self.config
    if c.vision_input == "vq":
      self.vq = VQAutoencoder(c.vq)
      self.code_encoder = CodeEncoder(c)
    else:
      self.vision = VisionTower(c.vision)
    self.projector = projector_of(c)
    self.lm = DecoderLM(c.text)

  def encode_codes(self, codes: jax.Array) -> jax.Array:
    """Codes int32 [..., T] -> projected features [..., tokens_per_image, lm_width]."""
    c = self.config
    check_codes(codes, c.vq.num_tokens, c.vq.codebook_size)
    lead = codes.shape[:-1]
    feats = self.projector(self.code_encoder(self.vq.embed(codes.reshape(-1, codes.shape[-1]))))
    return feats.reshape(*lead, *feats.shape[1:])

  def codes_of(self, images: Optional[jax.Array], image_codes: Optional[jax.Array],
               code_given: Optional[jax.Array]) -> jax.Array:
    """The codes of every slot: the given ones where `code_given`, the tokenizer's codes of
    the pixels elsewhere (every slot's pixels are encoded; the given slots' are then unused)."""
    if image_codes is None:
      return self.vq.encode(images)
    if images is None:
      return image_codes
    if code_given is None:
      raise ValueError("images and image_codes together need code_given (which slots' codes are given)")
    if image_codes.shape[:-1] != images.shape[:-3] or code_given.shape != image_codes.shape[:-1]:
      raise ValueError(f"image_codes {tuple(image_codes.shape)}, code_given {tuple(code_given.shape)} and "
                       f"images {tuple(images.shape)} must share their leading (slot) dimensions")
    given = code_given.astype(bool)[..., None]
    check_codes(jnp.where(given, image_codes, 0), self.config.vq.num_tokens, self.config.vq.codebook_size)
    return jnp.where(given, image_codes, self.vq.encode(images))

  def encode_images(self, images: jax.Array) -> jax.Array:
    """Images [..., h, w, 3] -> projected features [..., tokens_per_image, lm_width]."""
    c = self.config
    if c.vision_input == "vq":
      return self.encode_codes(self.vq.encode(images))
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
               image_codes: Optional[jax.Array] = None,
               code_given: Optional[jax.Array] = None,
               image_embeds: Optional[jax.Array] = None,
               attention_mask: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None,
               cache: Optional[KVCache] = None) -> LMOutput:
    c = self.config
    if image_embeds is not None and (images is not None or image_codes is not None):
      raise ValueError("pass either images / image_codes or image_embeds, not both")
    if image_codes is not None and c.vision_input != "vq":
      raise ValueError(f"image_codes need vision_input='vq'; this VLM's is {c.vision_input!r}")
    if images is not None or image_codes is not None:
      image_embeds = (self.encode_codes(self.codes_of(images, image_codes, code_given))
                      if c.vision_input == "vq" else self.encode_images(images))
    elif self.is_initializing():
      if c.vision_input == "vq":  # every tokenizer parameter, the decoder's too: a tokenizer run's tree
        self.vq(jnp.zeros((1, c.vq.image_size, c.vq.image_size, 3)))
      self.encode_images(jnp.zeros((1, c.vision.image_size, c.vision.image_size, 3)))
    embeds = self.input_embeddings(input_ids, image_embeds)
    return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions,
                   segment_ids=segment_ids, cache=cache)

  def head(self, hidden: jax.Array) -> jax.Array:
    """The decoder's output head (see `DecoderLM.head`)."""
    return self.lm.head(hidden)
