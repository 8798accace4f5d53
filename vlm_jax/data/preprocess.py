"""Image decoding and preprocessing for the vision towers (host-side NumPy + PIL).

    img = decode_image(png_or_jpeg_bytes)                # uint8 [h, w, 3] RGB
    x = preprocess_image(img, 336, mode="pad", normalization="clip")  # float32 [336, 336, 3]

Modes (all resample with PIL bicubic, as the Hugging Face CLIP / SigLIP image
processors do):
  resize  stretch to size x size (SigLIP; LLaVA's "resize" aspect mode)
  pad     pad to a square with the mean colour, centred, then resize
          (LLaVA-1.5's `expand2square` with `image_mean`)
  crop    resize the shorter side to `size`, then centre-crop (the CLIP processor)
Normalisation: (x / 255 - mean) / std with
  clip    mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258, 0.27577711)
  siglip  mean = std = (0.5, 0.5, 0.5), i.e. values in [-1, 1]

An image that cannot be decoded raises `BadRecord("undecodable_image")`, an empty
one `BadRecord("missing_image")`; the input pipeline skips and counts such records.
"""

from __future__ import annotations

import io
from typing import Union

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}
MODES = ("resize", "pad", "crop")
# Larger decoded images than this are refused (decompression bombs, corrupt headers).
MAX_PIXELS = 1 << 28


class BadRecord(Exception):
  """A data record that must be skipped (never trained on); `reason` is the count key."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


def decode_image(data: Union[bytes, bytearray, memoryview, np.ndarray, Image.Image]) -> np.ndarray:
  """Encoded bytes (PNG, JPEG, ...), a PIL image or an array -> uint8 [h, w, 3] RGB.

  Grey images are repeated to 3 channels, alpha is dropped (composited on
  nothing: the colour channels are kept), 16-bit and float arrays are brought to
  uint8. Raises BadRecord("missing_image") for empty input and
  BadRecord("undecodable_image") for anything PIL cannot read.
  """
  if data is None:
    raise BadRecord("missing_image", "image is None")
  if isinstance(data, Image.Image):
    return _pil_to_rgb(data)
  if isinstance(data, np.ndarray) and data.dtype != object and data.dtype.kind != "S":
    return _array_to_rgb(data)
  if isinstance(data, np.ndarray):  # a 0-d bytes array
    data = data.item()
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise BadRecord("undecodable_image", f"unsupported image type {type(data).__name__}")
  if len(data) == 0:
    raise BadRecord("missing_image", "empty image bytes")
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.width * im.height > MAX_PIXELS:
        raise BadRecord("undecodable_image", f"image of {im.width}x{im.height} pixels is too large")
      im.load()
      return _pil_to_rgb(im)
  except BadRecord:
    raise
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
    raise BadRecord("undecodable_image", f"{type(e).__name__}: {e}") from None


def _pil_to_rgb(im) -> np.ndarray:
  if im.width == 0 or im.height == 0:
    raise BadRecord("missing_image", "image has zero size")
  if im.mode != "RGB":
    im = im.convert("RGB")
  return np.asarray(im, dtype=np.uint8)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
  if a.size == 0:
    raise BadRecord("missing_image", f"image array of shape {a.shape}")
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise BadRecord("undecodable_image", f"image array of shape {a.shape} is not [h, w, 1|3|4]")
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  elif a.shape[-1] == 4:
    a = a[..., :3]
  if a.dtype == np.uint8:
    return np.ascontiguousarray(a)
  if a.dtype == np.uint16:
    return (a >> 8).astype(np.uint8)
  if a.dtype.kind == "f":  # assumed in [0, 1]
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
  return np.clip(a, 0, 255).astype(np.uint8)


def preprocess_image(img: np.ndarray, size: int, mode: str = "resize",
                     normalization: str = "clip") -> np.ndarray:
  """uint8 [h, w, 3] -> normalised float32 [size, size, 3] (see the module docstring)."""
  if mode not in MODES:
    raise ValueError(f"unknown resize mode {mode!r}; one of {MODES}")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"unknown normalization {normalization!r}; one of {tuple(NORMALIZATIONS)}")
  mean, std = NORMALIZATIONS[normalization]
  img = _array_to_rgb(np.asarray(img))
  if img.shape[:2] == (size, size):  # already square at the right size: every mode is the identity
    return normalize(img, mean, std)
  im = Image.fromarray(img, "RGB")
  if mode == "pad":
    im = _expand_to_square(im, tuple(int(m * 255) for m in mean))
  elif mode == "crop":
    im = _resize_shorter_and_crop(im, size)
  if im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.BICUBIC)
  return normalize(np.asarray(im), mean, std)


def normalize(img_uint8: np.ndarray, mean, std) -> np.ndarray:
  """(x / 255 - mean) / std in float32, as one multiply-add."""
  scale = (1.0 / (255.0 * np.asarray(std, np.float64))).astype(np.float32)
  offset = (-np.asarray(mean, np.float64) / np.asarray(std, np.float64)).astype(np.float32)
  out = img_uint8.astype(np.float32)
  out *= scale
  out += offset
  return out


def _expand_to_square(im, fill):
  """LLaVA's expand2square: the image centred on a square canvas of colour `fill`."""
  w, h = im.size
  if w == h:
    return im
  side = max(w, h)
  canvas = Image.new("RGB", (side, side), fill)
  canvas.paste(im, ((side - w) // 2, (side - h) // 2))
  return canvas


def _resize_shorter_and_crop(im, size: int):
  w, h = im.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  if (nw, nh) != (w, h):
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  return im.crop((left, top, left + size, top + size))


def load_and_preprocess(data, size: int, mode: str = "resize", normalization: str = "clip") -> np.ndarray:
  """decode_image then preprocess_image."""
  return preprocess_image(decode_image(data), size, mode, normalization)
