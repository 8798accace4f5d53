"""The train state and the pure train step `(state, batch) -> (state, metrics)`."""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlm_jax.models.metrics import argmax_equals
from vlm_jax.models.vlm import VLM
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.extension import PLAIN, TrainExtension


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: dict  # the full nested parameter tree
  opt_state: Any  # over the trainable parameters only (flat, keyed by path)
  rng: jax.Array  # raw uint32 key data, so it checkpoints like any array


def forward_output(model: nn.Module, params: dict, batch: dict):
  """The model's `LMOutput` (logits and final hidden states) for a batch in the format of
  `vlm_jax.data.schema`."""
  kw = dict(attention_mask=batch.get("attention_mask"), positions=batch.get("positions"),
            segment_ids=batch.get("segment_ids"))
  if isinstance(model, VLM):
    codes = {k: batch[k] for k in ("image_codes", "code_given") if k in batch}
    return model.apply({"params": params}, batch["input_ids"], batch.get("images"), **codes, **kw)
  return model.apply({"params": params}, batch["input_ids"], **kw)


def forward(model: nn.Module, params: dict, batch: dict):
  """Logits for a batch in the format of `vlm_jax.data.schema`."""
  return forward_output(model, params, batch).logits


def next_token_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
  """Targets and float32 weights `[B, L-1]`: token t is predicted from tokens < t; `loss_mask[t]`
  says whether it counts."""
  return batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].astype(jnp.float32)


def _ce_and_lse(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy and log-partition of logits already aligned with their targets."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], lse


def token_losses(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token next-token cross-entropy, log-partition and weights, all [B, L-1], float32."""
  targets, weights = next_token_targets(batch)
  ce, lse = _ce_and_lse(logits[:, :-1], targets)
  return ce, lse, weights


def _summed_terms(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict:
  """The summed terms of `loss_sums` over aligned logits, targets and weights."""
  ce, lse = _ce_and_lse(logits, targets)
  correct = argmax_equals(logits, targets).astype(jnp.float32)
  return {"ce_sum": jnp.sum(ce * weights), "z_sum": jnp.sum(jnp.square(lse) * weights),
          "correct": jnp.sum(correct * weights), "tokens": jnp.sum(weights)}


def loss_sums(logits: jax.Array, batch: dict, z_loss: float) -> tuple[jax.Array, dict]:
  """Summed (not averaged) loss terms, so microbatches add up to the full batch exactly."""
  aux = _summed_terms(logits[:, :-1], *next_token_targets(batch))
  return aux["ce_sum"] + z_loss * aux["z_sum"], aux


def chunked_loss_sums(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], batch: dict,
                      z_loss: float, chunk: int) -> tuple[jax.Array, dict]:
  """`loss_sums` from the final hidden states `[B, L, D]`, `chunk` positions at a time.

  The output head runs on one `[B, chunk, D]` slice per scan step, each step rematerialised,
  so neither the forward nor the backward ever holds `[B, L, vocab]` logits: only one
  chunk's. The sequence is padded with zero-weight positions to a multiple of `chunk`.
  The model's own full logits, left unused, are dead code that XLA drops (the compiled
  step holds no `[B, L, vocab]` buffer).
  """
  targets, weights = next_token_targets(batch)
  h = hidden[:, :-1]
  b, n = targets.shape
  pad = -n % chunk
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
  chunks = lambda x: jnp.swapaxes(x.reshape(b, -1, chunk, *x.shape[2:]), 0, 1)
  terms = jax.checkpoint(lambda h, t, w: _summed_terms(head(h), t, w), prevent_cse=False)

  def add_chunk(carry, xs):
    return jax.tree.map(jnp.add, carry, terms(*xs)), None

  zero = jnp.zeros((), jnp.float32)
  aux, _ = jax.lax.scan(add_chunk, dict(ce_sum=zero, z_sum=zero, correct=zero, tokens=zero),
                        (chunks(h), chunks(targets), chunks(weights)))
  return aux["ce_sum"] + z_loss * aux["z_sum"], aux


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, labels: dict,
                    lr_schedule: Callable, z_loss: float = 0.0, grad_accum: int = 1,
                    extension: TrainExtension = PLAIN, loss_chunk: int = 0):
  """Builds the pure step `(state, batch[, inputs]) -> (state, metrics)`.

  `labels` (from `optim.path_labels`) fix what trains; `extension` is how a technique
  changes the objective (see `vlm_jax.train.extension`; `inputs` are its step inputs).
  A model that defines `train_loss` (a two-tower model's CLIP/SigLIP loss, the VQ
  tokenizer's, the code generator's) trains on it (`make_objective_step`); every other
  model on the next-token loss.
  `loss_chunk` > 0 computes that loss `loss_chunk` positions at a time from the hidden
  states (`chunked_loss_sums`: same sums, no whole-batch logits). An extension with a
  `loss` hook is handed the full logits, so with one the step keeps the full-logits path.
  """
  if has_own_objective(model):
    if extension is not PLAIN or grad_accum != 1 or loss_chunk or z_loss:
      raise ValueError(f"{type(model).__name__} trains on its own train_loss over whole batches (a "
                       f"contrastive loss's negatives are the batch's other rows): no grad_accum, no "
                       f"train extension, no loss_chunk or z_loss (those shape the next-token loss)")
    return make_objective_step(model, tx, labels, lr_schedule)
  student = extension.student or (lambda params, inputs: params)
  project = extension.project or (lambda tree, inputs: tree)

  def step_fn(state: TrainState, batch: dict, inputs: Any = None) -> tuple[TrainState, dict]:
    trainable, frozen = optim_lib.split(state.params, labels)
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:]), 1.0)

    def loss_fn(train_params, micro):
      params = optim_lib.merge(train_params, frozen)
      run_params = student(params, inputs)
      if loss_chunk and extension.loss is None:
        head = lambda h: model.apply({"params": run_params}, h, method="head")
        total, aux = chunked_loss_sums(forward_output(model, run_params, micro).hidden, head, micro,
                                       z_loss, loss_chunk)
      else:
        logits = forward(model, run_params, micro)
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


def has_own_objective(model: nn.Module) -> bool:
  """Whether `model` defines `train_loss(batch, rng) -> (loss, metrics)`, the objective it trains on."""
  return callable(getattr(type(model), "train_loss", None))


def make_objective_step(model: nn.Module, tx: optax.GradientTransformation, labels: dict,
                        lr_schedule: Callable):
  """The step of a model with its own objective: the gradient of its `train_loss(batch, rng)`
  on the whole batch, rng being the state's RNG folded with the step.

  Metrics: the model's (scalars; `loss` is the loss it returned) and `target_tokens`, the
  batch's rows unless the model counts its own.
  """

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    trainable, frozen = optim_lib.split(state.params, labels)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(train_params):
      return model.apply({"params": optim_lib.merge(train_params, frozen)}, batch, rng, method="train_loss")

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    rows = jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)
    metrics = {"target_tokens": rows, **aux, "loss": loss}
    return _apply_gradients(state, tx, lr_schedule, trainable, frozen, grads, metrics)

  return step_fn
