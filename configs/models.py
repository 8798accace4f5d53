"""Model presets: the `model` block of a config, in the form `build_model` takes.

Use one on its own (`--config=configs/models.py:tiny`, or `:name=tiny`), or
embed one in an experiment config with `preset(name)` (an unlocked copy):

    from configs import models
    config.model = models.preset("llava15_7b")

Every field of the model dataclasses is present, so any of them can be
overridden from the command line (`--config.text.num_layers=4`).

Presets (parameters float32; counts are exact, see tests/test_presets.py):

  tiny               vlm          0.53M   CLIP-style ViT 32 px/8 + 2-layer LM (vocab 512);
                                          trains on 2 CPU cores in minutes
  small              vlm          ~96M    CLIP-style ViT-S/16 at 224 + 12-layer LM of ~74M (vocab 32000)
  llava15_7b         vlm          7.06B   LLaVA-1.5-7B: CLIP ViT-L/14-336 + LLaMA-2-7B (vocab 32064), mlp2x_gelu
  vila15_3b          vlm          ~3.1B   VILA1.5-3B-like: SigLIP so400m/14-384 (no head) + Sheared-LLaMA-2.7B,
                                          downsample projector (729 patches -> 196 tokens)
  llama2_7b          lm           6.74B   LLaMA-2-7B
  clip_l14_336       vision       304M    CLIP ViT-L/14 at 336 px (LLaVA's tower)
  siglip_so400m_384  vision       428M    SigLIP so400m/14 at 384 px (27x27 patches) with the attention-pooling head
  clip_b16           contrastive  150M    CLIP ViT-B/16
"""

import dataclasses
from typing import Any, Callable

import ml_collections

from vlm_jax.models.contrastive import ContrastiveConfig, TextConfig
from vlm_jax.models.lm import LMConfig
from vlm_jax.models.vit import ViTConfig
from vlm_jax.models.vlm import VLMConfig

DEFAULT = "tiny"


# --- Towers -----------------------------------------------------------------
# Each returns a plain dict holding every field of its dataclass (the dataclass
# checks the values and fills in the defaults).


def _fields(cls, **kw) -> dict[str, Any]:
  return dataclasses.asdict(cls(**kw))


def _clip_l14_336() -> dict[str, Any]:
  return _fields(ViTConfig, style="clip", image_size=336, patch_size=14, width=1024, depth=24,
                 num_heads=16, mlp_dim=4096, act="quick_gelu", norm_eps=1e-5)


def _siglip_so400m_384(use_head: bool) -> dict[str, Any]:
  # 384 is not a multiple of 14: the patch conv sees a 27x27 grid and ignores
  # the last 6 pixel rows and columns, as the reference does.
  return _fields(ViTConfig, style="siglip", image_size=384, patch_size=14, width=1152, depth=27,
                 num_heads=16, mlp_dim=4304, act="gelu_pytorch_tanh", norm_eps=1e-6, use_head=use_head)


def _llama2_7b(vocab_size: int) -> dict[str, Any]:
  return _fields(LMConfig, vocab_size=vocab_size, embed_dim=4096, num_layers=32, num_heads=32,
                 num_kv_heads=32, head_dim=128, mlp_dim=11008, rope_theta=10000.0, norm_eps=1e-5,
                 tie_embeddings=False, max_position=4096)


def _vlm(vision: dict, text: dict, **kw) -> dict[str, Any]:
  # VLMConfig's own fields (projector, feature_layer, ...) at the top level.
  top = {k: v for k, v in dataclasses.asdict(VLMConfig(**kw)).items() if k not in ("vision", "text")}
  VLMConfig(vision=ViTConfig(**vision), text=LMConfig(**text), **kw)  # validates the combination
  return {"kind": "vlm", "vision": vision, "text": text, **top}


# --- Presets ----------------------------------------------------------------


