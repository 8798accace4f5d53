"""The train state and the pure train step `(state, batch) -> (state, metrics)`."""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlm_jax.models.vlm import VLM
from vlm_jax.train import optim as optim_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: dict  # the full nested parameter tree
  opt_state: Any  # over the trainable parameters only (flat, keyed by path)
  rng: jax.Array  # raw uint32 key data, so it checkpoints like any array


def forward(model: nn.Module, params: dict, batch: dict):
  """Logits for a batch in the format of `vlm_jax.data.schema`."""
  kw = dict(attention_mask=batch.get("attention_mask"), positions=batch.get("positions"),
            segment_ids=batch.get("segment_ids"))
  if isinstance(model, VLM):
    return model.apply({"params": params}, batch["input_ids"], batch.get("images"), **kw).logits
  return model.apply({"params": params}, batch["input_ids"], **kw).logits


def token_losses(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token next-token cross-entropy, log-partition and weights, all [B, L-1], float32.

  Token t is predicted from tokens < t; `loss_mask[t]` says whether it counts.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = batch["input_ids"][:, 1:]
  weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return ce, lse, weights


def loss_sums(logits: jax.Array, batch: dict, z_loss: float) -> tuple[jax.Array, dict]:
  """Summed (not averaged) loss terms, so microbatches add up to the full batch exactly."""
  ce, lse, w = token_losses(logits, batch)
  correct = (jnp.argmax(logits[:, :-1], axis=-1) == batch["input_ids"][:, 1:]).astype(jnp.float32)
  aux = {"ce_sum": jnp.sum(ce * w), "z_sum": jnp.sum(jnp.square(lse) * w),
         "correct": jnp.sum(correct * w), "tokens": jnp.sum(w)}
  return aux["ce_sum"] + z_loss * aux["z_sum"], aux


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, labels: dict,
                    lr_schedule: Callable, z_loss: float = 0.0, grad_accum: int = 1):
  """Builds the pure step. `labels` (from `optim.path_labels`) fix what trains."""

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    trainable, frozen = optim_lib.split(state.params, labels)
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:]), 1.0)

    def loss_fn(train_params, micro):
      logits = forward(model, optim_lib.merge(train_params, frozen), micro)
      total, aux = loss_sums(logits, micro, z_loss)
      return total / n_tokens, aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
      (_, aux), grads = grad_fn(trainable, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, mb):
        (_, aux), g = grad_fn(trainable, mb)
        return jax.tree.map(jnp.add, carry, (g, aux)), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      zero_aux = {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "z_sum", "correct", "tokens")}
      (grads, aux), _ = jax.lax.scan(accumulate, (zeros, zero_aux), micro)

    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    params = optim_lib.merge(trainable, frozen)
    tokens = jnp.maximum(aux["tokens"], 1.0)
    metrics = {
        "loss": aux["ce_sum"] / tokens,
        "z_loss": aux["z_sum"] / tokens,
        "accuracy": aux["correct"] / tokens,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
        "lr": lr_schedule(state.step),
        "target_tokens": aux["tokens"],
    }
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return step_fn
