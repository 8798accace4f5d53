"""Contrastive region guidance on a tiny random VLM: exactness against plain decoding and
against hand-built branches, the masked branch's dependence on the masked image, box
handling, several images per row, and region re-ranking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from vlm_jax.guidance import (black_pixel, branch_logits, combine, guided_generate, guided_score, region_mask,
                              rerank_boxes)
from vlm_jax.guidance.masking import patch_token_mask
from vlm_jax.models import build_model, init_params
from vlm_jax.models.generate import generate

NEW = 6


@pytest.fixture(scope="module")
def tiny():
  model = build_model(models.preset("tiny"))
  params = jax.jit(lambda key: init_params(model, key))(jax.random.key(0))
  c = model.config
  rng = np.random.default_rng(0)
  b, t = 3, c.tokens_per_image
  ids = np.concatenate([np.full((b, 2), 5), np.full((b, t), c.image_token_id), rng.integers(1, 500, (b, 4))],
                       axis=1).astype(np.int32)
  s = c.vision.image_size
  images = rng.normal(size=(b, 1, s, s, 3)).astype(np.float32)
  boxes = [[[[0, 0, 10, 10]]], [[[20, 5, s - 1, s - 1]]], []]  # the last row has none
  return model, params, ids, images, boxes


_FORWARD = {}


def _jitted_forward(model):
  if id(model) not in _FORWARD:
    _FORWARD[id(model)] = jax.jit(lambda params, ids, images: model.apply({"params": params}, ids,
                                                                          images=images).logits)
  return _FORWARD[id(model)]


def _forward(model, params, ids, images):
  """A plain forward pass of its own (one branch, its own batch), jitted."""
  return np.asarray(_jitted_forward(model)(params, jnp.asarray(ids), jnp.asarray(images)))


def _hand_masked(images, boxes, black):
  """The masked images built independently: numpy slicing per box."""
  out = images.copy()
  for r, per in enumerate(boxes):
    for j, image_boxes in enumerate(per):
      for x0, y0, x1, y1 in image_boxes:
        out[r, j, y0:y1 + 1, x0:x1 + 1] = black
  return out


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), pytest.param(0.8, 0.9, marks=pytest.mark.slow)])
def test_alpha_zero_is_plain_decoding_bit_for_bit(tiny, temperature, top_p):
  model, params, ids, images, boxes = tiny
  kw = dict(max_new_tokens=NEW, temperature=temperature, top_p=top_p, rng=jax.random.key(3))
  plain = np.asarray(generate(model, params, ids, images=images, **kw))
  guided0 = np.asarray(guided_generate(model, params, ids, images=images, boxes=boxes, alpha=0.0, **kw))
  np.testing.assert_array_equal(guided0, plain)
  guided = np.asarray(guided_generate(model, params, ids, images=images, boxes=boxes, alpha=4.0, **kw))
  assert not np.array_equal(guided[:2], plain[:2])  # guidance acts on the rows with boxes...
  np.testing.assert_array_equal(guided[2], plain[2])  # ...and the row without boxes decodes plainly


def test_guided_logits_equal_hand_combination_of_two_plain_runs(tiny):
  model, params, ids, images, boxes = tiny
  black = black_pixel("clip")
  plain = _forward(model, params, ids, images)
  masked = _forward(model, params, ids, _hand_masked(images, boxes, black))
  l, lm, rows = branch_logits(model, params, ids, images=images, boxes=boxes)
  np.testing.assert_array_equal(rows, [True, True, False])
  np.testing.assert_allclose(np.asarray(l), plain, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lm), masked, atol=2e-5)
  alpha = 1.5
  hand = (1 + alpha) * plain - alpha * masked
  got = np.asarray(combine(l, lm, alpha, jnp.asarray(rows)))
  np.testing.assert_allclose(got[:2], hand[:2], atol=1e-4)
  np.testing.assert_allclose(got[2], plain[2], atol=2e-5)
  assert np.abs(masked[:2, -1] - plain[:2, -1]).max() > 1e-3  # the boxes matter

  # The first guided token is the argmax of the hand combination at the prompt's end.
  first = np.asarray(guided_generate(model, params, ids, images=images, boxes=boxes, alpha=alpha,
                                     max_new_tokens=NEW))[:, 0]
  np.testing.assert_array_equal(first[:2], hand[:2, -1].argmax(-1))

  # Teacher-forced scores: log softmax of the combination, summed over the target tokens.
  target = np.zeros_like(ids)
  target[:, -3:] = 1
  scores = guided_score(model, params, ids, target, images=images, boxes=boxes, alphas=(0.0, alpha))
  logp = jax.nn.log_softmax(jnp.asarray(hand[:, :-1]), axis=-1)
  want = np.take_along_axis(np.asarray(logp), ids[:, 1:, None], -1)[..., 0][:, -3:].sum(-1)
  np.testing.assert_allclose(scores["guided"][1, :2], want[:2], rtol=1e-4)
  np.testing.assert_allclose(scores["guided"][0], scores["plain"], rtol=1e-6)


def test_masked_branch_sees_the_masked_image(tiny):
  """The contrast branch is the image with the boxes black, not a blind branch without an image."""
  model, params, ids, images, boxes = tiny
  _, lm, _ = branch_logits(model, params, ids, images=images, boxes=boxes)
  # Other pixels outside the box: the masked branch changes (a blind branch would not).
  outside = images.copy()
  outside[0, 0, 20:, 20:] += 1.0
  _, lm_outside, _ = branch_logits(model, params, ids, images=outside, boxes=boxes)
  assert np.abs(np.asarray(lm_outside)[0, -1] - np.asarray(lm)[0, -1]).max() > 1e-3
  # Other pixels inside the box: they are blacked out, so the masked branch is unchanged.
  inside = images.copy()
  inside[0, 0, 0:11, 0:11] += 1.0
  _, lm_inside, _ = branch_logits(model, params, ids, images=inside, boxes=boxes)
  np.testing.assert_allclose(np.asarray(lm_inside)[0], np.asarray(lm)[0], atol=1e-5)
  # And it is not what the LM says with no image: drop the image tokens (the reference's branch).
  text_only = np.asarray(model.apply({"params": params}, jnp.asarray(ids[:1, -4:])).logits)[0, -1]
  assert np.abs(np.asarray(lm)[0, -1] - text_only).max() > 1e-3


def test_boxes_at_edges_empty_and_outside():
  s = 32
  full = region_mask([[0, 0, s - 1, s - 1]], s, s)
  assert full.all()
  corner = region_mask([[s - 1, s - 1, s - 1, s - 1]], s, s)
  assert corner.sum() == 1 and corner[s - 1, s - 1]
  assert region_mask([[0, 3, 4, 3]], s, s).sum() == 5  # a one-pixel-high strip on the left edge
  assert not region_mask([], s, s).any()
  for bad in ([0, 0, s, 4], [-1, 0, 4, 4], [5, 0, 4, 4], [0, 0, 4]):
    with pytest.raises(ValueError, match="box"):
      region_mask([bad], s, s)
  with pytest.raises(ValueError, match="outside the 32x32 image"):
    region_mask([[0, 0, 40, 40]], s, s)
  # patch tokens touched by a box (the token-masking option): 8 px patches, a 4x4 grid
  tokens = patch_token_mask(region_mask([[7, 0, 8, 0]], s, s), 8)
  assert np.flatnonzero(tokens).tolist() == [0, 1]


def test_box_outside_the_image_is_a_clear_error_in_decoding(tiny):
  model, params, ids, images, _ = tiny
  with pytest.raises(ValueError, match="outside"):
    guided_generate(model, params, ids, images=images, boxes=[[[[0, 0, 32, 8]]], [], []], max_new_tokens=NEW)


def test_empty_box_lists_decode_plainly(tiny):
  model, params, ids, images, _ = tiny
  kw = dict(max_new_tokens=NEW, eos_token_id=None)
  plain = np.asarray(generate(model, params, ids, images=images, **kw))
  guided = np.asarray(guided_generate(model, params, ids, images=images, boxes=[[[]], [], []], alpha=5.0, **kw))
  np.testing.assert_array_equal(guided, plain)


def test_several_images_per_row(tiny):
  model, params, _, _, _ = tiny
  c = model.config
  t, s = c.tokens_per_image, c.vision.image_size
  rng = np.random.default_rng(1)
  img = np.full((2, t), c.image_token_id)
  ids = np.concatenate([np.full((2, 1), 7), img[:, :t], np.full((2, 2), 9), img[:, :t], np.full((2, 3), 11)],
                       axis=1).astype(np.int32)
  images = rng.normal(size=(2, 2, s, s, 3)).astype(np.float32)
  boxes = [[[], [[4, 4, 20, 20]]], [[[0, 0, 31, 15]], []]]  # row 0: its second image; row 1: its first
  black = black_pixel("clip")
  l, lm, rows = branch_logits(model, params, ids, images=images, boxes=boxes)
  np.testing.assert_array_equal(rows, [True, True])
  masked = _hand_masked(images, boxes, black)
  np.testing.assert_allclose(np.asarray(lm), _forward(model, params, ids, masked), atol=2e-5)
  np.testing.assert_allclose(np.asarray(l), _forward(model, params, ids, images), atol=2e-5)

  # The other layout: images [n, h, w, 3] consumed in order across the batch; row 0 holds
  # images 0 and 1, row 1 images 2 and 3; only image 3 has a box: only row 1 is guided.
  flat = images.reshape(4, s, s, 3)
  _, lm_flat, rows_flat = branch_logits(model, params, ids, images=flat, boxes=[[], [], [], [[0, 0, 9, 9]]])
  np.testing.assert_array_equal(rows_flat, [False, True])
  masked_flat = flat.copy()
  masked_flat[3, :10, :10] = black
  want = _forward(model, params, ids, masked_flat)
  np.testing.assert_allclose(np.asarray(lm_flat), want, atol=2e-5)


def test_rerank_picks_the_box_that_holds_the_content(tiny):
  """A constructed case: all content of the image lies in one box, the other candidates
  cover already-black background; the expression is what the model says about the image.
  Masking an empty region changes nothing (drop 0); masking the content lowers it."""
  model, params, _, _, _ = tiny
  c = model.config
  t, s = c.tokens_per_image, c.vision.image_size
  black = black_pixel("clip")
  image = np.broadcast_to(black, (1, s, s, 3)).copy()
  image[0, 16:28, 4:14] = np.random.default_rng(2).normal(size=(12, 10, 3)) * 2
  prompt = np.concatenate([[5], np.full(t, c.image_token_id), [9]]).astype(np.int32)
  expr = np.asarray(generate(model, params, prompt[None], images=image[None], max_new_tokens=4))[0]
  ids = np.concatenate([prompt, expr]).astype(np.int32)
  target = np.zeros_like(ids)
  target[-4:] = 1
  candidates = [[0, 0, 10, 10], [20, 0, 31, 12], [3, 15, 15, 29], [18, 18, 31, 31]]
  out = rerank_boxes(model, params, ids, target, image=image, candidates=candidates)
  assert out["best"] == 2
  np.testing.assert_allclose(out["drop"][[0, 1, 3]], 0.0, atol=1e-5)
  assert out["drop"][2] > 1e-3


@pytest.mark.slow
def test_token_masking_option(tiny):
  model, params, ids, images, boxes = tiny
  l, lm, rows = branch_logits(model, params, ids, images=images, boxes=boxes, mode="tokens")
  np.testing.assert_allclose(np.asarray(l), _forward(model, params, ids, images), atol=2e-5)
  assert np.abs(np.asarray(lm)[:2, -1] - np.asarray(l)[:2, -1]).max() > 1e-3
  np.testing.assert_allclose(np.asarray(lm)[2], np.asarray(l)[2], atol=1e-6)
