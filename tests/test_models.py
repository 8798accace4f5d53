"""Model behaviour that has no Hugging Face counterpart: image slots, packing, projectors, sampling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from vlm_jax.models import LMConfig, VLM, build_model, init_params
from vlm_jax.models.generate import sample_token
from vlm_jax.models.projector import downsample_2x2, projected_tokens


@pytest.fixture(scope="module")
def tiny():
  model = build_model(presets.get_config("tiny"))
  return model, init_params(model, jax.random.key(0))


def test_per_row_image_slots_equal_the_flat_layout(tiny):
  model, params = tiny
  c = model.config
  t, img = c.tokens_per_image, c.image_token_id
  row0 = [1] + [img] * t + [2, 3] + [img] * t + [4]  # two images
  row1 = [5, 6] + [img] * t + [7] + [0] * (t + 1)  # one image, padding
  ids = jnp.asarray([row0, row1])
  x = jax.random.normal(jax.random.key(1), (3, c.vision.image_size, c.vision.image_size, 3))
  apply = jax.jit(model.apply)  # two compiles beat op-by-op dispatch of the tiny VLM
  flat = apply({"params": params}, ids, x).logits
  slots = jnp.stack([x[:2], jnp.stack([x[2], jnp.zeros_like(x[2])])])  # [2 rows, 2 slots, ...]
  per_row = apply({"params": params}, ids, slots).logits
  np.testing.assert_allclose(per_row[:, :-(t + 1)], flat[:, :-(t + 1)], atol=1e-5)
  np.testing.assert_allclose(per_row[0], flat[0], atol=1e-5)


def test_packed_segments_do_not_see_each_other(tiny):
  model, params = tiny
  lm = model.config.text
  from vlm_jax.models import DecoderLM
  dec = DecoderLM(lm)
  p = params["lm"]
  a, b = jnp.asarray([[3, 4, 5, 6]]), jnp.asarray([[7, 8, 9]])
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2]])
  pos = jnp.asarray([[0, 1, 2, 3, 0, 1, 2]])
  out = dec.apply({"params": p}, packed, positions=pos, segment_ids=seg).logits
  np.testing.assert_allclose(out[:, :4], dec.apply({"params": p}, a).logits, atol=1e-5)
  np.testing.assert_allclose(out[:, 4:], dec.apply({"params": p}, b).logits, atol=1e-5)


def test_image_token_count_mismatch_is_a_clear_error(tiny):
  model, params = tiny
  c = model.config
  ids = jnp.asarray([[1] + [c.image_token_id] * (c.tokens_per_image - 1) + [2]])
  x = jnp.zeros((1, c.vision.image_size, c.vision.image_size, 3))
  with pytest.raises(ValueError, match="image tokens"):
    model.apply({"params": params}, ids, x)


def test_downsample_concatenates_2x2_blocks():
  g, c = 4, 3
  x = jnp.arange(g * g * c, dtype=jnp.float32).reshape(1, g * g, c)
  y = downsample_2x2(x)
  assert y.shape == (1, 4, 4 * c)
  grid = np.asarray(x).reshape(g, g, c)
  np.testing.assert_array_equal(y[0, 1], np.concatenate([grid[0, 2], grid[0, 3], grid[1, 2], grid[1, 3]]))
  assert downsample_2x2(jnp.zeros((2, 25, 8))).shape == (2, 9, 32)  # odd grid padded
  assert projected_tokens("downsample", 576) == 144  # 336 px / patch 14 (METHODS §1)


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "downsample"])
def test_every_projector_builds_and_runs(projector):
  cfg = presets.preset("tiny")
  cfg.projector = projector  # the tiny preset drops CLIP's class token: 16 patch tokens
  model = build_model(cfg)
  params = init_params(model, jax.random.key(0))
  t = model.config.tokens_per_image
  assert t == (4 if projector == "downsample" else 16)
  ids = jnp.asarray([[1] + [model.config.image_token_id] * t + [2]])
  x = jnp.ones((1, model.config.vision.image_size, model.config.vision.image_size, 3))
  assert model.apply({"params": params}, ids, x).logits.shape == (1, t + 2, model.config.text.vocab_size)


def test_top_p_sampling_keeps_only_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.vmap(lambda k: sample_token(logits, k, 1.0, 0.7))(jax.random.split(jax.random.key(0), 400))
  assert set(np.unique(np.asarray(draws)).tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7
  assert int(sample_token(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0


def test_generation_stops_at_eos_and_pads_the_rest(tiny):
  """Up to its EOS each row is what decoding without an EOS gives, then padding; also when
  every row has finished and the loop exits before max_new_tokens (batch 1)."""
  from vlm_jax.models import DecoderLM
  from vlm_jax.models.generate import generate
  model, params = tiny
  lm = DecoderLM(model.config.text)
  prompts = jnp.asarray([[3, 4, 5, 6], [9, 8, 7, 6]])
  free = np.asarray(generate(lm, params["lm"], prompts, max_new_tokens=10))
  eos = int(free[0, 2])  # row 0 emits it by step 2, so with batch 1 the loop exits early
  for rows in (prompts[:1], prompts):
    out = np.asarray(generate(lm, params["lm"], rows, max_new_tokens=10, eos_token_id=eos, pad_token_id=0))
    for got, want in zip(out, free):
      hits = np.flatnonzero(want == eos)
      cut = hits[0] + 1 if hits.size else len(want)
      np.testing.assert_array_equal(got[:cut], want[:cut])
      assert (got[cut:] == 0).all()


def test_mean_max_pool_concatenates_the_mean_and_max_of_the_patch_tokens():
  from vlm_jax.models.vit import ViTConfig, VisionTower
  base = dict(style="clip", image_size=32, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  tower = VisionTower(ViTConfig(**base, pool="mean_max"))
  params = nn.meta.unbox(tower.init(jax.random.key(1), x))
  out = tower.apply(params, x)
  patches = np.asarray(out.last_hidden_state)[:, 1:]  # the class token takes no part
  np.testing.assert_allclose(out.pooled, np.concatenate([patches.mean(1), patches.max(1)], -1), rtol=1e-6)
  assert "post_norm" not in params["params"]
  with pytest.raises(ValueError, match="pool must be one of"):
    ViTConfig(**base, pool="max")


def test_text_tower_pools_the_last_kept_token_whatever_the_padding():
  from vlm_jax.models.contrastive import TextConfig, TextTower
  tower = TextTower(TextConfig(vocab_size=64, width=16, depth=1, num_heads=2, mlp_dim=32, max_len=12, pool="last"))
  ids = np.array([[1, 40, 41, 42, 2]], np.int32)  # eos id 2 is the smallest: HF's legacy rule would miss it
  params = nn.meta.unbox(tower.init(jax.random.key(0), ids))
  alone = tower.apply(params, ids, np.ones_like(ids))
  padded_ids = np.concatenate([ids, np.zeros((1, 7), np.int32)], axis=1)
  padded = tower.apply(params, padded_ids, (padded_ids != 0).astype(np.int32))
  np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="pool must be 'eos' or 'last'"):
    TextConfig(pool="mean")


def test_conv_stem_makes_the_same_token_grid():
  from vlm_jax.models.vit import ViTConfig, VisionTower
  base = dict(style="clip", image_size=32, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  plain, stem = VisionTower(ViTConfig(**base)), VisionTower(ViTConfig(**base, stem=[4, 8]))
  p_plain, p_stem = (nn.meta.unbox(m.init(jax.random.key(1), x)) for m in (plain, stem))
  assert p_stem["params"]["stem_1"]["kernel"].shape == (3, 3, 4, 8)
  assert p_stem["params"]["patch_embed"]["kernel"].shape == (2, 2, 8, 16)  # 8 px = 2 strides of 2, then 2x2
  assert stem.apply(p_stem, x).last_hidden_state.shape == plain.apply(p_plain, x).last_hidden_state.shape
  with pytest.raises(ValueError, match="not divisible by the stem"):
    ViTConfig(**base | dict(patch_size=4), stem=(4, 4, 4))
