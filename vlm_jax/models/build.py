"""Builds a model from an ml_collections config (the `model` block of a config file).

    model:
      kind: "vlm" | "lm" | "vision" | "contrastive" | "vq" | "text_to_codes"
      vision: {...ViTConfig fields}     # vlm, vision, contrastive
      text: {...LMConfig fields}        # vlm ("lm" uses the top level)
      vq: {...VQConfig fields}          # vq (the image tokenizer alone), vlm with vision_input="vq", text_to_codes
      generator: {...MaskGITConfig}     # text_to_codes
      projector, feature_layer, ...     # remaining VLMConfig fields

Unknown keys are an error that names them.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from vlm_jax.models.contrastive import ContrastiveConfig, ContrastiveModel, TextConfig
from vlm_jax.models.lm import DecoderLM, LMConfig
from vlm_jax.models.vit import ViTConfig, VisionTower
from vlm_jax.models.vlm import VLM, VLMConfig
from vlm_jax.models.maskgit import MaskGITConfig
from vlm_jax.models.text_to_codes import TextToCodes, TextToCodesConfig
from vlm_jax.models.vq import ImageTokenizer, VQConfig


def _make(cls, fields: Mapping[str, Any], where: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in {where}; {cls.__name__} takes {sorted(known)}")
  return cls(**fields)


def _plain(d) -> dict:
  return d.to_dict() if hasattr(d, "to_dict") else dict(d)


def config_from_dict(cfg: Mapping[str, Any]):
  """ConfigDict (or dict) -> (module class, frozen model config)."""
  cfg = _plain(cfg)
  kind = cfg.pop("kind", None)
  if kind == "lm":
    return DecoderLM, _make(LMConfig, cfg, "model")
  if kind == "vision":
    if "vision" in cfg:  # the tower nested under `vision:`; nothing else may stand beside it
      stray = sorted(set(cfg) - {"vision"})
      if stray:
        raise ValueError(f"unknown key(s) {stray} in model; a vision model takes only `vision`")
      cfg = cfg["vision"]
    return VisionTower, _make(ViTConfig, cfg, "model.vision")
  if kind == "vlm":
    vision = _make(ViTConfig, cfg.pop("vision", {}), "model.vision")
    text = _make(LMConfig, cfg.pop("text", {}), "model.text")
    vq = _make(VQConfig, cfg.pop("vq", {}), "model.vq")
    return VLM, _make(VLMConfig, {**cfg, "vision": vision, "text": text, "vq": vq}, "model")
  if kind == "contrastive":
    vision = _make(ViTConfig, cfg.pop("vision", {}), "model.vision")
    text = _make(TextConfig, cfg.pop("text", {}), "model.text")
    return ContrastiveModel, _make(ContrastiveConfig, {**cfg, "vision": vision, "text": text}, "model")
  if kind == "vq":
    stray = sorted(set(cfg) - {"vq"})
    if stray:
      raise ValueError(f"unknown key(s) {stray} in model; a vq model takes only `vq`")
    return ImageTokenizer, _make(VQConfig, cfg.get("vq", {}), "model.vq")
  if kind == "text_to_codes":
    vq = _make(VQConfig, cfg.pop("vq", {}), "model.vq")
    generator = _make(MaskGITConfig, cfg.pop("generator", {}), "model.generator")
    return TextToCodes, _make(TextToCodesConfig, {**cfg, "vq": vq, "generator": generator}, "model")
  raise ValueError(f"model.kind must be one of 'vlm', 'lm', 'vision', 'contrastive', 'vq', 'text_to_codes', "
                   f"got {kind!r}")


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
  module, config = config_from_dict(cfg)
  return module(config)


def model_config(model: nn.Module) -> dict:
  """The `model` block that rebuilds `model` (inverse of `config_from_dict`), e.g. for a model read by from_hf."""
  kinds = {DecoderLM: "lm", VisionTower: "vision", VLM: "vlm", ContrastiveModel: "contrastive",
           ImageTokenizer: "vq", TextToCodes: "text_to_codes"}
  fields = dataclasses.asdict(model.config)
  if isinstance(model, (VisionTower, ImageTokenizer)):
    fields = {kinds[type(model)]: fields}
  return {"kind": kinds[type(model)], **fields}
