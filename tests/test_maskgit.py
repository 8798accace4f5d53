"""The MaskGIT text-to-codes generator: schedule, masking, loss, decoding and a tiny overfit."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.models.maskgit import (CodeGenerator, MaskGITConfig, example_inputs, generate_codes, mask_ratio,
                                    masked_loss, random_mask, remaining_masked, train_loss)

K, T, LT = 16, 16, 8
CONFIG = MaskGITConfig(codebook_size=K, num_tokens=T, text_vocab_size=32, max_text_len=LT, width=32, depth=2,
                       num_heads=2, mlp_dim=64, cond_dropout=0.1)


def _init(model):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *example_inputs(model.config))["params"])


@pytest.fixture(scope="module")
def model_params():
  model = CodeGenerator(CONFIG)
  params = _init(model)
  return model, params


def _captions(batch: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 32, (batch, LT)).astype(np.int32)
  lengths = rng.integers(2, LT + 1, batch)
  mask = np.arange(LT)[None] < lengths[:, None]
  return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


# ----------------------------------------------------------------------------- schedule, masking, loss

def test_cosine_schedule_and_remaining_counts():
  np.testing.assert_allclose(mask_ratio(jnp.array([0.0, 0.5, 1.0])), [1.0, math.sqrt(0.5), 0.0], atol=1e-6)
  # floor(cos(pi/2 k/8) * 16), k = 1..8: 15.69, 14.78, 13.30, 11.31, 8.89, 6.12, 3.12, 0
  assert remaining_masked(16, 8).tolist() == [15, 14, 13, 11, 8, 6, 3, 0]
  # floor(cos(pi/2 k/4) * 10): 9.24, 7.07, 3.83, 0; per row, M0 = [10, 1]
  assert remaining_masked(jnp.array([10, 1]), 4).tolist() == [[9, 0], [7, 0], [3, 0], [0, 0]]


def test_random_mask_count_follows_the_drawn_ratio():
  mask, r = random_mask(jax.random.key(3), 256, T, return_ratios=True)
  r = np.asarray(r, np.float64)
  expected = np.maximum(1, np.ceil(np.cos(np.pi / 2 * r) * T))
  np.testing.assert_array_equal(np.asarray(mask).sum(-1), expected)
  assert r.min() < 0.05 and r.max() > 0.95  # r spans (0, 1): counts from 1 to T
  # The positions are chosen at random, not a prefix: every column is masked sometimes and
  # rows with the same count differ.
  assert np.asarray(mask).any(0).all()
  half = np.asarray(mask)[expected == 8]
  assert len({row.tobytes() for row in half}) == len(half) > 1


def test_masked_loss_is_cross_entropy_over_masked_positions_only():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  codes = rng.integers(0, 7, (3, 5))
  mask = rng.random((3, 5)) < 0.5
  mask[0, 0] = True
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, codes[..., None], -1)[..., 0]
  loss, metrics = masked_loss(jnp.asarray(logits), jnp.asarray(codes), jnp.asarray(mask))
  np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["masked_accuracy"], (logits.argmax(-1) == codes)[mask].mean(), rtol=1e-6)
  assert metrics["loss"] == loss


# ----------------------------------------------------------------------------- the network

def test_padding_and_null_condition_are_masked_out(model_params):
  model, params = model_params
  text, text_mask = _captions(2)
  codes = jax.random.randint(jax.random.key(1), (2, T), 0, K + 1)  # the mask id K is a legal input
  apply = jax.jit(lambda ids, m: model.apply({"params": params}, ids, m, codes))
  logits = apply(text, text_mask)
  assert logits.shape == (2, T, K) and logits.dtype == jnp.float32
  # A padded-out caption token changes nothing; a real one does.
  other = jnp.where(text_mask, text, 31)
  np.testing.assert_allclose(apply(other, text_mask), logits, atol=1e-6)
  assert not np.allclose(apply(text.at[:, 0].set(31 - text[:, 0]), text_mask), logits, atol=1e-4)
  # The null condition (all padded) ignores the caption entirely.
  null = jnp.zeros_like(text_mask)
  np.testing.assert_allclose(apply(text, null), apply((other + 1) % 32, null), atol=1e-6)


def test_splash_attention_gives_the_xla_logits(model_params):
  """The Pallas kernel (interpret mode on CPU) with padded captions and the null condition."""
  from vlm_jax.models.attention import interpret_kernels
  model, params = model_params
  text, text_mask = _captions(3)
  text_mask = text_mask.at[2].set(False)  # a null-condition row
  codes = jax.random.randint(jax.random.key(1), (3, T), 0, K + 1)
  want = model.apply({"params": params}, text, text_mask, codes)
  with interpret_kernels():
    got = CodeGenerator(dataclasses.replace(CONFIG, attention="splash")).apply(
        {"params": params}, text, text_mask, codes)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_cond_dropout_one_ignores_the_caption(model_params):
  _, params = model_params
  text, text_mask = _captions(4)
  codes = jax.random.randint(jax.random.key(2), (4, T), 0, K)
  rng = jax.random.key(5)
  def losses(config):  # (loss with the caption, loss with another caption)
    loss = jax.jit(lambda ids: train_loss(CodeGenerator(config), params, ids, text_mask, codes, rng)[0])
    return float(loss(text)), float(loss((text + 7) % 32))
  always = losses(dataclasses.replace(CONFIG, cond_dropout=1.0))
  never = losses(dataclasses.replace(CONFIG, cond_dropout=0.0))
  assert abs(always[0] - always[1]) < 1e-6
  assert abs(never[0] - never[1]) > 1e-4


# ----------------------------------------------------------------------------- decoding

def test_decoding_follows_the_schedule_and_never_revisits(model_params):
  model, params = model_params
  text, text_mask = _captions(4)
  codes, (trace_codes, trace_masks) = generate_codes(model, params, text, text_mask, jax.random.key(0),
                                                     steps=8, return_trace=True)
  codes, trace_codes, trace_masks = map(np.asarray, (codes, trace_codes, trace_masks))
  assert codes.shape == (4, T) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < K
  np.testing.assert_array_equal(trace_masks.sum(-1), np.repeat([[15, 14, 13, 11, 8, 6, 3, 0]], 4, 0).T)
  np.testing.assert_array_equal(trace_codes[-1], codes)
  np.testing.assert_array_equal(trace_codes == K, trace_masks)
  for t in range(8):  # once decided, a position keeps its code to the end
    decided = ~trace_masks[t]
    np.testing.assert_array_equal(trace_codes[t][decided], codes[decided])
    if t:
      assert not (trace_masks[t] & ~trace_masks[t - 1]).any()


def test_fixed_codes_stay_fixed(model_params):
  model, params = model_params
  text, text_mask = _captions(4)
  fixed = jax.random.randint(jax.random.key(7), (4, T), 0, K)
  fixed_mask = np.zeros((4, T), bool)
  fixed_mask[0, :6] = True
  fixed_mask[1, ::3] = True
  fixed_mask[3, 1:] = True  # row 2: nothing fixed; row 3: one position left
  fixed = jnp.where(fixed_mask, fixed, -1)  # what sits under an unfixed position is never read
  codes, (_, masks) = generate_codes(model, params, text, text_mask, jax.random.key(1), steps=8,
                                     fixed=fixed, fixed_mask=fixed_mask, return_trace=True)
  np.testing.assert_array_equal(np.asarray(codes)[fixed_mask], np.asarray(fixed)[fixed_mask])
  assert not np.asarray(masks)[:, fixed_mask].any()
  m0 = T - fixed_mask.sum(-1)  # 10, 10, 16, 1
  np.testing.assert_array_equal(np.asarray(masks).sum(-1), remaining_masked(m0, 8))
  assert np.asarray(codes).min() >= 0


def test_greedy_and_guidance_match_a_direct_forward_pass(model_params):
  model, params = model_params
  text, text_mask = _captions(4)
  apply = jax.jit(lambda m: model.apply({"params": params}, text, m, jnp.full((4, T), K)))
  cond, uncond = apply(text_mask), apply(jnp.zeros_like(text_mask))
  # One round, temperature 0: every position is the argmax of the (guided) logits.
  one = lambda rng, s: np.asarray(generate_codes(model, params, text, text_mask, rng, steps=1,
                                                 temperature=0.0, guidance_scale=s))
  np.testing.assert_array_equal(one(jax.random.key(0), 0.0), np.asarray(cond.argmax(-1)))
  np.testing.assert_array_equal(one(jax.random.key(0), 3.0), np.asarray((4 * cond - 3 * uncond).argmax(-1)))
  assert (one(jax.random.key(0), 3.0) != one(jax.random.key(0), 0.0)).any()
  # Temperature 0 is deterministic whatever the key, over several rounds too.
  greedy = lambda rng: np.asarray(generate_codes(model, params, text, text_mask, rng, temperature=0.0))
  np.testing.assert_array_equal(greedy(jax.random.key(1)), greedy(jax.random.key(2)))
  # guidance_scale=0 is plain conditional sampling with the same key.
  sampled = lambda **kw: np.asarray(generate_codes(model, params, text, text_mask, jax.random.key(4), **kw))
  np.testing.assert_array_equal(sampled(), sampled(guidance_scale=0.0))
  assert (sampled() != greedy(jax.random.key(4))).any()


def test_row_results_do_not_depend_on_the_batch(model_params):
  model, params = model_params
  text, text_mask = _captions(4)
  keys = jax.random.split(jax.random.key(11), 4)
  kw = dict(steps=8, temperature=1.0, guidance_scale=1.5)
  batched = np.asarray(generate_codes(model, params, text, text_mask, keys, **kw))
  for i in range(4):
    alone = generate_codes(model, params, text[i:i + 1], text_mask[i:i + 1], keys[i:i + 1], **kw)
    np.testing.assert_array_equal(np.asarray(alone)[0], batched[i])
  # One key is the same as its split into per-row keys; different rows get different keys.
  single = generate_codes(model, params, text, text_mask, jax.random.key(11), **kw)
  np.testing.assert_array_equal(np.asarray(single), batched)
  same_text = generate_codes(model, params, text[:1].repeat(4, 0), text_mask[:1].repeat(4, 0), keys, **kw)
  assert len({row.tobytes() for row in np.asarray(same_text)}) > 1


# ----------------------------------------------------------------------------- learning

def _overfit(steps: int, decode: bool):
  """Trains on 4 (caption, grid) pairs: (first losses, last losses, greedy match rate if `decode`)."""
  model = CodeGenerator(CONFIG)
  params = _init(model)
  text, text_mask = _captions(4, seed=1)
  assert len({row.tobytes() for row in np.asarray(text)}) == 4
  grids = jax.random.randint(jax.random.key(1), (4, T), 0, K)
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, rng):
    grads, metrics = jax.grad(lambda p: train_loss(model, p, text, text_mask, grids, rng), has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, metrics["loss"]

  opt_state, losses = opt.init(params), []
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(jax.random.key(2), i))
    losses.append(float(loss))
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  if not decode:
    return first, last, None
  codes = generate_codes(model, params, text, text_mask, jax.random.key(3), temperature=0.0)
  return first, last, float(np.mean(np.asarray(codes) == np.asarray(grids)))


def test_loss_falls_quickly():
  first, last, _ = _overfit(60, decode=False)
  assert first > 2.4  # about ln 16 = 2.77 at the start
  assert last < 0.7 * first


@pytest.mark.slow
def test_tiny_generator_overfits_four_pairs():
  _, last, match = _overfit(400, decode=True)
  assert last < 0.2
  assert match >= 0.9


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error(model_params):
  model, params = model_params
  text, text_mask = _captions(2)
  codes = jnp.zeros((2, T), jnp.int32)
  apply = lambda ids, m, c: model.apply({"params": params}, ids, m, c)
  with pytest.raises(ValueError, match=r"codes .* \[0, 17\].*outside \[0, 17\)"):
    apply(text, text_mask, codes.at[0, 0].set(K + 1))
  with pytest.raises(ValueError, match=r"codes .* \[0, 16\].*outside \[0, 16\)"):
    train_loss(model, params, text, text_mask, codes.at[1, 3].set(K), jax.random.key(0))
  with pytest.raises(ValueError, match=r"\[-1, 0\].*outside \[0, 16\)"):
    train_loss(model, params, text, text_mask, codes.at[1, 3].set(-1), jax.random.key(0))
  with pytest.raises(ValueError, match=r"codes hold 9 codes per row but config.num_tokens is 16"):
    apply(text, text_mask, codes[:, :9])
  long_text = jnp.ones((2, LT + 4), jnp.int32)
  with pytest.raises(ValueError, match=r"text length 12 exceeds max_text_len 8"):
    apply(long_text, jnp.ones_like(long_text, bool), codes)
  with pytest.raises(ValueError, match=r"text length 12 exceeds max_text_len 8"):
    generate_codes(model, params, long_text, jnp.ones_like(long_text, bool), jax.random.key(0))
  with pytest.raises(ValueError, match=r"text_ids .*\[0, 40\].*outside \[0, 32\)"):
    apply(text.at[0, 0].set(40), text_mask, codes)
  with pytest.raises(ValueError, match=r"fixed .*\[0, 20\].*outside \[0, 16\)"):
    generate_codes(model, params, text, text_mask, jax.random.key(0), fixed=codes.at[0, 1].set(20),
                   fixed_mask=jnp.ones((2, T), bool))
  with pytest.raises(ValueError, match=r"fixed_mask hold 4 codes per row but config.num_tokens is 16"):
    generate_codes(model, params, text, text_mask, jax.random.key(0), fixed=codes,
                   fixed_mask=jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r"rng holds 3 per-row keys for a batch of 2"):
    generate_codes(model, params, text, text_mask, jax.random.split(jax.random.key(0), 3))
  with pytest.raises(ValueError, match=r"width 30 is not divisible by num_heads 4"):
    MaskGITConfig(width=30, num_heads=4)
