"""Translation between Hugging Face configs and vlm_jax model configs.

Anything our models cannot represent exactly (an o_proj bias, a RoPE variant
we do not implement, ...) is refused with a message, never approximated.
"""

import dataclasses

from vlm_jax.interop.safetensors_io import CheckpointError
from vlm_jax.models.contrastive import ContrastiveConfig, TextConfig
from vlm_jax.models.lm import LMConfig
from vlm_jax.models.vit import ViTConfig
from vlm_jax.models.vlm import VLMConfig


def _unsupported(what: str):
  raise CheckpointError(f"unsupported by vlm_jax: {what}")


def lm_from_hf(c) -> LMConfig:
  rope = dict(getattr(c, "rope_parameters", None) or {})
  rope_type = rope.get("rope_type", "default")
  if rope_type not in ("default", "linear"):
    _unsupported(f"rope_type {rope_type!r} (only 'default' and 'linear')")
  if getattr(c, "mlp_bias", False):
    _unsupported("mlp_bias=True")
  if c.model_type == "llama" and getattr(c, "attention_bias", False):
    _unsupported("LLaMA attention_bias=True (bias on o_proj)")
  if c.hidden_act != "silu":
    _unsupported(f"hidden_act {c.hidden_act!r} in a decoder LM")
  if getattr(c, "use_sliding_window", False):
    _unsupported("sliding-window attention")
  return LMConfig(
      vocab_size=c.vocab_size, embed_dim=c.hidden_size, num_layers=c.num_hidden_layers,
      num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
      head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
      mlp_dim=c.intermediate_size, rope_theta=float(rope.get("rope_theta", 10000.0)),
      rope_linear_scaling=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
      norm_eps=c.rms_norm_eps, qkv_bias=c.model_type == "qwen2",
      tie_embeddings=bool(c.tie_word_embeddings), max_position=c.max_position_embeddings)


def lm_to_hf(c: LMConfig):
  from transformers import LlamaConfig, Qwen2Config  # heavy; only when a config is written
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_linear_scaling != 1.0:
    rope = {"rope_type": "linear", "rope_theta": c.rope_theta, "factor": c.rope_linear_scaling}
  common = dict(
      vocab_size=c.vocab_size, hidden_size=c.embed_dim, intermediate_size=c.mlp_dim,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
      rope_parameters=rope, tie_word_embeddings=c.tie_embeddings,
      max_position_embeddings=c.max_position, hidden_act="silu")
  if c.qkv_bias:
    return Qwen2Config(**common)
  return LlamaConfig(**common, attention_bias=False, mlp_bias=False)


def vit_from_hf(c) -> ViTConfig:
  style = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(c.model_type)
  if style is None:
    _unsupported(f"vision tower of type {c.model_type!r}")
  if c.num_channels != 3:
    _unsupported(f"{c.num_channels} input channels")
  return ViTConfig(style=style, image_size=c.image_size, patch_size=c.patch_size, width=c.hidden_size,
                   depth=c.num_hidden_layers, num_heads=c.num_attention_heads, mlp_dim=c.intermediate_size,
                   act=c.hidden_act, norm_eps=c.layer_norm_eps,
                   use_head=style == "siglip" and bool(getattr(c, "vision_use_head", True)))


def vit_to_hf(c: ViTConfig, projection_dim: int = 512):
  from transformers import CLIPVisionConfig, SiglipVisionConfig  # heavy; only when a config is written
  if c.stem:
    raise CheckpointError(f"a vision tower with a convolutional stem (stem={c.stem}) has no Hugging Face "
                          "counterpart; only towers with stem=() export")
  if c.pool != "default":
    raise CheckpointError(f"a vision tower with pool={c.pool!r} has no Hugging Face counterpart; "
                          "only towers with pool='default' export")
  common = dict(image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.width,
                num_hidden_layers=c.depth, num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim,
                hidden_act=c.act, layer_norm_eps=c.norm_eps, num_channels=3)
  if c.style == "clip":
    return CLIPVisionConfig(**common, projection_dim=projection_dim)
  return SiglipVisionConfig(**common, vision_use_head=c.use_head)


