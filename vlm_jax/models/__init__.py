"""Pure Flax Linen models. Parameters are plain nested dicts of arrays."""

from vlm_jax.models.build import build_model, config_from_dict
from vlm_jax.models.contrastive import ContrastiveConfig, ContrastiveModel, TextConfig, clip_loss, siglip_loss
from vlm_jax.models.lm import DecoderLM, KVCache, LMConfig, LMOutput
from vlm_jax.models.params import count_params, init_params, logical_axes, stack_layers, unstack_layers
from vlm_jax.models.projector import Projector
from vlm_jax.models.vit import ViTConfig, VisionOutput, VisionTower
from vlm_jax.models.vlm import VLM, VLMConfig
