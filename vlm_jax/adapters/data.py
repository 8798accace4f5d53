"""Labelled image data sets for few-shot classification: an image folder, and the shapes world.

    dataset = image_folder("photos/", data_dir="tfds/")   # photos/<class name>/*.jpg|png
    dataset = shapes_world(train=1200, validation=480, test=480)

An `ImageDataset` is its class names and named splits of (uint8 images, labels). The split
named "train" is the pool the K shots are drawn from (`task.sample_shots`, by seed);
"validation" is what the hyper-parameter search reads; every other split ("test",
"test/<domain>") is only evaluated.

An image folder is read through its TFDS builder (`vlm_jax.data.builders.ImageFolder`, prepared
once under `data_dir` and reused; its layouts are there: root/<class>/* split by `seed` into
validation / test fractions, or root/{train,val,test}/<class>/*). Bad input: an empty class
folder, split folders whose class names differ, or a class left with no readable image in a
split is an error naming it; an unreadable image is skipped and counted (`dataset.skipped`),
never fatal, never silent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Optional, Sequence

import numpy as np

from vlm_jax.data import shapes_world as world
from vlm_jax.data import sources
from vlm_jax.data.preprocess import decode_image

log = logging.getLogger(__name__)

@dataclasses.dataclass
class LabelledImages:
  images: list  # uint8 [h, w, 3] arrays
  labels: np.ndarray  # [N] int

  def __post_init__(self):
    self.labels = np.asarray(self.labels, np.int32)
    if len(self.images) != len(self.labels):
      raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")


@dataclasses.dataclass
class ImageDataset:
  class_names: tuple
  splits: dict  # name -> LabelledImages
  source: str = ""
  skipped: dict = dataclasses.field(default_factory=dict)

  def fingerprint(self) -> str:
    """A digest of the class names, and every split's labels and image bytes."""
    h = hashlib.blake2b("\n".join(self.class_names).encode(), digest_size=12)
    for name in sorted(self.splits):
      s = self.splits[name]
      h.update(name.encode() + s.labels.tobytes())
      for im in s.images:
        a = np.ascontiguousarray(im)
        h.update(str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- image folders

def image_folder(root: str, *, data_dir: Optional[str] = None, validation_fraction: float = 0.2,
                 test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
  """An image folder as a data set, through its TFDS builder (see the module docstring);
  data_dir: where TFDS keeps the prepared data set (None: its default)."""
  from vlm_jax.data import builders  # heavy (imports TFDS, TensorFlow): only image folders need it
  builder = builders.build_image_folder(root, data_dir, validation_fraction, test_fraction, seed)
  class_names = tuple(builder.builder_config.class_names)
  splits = {}
  for name in builder.builder_config.files:
    records = sources.open_source(sources.Source(name=builder.name, split=name, builder=builder))
    images, labels = [], []
    for i in range(len(records)):
      r = records[i]
      images.append(decode_image(r["images"][0]))
      labels.append(json.loads(r["meta"])["label"])
    missing = sorted(set(range(len(class_names))) - set(labels))
    if missing:
      raise ValueError(f"class {class_names[missing[0]]!r} has no readable image in split {name!r} of {root!r} "
                       f"(skipped: {builders.skipped_counts(builder)})")
    splits[name] = LabelledImages(images, np.asarray(labels))
  skipped = builders.skipped_counts(builder)
  if skipped:
    log.warning("image folder %s: skipped %s", root, skipped)
  return ImageDataset(class_names, splits, source=f"image_folder:{builder.builder_config.root}", skipped=skipped)


# ----------------------------------------------------------------------------- the shapes world

def shapes_world(train: int = 1200, validation: int = 480, test: int = 480, *, domains: Sequence[str] = world.DOMAINS,
                 seed: int = 0, image_size: int = 64) -> ImageDataset:
  """The shapes world's 24 single-object classes (colour × shape): the train pool, validation and
  test in the standard rendering, and "test/<domain>" for every other rendering domain (the same
  test scenes, drawn as outlines, in another palette, with noise)."""
  bad = [d for d in domains if d not in world.DOMAINS]
  if bad:
    raise ValueError(f"unknown domain(s) {bad}; known: {world.DOMAINS}")

  def split(name, num, domain="standard"):
    images, labels = [], []
    for r in world.records("classes", name, num, seed=seed, image_size=image_size, domain=domain):
      images.append(r["images"][0])
      labels.append(json.loads(r["meta"])["label"])
    return LabelledImages(images, np.asarray(labels))

  splits = {"train": split("train", train), "validation": split("validation", validation),
            "test": split("test", test)}
  for d in domains:
    if d != "standard":
      splits[f"test/{d}"] = split("test", test, d)
  return ImageDataset(world.CLASS_NAMES, splits,
                      source=f"shapes_world:seed={seed},size={image_size},n={train}/{validation}/{test}")
