"""vlm_jax against transformers 5 PyTorch on identical weights (float32, max |Δ| ≤ 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import vlm_jax
from tests import hf_reference as ref

TOL = 1e-4


def assert_close(ours, theirs, tol=TOL):
  ours, theirs = np.asarray(ours), np.asarray(theirs.detach().numpy() if hasattr(theirs, "detach") else theirs)
  assert ours.shape == theirs.shape
  diff = np.abs(ours - theirs).max()
  assert diff <= tol, f"max |Δ| = {diff}"


def padded_batch(vocab, lengths, total, left: bool, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, vocab, (len(lengths), total))
  mask = np.zeros_like(ids)
  for b, n in enumerate(lengths):
    if left:
      mask[b, total - n:] = 1
    else:
      mask[b, :n] = 1
  ids = np.where(mask == 1, ids, 0)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  return ids, mask, positions


LM_CASES = {
    "llama-gqa2-untied": ("llama", dict()),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-mqa-linear-rope": ("llama", dict(num_key_value_heads=1,
                                            rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0})),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-bias-gqa4": ("qwen2", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=6)),
}
LM_CLASSES = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}


@pytest.fixture(scope="module", params=sorted(LM_CASES))
def lm_pair(request, tmp_path_factory):
  arch, kw = LM_CASES[request.param]
  hf, folder = ref.build(LM_CLASSES[arch], ref.tiny_lm_config(arch, **kw), tmp_path_factory.mktemp(request.param))
  model, params = vlm_jax.from_hf(folder)
  return hf, folder, model, params


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_lm_logits_match_with_padding(lm_pair, left):
  hf, _, model, params = lm_pair
  ids, mask, pos = padded_batch(97, [11, 7, 3], 11, left)
  theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
  ours = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                     positions=jnp.asarray(pos)).logits
  real = mask.astype(bool)
  assert_close(np.asarray(ours)[real], theirs.detach().numpy()[real])


def test_lm_scan_and_remat_give_the_same_logits(lm_pair):
  _, folder, model, params = lm_pair
  scanned, sparams = vlm_jax.from_hf(folder, scan_layers=True, remat=True)
  assert "layers" in sparams and "layers_0" not in sparams
  ids = jnp.asarray(np.random.RandomState(1).randint(0, 97, (2, 9)))
  np.testing.assert_allclose(scanned.apply({"params": sparams}, ids).logits,
                             model.apply({"params": params}, ids).logits, atol=1e-5)
  np.testing.assert_array_equal(vlm_jax.generate(scanned, sparams, ids, max_new_tokens=6),
                                vlm_jax.generate(model, params, ids, max_new_tokens=6))


def test_lm_round_trip_is_bit_exact_and_loads_in_transformers(lm_pair, tmp_path):
  hf, _, model, params = lm_pair
  vlm_jax.to_hf(model, params, tmp_path)
  _, again = vlm_jax.from_hf(tmp_path)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, again)
  reloaded = type(hf).from_pretrained(tmp_path).eval()
  ids = torch.tensor(np.random.RandomState(2).randint(0, 97, (2, 8)))
  assert_close(reloaded(ids).logits.detach(), hf(ids).logits.detach(), tol=0)


def test_scanned_round_trip(lm_pair, tmp_path):
  hf, folder, _, _ = lm_pair
  model, params = vlm_jax.from_hf(folder, scan_layers=True)
  vlm_jax.to_hf(model, params, tmp_path)
  reloaded = type(hf).from_pretrained(tmp_path).eval()
  ids = torch.tensor([[5, 6, 7, 8]])
  assert_close(reloaded(ids).logits.detach(), hf(ids).logits.detach(), tol=0)


def test_greedy_generation_matches_transformers(lm_pair):
  hf, _, model, params = lm_pair
  ids, mask, _ = padded_batch(97, [6, 4], 6, left=True, seed=3)
  theirs = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=16,
                       do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
  ours = vlm_jax.generate(model, params, ids, attention_mask=mask, max_new_tokens=16)
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


# ---------------------------------------------------------------- vision towers

VISION_CASES = {
    "clip-28": ("clip", dict(image_size=28, patch_size=7)),
    "clip-42": ("clip", dict(image_size=42, patch_size=7)),
    "siglip-28-head": ("siglip", dict(image_size=28, patch_size=7)),
    "siglip-30-nohead": ("siglip", dict(image_size=30, patch_size=7, vision_use_head=False)),  # 30 % 7 != 0
}
VISION_CLASSES = {"clip": transformers.CLIPVisionModel, "siglip": transformers.SiglipVisionModel}


@pytest.mark.parametrize("case", sorted(VISION_CASES))
def test_vision_tower_matches(case, tmp_path):
  style, kw = VISION_CASES[case]
  hf, folder = ref.build(VISION_CLASSES[style], ref.tiny_vision_config(style, **kw), tmp_path)
  model, params = vlm_jax.from_hf(folder)
  x = ref.images(2, kw["image_size"])
  theirs = hf(pixel_values=ref.to_torch_images(x), output_hidden_states=True)
  full = model.apply({"params": params}, jnp.asarray(x))
  assert_close(full.last_hidden_state, theirs.last_hidden_state)
  if theirs.pooler_output is not None:
    assert_close(full.pooled, theirs.pooler_output)
  for layer in (-2, 1, 0):
    feats = model.apply({"params": params}, jnp.asarray(x), feature_layer=layer).features
    assert_close(feats, theirs.hidden_states[layer])
  vlm_jax.to_hf(model, params, tmp_path / "out")
  _, again = vlm_jax.from_hf(tmp_path / "out")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, again)
  reloaded = VISION_CLASSES[style].from_pretrained(tmp_path / "out").eval()
  assert_close(reloaded(pixel_values=ref.to_torch_images(x)).last_hidden_state.detach(),
               theirs.last_hidden_state.detach(), tol=0)


def test_hub_style_vision_names_are_read(tmp_path):
  """Older checkpoints keep a `vision_model.` level in every tensor name."""
  from safetensors.numpy import load_file, save_file
  hf, folder = ref.build(transformers.CLIPVisionModel, ref.tiny_vision_config("clip"), tmp_path)
  tensors = load_file(f"{folder}/model.safetensors")
  save_file({f"vision_model.{k}": v for k, v in tensors.items()}, f"{folder}/model.safetensors")
  model, params = vlm_jax.from_hf(folder)
  x = ref.images(1, 28)
  assert_close(model.apply({"params": params}, jnp.asarray(x)).last_hidden_state,
               hf(pixel_values=ref.to_torch_images(x)).last_hidden_state)


# ---------------------------------------------------------------- contrastive models

@pytest.mark.parametrize("style", ["clip", "siglip"])
def test_contrastive_model_matches(style, tmp_path):
  text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=16, eos_token_id=98)
  vision = ref.tiny_vision_config(style).to_dict()
  if style == "clip":
    cls, config = transformers.CLIPModel, transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                  projection_dim=24)
  else:
    cls, config = transformers.SiglipModel, transformers.SiglipConfig(text_config=text, vision_config=vision)
  hf, folder = ref.build(cls, config, tmp_path)
  model, params = vlm_jax.from_hf(folder)
  ids = np.random.RandomState(0).randint(1, 97, (3, 10))
  ids[:, -1] = 98  # end of text
  x = ref.images(2, 28)
  theirs = hf(input_ids=torch.tensor(ids), pixel_values=ref.to_torch_images(x))
  ours = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(ids))
  assert_close(ours.text_embeds, theirs.text_embeds)
  assert_close(ours.image_embeds, theirs.image_embeds)
  assert_close(ours.logits_per_text, theirs.logits_per_text)
  vlm_jax.to_hf(model, params, tmp_path / "out")
  _, again = vlm_jax.from_hf(tmp_path / "out")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, again)


# ---------------------------------------------------------------- LLaVA

LLAVA_CASES = {
    "clip+llama": ("clip", "llama", dict(), "default"),
    "siglip+qwen2-tied": ("siglip", "qwen2", dict(tie_word_embeddings=True), "full"),
}


@pytest.fixture(scope="module", params=sorted(LLAVA_CASES))
def llava_pair(request, tmp_path_factory):
  style, arch, kw, select = LLAVA_CASES[request.param]
  config = transformers.LlavaConfig(
      vision_config=ref.tiny_vision_config(style).to_dict(),
      text_config=ref.tiny_lm_config(arch, **kw).to_dict(),
      image_token_index=96, vision_feature_select_strategy=select, vision_feature_layer=-2,
      image_seq_length=16, tie_word_embeddings=kw.get("tie_word_embeddings", False))
  hf, folder = ref.build(transformers.LlavaForConditionalGeneration, config,
                         tmp_path_factory.mktemp(request.param))
  model, params = vlm_jax.from_hf(folder)
  return hf, folder, model, params


def interleaved_prompt(model, n_images, text_between=3, seed=0):
  """Text, image, text, image, ... with one image token per image feature."""
  rng = np.random.RandomState(seed)
  t = model.config.tokens_per_image
  parts = [rng.randint(1, 90, 2)]
  for _ in range(n_images):
    parts += [np.full(t, model.config.image_token_id), rng.randint(1, 90, text_between)]
  return np.concatenate(parts)


def test_llava_logits_match_two_images_anywhere(llava_pair):
  hf, _, model, params = llava_pair
  a, b = interleaved_prompt(model, 1, seed=1), interleaved_prompt(model, 1, text_between=1, seed=2)
  length = max(len(a), len(b))
  ids = np.zeros((2, length), np.int64)
  mask = np.zeros((2, length), np.int64)
  ids[0, :len(a)], mask[0, :len(a)] = a, 1  # right padding
  ids[1, length - len(b):], mask[1, length - len(b):] = b, 1  # left padding
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  x = ref.images(2, 28)
  theirs = hf(input_ids=torch.tensor(ids), pixel_values=ref.to_torch_images(x),
              attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.detach().numpy()
  ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(x), attention_mask=jnp.asarray(mask),
                     positions=jnp.asarray(pos)).logits
  real = mask.astype(bool)
  assert_close(np.asarray(ours)[real], theirs[real])


def test_llava_several_images_in_one_sequence(llava_pair):
  hf, _, model, params = llava_pair
  ids = interleaved_prompt(model, 3, seed=4)[None]
  x = ref.images(3, 28, seed=5)
  theirs = hf(input_ids=torch.tensor(ids), pixel_values=ref.to_torch_images(x)).logits
  assert_close(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(x)).logits, theirs)


def test_llava_precomputed_image_embeddings(llava_pair):
  _, _, model, params = llava_pair
  ids = jnp.asarray(interleaved_prompt(model, 2, seed=6)[None])
  x = jnp.asarray(ref.images(2, 28, seed=7))
  embeds = model.apply({"params": params}, x, method=type(model).encode_images)
  np.testing.assert_allclose(model.apply({"params": params}, ids, image_embeds=embeds).logits,
                             model.apply({"params": params}, ids, x).logits, atol=1e-6)


def test_llava_round_trip_and_generation(llava_pair, tmp_path):
  hf, _, model, params = llava_pair
  vlm_jax.to_hf(model, params, tmp_path)
  _, again = vlm_jax.from_hf(tmp_path)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, again)
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
  ids = interleaved_prompt(model, 1, seed=8)[None]
  x = ref.images(1, 28, seed=9)
  kw = dict(input_ids=torch.tensor(ids), pixel_values=ref.to_torch_images(x))
  assert_close(reloaded(**kw).logits.detach(), hf(**kw).logits.detach(), tol=0)
  theirs = hf.generate(**kw, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
  ours = vlm_jax.generate(model, params, ids, images=x, max_new_tokens=16)
  np.testing.assert_array_equal(np.asarray(ours), theirs[:, ids.shape[1]:].numpy())


def test_llava_in_memory_names_are_read(llava_pair, tmp_path):
  """transformers 5 writes legacy names; its in-memory names must load too."""
  from safetensors.torch import save_file
  hf, folder, model, params = llava_pair
  save_file({k: v.clone().contiguous() for k, v in hf.state_dict().items()}, f"{tmp_path}/model.safetensors")
  (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
  assert any(k.startswith("model.language_model.") for k in hf.state_dict())
  _, again = vlm_jax.from_hf(tmp_path)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, again)


@pytest.mark.parametrize("style", ["clip", "siglip"])
def test_contrastive_losses_match_transformers(style, tmp_path):
  from vlm_jax.models import clip_loss, siglip_loss
  text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, max_position_embeddings=16, eos_token_id=98)
  vision = ref.tiny_vision_config(style, num_hidden_layers=1).to_dict()
  cls, config = ((transformers.CLIPModel, transformers.CLIPConfig) if style == "clip"
                 else (transformers.SiglipModel, transformers.SiglipConfig))
  hf, folder = ref.build(cls, config(text_config=text, vision_config=vision), tmp_path)
  model, params = vlm_jax.from_hf(folder)
  ids = np.random.RandomState(0).randint(1, 97, (4, 8))
  ids[:, -1] = 98
  x = ref.images(4, 28)
  theirs = hf(input_ids=torch.tensor(ids), pixel_values=ref.to_torch_images(x), return_loss=True).loss.detach()
  logits = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(ids)).logits_per_text
  loss = (clip_loss if style == "clip" else siglip_loss)(logits)
  assert abs(float(loss) - theirs.item()) < 1e-4
