"""Every attention implementation gives the numbers of the "xla" reference, alone and inside the models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from vlm_jax.models import build_model, init_params
from vlm_jax.models.attention import IMPLEMENTATIONS, attention, check_attention
from vlm_jax.models.contrastive import TextConfig, TextTower
from vlm_jax.models.lm import DecoderLM, KVCache, LMConfig, attention_mask_matrix
from vlm_jax.models.vit import ViTConfig, VisionTower
from vlm_jax.models.vlm import VLM

# the implementations this platform runs, besides the reference
OTHERS = [n for n, p in IMPLEMENTATIONS.items() if n != "xla" and (p is None or jax.default_backend() in p)]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
B, L, D = 2, 12, 16


def _masks():
  """name -> (mask [B, L, L] or None, kv_heads): the cases the towers and the decoder build."""
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, L, L))
  pad = jnp.arange(L)[None] < jnp.asarray([[L], [L - 5]])  # right padding
  left = jnp.arange(L)[None] >= jnp.asarray([[0], [4]])  # left padding: fully masked query rows
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [2] * 3 + [0] * 2])
  slots = jnp.arange(L)
  return {
      "bidirectional": (None, 4),
      "causal": (causal, 4),
      "encoder_padded": (jnp.broadcast_to(pad[:, None, :], (B, L, L)), 4),
      "causal_left_padded": (attention_mask_matrix(left, slots, slots), 4),
      "packed_segments": (attention_mask_matrix(seg > 0, slots, slots, seg), 4),
      "gqa_causal_padded": (attention_mask_matrix(pad, slots, slots), 2),
      "mqa_packed": (attention_mask_matrix(seg > 0, slots, slots, seg), 1),
  }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(_masks()))
@pytest.mark.parametrize("impl", OTHERS)
def test_attention_function_equals_xla(impl, case, dtype):
  mask, kv_heads = _masks()[case]
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (B, L, 4, D), dtype)
  k = jax.random.normal(kk, (B, L, kv_heads, D), dtype)
  v = jax.random.normal(kv, (B, L, kv_heads, D), dtype)
  want = attention(q, k, v, mask, "xla").astype(jnp.float32)
  got = attention(q, k, v, mask, impl).astype(jnp.float32)
  np.testing.assert_allclose(got, want, atol=TOL[dtype], rtol=0)


def _lm_config(impl: str, dtype: str, **kw) -> LMConfig:
  return LMConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=64, attention=impl, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", OTHERS)
def test_decoder_logits_equal_xla(impl, dtype):
  """GQA decoder on a left-padded batch and on a packed one (scanned layers: the same call)."""
  ref = DecoderLM(_lm_config("xla", dtype))
  params = init_params(ref, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (B, L), 0, 64)
  padded = dict(attention_mask=jnp.arange(L)[None] >= jnp.asarray([[0], [3]]))
  seg = jnp.asarray([[1] * 7 + [2] * 5, [1] * 4 + [2] * 8])
  packed = dict(segment_ids=seg, positions=jnp.asarray([list(range(7)) + list(range(5)),
                                                        list(range(4)) + list(range(8))]))
  for scan in (False, True):
    want_model, model = (DecoderLM(_lm_config(i, dtype, scan_layers=scan)) for i in ("xla", impl))
    p = params if not scan else jax.tree.map(lambda *x: jnp.stack(x), params["layers_0"], params["layers_1"])
    if scan:
      p = {k: v for k, v in params.items() if not k.startswith("layers_")} | {"layers": p}
    for kw in (padded, packed):
      want = want_model.apply({"params": p}, ids, **kw).logits
      got = model.apply({"params": p}, ids, **kw).logits
      np.testing.assert_allclose(got, want, atol=TOL[jnp.dtype(dtype).type], rtol=0)


@pytest.mark.parametrize("impl", OTHERS)
def test_decoding_with_a_cache_runs_xla_for_every_setting(impl):
  ref, model = DecoderLM(_lm_config("xla", "float32")), DecoderLM(_lm_config(impl, "float32"))
  params = init_params(ref, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (B, 5), 0, 64)
  cache = KVCache.empty(ref.config, B, 8)
  want = ref.apply({"params": params}, ids, cache=cache).logits
  got = model.apply({"params": params}, ids, cache=cache).logits
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.slow  # ~11 s; the decoder and the attention function are compared in the default run
@pytest.mark.parametrize("impl", OTHERS)
def test_vlm_logits_equal_xla(impl):
  ref = build_model(presets.get_config("tiny"))
  c = ref.config
  model = VLM(dataclasses.replace(c, vision=dataclasses.replace(c.vision, attention=impl),
                                  text=dataclasses.replace(c.text, attention=impl)))
  params = init_params(ref, jax.random.key(0))
  t, img = c.tokens_per_image, c.image_token_id
  ids = jnp.asarray([[1] + [img] * t + [2, 3, 4], [5, 6] + [img] * t + [0, 0]])
  mask = ids != 0
  images = jax.random.normal(jax.random.key(1), (2, c.vision.image_size, c.vision.image_size, 3))
  want = ref.apply({"params": params}, ids, images, attention_mask=mask).logits
  got = model.apply({"params": params}, ids, images, attention_mask=mask).logits
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow  # ~11 s
@pytest.mark.parametrize("impl", OTHERS)
def test_siglip_tower_and_text_tower_equal_xla(impl):
  """The attention-pooling head (one query) and the padded causal / bidirectional text towers."""
  vit = ViTConfig(style="siglip", image_size=16, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64,
                  act="gelu_pytorch_tanh", use_head=True)
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = init_params(VisionTower(vit), jax.random.key(0))
  want = VisionTower(vit).apply({"params": params}, images).pooled
  got = VisionTower(dataclasses.replace(vit, attention=impl)).apply({"params": params}, images).pooled
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  ids = jnp.asarray([[3, 4, 5, 2, 0, 0], [6, 7, 8, 9, 10, 2]])
  for style in ("clip", "siglip"):
    text = TextConfig(style=style, vocab_size=16, width=32, depth=2, num_heads=4, mlp_dim=64, max_len=8)
    params = init_params(TextTower(text), jax.random.key(0))
    want = TextTower(text).apply({"params": params}, ids, ids != 0)
    got = TextTower(dataclasses.replace(text, attention=impl)).apply({"params": params}, ids, ids != 0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_unknown_or_unbuilt_implementation_fails_at_config_time():
  with pytest.raises(ValueError, match="splash.*not implemented.*dot_product_attention"):
    LMConfig(attention="splash")
  with pytest.raises(ValueError, match="unknown attention implementation"):
    ViTConfig(attention="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN is there to run on a GPU")
def test_a_kernel_forced_onto_a_platform_without_it_names_platform_and_alternatives():
  check_attention("cudnn")  # a valid name: only the platform lacks it
  model = DecoderLM(_lm_config("cudnn", "bfloat16"))
  params = init_params(DecoderLM(_lm_config("xla", "bfloat16")), jax.random.key(0))
  with pytest.raises(ValueError, match=rf"'cudnn' needs a gpu backend, but this one is '{jax.default_backend()}'"
                                       r".*\['dot_product_attention', 'xla'\]"):
    model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32))