def _tiny() -> dict[str, Any]:
  vision = _fields(ViTConfig, style="clip", image_size=32, patch_size=8, width=64, depth=2, num_heads=4,
                   mlp_dim=128, act="quick_gelu", norm_eps=1e-5)
  text = _fields(LMConfig, vocab_size=512, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=256, max_position=512)
  return _vlm(vision, text, projector="mlp2x_gelu", feature_layer=-1, feature_select="default",
              image_token_id=511)


def _small() -> dict[str, Any]:
  vision = _fields(ViTConfig, style="clip", image_size=224, patch_size=16, width=384, depth=12, num_heads=6,
                   mlp_dim=1536, act="quick_gelu", norm_eps=1e-5)
  text = _fields(LMConfig, vocab_size=32000, embed_dim=512, num_layers=12, num_heads=8, num_kv_heads=8,
                 head_dim=64, mlp_dim=1536, max_position=2048)
  return _vlm(vision, text, projector="mlp2x_gelu", feature_layer=-2, feature_select="default",
              image_token_id=31999)


def _llava15_7b() -> dict[str, Any]:
  return _vlm(_clip_l14_336(), _llama2_7b(vocab_size=32064), projector="mlp2x_gelu", projector_act="gelu",
              feature_layer=-2, feature_select="default", image_token_id=32000)


def _vila15_3b() -> dict[str, Any]:
  text = _fields(LMConfig, vocab_size=32000, embed_dim=2560, num_layers=32, num_heads=20, num_kv_heads=20,
                 head_dim=128, mlp_dim=6912, rope_theta=10000.0, norm_eps=1e-5, max_position=4096)
  return _vlm(_siglip_so400m_384(use_head=False), text, projector="downsample", projector_act="gelu",
              feature_layer=-2, feature_select="full", image_token_id=31999)


def _llama2_7b_lm() -> dict[str, Any]:
  return {"kind": "lm", **_llama2_7b(vocab_size=32000)}


def _clip_l14_336_vision() -> dict[str, Any]:
  return {"kind": "vision", "vision": _clip_l14_336()}


def _siglip_so400m_384_vision() -> dict[str, Any]:
  return {"kind": "vision", "vision": _siglip_so400m_384(use_head=True)}


def _clip_b16() -> dict[str, Any]:
  vision = _fields(ViTConfig, style="clip", image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                   mlp_dim=3072, act="quick_gelu", norm_eps=1e-5)
  text = _fields(TextConfig, style="clip", vocab_size=49408, width=512, depth=12, num_heads=8, mlp_dim=2048,
                 max_len=77, act="quick_gelu", norm_eps=1e-5, eos_token_id=49407)
  top = {k: v for k, v in dataclasses.asdict(ContrastiveConfig(projection_dim=512)).items()
         if k not in ("vision", "text")}
  return {"kind": "contrastive", "vision": vision, "text": text, **top}


_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": _tiny,
    "small": _small,
    "llava15_7b": _llava15_7b,
    "vila15_3b": _vila15_3b,
    "llama2_7b": _llama2_7b_lm,
    "clip_l14_336": _clip_l14_336_vision,
    "siglip_so400m_384": _siglip_so400m_384_vision,
    "clip_b16": _clip_b16,
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def preset(name: str) -> ml_collections.ConfigDict:
  """A fresh, unlocked ConfigDict of preset `name` (for embedding in experiment configs)."""
  try:
    make = _PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
  return ml_collections.ConfigDict(make())


def _parse(arg: str | None) -> str:
  arg = (arg or "").strip() or DEFAULT
  key, sep, value = arg.partition("=")
  if sep:
    if key.strip() != "name":
      raise ValueError(f"configs/models.py takes 'NAME' or 'name=NAME', got {arg!r}; "
                       f"known presets: {', '.join(PRESETS)}")
    arg = value.strip()
  return arg


def get_config(arg: str | None = DEFAULT) -> ml_collections.ConfigDict:
  """`configs/models.py:NAME` (or `:name=NAME`): preset NAME, locked."""
  cfg = preset(_parse(arg))
  cfg.lock()
  return cfg
