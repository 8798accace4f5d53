"""Model presets (configs/models.py): they build, and their parameter counts are exact.

Counts come from `jax.eval_shape` (nothing allocated) and are compared with the
Hugging Face PyTorch models built on the meta device (nothing allocated either).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from vlm_jax.models import build_model, count_params, init_params
from vlm_jax.models.build import config_from_dict
from vlm_jax.models.params import abstract_params

LLAMA2_7B = 6_738_415_616  # published LLaMA-2-7B count
LLAVA15_7B = 7_063_427_072  # llava-hf/llava-1.5-7b-hf model page


@functools.lru_cache(maxsize=None)
def ours(name: str) -> int:
  return count_params(abstract_params(build_model(presets.get_config(name))))


def model_config(name: str):
  return config_from_dict(presets.get_config(name))[1]


def hf_count(cls_name: str, hf_config) -> int:
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  with torch.device("meta"):
    model = getattr(transformers, cls_name)(hf_config)
  return sum(p.numel() for p in model.parameters())  # tied tensors are yielded once


# --- The config file --------------------------------------------------------


def test_presets_listed_in_docstring():
  assert presets.PRESETS == ("tiny", "small", "llava15_7b", "vila15_3b", "llama2_7b", "clip_l14_336",
                             "siglip_so400m_384", "clip_b16")
  for name in presets.PRESETS:
    assert name in presets.__doc__
  assert "configs/models.py:tiny" in presets.__doc__


def test_get_config_is_locked_and_preset_is_not():
  cfg = presets.get_config()
  assert cfg.is_locked and cfg.kind == "vlm" and cfg.text.vocab_size == 512
  with pytest.raises(AttributeError):
    cfg.text.bogus = 1
  cfg.text.num_layers = 3  # existing fields stay overridable
  embedded = presets.preset("tiny")
  assert not embedded.is_locked
  embedded.extra = 1
  assert "extra" not in presets.preset("tiny")  # every call is a fresh copy


@pytest.mark.parametrize("arg", ["llava15_7b", "name=llava15_7b", " name = llava15_7b "])
def test_arg_forms(arg):
  assert presets.get_config(arg).to_dict() == presets.preset("llava15_7b").to_dict()


@pytest.mark.parametrize("arg", ["llava", "size=tiny"])
def test_unknown_preset_names_the_known_ones(arg):
  with pytest.raises(ValueError, match="known presets: tiny, small, llava15_7b") as e:
    presets.get_config(arg)
  for name in presets.PRESETS:
    assert name in str(e.value)


@pytest.mark.parametrize("where", ["text", "vision", None])
def test_mistyped_key_is_an_error_that_names_it(where):
  cfg = presets.get_config("tiny")
  cfg.unlock()
  (cfg if where is None else cfg[where]).bogus = 1
  with pytest.raises(ValueError, match="bogus"):
    build_model(cfg)


def test_mistyped_key_in_lm_preset():
  cfg = presets.preset("llama2_7b")
  cfg.num_layer = 4
  with pytest.raises(ValueError, match="num_layer"):
    build_model(cfg)


# --- Parameter counts -------------------------------------------------------


@pytest.mark.parametrize("name", presets.PRESETS)
def test_every_preset_builds(name):
  assert ours(name) > 0


def test_llama2_7b_published_count():
  assert ours("llama2_7b") == LLAMA2_7B


def test_llava15_7b_published_count():
  assert ours("llava15_7b") == LLAVA15_7B


def test_tiny_and_small_sizes():
  assert ours("tiny") < 1_000_000
  assert 90_000_000 <= ours("small") <= 110_000_000


def test_tokens_per_image():
  assert model_config("tiny").tokens_per_image == 16  # 4x4 patches, class token dropped
  assert model_config("llava15_7b").tokens_per_image == 576
  assert model_config("vila15_3b").tokens_per_image == 196  # 27x27 padded to 28x28, 2x2 -> 14x14


@pytest.mark.parametrize("name,hf_class,convert", [
    ("tiny", "LlavaForConditionalGeneration", "vlm_to_hf"),
    ("small", "LlavaForConditionalGeneration", "vlm_to_hf"),
    ("llava15_7b", "LlavaForConditionalGeneration", "vlm_to_hf"),
    ("llama2_7b", "LlamaForCausalLM", "lm_to_hf"),
    ("clip_l14_336", "CLIPVisionModel", "vit_to_hf"),
    ("siglip_so400m_384", "SiglipVisionModel", "vit_to_hf"),
    ("clip_b16", "CLIPModel", "contrastive_to_hf"),
])
def test_count_matches_hugging_face(name, hf_class, convert):
  from vlm_jax.interop import hf_configs
  assert ours(name) == hf_count(hf_class, getattr(hf_configs, convert)(model_config(name)))


def test_vila15_3b_parts_match_hugging_face():
  # Hugging Face LLaVA has no downsample projector: compare the towers one by
  # one and count the projector (LayerNorm(4C) -> Dense -> GELU -> Dense) by hand.
  from vlm_jax.interop import hf_configs
  c = model_config("vila15_3b")
  lm = hf_count("LlamaForCausalLM", hf_configs.lm_to_hf(c.text))
  vision = hf_count("SiglipVisionModel", hf_configs.vit_to_hf(c.vision))
  params = abstract_params(build_model(presets.get_config("vila15_3b")))
  assert count_params(params["lm"]) == lm
  assert count_params(params["vision"]) == vision
  assert "head" not in params["vision"]
  c4, d = 4 * c.vision.width, c.text.embed_dim
  projector = 2 * c4 + (c4 * d + d) + (d * d + d)
  assert count_params(params["projector"]) == projector
  assert ours("vila15_3b") == lm + vision + projector


# --- tiny runs --------------------------------------------------------------


def test_tiny_forward_pass():
  cfg = presets.get_config("tiny")
  model = build_model(cfg)
  c = model.config
  params = init_params(model, jax.random.key(0))
  assert count_params(params) == ours("tiny")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  t = c.tokens_per_image
  ids = np.array([[1, 2] + [cfg.image_token_id] * t + [3, 4, 5],
                  [6] * (t + 5)], np.int32)
  images = jax.random.normal(jax.random.key(1), (1, c.vision.image_size, c.vision.image_size, 3))
  out = model.apply({"params": params}, jnp.asarray(ids), images=images)
  assert out.logits.shape == (2, t + 5, c.text.vocab_size)
  assert bool(jnp.isfinite(out.logits).all())
  # The image changes the logits of the sequence that holds it, after the image tokens.
  other = model.apply({"params": params}, jnp.asarray(ids), images=images + 1.0)
  assert not np.allclose(out.logits[0, -1], other.logits[0, -1])
  np.testing.assert_allclose(out.logits[1], other.logits[1], rtol=1e-5, atol=1e-5)
