"""Labelled image data sets for few-shot classification: an image folder, and the shapes world.

    dataset = image_folder("photos/")             # photos/<class name>/*.jpg|png
    dataset = shapes_world(train=1200, validation=480, test=480)

An `ImageDataset` is its class names and named splits of (uint8 images, labels). The split
named "train" is the pool the K shots are drawn from (`task.sample_shots`, by seed);
"validation" is what the hyper-parameter search reads; every other split ("test",
"test/<domain>") is only evaluated.

Image folder layouts:
  root/<class>/*           one folder: each class's images are split by `seed` into
                           validation / test fractions, the rest train
  root/train/<class>/*     explicit splits (validation may be named "val"; test optional);
  root/validation/<class>/*  every split must have the same class names
Bad input: an empty class folder, or a class left with no image, is an error naming it; an
unreadable image is skipped and counted (`dataset.skipped`), never fatal, never silent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from vlm_jax.data import shapes_world as world

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


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

def _read(path: str) -> Optional[np.ndarray]:
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    log.warning("skipping unreadable image %s: %s", path, e)
    return None


def _class_folder(root: str) -> dict:
  """{class name: sorted image paths} of root/<class>/*; an empty class folder is an error."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  if not classes:
    raise ValueError(f"image folder {root!r} has no class sub-folders (expected {root}/<class name>/*.jpg|png)")
  out = {}
  for c in classes:
    files = sorted(os.path.join(root, c, f) for f in os.listdir(os.path.join(root, c))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise ValueError(f"class folder {os.path.join(root, c)!r} is empty: it has no .jpg / .png image")
    out[c] = files
  return out


def _load(files: dict, class_names: Sequence[str], skipped: dict, where: str) -> LabelledImages:
  images, labels = [], []
  for i, c in enumerate(class_names):
    kept = 0
    for path in files[c]:
      im = _read(path)
      if im is None:
        skipped["bad_image"] = skipped.get("bad_image", 0) + 1
        continue
      images.append(im)
      labels.append(i)
      kept += 1
    if not kept:
      raise ValueError(f"class {c!r} has no readable image in {where}")
  return LabelledImages(images, np.asarray(labels))


def image_folder(root: str, *, validation_fraction: float = 0.2, test_fraction: float = 0.2,
                 seed: int = 0) -> ImageDataset:
  """An image folder as a data set (see the module docstring for the layouts)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist")
  subdirs = set(os.listdir(root))
  found = {split: next((d for d in names if d in subdirs), None) for split, names in SPLIT_DIRS.items()}
  skipped: dict = {}
  if found["train"]:
    if not found["validation"]:
      raise ValueError(f"{root!r} has a train/ folder but no validation/ (or val/) folder")
    per_split = {s: _class_folder(os.path.join(root, d)) for s, d in found.items() if d}
    class_names = tuple(per_split["train"])
    for s, files in per_split.items():
      if tuple(files) != class_names:
        raise ValueError(f"the class names of {s!r} differ from train's: "
                         f"{sorted(set(files) ^ set(class_names))[:5]} are in only one of them")
    splits = {s: _load(files, class_names, skipped, os.path.join(root, found[s])) for s, files in per_split.items()}
  else:
    files = _class_folder(root)
    class_names = tuple(files)
    rng = np.random.default_rng([seed, 7])
    parts = {"train": {}, "validation": {}, "test": {}}
    for c, paths in files.items():
      order = [paths[i] for i in rng.permutation(len(paths))]
      n_val = int(round(validation_fraction * len(order)))
      n_test = int(round(test_fraction * len(order)))
      if len(order) - n_val - n_test < 1 or (validation_fraction > 0 and n_val < 1):
        raise ValueError(f"class {c!r} has {len(paths)} image(s): too few to split into train / validation / test "
                         f"({validation_fraction:.0%} / {test_fraction:.0%}); add images or use explicit split folders")
      parts["validation"][c] = order[:n_val]
      parts["test"][c] = order[n_val:n_val + n_test]
      parts["train"][c] = order[n_val + n_test:]
    splits = {s: _load(f, class_names, skipped, f"{root} ({s})") for s, f in parts.items()
              if any(f.values())}
  if skipped:
    log.warning("image folder %s: skipped %s", root, skipped)
  return ImageDataset(class_names, splits, source=f"image_folder:{os.path.abspath(root)}", skipped=skipped)


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
