"""The train state and the pure train step `(state, batch) -> (state, metrics)`."""

import dataclasses
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlm_jax.models.contrastive import ContrastiveModel, clip_loss, siglip_loss
from vlm_jax.models.vlm import VLM
from vlm_jax.peft import lora as lora_lib
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


def kd_sum(student_logits: jax.Array, teacher_logits: jax.Array, batch: dict, temperature: float) -> jax.Array:
  """Σ over target tokens of KL(p_teacher ‖ p_student), both softmaxes at temperature T.

  Divided by the target-token count by the caller ("batchmean" per token); no
  T² factor (the reference repair uses T = 1).
  """
  s = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return jnp.sum(kl * batch["loss_mask"][:, 1:].astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class SparseTraining:
  """How a pruned model trains (METHODS §4); the masks are an explicit input of the step.

  lora_alpha None: full fine-tuning under the mask (gradients and weights are
    masked, so pruned weights stay exactly zero).
  lora_alpha α: SparseLoRA repair. The parameters are `{"base": dense frozen
    model, "lora": adapters}`; the student runs `(W + (α/r)AB) ⊙ M`, and with
    kd_weight λ > 0 the loss is `(1−λ)·task + λ·KL(dense teacher ‖ student)`,
    the teacher being `base` itself (no second copy of the weights).
  """
  lora_alpha: Optional[float] = None
  kd_weight: float = 0.0
  kd_temperature: float = 1.0

  def __post_init__(self):
    if self.kd_weight and self.lora_alpha is None:
      raise ValueError("distillation needs the dense teacher: use SparseLoRA (lora_alpha), where the frozen "
                       "base is the teacher; masked full fine-tuning has no dense copy")


def _masked(tree: dict, flat_masks: dict) -> dict:
  """Zeroes the masked entries of a flat path-keyed tree (gradients, updated weights)."""
  return {k: (jnp.where(flat_masks[k], v, jnp.zeros((), v.dtype)) if k in flat_masks else v) for k, v in tree.items()}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, labels: dict,
                    lr_schedule: Callable, z_loss: float = 0.0, grad_accum: int = 1,
                    sparse: Optional[SparseTraining] = None):
  """Builds the pure step `(state, batch[, masks]) -> (state, metrics)`.

  `labels` (from `optim.path_labels`) fix what trains; `sparse` (with masks)
  trains a pruned model, see `SparseTraining`. A `ContrastiveModel` gets its
  own objective (`make_contrastive_step`); every other model the next-token loss.
  """
  if isinstance(model, ContrastiveModel):
    if sparse or grad_accum != 1:
      raise ValueError("a contrastive model trains on whole batches (in-batch negatives): "
                       "no grad_accum, no sparse training")
    return make_contrastive_step(model, tx, labels, lr_schedule)
  lora_alpha = sparse.lora_alpha if sparse else None
  kd_weight = sparse.kd_weight if sparse else 0.0

  def step_fn(state: TrainState, batch: dict, masks: Optional[dict] = None) -> tuple[TrainState, dict]:
    trainable, frozen = optim_lib.split(state.params, labels)
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:]), 1.0)
    flat_masks = {}
    if masks is not None and lora_alpha is None:
      flat_masks = {k: v for k, v in flax.traverse_util.flatten_dict(masks, sep="/").items() if k in trainable}

    def loss_fn(train_params, micro):
      params = optim_lib.merge(train_params, frozen)
      student = lora_lib.merge(params["base"], params["lora"], masks, lora_alpha) if lora_alpha else params
      logits = forward(model, student, micro)
      total, aux = loss_sums(logits, micro, z_loss)
      aux["kd_sum"] = jnp.zeros((), jnp.float32)
      if kd_weight:
        teacher = jax.lax.stop_gradient(forward(model, params["base"], micro))
        aux["kd_sum"] = kd_sum(logits, teacher, micro, sparse.kd_temperature)
        total = (1.0 - kd_weight) * total + kd_weight * aux["kd_sum"]
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
      zero_aux = {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "z_sum", "correct", "tokens", "kd_sum")}
      (grads, aux), _ = jax.lax.scan(accumulate, (zeros, zero_aux), micro)

    grads = _masked(grads, flat_masks)
    tokens = jnp.maximum(aux["tokens"], 1.0)
    metrics = {"loss": aux["ce_sum"] / tokens, "z_loss": aux["z_sum"] / tokens,
               "accuracy": aux["correct"] / tokens, "target_tokens": aux["tokens"]}
    if kd_weight:
      metrics["kd"] = aux["kd_sum"] / tokens
    return _apply_gradients(state, tx, lr_schedule, trainable, frozen, grads, metrics, flat_masks)

  return step_fn


def _apply_gradients(state: TrainState, tx: optax.GradientTransformation, lr_schedule: Callable,
                     trainable: dict, frozen: dict, grads: dict, metrics: dict,
                     flat_masks: Optional[dict] = None) -> tuple[TrainState, dict]:
  """The optimiser update every objective shares; adds grad/param norms and lr to `metrics`."""
  flat_masks = flat_masks or {}
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = _masked(optax.apply_updates(trainable, updates), flat_masks)
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
