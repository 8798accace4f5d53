"""The train state and the pure train step `(state, batch) -> (state, metrics)`."""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlm_jax.models.contrastive import ContrastiveModel, clip_loss, siglip_loss
from vlm_jax.models.vlm import VLM
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.extension import PLAIN, TrainExtension


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
                    lr_schedule: Callable, z_loss: float = 0.0, grad_accum: int = 1,
                    extension: TrainExtension = PLAIN):
  """Builds the pure step `(state, batch[, inputs]) -> (state, metrics)`.

  `labels` (from `optim.path_labels`) fix what trains; `extension` is how a technique
  changes the objective (see `vlm_jax.train.extension`; `inputs` are its step inputs).
  A `ContrastiveModel` gets its own objective (`make_contrastive_step`); every other
  model the next-token loss.
  """
  if isinstance(model, ContrastiveModel):
    if extension is not PLAIN or grad_accum != 1:
      raise ValueError("a contrastive model trains on whole batches (in-batch negatives): "
                       "no grad_accum, no train extension")
    return make_contrastive_step(model, tx, labels, lr_schedule)
  student = extension.student or (lambda params, inputs: params)
  project = extension.project or (lambda tree, inputs: tree)

  def step_fn(state: TrainState, batch: dict, inputs: Any = None) -> tuple[TrainState, dict]:
    trainable, frozen = optim_lib.split(state.params, labels)
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:]), 1.0)

    def loss_fn(train_params, micro):
      params = optim_lib.merge(train_params, frozen)
      logits = forward(model, student(params, inputs), micro)
      total, aux = loss_sums(logits, micro, z_loss)
      if extension.loss is not None:
        total, extra = extension.loss(model, params, inputs, micro, logits, total)
        aux = {**aux, **extra}
      return total / n_tokens, aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
      (_, aux), grads = grad_fn(trainable, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, mb):
        (_, aux), g = grad_fn(trainable, mb)
        return jax.tree.map(jnp.add, carry, (g, aux)), None

      _, aux_shapes = jax.eval_shape(loss_fn, trainable, jax.tree.map(lambda x: x[0], micro))
      zeros = jax.tree.map(jnp.zeros_like, (trainable, aux_shapes))
      (grads, aux), _ = jax.lax.scan(accumulate, zeros, micro)

    grads = project(grads, inputs)
    tokens = jnp.maximum(aux["tokens"], 1.0)
    metrics = {"loss": aux["ce_sum"] / tokens, "z_loss": aux["z_sum"] / tokens,
               "accuracy": aux["correct"] / tokens, "target_tokens": aux["tokens"]}
    metrics.update({k[:-len("_sum")]: v / tokens for k, v in aux.items()
                    if k.endswith("_sum") and k not in ("ce_sum", "z_sum")})
    return _apply_gradients(state, tx, lr_schedule, trainable, frozen, grads, metrics,
                            lambda tree: project(tree, inputs))

  return step_fn


def _apply_gradients(state: TrainState, tx: optax.GradientTransformation, lr_schedule: Callable,
                     trainable: dict, frozen: dict, grads: dict, metrics: dict,
                     project: Callable[[dict], dict] = lambda tree: tree) -> tuple[TrainState, dict]:
  """The optimiser update every objective shares; adds grad/param norms and lr to `metrics`."""
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = project(optax.apply_updates(trainable, updates))
  params = optim_lib.merge(trainable, frozen)
  metrics = {**metrics, "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
             "lr": lr_schedule(state.step)}
  rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
  return TrainState(state.step + 1, params, opt_state, rng), metrics


def contrastive_batch(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A pipeline batch of image–caption pairs (one image slot, no image tokens) ->
  (images [B, H, W, 3], caption ids [B, L], attention mask [B, L]); row i pairs image i with text i."""
  return batch["images"][:, 0], batch["input_ids"], batch["attention_mask"]


def make_contrastive_step(model: ContrastiveModel, tx: optax.GradientTransformation, labels: dict,
                          lr_schedule: Callable):
  """The step of a two-tower model: CLIP's softmax or SigLIP's sigmoid loss over the
  batch's pairs (every other row is a negative, so the batch is not split into microbatches).

  Metrics: `loss`, `accuracy` (top-1 retrieval, text -> image and image -> text averaged)
  and `temperature` (the learned logit scale, exp(t)).
  """
  loss_of = siglip_loss if model.config.style == "siglip" else clip_loss

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    trainable, frozen = optim_lib.split(state.params, labels)
    images, ids, mask = contrastive_batch(batch)

    def loss_fn(train_params):
      out = model.apply({"params": optim_lib.merge(train_params, frozen)}, images, ids, mask)
      return loss_of(out.logits_per_text), out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    logits = out.logits_per_text
    pairs = jnp.arange(logits.shape[0])
    accuracy = (jnp.mean(jnp.argmax(logits, axis=1) == pairs) + jnp.mean(jnp.argmax(logits, axis=0) == pairs)) / 2
    metrics = {"loss": loss, "accuracy": accuracy, "temperature": jnp.exp(out.logit_scale)}
    return _apply_gradients(state, tx, lr_schedule, trainable, frozen, grads, metrics)

  return step_fn
