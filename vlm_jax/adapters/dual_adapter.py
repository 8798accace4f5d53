"""DualAdapter (METHODS §5, arXiv 2403.12964): a positive and a negative path, each a text term and a
cache term, fused.

    P⁺ = 100·f·W⁺ᵀ + α·exp(−β(1 − f·Fᵀ))·L̃          positive prompts, the shots' cache,
                                                    refined labels L̃ (K > 1)
    P⁻ = 15·(1 − f·W⁻ᵀ) + α·exp(−β·f·F⁻ᵀ)·L           "a photo without {c}." prompts, the
                                                    negative cache F⁻ (per shot, the mean of
                                                    the other classes' shots)
    logits = λ·P⁺ + (1 − λ)·P⁻

    adapter = dual_adapter.fit(shots)                  # training-free; α, β, λ searched
    adapter = dual_adapter.fit(shots, train=True)      # residuals on W⁺, F (lr 1e-4), W⁻, F⁻
                                                       # (lr 5e-4), AdamW wd 0.1, cosine
    logits = adapter(test_features)

Trained from the α, β, λ of the training-free search (on validation); after training, α, β, λ
are searched again on validation. The refined labels are computed once from the shots' keys.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from vlm_jax.adapters import logits as L
from vlm_jax.adapters import search as search_lib
from vlm_jax.adapters import training
from vlm_jax.adapters.adapter import Adapter
from vlm_jax.adapters.task import Shots

TRAIN = training.TrainConfig(epochs=20, lrs=(("pos", 1e-4), ("neg", 5e-4)), weight_decay=0.1)
GROUPS = {"w_pos": "pos", "keys": "pos", "w_neg": "neg", "neg_keys": "neg"}
DEFAULT_HPARAMS = {"alpha": 1.0, "beta": 1.0, "lam": 0.5}


@jax.jit
def _negative_cache_and_refined_labels(keys):
  """One compiled program (eagerly, each of their dozen ops compiles on first use: ~0.5 s a fit)."""
  return L.negative_cache(keys), L.refine_labels(keys)


def raw_arrays(shots: Shots, refine: bool = True) -> dict:
  """What the residuals are added to: the prompt ensembles, the caches and their labels."""
  keys = np.asarray(shots.keys, np.float32)
  neg_keys, refined = map(np.asarray, _negative_cache_and_refined_labels(keys))
  return {
      "w_pos": shots.w_pos, "w_neg": shots.w_neg, "keys": keys, "neg_keys": neg_keys,
      "pos_labels": refined if refine else np.ones(keys.shape[:2], np.float32),
      "neg_labels": np.ones(keys.shape[:2], np.float32),
  }


def base_arrays(shots: Shots, refine: bool = True) -> dict:
  """The training-free arrays: `raw_arrays` renormalised by the same function as the trained ones
  (`training.effective_arrays`), so that zero residuals give these logits bit for bit."""
  return training.with_zero_residuals(raw_arrays(shots, refine), GROUPS, frozenset(GROUPS))


def fit(shots: Shots, *, train: bool = False, refine: bool = True, search: bool = True,
        grid: search_lib.Grid = search_lib.Grid(), train_config: Optional[training.TrainConfig] = None,
        hparams: Optional[dict] = None) -> Adapter:
  """DualAdapter on a K-shot task; `search` on the task's validation split (else `hparams`)."""
  raw = raw_arrays(shots, refine)
  arrays = training.with_zero_residuals(raw, GROUPS, frozenset(GROUPS))
  hp = {**DEFAULT_HPARAMS, **(hparams or {}), "text_scale": L.TEXT_SCALE, "neg_scale": L.NEG_SCALE}
  info = {"method": "DualAdapter" + ("-F" if train else ""), "k": shots.k, "refine": refine}
  if search:
    found = search_lib.search(arrays, shots.validation, grid, negative=True)
    hp.update(alpha=found["alpha"], beta=found["beta"], lam=found["lam"])
    info["search_training_free"] = found
  if train:
    cfg = train_config or dataclasses.replace(TRAIN, seed=shots.seed)
    arrays, losses = training.train("dual", raw, hp, shots, GROUPS, frozenset(GROUPS), cfg)
    info["loss_first_last"] = [float(losses[0]), float(losses[-1])] if len(losses) else []
    if search:
      found = search_lib.search(arrays, shots.validation, grid, negative=True)
      hp.update(alpha=found["alpha"], beta=found["beta"], lam=found["lam"])
      info["search"] = found
  return Adapter("dual", shots.class_names, arrays, hp, info)
