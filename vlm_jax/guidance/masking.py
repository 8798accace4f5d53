"""The contrast branch's input: the regions of interest blacked out.

Boxes are `[x0, y0, x1, y1]`, inclusive pixel corners in the coordinates of the image
they are drawn on (the shapes world writes them so). Two ways to hide a region:

  pixel  (the default) every box is set to black in pixel space, before the vision
         tower: the image the contrast branch sees is an ordinary image. This is
         CRG's rule, it needs nothing from the tower or the projector, and it removes
         the region for real: the tower's self-attention cannot carry the region's
         content into other patches, because the region is not in the input at all.
  tokens (option) the image is encoded once, and the features of every patch that
         touches a box are replaced by the features a black image has at that patch.
         Cheaper when one image is contrasted with many regions (one tower pass), but
         leaky: every other patch token has already attended to the region inside the
         tower. Needs one LM token per patch (projectors that keep the patch grid).
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.data.preprocess import NORMALIZATIONS, normalize
from vlm_jax.models.vlm import VLM

MODES = ("pixel", "tokens")


def black_pixel(normalization: str) -> np.ndarray:
  """The value a black (0, 0, 0) pixel has after the model's normalisation, float32 [3]."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"unknown normalization {normalization!r}; one of {tuple(NORMALIZATIONS)}")
  return normalize(np.zeros((1, 1, 3), np.uint8), *NORMALIZATIONS[normalization])[0, 0]


def check_box(box, height: int, width: int, where: str = "") -> tuple[int, int, int, int]:
  """The box as four ints; a clear error when it is malformed or leaves the image."""
  if len(box) != 4:
    raise ValueError(f"box {list(box)}{where} must be [x0, y0, x1, y1]")
  x0, y0, x1, y1 = (int(v) for v in box)
  if [x0, y0, x1, y1] != [float(v) for v in box]:
    raise ValueError(f"box {list(box)}{where} must hold whole pixel coordinates")
  if not (0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height):
    raise ValueError(f"box {list(box)}{where} is outside the {width}x{height} image "
                     f"(inclusive corners, 0 <= x0 <= x1 <= {width - 1}, 0 <= y0 <= y1 <= {height - 1})")
  return x0, y0, x1, y1


def region_mask(boxes: Sequence, height: int, width: int, where: str = "") -> np.ndarray:
  """bool [height, width]: True inside any of `boxes` (an empty list masks nothing)."""
  mask = np.zeros((height, width), bool)
  for k, box in enumerate(boxes):
    x0, y0, x1, y1 = check_box(box, height, width, f"{where} (box {k})")
    mask[y0:y1 + 1, x0:x1 + 1] = True
  return mask


def region_masks(boxes: Sequence, lead: tuple, height: int, width: int) -> np.ndarray:
  """bool [*lead, height, width] from boxes nested like the images' leading axes.

  lead (n,): boxes[i] lists image i's boxes; lead (b, m): boxes[r][j] lists the boxes of
  row r's image j (a row may list fewer images than m, or none: the rest are unmasked).
  """
  out = np.zeros((*lead, height, width), bool)
  if len(boxes) > lead[0]:
    raise ValueError(f"boxes for {len(boxes)} {'rows' if len(lead) == 2 else 'images'}, "
                     f"but the images hold {lead[0]}")
  for i, per in enumerate(boxes):
    if len(lead) == 1:
      out[i] = region_mask(per, height, width, f" of image {i}")
      continue
    if len(per) > lead[1]:
      raise ValueError(f"row {i} gives boxes for {len(per)} images, but a row holds {lead[1]} image slots")
    for j, image_boxes in enumerate(per):
      out[i, j] = region_mask(image_boxes, height, width, f" of row {i}, image {j}")
  return out


def black_out(images, boxes: Sequence, value=0) -> np.ndarray:
  """A copy of one image [h, w, c] (uint8 or normalised) with every box set to `value`."""
  images = np.asarray(images)
  out = images.copy()
  out[region_mask(boxes, *images.shape[:2])] = value
  return out


def mask_pixels(images: jax.Array, masks, black) -> jax.Array:
  """images [..., h, w, 3] (normalised) with the pixels of `masks` [..., h, w] set to `black` [3]."""
  return jnp.where(jnp.asarray(masks)[..., None], jnp.asarray(black, images.dtype), images)


def patch_token_mask(masks: np.ndarray, patch_size: int) -> np.ndarray:
  """bool [..., tokens]: which patches (row-major, as the tower lays them out) touch a masked pixel."""
  *lead, h, w = masks.shape
  g_h, g_w = h // patch_size, w // patch_size
  cut = masks[..., :g_h * patch_size, :g_w * patch_size]
  grid = cut.reshape(*lead, g_h, patch_size, g_w, patch_size).any(axis=(-3, -1))
  return grid.reshape(*lead, g_h * g_w)


def encode(model: VLM, params, images: jax.Array) -> jax.Array:
  """Projected image features [..., tokens, lm_width] (the public `VLM.encode_images`)."""
  return model.apply({"params": params}, images, method=VLM.encode_images)


def mask_tokens(model: VLM, params, images: jax.Array, masks: np.ndarray, black,
                embeds: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """(features of `images`, the same with masked patches' features replaced by a black image's)."""
  c = model.config
  grid = (c.vision.image_size // c.vision.patch_size) ** 2
  if c.tokens_per_image != grid:
    raise ValueError(f"token masking needs one LM token per patch; this model has {c.tokens_per_image} "
                     f"tokens per image for {grid} patches (projector {c.projector!r}): use mode='pixel'")
  if embeds is None:
    embeds = encode(model, params, images)
  s = c.vision.image_size
  black_embeds = encode(model, params, jnp.broadcast_to(jnp.asarray(black, images.dtype), (1, s, s, 3)))[0]
  tokens = jnp.asarray(patch_token_mask(np.asarray(masks), c.vision.patch_size))
  return embeds, jnp.where(tokens[..., None], black_embeds.astype(embeds.dtype), embeds)
