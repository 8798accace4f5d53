"""`from_hf` / `to_hf`: exact import and export of Hugging Face checkpoints.

Weights move through safetensors and NumPy only (no torch). Each architecture
is one `Architecture` entry: a name map (`name_maps`), config translators
(`hf_configs`) and the vlm_jax module it builds. `hf_names(model)` lists the
mapping itself: our parameter path -> the Hugging Face tensor name.
"""

import dataclasses
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from vlm_jax.interop import hf_configs, name_maps
from vlm_jax.interop.safetensors_io import CheckpointError, TensorReader, read_json, write_tensors
from vlm_jax.models.contrastive import ContrastiveModel
from vlm_jax.models.lm import DecoderLM
from vlm_jax.models.params import abstract_params, stack_layers, unstack_layers
from vlm_jax.models.vit import VisionTower
from vlm_jax.models.vlm import VLM


@dataclasses.dataclass(frozen=True)
class Architecture:
  name: str  # the Hugging Face class, as in config.json "architectures"
  module: type
  rules: list
  config_from_hf: Callable
  config_to_hf: Callable
  aliases: tuple = ()
  # Tensors a checkpoint may hold that carry nothing we need.
  ignorable: tuple = ("position_ids", "rotary_emb.inv_freq")


ARCHITECTURES = {a.name: a for a in [
    Architecture("LlamaForCausalLM", DecoderLM, name_maps.DECODER_LM, hf_configs.lm_from_hf, hf_configs.lm_to_hf),
    Architecture("Qwen2ForCausalLM", DecoderLM, name_maps.DECODER_LM, hf_configs.lm_from_hf, hf_configs.lm_to_hf),
    Architecture("CLIPVisionModel", VisionTower, name_maps.VISION_TOWER, hf_configs.vit_from_hf,
                 hf_configs.vit_to_hf, name_maps.ALIASES["vision"]),
    Architecture("SiglipVisionModel", VisionTower, name_maps.VISION_TOWER, hf_configs.vit_from_hf,
                 hf_configs.vit_to_hf, name_maps.ALIASES["vision"]),
    Architecture("CLIPModel", ContrastiveModel, name_maps.CLIP, hf_configs.contrastive_from_hf,
                 hf_configs.contrastive_to_hf),
    Architecture("SiglipModel", ContrastiveModel, name_maps.SIGLIP, hf_configs.contrastive_from_hf,
                 hf_configs.contrastive_to_hf),
    Architecture("LlavaForConditionalGeneration", VLM, name_maps.LLAVA, hf_configs.vlm_from_hf,
                 hf_configs.vlm_to_hf, name_maps.ALIASES["llava"]),
]}


def _architecture_of(module: nn.Module) -> Architecture:
  c = module.config
  name = {
      DecoderLM: lambda: "Qwen2ForCausalLM" if c.qkv_bias else "LlamaForCausalLM",
      VisionTower: lambda: "CLIPVisionModel" if c.style == "clip" else "SiglipVisionModel",
      ContrastiveModel: lambda: "CLIPModel" if c.style == "clip" else "SiglipModel",
      VLM: lambda: "LlavaForConditionalGeneration",
  }.get(type(module))
  if name is None:
    raise ValueError(f"no Hugging Face architecture for {type(module).__name__}")
  return ARCHITECTURES[name()]