def text_from_hf(c) -> TextConfig:
  style = {"clip_text_model": "clip", "siglip_text_model": "siglip"}[c.model_type]
  return TextConfig(style=style, vocab_size=c.vocab_size, width=c.hidden_size, depth=c.num_hidden_layers,
                    num_heads=c.num_attention_heads, mlp_dim=c.intermediate_size,
                    max_len=c.max_position_embeddings, act=c.hidden_act, norm_eps=c.layer_norm_eps,
                    eos_token_id=c.eos_token_id if c.eos_token_id is not None else 2)


def text_to_hf(c: TextConfig, projection_dim: int) -> dict:
  if c.pool != "eos":
    raise CheckpointError(f"a text tower with pool={c.pool!r} has no Hugging Face counterpart "
                          "(CLIP pools at the end-of-text token)")
  common = dict(vocab_size=c.vocab_size, hidden_size=c.width, num_hidden_layers=c.depth,
                num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim,
                max_position_embeddings=c.max_len, hidden_act=c.act, layer_norm_eps=c.norm_eps,
                eos_token_id=c.eos_token_id)
  if c.style == "siglip":
    common["projection_size"] = projection_dim
  return common


def contrastive_from_hf(c) -> ContrastiveConfig:
  text = text_from_hf(c.text_config)
  if text.style == "siglip":
    proj = c.text_config.projection_size
    if not c.vision_config.vision_use_head:
      _unsupported("SigLIP without a vision head")
  else:
    proj = c.projection_dim
  return ContrastiveConfig(vision=vit_from_hf(c.vision_config), text=text, projection_dim=proj,
                           logit_scale_init=getattr(c, "logit_scale_init_value", 2.6592))


def contrastive_to_hf(c: ContrastiveConfig):
  from transformers import CLIPConfig, SiglipConfig  # heavy; only when a config is written
  vision = vit_to_hf(c.vision, c.projection_dim).to_dict()
  text = text_to_hf(c.text, c.projection_dim)
  if c.style == "siglip":
    return SiglipConfig(vision_config=vision, text_config=text)
  return CLIPConfig(vision_config=vision, text_config=text, projection_dim=c.projection_dim,
                    logit_scale_init_value=c.logit_scale_init)


def vlm_from_hf(c) -> VLMConfig:
  if not isinstance(c.vision_feature_layer, int):
    _unsupported(f"vision_feature_layer={c.vision_feature_layer!r} (several layers)")
  return VLMConfig(vision=vit_from_hf(c.vision_config), text=lm_from_hf(c.text_config),
                   projector="mlp2x_gelu", projector_act=c.projector_hidden_act,
                   projector_bias=bool(getattr(c, "multimodal_projector_bias", True)),
                   feature_layer=c.vision_feature_layer,
                   feature_select=c.vision_feature_select_strategy, image_token_id=c.image_token_index)


def vlm_to_hf(c: VLMConfig):
  from transformers import LlavaConfig  # heavy; only when a config is written
  if c.projector != "mlp2x_gelu":
    _unsupported(f"exporting projector {c.projector!r} to LLaVA (Hugging Face LLaVA has only mlp2x_gelu)")
  if c.image_token_id >= c.text.vocab_size:
    _unsupported(f"image_token_id {c.image_token_id} outside the LM vocabulary ({c.text.vocab_size}); "
                 "Hugging Face LLaVA embeds the image token")
  return LlavaConfig(vision_config=vit_to_hf(c.vision).to_dict(), text_config=lm_to_hf(c.text).to_dict(),
                     image_token_index=c.image_token_id, image_seq_length=c.tokens_per_image,
                     projector_hidden_act=c.projector_act, vision_feature_select_strategy=c.feature_select,
                     vision_feature_layer=c.feature_layer, multimodal_projector_bias=c.projector_bias,
                     tie_word_embeddings=c.text.tie_embeddings)


def replace_lm(config, **overrides):
  """Applies LM overrides (`scan_layers`, `remat`, `dtype`, ...) to an LM or VLM config."""
  if not overrides:
    return config
  if isinstance(config, LMConfig):
    return dataclasses.replace(config, **overrides)
  if isinstance(config, VLMConfig):
    return dataclasses.replace(config, text=dataclasses.replace(config.text, **overrides))
  raise ValueError(f"overrides {sorted(overrides)} apply to language models and VLMs only")
