"""Tip-Adapter (training-free) and Tip-Adapter-F (learnable cache keys): the baseline of METHODS §5.

    logits = 100·f·Wᵀ + α·exp(−β(1 − f·Fᵀ))·L

    adapter = tip_adapter.fit(shots)               # training-free; α, β searched on validation
    adapter = tip_adapter.fit(shots, train=True)   # Tip-Adapter-F
    logits = adapter(test_features)

Tip-Adapter-F trains the keys (AdamW lr 1e-3, eps 1e-4, weight decay 0.01, cosine, as the
reference) starting from the α, β of the training-free search, then searches α, β again.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from vlm_jax.adapters import logits as L
from vlm_jax.adapters import search as search_lib
from vlm_jax.adapters import training
from vlm_jax.adapters.adapter import Adapter
from vlm_jax.adapters.task import Shots

TRAIN = training.TrainConfig(epochs=20, lrs=(("pos", 1e-3),), weight_decay=0.01, eps=1e-4)
DEFAULT_HPARAMS = {"alpha": 1.0, "beta": 1.0}


def base_arrays(shots: Shots) -> dict:
  return {"w_pos": shots.w_pos, "keys": shots.keys, "pos_labels": np.ones(shots.keys.shape[:2], np.float32)}


def fit(shots: Shots, *, train: bool = False, search: bool = True, grid: search_lib.Grid = search_lib.Grid(),
        train_config: Optional[training.TrainConfig] = None, hparams: Optional[dict] = None) -> Adapter:
  """Tip-Adapter(-F) on a K-shot task; `search` on the task's validation split (else `hparams`)."""
  arrays = base_arrays(shots)
  hp = {**DEFAULT_HPARAMS, **(hparams or {}), "text_scale": L.TEXT_SCALE}
  info = {"method": "Tip-Adapter-F" if train else "Tip-Adapter", "k": shots.k}
  if search:
    found = search_lib.search(arrays, shots.validation, grid, negative=False)
    hp.update(alpha=found["alpha"], beta=found["beta"])
    info["search_training_free"] = found
  if train:
    cfg = train_config or dataclasses.replace(TRAIN, seed=shots.seed)
    arrays, losses = training.train("tip", arrays, hp, shots, {"keys": "pos"}, frozenset(), cfg)
    info["loss_first_last"] = [float(losses[0]), float(losses[-1])] if len(losses) else []
    if search:
      found = search_lib.search(arrays, shots.validation, grid, negative=False)
      hp.update(alpha=found["alpha"], beta=found["beta"])
      info["search"] = found
  return Adapter("tip", shots.class_names, arrays, hp, info)
