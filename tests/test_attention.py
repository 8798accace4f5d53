"""Every attention implementation gives the numbers of the "xla" reference, alone and inside the models."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from vlm_jax.models import build_model, init_params
from vlm_jax.models.attention import IMPLEMENTATIONS, Segments, attention, check_attention, interpret_kernels
from vlm_jax.models.contrastive import TextConfig, TextTower
from vlm_jax.models.lm import DecoderLM, KVCache, LMConfig, attention_mask_matrix
from vlm_jax.models.vit import ViTConfig, VisionTower
from vlm_jax.models.vlm import VLM
from vlm_jax.parallel.mesh import DEFAULT_RULES, make_mesh

# the implementations this platform runs, besides the reference (splash, TPU only, has its own tests below)
OTHERS = [n for n, p in IMPLEMENTATIONS.items()
          if n not in ("xla", "splash") and (p is None or jax.default_backend() in p)]
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


def test_unknown_implementation_fails_at_config_time():
  with pytest.raises(ValueError, match=r"'flash': unknown attention implementation.*'splash', 'xla'\]"):
    ViTConfig(attention="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN is there to run on a GPU")
def test_a_kernel_forced_onto_a_platform_without_it_names_platform_and_alternatives():
  check_attention("cudnn")  # a valid name: only the platform lacks it
  model = DecoderLM(_lm_config("cudnn", "bfloat16"))
  params = init_params(DecoderLM(_lm_config("xla", "bfloat16")), jax.random.key(0))
  with pytest.raises(ValueError, match=rf"'cudnn' needs a gpu backend, but this one is '{jax.default_backend()}'"
                                       r".*\['dot_product_attention', 'xla'\]"):
    model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32))


# --- splash: the Pallas TPU kernel, here in interpret mode (~1-3 s a call on CPU) ---

def _segment_cases():
  """name -> (Segments or None, kv_heads): what the decoder and the towers give the kernel."""
  valid = jnp.ones((B, L), bool)
  pad = jnp.arange(L)[None] < jnp.asarray([[L], [L - 5]])
  left = jnp.arange(L)[None] >= jnp.asarray([[0], [4]])
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [2] * 3 + [0] * 2])
  return {
      "bidirectional": (None, 4),
      "causal": (Segments.of(valid, causal=True), 4),
      "encoder_padded": (Segments.of(pad), 4),
      "causal_left_padded": (Segments.of(left, causal=True), 4),
      "packed_segments": (Segments.of(seg > 0, seg, causal=True), 4),
      "gqa_causal_padded": (Segments.of(pad, causal=True), 2),
      "mqa_packed": (Segments.of(seg > 0, seg, causal=True), 1),
  }


def _qkv(kv_heads, dtype, b=B, lq=L, lk=L):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kq, (b, lq, 4, D), dtype), jax.random.normal(kk, (b, lk, kv_heads, D), dtype),
          jax.random.normal(kv, (b, lk, kv_heads, D), dtype))


def test_segments_are_the_decoder_mask_on_real_rows():
  """The structure splash gets is the dense mask the other implementations get (padding rows aside)."""
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [2] * 3 + [0] * 2])
  slots = jnp.arange(L)
  dense = Segments.of(seg > 0, seg, causal=True).dense()
  want = attention_mask_matrix(seg > 0, slots, slots, seg)
  np.testing.assert_array_equal(dense[seg > 0], want[seg > 0])
  assert dense[1, 11, 10:].all() and not dense[1, 11, :10].any()  # padding sees only padding: no empty row
  assert int(want.sum()) == 5 * 6 // 2 + 4 * 5 // 2 + 3 * 4 // 2 + 7 * 8 // 2 + 3 * 4 // 2  # causal triangles


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(_segment_cases()))
def test_splash_equals_xla(case, dtype):
  """Every row, padding rows too (length 12 is padded to the kernel's 128-token tiles inside)."""
  mask, kv_heads = _segment_cases()[case]
  q, k, v = _qkv(kv_heads, dtype)
  want = attention(q, k, v, None if mask is None else mask.dense(), "xla").astype(jnp.float32)
  with interpret_kernels():
    got = attention(q, k, v, mask, "splash").astype(jnp.float32)
  np.testing.assert_allclose(got, want, atol=TOL[dtype], rtol=0)


def test_splash_gradients_equal_xla():
  mask, kv_heads = _segment_cases()["mqa_packed"]
  q, k, v = _qkv(2, jnp.float32)
  ct = jax.random.normal(jax.random.key(5), q.shape)
  loss = lambda impl, m: lambda q, k, v: jnp.sum(attention(q, k, v, m, impl) * ct)
  want = jax.grad(loss("xla", mask.dense()), argnums=(0, 1, 2))(q, k, v)
  with interpret_kernels():
    got = jax.grad(loss("splash", mask), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_splash_cross_attention_pads_queries_and_keys():
  """One probe query over 130 keys (the SigLIP pooling head's shape): both lengths padded to tiles."""
  q, k, v = _qkv(4, jnp.float32, lq=1, lk=130)
  with interpret_kernels():
    got = attention(q, k, v, None, "splash")
  np.testing.assert_allclose(got, attention(q, k, v, None, "xla"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["layers", "scanned"])
def test_decoder_with_splash_equals_xla_on_real_tokens(scan):
  """GQA decoder on a left-padded and a packed batch (padding positions are not compared: the
  reference leaves them uniform, splash lets padding see padding)."""
  ref, model = (DecoderLM(_lm_config(i, "float32", scan_layers=scan)) for i in ("xla", "splash"))
  params = init_params(ref, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (B, L), 0, 64)
  valid = jnp.arange(L)[None] >= jnp.asarray([[0], [3]])
  seg = jnp.asarray([[1] * 7 + [2] * 5, [1] * 4 + [2] * 6 + [0] * 2])
  packed = dict(segment_ids=seg, attention_mask=seg > 0,
                positions=jnp.asarray([list(range(7)) + list(range(5)), list(range(4)) + list(range(8))]))
  with interpret_kernels():
    for kw, real in ((dict(attention_mask=valid), valid), (packed, seg > 0)):
      want = ref.apply({"params": params}, ids, **kw).logits
      got = model.apply({"params": params}, ids, **kw).logits
      np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.slow  # ~50 s in interpret mode
def test_towers_with_splash_equal_xla():
  """A CLIP tower (5 tokens: class + 2x2 patches), a SigLIP tower with its one-query pooling head,
  and the padded causal text tower."""
  for style, extra in (("clip", {}), ("siglip", dict(act="gelu_pytorch_tanh", use_head=True))):
    vit = ViTConfig(style=style, image_size=16, patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64, **extra)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    params = init_params(VisionTower(vit), jax.random.key(0))
    want = VisionTower(vit).apply({"params": params}, images)
    with interpret_kernels():
      got = VisionTower(dataclasses.replace(vit, attention="splash")).apply({"params": params}, images)
    np.testing.assert_allclose(got.pooled, want.pooled, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
  ids = jnp.asarray([[3, 4, 5, 2, 0, 0], [6, 7, 8, 9, 10, 2]])
  text = TextConfig(style="clip", vocab_size=16, width=32, depth=1, num_heads=4, mlp_dim=64, max_len=8)
  params = init_params(TextTower(text), jax.random.key(0))
  want = TextTower(text).apply({"params": params}, ids, ids != 0)
  with interpret_kernels():
    got = TextTower(dataclasses.replace(text, attention="splash")).apply({"params": params}, ids, ids != 0)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="splash is there to run on a TPU")
def test_splash_off_tpu_names_the_platform_alternatives_and_interpret_mode():
  q, k, v = _qkv(4, jnp.float32)
  with pytest.raises(ValueError, match=rf"'splash' needs a tpu backend, but this one is '{jax.default_backend()}'"
                                       r".*\['dot_product_attention', 'xla'\].*interpret_kernels"):
    attention(q, k, v, None, "splash")


def test_splash_refuses_a_dense_mask():
  q, k, v = _qkv(4, jnp.float32)
  with interpret_kernels(), pytest.raises(ValueError, match=r"needs the mask's structure \(a `Segments`"):
    attention(q, k, v, jnp.ones((B, L, L), bool), "splash")


def test_splash_under_a_mesh_runs_per_batch_and_head_shard():
  """2-way data x 2-way tensor: each device runs the kernel on 1 row and half the (kv) heads."""
  mask, kv_heads = _segment_cases()["gqa_causal_padded"]
  q, k, v = _qkv(kv_heads, jnp.float32)
  want = attention(q, k, v, mask.dense(), "xla")
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES), interpret_kernels():
    got = jax.jit(lambda q, k, v, m: attention(q, k, v, m, "splash"))(q, k, v, mask)
    text = jax.jit(lambda q, k, v, m: attention(q, k, v, m, "splash")).lower(q, k, v, mask).as_text()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert re.search(r"sdy.manual_computation|shard_map", text)  # per-device code, not one global kernel
