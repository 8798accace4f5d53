"""What the classifiers see: labelled feature splits, the extracted features of a data set, and a
K-shot task sampled from them.

    Split      one labelled split as features: x [N, D] (L2-normalised), y [N], its name
    Features   everything `features.extract` computes once per (model, data, augmentation):
               the training pool's augmented views, the text weights, the evaluation splits
    Shots      a K-shot task: the cache (keys [C, K, D], their views), the text weights and the
               VALIDATION split, nothing else. Every `fit` and every search takes a `Shots` (or a
               validation `Split`), so no fitting code can reach a test split: the test splits
               stay in `Features.splits` and are only read by `evaluate` at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

VALIDATION = "validation"


@dataclasses.dataclass(frozen=True)
class Split:
  x: np.ndarray  # [N, D] float32, L2-normalised
  y: np.ndarray  # [N] int32
  name: str

  def __post_init__(self):
    if self.x.ndim != 2 or self.y.shape != (self.x.shape[0],):
      raise ValueError(f"split {self.name!r}: features {self.x.shape} and labels {self.y.shape} do not match")

  def __len__(self) -> int:
    return int(self.x.shape[0])


@dataclasses.dataclass(frozen=True)
class Features:
  """The extracted features of a data set (see `vlm_jax.adapters.features.extract`)."""
  class_names: tuple
  train_views: np.ndarray  # [V, N, D]: each augmented view's normalised feature
  train_labels: np.ndarray  # [N]
  w_pos: np.ndarray  # [C, D] positive prompt ensemble
  w_neg: np.ndarray  # [C, D] negative prompt ensemble
  logit_scale: float  # exp(the model's logit_scale)
  logit_bias: Optional[float]  # SigLIP's bias; None for CLIP
  splits: dict  # name -> Split ("validation", "test", "test/<domain>", ...)
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def validation(self) -> Split:
    if VALIDATION not in self.splits:
      raise KeyError(f"the features have no {VALIDATION!r} split; they have {sorted(self.splits)}")
    return self.splits[VALIDATION]

  def train_keys(self) -> np.ndarray:
    """[N, D]: each training image's views averaged and renormalised."""
    m = self.train_views.mean(axis=0)
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Shots:
  """A K-shot task: the cache of C·K shots, the text weights and the validation split only."""
  class_names: tuple
  keys: np.ndarray  # [C, K, D]: views averaged, renormalised
  views: np.ndarray  # [V, C, K, D]: the training samples of the learnable adapters
  w_pos: np.ndarray
  w_neg: np.ndarray
  logit_scale: float
  logit_bias: Optional[float]
  validation: Split
  true_labels: np.ndarray  # [C, K]: the class each shot's image really shows (≠ c where mislabelled)
  seed: int = 0

  @property
  def num_classes(self) -> int:
    return self.keys.shape[0]

  @property
  def k(self) -> int:
    return self.keys.shape[1]


def sample_shots(features: Features, k: int, seed: int = 0, noise: float = 0.0) -> Shots:
  """K training images per class, chosen by `seed`; `noise` (0-1) of the C·K shot slots, chosen by
  `seed`, hold an image of another class instead (mislabelled shots, as the paper's noisy setting).

  Raises ValueError when a class has fewer than K training images.
  """
  if k < 1:
    raise ValueError(f"K must be >= 1, got {k}")
  if not 0.0 <= noise < 1.0:
    raise ValueError(f"noise must be in [0, 1), got {noise}")
  names, labels = features.class_names, features.train_labels
  c = len(names)
  rng = np.random.default_rng([seed, k, 1729])
  chosen = np.zeros((c, k), np.int64)
  for i, name in enumerate(names):
    pool = np.flatnonzero(labels == i)
    if len(pool) < k:
      raise ValueError(f"class {name!r} has {len(pool)} training image(s), fewer than K={k}")
    chosen[i] = rng.choice(pool, size=k, replace=False)
  true = np.repeat(np.arange(c)[:, None], k, axis=1)
  n_noisy = int(round(noise * c * k))
  if n_noisy:
    used = set(chosen.ravel().tolist())
    for slot in rng.choice(c * k, size=n_noisy, replace=False):
      ci, ki = divmod(int(slot), k)
      other = int(rng.choice([j for j in range(c) if j != ci]))
      pool = [p for p in np.flatnonzero(labels == other) if p not in used]
      if not pool:
        raise ValueError(f"class {names[other]!r} has too few training images to mislabel a shot")
      pick = int(rng.choice(pool))
      used.add(pick)
      chosen[ci, ki], true[ci, ki] = pick, other
  views = features.train_views[:, chosen]  # [V, C, K, D]
  mean = views.mean(axis=0)
  keys = (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)
  return Shots(class_names=tuple(names), keys=keys, views=views.astype(np.float32), w_pos=features.w_pos,
               w_neg=features.w_neg, logit_scale=features.logit_scale, logit_bias=features.logit_bias,
               validation=features.validation, true_labels=true, seed=seed)
