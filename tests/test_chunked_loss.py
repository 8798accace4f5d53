"""The chunked next-token loss is the full-logits loss: same sums, same gradients, same train step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import models as presets
from vlm_jax.models import build_model, init_params
from vlm_jax.models.lm import DecoderLM, LMConfig
from vlm_jax.models.vlm import VLM
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.extension import TrainExtension
from vlm_jax.train.step import (TrainState, chunked_loss_sums, forward, forward_output, loss_sums,
                                make_train_step)

Z_LOSS = 0.1
B, L = 3, 12


def _lm(tie: bool) -> DecoderLM:
  return DecoderLM(LMConfig(vocab_size=96, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=64, tie_embeddings=tie))


def _batch(ids: jax.Array) -> dict:
  """Padding (id 0) anywhere; row 0's first five tokens are a prompt that does not count."""
  valid = (ids != 0).astype(jnp.int32)
  return {"input_ids": ids, "attention_mask": valid, "loss_mask": valid.at[0, :5].set(0)}


def _lm_batch(vocab: int) -> dict:
  """Right padding in row 1, left padding in row 2."""
  ids = jax.random.randint(jax.random.key(1), (B, L), 1, vocab)
  return _batch(ids.at[1, -4:].set(0).at[2, :3].set(0))


def _tiny_vlm():
  model = build_model(presets.get_config("tiny"))
  c = model.config
  t, img = c.tokens_per_image, c.image_token_id
  ids = jnp.asarray([[1] + [img] * t + [2, 3, 4, 5, 6], [7] * 3 + [img] * t + [8, 9, 0],
                     [0, 0] + [img] * t + [10, 11, 12, 13]])
  batch = _batch(ids)
  batch["loss_mask"] = batch["loss_mask"] * (ids != img)
  batch["images"] = jax.random.normal(jax.random.key(2), (B, 1, c.vision.image_size, c.vision.image_size, 3))
  return model, batch


def _models():
  lm_cases = {f"lm_{'tied' if tie else 'untied'}": (_lm(tie), _lm_batch(96)) for tie in (True, False)}
  vlm, batch = _tiny_vlm()
  tied = VLM(dataclasses.replace(vlm.config, text=dataclasses.replace(vlm.config.text, tie_embeddings=True)))
  return {**lm_cases, "vlm_untied": (vlm, batch), "vlm_tied": (tied, batch)}


@pytest.mark.parametrize("case, chunk", [  # chunks that divide, do not divide, exceed the sequence
    pytest.param(case, chunk, marks=pytest.mark.slow if case.startswith("vlm") and chunk != 5 else ())
    for case in ("lm_tied", "lm_untied", "vlm_untied", "vlm_tied") for chunk in (4, 5, 64)])
def test_chunked_loss_and_gradients_equal_the_full_logits(case, chunk):
  model, batch = _models()[case]
  params = init_params(model, jax.random.key(0))
  n = jnp.sum(batch["loss_mask"][:, 1:])

  def full(p):
    total, aux = loss_sums(forward(model, p, batch), batch, Z_LOSS)
    return total / n, aux

  def chunked(p):
    head = lambda h: model.apply({"params": p}, h, method="head")
    total, aux = chunked_loss_sums(forward_output(model, p, batch).hidden, head, batch, Z_LOSS, chunk)
    return total / n, aux

  (want, want_aux), want_grads = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
  (got, got_aux), got_grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
  assert float(want_aux["z_sum"]) > 0 and float(want_aux["tokens"]) == float(n)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  for key in want_aux:  # per target token, as the step logs them (z ~ 21: 1e-6 is under 1 ulp, so relative)
    np.testing.assert_allclose(got_aux[key] / n, want_aux[key] / n, atol=1e-6, rtol=1e-6, err_msg=key)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=0), got_grads, want_grads)


def _one_step(model, batch, loss_chunk, extension=None):
  params = init_params(model, jax.random.key(0))
  labels = optim_lib.path_labels(params, [(".*", 1.0)])
  tx = optax.sgd(0.5)
  kw = dict(extension=extension) if extension else {}
  step = jax.jit(make_train_step(model, tx, labels, lambda s: 0.5, Z_LOSS, loss_chunk=loss_chunk, **kw))
  trainable, _ = optim_lib.split(params, labels)
  state = TrainState(np.int32(0), params, tx.init(trainable), jax.random.key_data(jax.random.key(0)))
  return step(state, batch)


@pytest.mark.parametrize("case", ["lm_untied", "vlm_tied"])
def test_train_step_with_chunking_gives_the_same_metrics_and_update(case):
  model, batch = _models()[case]
  (want_state, want), (got_state, got) = (_one_step(model, batch, chunk) for chunk in (0, 5))
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=1e-6, err_msg=key)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), got_state.params, want_state.params)


def test_an_extension_loss_still_sees_the_full_logits():
  model, batch = _models()["lm_untied"]
  seen = []

  def loss(model, params, inputs, batch, logits, total):
    seen.append(logits.shape)
    return total + jnp.sum(logits[..., 0]), {"first_logit_sum": jnp.sum(logits[..., 0])}

  ext = TrainExtension(name="probe", loss=loss)
  (_, want), (_, got) = (_one_step(model, batch, chunk, ext) for chunk in (0, 5))
  assert seen == [(B, L, 96)] * 2
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=1e-6, err_msg=key)
