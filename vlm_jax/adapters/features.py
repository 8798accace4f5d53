"""Features, once: image features of a labelled data set and text features of prompt templates
through any two-tower model, written to disk keyed by model + data + augmentation, and reused.

    encoder = Encoder(model, params, tokenize)            # or Encoder.from_hf(folder)
    features = extract(encoder, dataset, views=10, cache="features.npz")

Images: resized / centre-cropped to the tower's size and normalised (`data.preprocess`); the
training pool is also seen through `views` augmented views (random resized crop, scale
(0.5, 1), ratio (3/4, 4/3), bicubic, then a horizontal flip with p = 0.5: the reference's
torchvision transform), each view's feature kept (the learnable adapters train on them) and
their mean renormalised as the cache key. `views=1` is the plain image, no augmentation.
Every forward pass is one jitted function, its batch sharded over the mesh's batch axes.

Text: each class name (underscores read as spaces) in every template, each embedding
normalised, averaged over the templates and renormalised: W⁺ from `templates`, W⁻ from
`negative_templates`. A template must contain "{}".

The cache (an npz with a JSON key) holds everything `Features` holds. It is reused when its
key equals this run's; a cache of another model, other data (class names named apart),
other augmentation or templates is refused with `CacheMismatch`, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from vlm_jax.adapters.data import ImageDataset
from vlm_jax.adapters.task import Features, Split
from vlm_jax.data.preprocess import normalize, preprocess_image, NORMALIZATIONS
from vlm_jax.interop import from_hf
from vlm_jax.parallel.mesh import DEFAULT_RULES, batch_sharding

log = logging.getLogger(__name__)

TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a {}.", "a photo of the {}.")
NEGATIVE_TEMPLATES = ("a photo without {}.", "a photo of no {}.")
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CACHE_FORMAT = "vlm_jax.adapters.features/1"

Tokenize = Callable[[Sequence[str]], tuple]  # texts -> (input_ids [N, L] int, attention_mask [N, L] or None)


class CacheMismatch(ValueError):
  """A feature cache that was made for another model, data set, augmentation or prompts."""


def check_templates(templates: Sequence[str], what: str = "template") -> tuple:
  templates = tuple(templates)
  if not templates:
    raise ValueError(f"no {what}s given")
  for t in templates:
    if not isinstance(t, str) or "{}" not in t:
      raise ValueError(f"prompt {what} {t!r} has no '{{}}' where the class name goes")
  return templates


def prompt_name(class_name: str) -> str:
  return class_name.replace("_", " ")


# ----------------------------------------------------------------------------- the encoder

class Encoder:
  """A two-tower model as two jitted functions: images -> [N, D] and texts -> [N, D], L2-normalised."""

  def __init__(self, model: nn.Module, params, tokenize: Tokenize, *, image_size: Optional[int] = None,
               normalization: Optional[str] = None, resize: str = "crop", mesh=None, rules=DEFAULT_RULES,
               batch_size: int = 64, name: str = ""):
    self.model, self.params, self.tokenize = model, params, tokenize
    style = model.config.style
    self.style = style
    self.image_size = int(image_size or model.config.vision.image_size)
    self.normalization = normalization or ("siglip" if style == "siglip" else "clip")
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"unknown normalization {self.normalization!r}")
    self.resize, self.mesh, self.rules = resize, mesh, rules
    self.batch_size = int(batch_size)
    self.name = name
    self._fingerprint = None
    self._images = jax.jit(lambda p, x: model.apply({"params": p}, x, method=type(model).embed_images))
    self._texts = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method=type(model).embed_texts))

  @classmethod
  def from_hf(cls, folder: str, **kw) -> "Encoder":
    """A Hugging Face CLIPModel / SiglipModel folder (weights, config and tokenizer)."""
    model, params = from_hf(folder)
    return cls(model, params, hf_tokenizer(folder, model.config.text.max_len, model.config.style),
               name=kw.pop("name", os.path.abspath(folder)), **kw)

  @property
  def logit_scale(self) -> float:
    return float(np.exp(np.asarray(self.params["logit_scale"])))

  @property
  def logit_bias(self) -> Optional[float]:
    return float(np.asarray(self.params["logit_bias"])) if "logit_bias" in self.params else None

  @property
  def fingerprint(self) -> str:
    """A digest of the model's config and every parameter's bytes."""
    if self._fingerprint is None:
      h = hashlib.blake2b(repr(self.model.config).encode(), digest_size=12)
      flat = jax.tree_util.tree_flatten_with_path(self.params)[0]
      for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
      self._fingerprint = h.hexdigest()
    return self._fingerprint

  def _run(self, fn, *arrays) -> np.ndarray:
    """fn(params, *batch) over `batch_size` chunks, each padded to the mesh's batch multiple."""
    n = arrays[0].shape[0]
    if n == 0:
      raise ValueError("no inputs to embed")
    shards = 1
    sharding = None
    if self.mesh is not None:
      sharding = batch_sharding(self.mesh, self.rules)
      axes = sharding.spec[0] if len(sharding.spec) else None
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      shards = math.prod(self.mesh.shape[a] for a in axes)
    size = max(shards, -(-min(self.batch_size, n) // shards) * shards)
    out = []
    for start in range(0, n, size):
      chunk = [a[start:start + size] for a in arrays]
      m = chunk[0].shape[0]
      if m < size:
        chunk = [np.concatenate([c, np.repeat(c[-1:], size - m, axis=0)]) for c in chunk]
      if sharding is not None:
        chunk = [jax.device_put(c, sharding) for c in chunk]
        with jax.set_mesh(self.mesh), nn.logical_axis_rules([tuple(r) for r in self.rules]):
          y = fn(self.params, *chunk)
      else:
        y = fn(self.params, *chunk)
      out.append(np.asarray(jax.device_get(y), np.float32)[:m])
    return np.concatenate(out)

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    return preprocess_image(image, self.image_size, self.resize, self.normalization)

  def augment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return augment(image, rng, self.image_size, self.normalization)

  def image_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 images (any size) -> [N, D]."""
    return self._run(self._images, np.stack([self.preprocess(im) for im in images]))

  def pixel_features(self, pixels: np.ndarray) -> np.ndarray:
    """Already preprocessed float32 [N, size, size, 3] -> [N, D]."""
    return self._run(self._images, np.asarray(pixels, np.float32))

  def text_features(self, texts: Sequence[str]) -> np.ndarray:
    ids, mask = self.tokenize(list(texts))
    ids = np.asarray(ids, np.int32)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
    return self._run(self._texts, ids, mask)

  def class_weights(self, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """[C, D]: per class, the normalised template embeddings averaged and renormalised."""
    templates = check_templates(templates)
    texts = [t.replace("{}", prompt_name(c)) for c in class_names for t in templates]
    e = self.text_features(texts).reshape(len(class_names), len(templates), -1)
    w = e.mean(axis=1)
    return (w / np.linalg.norm(w, axis=-1, keepdims=True)).astype(np.float32)


def hf_tokenizer(folder: str, max_len: int, style: str) -> Tokenize:
  import transformers  # heavy and optional: only Hugging Face folders need it
  tok = transformers.AutoTokenizer.from_pretrained(folder)

  def tokenize(texts):
    enc = tok(list(texts), padding="max_length", max_length=max_len, truncation=True, return_tensors="np")
    mask = enc.get("attention_mask")
    return enc["input_ids"], (None if style == "siglip" else mask)
  return tokenize


def augment(image: np.ndarray, rng: np.random.Generator, size: int, normalization: str = "clip",
            scale=CROP_SCALE, ratio=CROP_RATIO) -> np.ndarray:
  """torchvision's RandomResizedCrop(size, scale, ratio, bicubic) + RandomHorizontalFlip, normalised."""
  im = Image.fromarray(np.asarray(image, np.uint8), "RGB")
  w, h = im.size
  area = w * h
  box = None
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      box = (left, top, left + cw, top + ch)
      break
  if box is None:  # torchvision's fallback: a centre crop of the clamped ratio
    r = w / h
    cw, ch = (w, int(round(w / ratio[0]))) if r < ratio[0] else ((int(round(h * ratio[1])), h) if r > ratio[1]
                                                                  else (w, h))
    left, top = (w - cw) // 2, (h - ch) // 2
    box = (left, top, left + cw, top + ch)
  im = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
  a = np.asarray(im)
  if rng.uniform() < 0.5:
    a = a[:, ::-1]
  mean, std = NORMALIZATIONS[normalization]
  return normalize(np.ascontiguousarray(a), mean, std)


# ----------------------------------------------------------------------------- extraction and the cache

def cache_key(encoder: Encoder, dataset: ImageDataset, views: int, seed: int, templates, negative_templates) -> dict:
  return {
      "format": CACHE_FORMAT,
      "model": {"fingerprint": encoder.fingerprint, "name": encoder.name},
      "data": {"fingerprint": dataset.fingerprint(), "source": dataset.source},
      "class_names": list(dataset.class_names),
      "augmentation": {"views": int(views), "seed": int(seed), "scale": list(CROP_SCALE), "ratio": list(CROP_RATIO),
                       "image_size": encoder.image_size, "resize": encoder.resize,
                       "normalization": encoder.normalization},
      "templates": {"positive": list(templates), "negative": list(negative_templates)},
  }


def _mismatch(stored: dict, key: dict) -> Optional[str]:
  if stored.get("format") != key["format"]:
    return f"it is not a feature cache of this version (format {stored.get('format')!r})"
  if stored["class_names"] != key["class_names"]:
    only_cache = [c for c in stored["class_names"] if c not in key["class_names"]]
    only_data = [c for c in key["class_names"] if c not in stored["class_names"]]
    return (f"its class names differ from the data's (only in the cache: {only_cache[:5]}, only in the data: "
            f"{only_data[:5]}{'' if only_cache or only_data else ', or another order'})")
  if stored["model"]["fingerprint"] != key["model"]["fingerprint"]:
    old, new = stored["model"]["name"] or "unnamed", key["model"]["name"] or "unnamed"
    if old == new:  # same folder or run: retrained, or its config gained or changed a field
      return (f"it was made with another model of the same name ({new}): the digest of its config and "
              f"parameters differs")
    return f"it was made with another model ({old}), not this one ({new})"
  if stored["data"]["fingerprint"] != key["data"]["fingerprint"]:
    return f"it was made from other data ({stored['data']['source']}), not this data set ({key['data']['source']})"
  for part in ("augmentation", "templates"):
    if stored[part] != key[part]:
      return f"its {part} differ: cache {stored[part]}, this run {key[part]}"
  return None


def _write(path: str, key: dict, arrays: dict) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
  with os.fdopen(fd, "wb") as f:
    np.savez(f, key=np.array(json.dumps(key, sort_keys=True)), **arrays)
  os.replace(tmp, path)


def read_cache_key(path: str) -> dict:
  with np.load(path, allow_pickle=False) as z:
    return json.loads(str(z["key"]))


def extract(encoder: Encoder, dataset: ImageDataset, *, templates: Sequence[str] = TEMPLATES,
            negative_templates: Sequence[str] = NEGATIVE_TEMPLATES, views: int = 10, seed: int = 0,
            cache: Optional[str] = None, train_split: str = "train") -> Features:
  """The features of `dataset` (its `train_split` is the shot pool; every other split plain).

  With `cache`: reused when its key is this run's, refused (`CacheMismatch`) when it is
  another's, written when absent. `features.meta["cache"]` says which ("reused" / "written").
  """
  templates = check_templates(templates)
  negative_templates = check_templates(negative_templates, "negative template")
  if views < 1:
    raise ValueError(f"views must be >= 1, got {views}")
  if train_split not in dataset.splits:
    raise ValueError(f"the data set has no {train_split!r} split; it has {sorted(dataset.splits)}")
  key = cache_key(encoder, dataset, views, seed, templates, negative_templates)
  if cache and os.path.exists(cache):
    stored = read_cache_key(cache)
    why = _mismatch(stored, key)
    if why:
      raise CacheMismatch(f"refusing the feature cache {cache!r}: {why}. Delete it or choose another cache path.")
    with np.load(cache, allow_pickle=False) as z:
      arrays = {n: z[n] for n in z.files if n != "key"}
    log.info("features: reused the cache %s", cache)
    return _features(dataset, arrays, key, "reused")

  arrays = {}
  train = dataset.splits[train_split]
  if views == 1:
    arrays["train_views"] = encoder.image_features(train.images)[None]
  else:
    rng = np.random.default_rng([seed, 31337])
    per_view = []
    for _ in range(views):
      pixels = np.stack([encoder.augment(im, rng) for im in train.images])
      per_view.append(encoder.pixel_features(pixels))
    arrays["train_views"] = np.stack(per_view)
  arrays["train_labels"] = train.labels.astype(np.int32)
  for name, split in dataset.splits.items():
    if name != train_split:
      arrays[f"split/{name}/x"] = encoder.image_features(split.images)
      arrays[f"split/{name}/y"] = split.labels.astype(np.int32)
  arrays["w_pos"] = encoder.class_weights(dataset.class_names, templates)
  arrays["w_neg"] = encoder.class_weights(dataset.class_names, negative_templates)
  arrays["logit_scale"] = np.float32(encoder.logit_scale)
  if encoder.logit_bias is not None:
    arrays["logit_bias"] = np.float32(encoder.logit_bias)
  if cache:
    _write(cache, key, arrays)
    log.info("features: wrote the cache %s", cache)
  return _features(dataset, arrays, key, "written" if cache else "none")


def _features(dataset: ImageDataset, arrays: dict, key: dict, how: str) -> Features:
  splits = {}
  for n in arrays:
    if n.startswith("split/") and n.endswith("/x"):
      name = n[len("split/"):-len("/x")]
      splits[name] = Split(arrays[n], arrays[f"split/{name}/y"], name)
  return Features(class_names=tuple(dataset.class_names), train_views=arrays["train_views"],
                  train_labels=arrays["train_labels"], w_pos=arrays["w_pos"], w_neg=arrays["w_neg"],
                  logit_scale=float(arrays["logit_scale"]),
                  logit_bias=float(arrays["logit_bias"]) if "logit_bias" in arrays else None,
                  splits=splits, meta={"cache": how, "key": key, "skipped": dict(dataset.skipped)})
