"""bfloat16 compute with float32 parameters and optimiser state: the configuration a pod run uses.

The model config's `dtype` is the compute dtype (activations and matrix products), `param_dtype`
the parameters'; the optimiser state follows the parameters. The engine needs nothing else.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import models as presets
from vlm_jax.models import build_model, init_params
from vlm_jax.models.vlm import VLM
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.step import TrainState, forward_output, make_train_step


def _bf16(model: VLM) -> VLM:
  c = model.config
  return VLM(dataclasses.replace(c, vision=dataclasses.replace(c.vision, dtype="bfloat16"),
                                 text=dataclasses.replace(c.text, dtype="bfloat16")))


def _batch(model: VLM) -> dict:
  c = model.config
  t, img = c.tokens_per_image, c.image_token_id
  ids = jnp.asarray([[1] + [img] * t + [2, 3, 4, 5, 6], [7] * 3 + [img] * t + [8, 9, 0]])
  valid = (ids != 0).astype(jnp.int32)
  images = jax.random.normal(jax.random.key(2), (2, 1, c.vision.image_size, c.vision.image_size, 3))
  return {"input_ids": ids, "attention_mask": valid, "loss_mask": valid * (ids != img), "images": images}


def test_bf16_compute_keeps_float32_state_and_the_float32_loss():
  f32 = build_model(presets.get_config("tiny"))
  bf16 = _bf16(f32)
  batch = _batch(f32)
  params = init_params(f32, jax.random.key(0))
  bf16_params = jax.eval_shape(lambda: init_params(bf16, jax.random.key(0)))
  assert jax.tree.map(lambda x: x.dtype, bf16_params) == jax.tree.map(lambda x: x.dtype, params)
  # The compute really is bfloat16: the decoder's hidden states (the logits are float32 by design).
  hidden = lambda model: jax.eval_shape(lambda p: forward_output(model, p, batch), params).hidden.dtype
  assert hidden(bf16) == jnp.bfloat16 and hidden(f32) == jnp.float32

  tx = optax.adamw(1e-3)
  labels = optim_lib.path_labels(params, [(".*", 1.0)])
  trainable, _ = optim_lib.split(params, labels)
  results = {}
  for name, model in (("float32", f32), ("bfloat16", bf16)):
    step = jax.jit(make_train_step(model, tx, labels, lambda s: 1.0))
    state = TrainState(np.int32(0), params, tx.init(trainable), jax.random.key_data(jax.random.key(0)))
    state, metrics = step(state, batch)
    state, second = step(state, batch)
    results[name] = (state, float(metrics["loss"]), float(second["loss"]))

  state, loss, second = results["bfloat16"]
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype  # Adam's count is the only integer
  _, want_loss, want_second = results["float32"]
  assert abs(loss - want_loss) <= 2e-2 and abs(second - want_second) <= 2e-2, (loss, want_loss, second, want_second)
  assert second < loss  # the first update, made from bfloat16 gradients, lowered the loss
  # Not the same numbers: bfloat16 rounding is visible, so the two runs are truly different.
  assert loss != want_loss