def _read_hf_config(folder: str):
  from transformers import AutoConfig  # heavy; only to read a folder's config
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"no config.json in {folder!r}")
  names = read_json(path).get("architectures") or []
  known = [n for n in names if n in ARCHITECTURES]
  if not known:
    raise CheckpointError(f"unknown architecture {names or '(none given)'} in {path}; "
                          f"vlm_jax reads {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[known[0]], AutoConfig.from_pretrained(folder)


def _with_unscanned_lm(model: nn.Module) -> nn.Module:
  """The same model with `scan_layers=False`: name maps speak of `layers_{i}`."""
  return type(model)(hf_configs.replace_lm(model.config, scan_layers=False)) if _scanned(model) else model


def _scanned(model: nn.Module) -> bool:
  c = model.config
  text = c if isinstance(model, DecoderLM) else getattr(c, "text", None)
  return isinstance(model, (DecoderLM, VLM)) and text.scan_layers


def _restack(model: nn.Module, params: dict, fn) -> dict:
  if not _scanned(model):
    return params
  if isinstance(model, DecoderLM):
    return fn(params)
  return {**params, "lm": fn(params["lm"])}


def _match(name_map: name_maps.NameMap, arch: Architecture, path: str) -> name_maps.Match:
  """The Hugging Face tensor of our parameter `path`; none is a gap in our tables (or a
  module with no Hugging Face counterpart), never a fault of a checkpoint."""
  match = name_map.resolve(path)
  if match is None:
    raise ValueError(f"parameter {path!r} has no Hugging Face name in {arch.name}")
  return match


def hf_names(model: nn.Module) -> dict[str, str]:
  """Our parameter paths -> the Hugging Face tensor names, as `to_hf` writes and `from_hf` reads.

  Keys are the `/`-joined paths of the parameter tree (`lm/embed/embedding`), values the
  tensor names of the model's architecture (`language_model.model.embed_tokens.weight`),
  one entry per tensor, every layer spelled out (`layers_3/q/kernel` <->
  `layers.3.self_attn.q_proj.weight`). Scanned layers (`scan_layers=True`) are named as
  the unscanned tree: layer i of `lm/layers/q/kernel` (index i of its leading axis) is
  `lm/layers_{i}/q/kernel` here, the tree `vlm_jax.models.params.unstack_layers` gives; the
  layout is a run-time choice, the names are not. Tied embeddings have no `lm_head` entry.
  Values are the names a checkpoint is written with; the other spellings `from_hf` also
  reads (transformers 5 in-memory LLaVA names, the `vision_model.` level of Hub vision
  checkpoints) are not listed.

  Tensor layouts: a linear kernel is ours [in, out] = the Hugging Face weight [out, in]
  transposed; a conv kernel is HWIO = OIHW.transpose(2, 3, 1, 0); the attention-pool
  `in_proj` is transposed too; SigLIP's logit_scale / logit_bias are shape () here, (1,)
  there; everything else (embeddings, norms, biases, class and position embeddings) is
  the same array.
  """
  arch = _architecture_of(model)
  name_map = name_maps.NameMap(arch.rules)
  paths = traverse_util.flatten_dict(abstract_params(_with_unscanned_lm(model)), sep="/")
  return {path: _match(name_map, arch, path).hf_name for path in paths}


def model_from_folder(folder: str, **lm_overrides: Any) -> nn.Module:
  """The vlm_jax module of a Hugging Face folder, from its config.json alone (no weights read)."""
  arch, hf_config = _read_hf_config(folder)
  model = arch.module(arch.config_from_hf(hf_config))
  return type(model)(hf_configs.replace_lm(model.config, **lm_overrides)) if lm_overrides else model


def from_hf(folder: str, **lm_overrides: Any) -> tuple[nn.Module, dict]:
  """Loads a local Hugging Face checkpoint folder: returns `(model, params)`.

  Reads LlamaForCausalLM, Qwen2ForCausalLM, CLIPVisionModel, SiglipVisionModel,
  CLIPModel, SiglipModel and LlavaForConditionalGeneration. `lm_overrides`
  change the language model's run-time settings (`scan_layers=True`,
  `remat=True`, `dtype="bfloat16"`). Parameters keep the config's
  `param_dtype` (float32) whatever dtype the file stores.
  """
  arch, _ = _read_hf_config(folder)
  model = model_from_folder(folder, **lm_overrides)
  expected = traverse_util.flatten_dict(abstract_params(_with_unscanned_lm(model)), sep="/")

  reader = TensorReader(folder)
  stored = {name_maps.canonical_name(n, arch.aliases): n for n in reader.names}
  name_map = name_maps.NameMap(arch.rules)
  flat, used = {}, set()
  for path, leaf in expected.items():
    match = _match(name_map, arch, path)
    if match.hf_name not in stored:
      raise CheckpointError(f"tensor {match.hf_name!r} (for parameter {path!r}) is missing from {folder!r}")
    stored_name = stored[match.hf_name]
    value = match.from_hf(reader.read(stored_name))
    if value.shape != leaf.shape:
      raise CheckpointError(
          f"tensor {stored_name!r} in {folder!r} has shape {reader.shape(stored_name)}, which gives "
          f"{tuple(value.shape)} for parameter {path!r}; the config expects {tuple(leaf.shape)}")
    flat[path] = np.asarray(value, dtype=leaf.dtype)
    used.add(match.hf_name)

  tied = getattr(getattr(model.config, "text", model.config), "tie_embeddings", False)
  unexpected = [n for n in stored if n not in used and not n.endswith(arch.ignorable)
                and not (tied and n.endswith("lm_head.weight"))]
  if unexpected:
    raise CheckpointError(f"{len(unexpected)} tensor(s) in {folder!r} match no parameter of {arch.name} "
                          f"(a checkpoint of another model?): {sorted(unexpected)[:5]}")
  params = jax.tree.map(jax.numpy.asarray, traverse_util.unflatten_dict(flat, sep="/"))
  return model, _restack(model, params, stack_layers)


def to_hf(model: nn.Module, params: dict, folder: str, dtype: Optional[str] = None,
          max_shard_bytes: int = 4 << 30) -> None:
  """Writes `params` as a Hugging Face checkpoint (config.json + safetensors).

  `transformers` loads the folder with `from_pretrained` and computes the same
  logits. `dtype` (e.g. "bfloat16") casts on the way out; by default the
  parameters' own dtype is kept.
  """
  arch = _architecture_of(model)
  hf_config = arch.config_to_hf(model.config)
  hf_config.architectures = [arch.name]
  flat = traverse_util.flatten_dict(_restack(model, params, unstack_layers), sep="/")
  name_map = name_maps.NameMap(arch.rules)

  def tensors():
    for path, value in flat.items():
      match = _match(name_map, arch, path)
      array = match.to_hf(np.asarray(jax.device_get(value)))
      yield match.hf_name, array.astype(jax.numpy.dtype(dtype)) if dtype else array

  write_tensors(folder, tensors(), max_shard_bytes)
  hf_config.save_pretrained(folder)
