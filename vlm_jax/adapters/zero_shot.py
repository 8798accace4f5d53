"""Zero-shot classification with the prompt ensemble: CLIP `exp(t)·f·Wᵀ`, SigLIP `exp(t)·f·Wᵀ + b`."""

from __future__ import annotations

from typing import Union

from vlm_jax.adapters.adapter import Adapter
from vlm_jax.adapters.task import Features, Shots


def fit(source: Union[Shots, Features]) -> Adapter:
  """The zero-shot classifier of the model's own logit scale (and bias, for SigLIP)."""
  hparams = {"scale": source.logit_scale}
  if source.logit_bias is not None:
    hparams["bias"] = source.logit_bias
  return Adapter("zero_shot", source.class_names, {"w_pos": source.w_pos}, hparams, {"method": "zero-shot"})
