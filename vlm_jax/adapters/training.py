"""Training the learnable adapters on cached features: one jitted `lax.scan` over all steps.

The trainable pytree is a set of zero-initialised residuals on some of the adapter's arrays; the
effective array is `base + residual`, renormalised along the feature axis where the method says
so (DualAdapter: all four; Tip-Adapter-F trains its keys as they are, like the reference). Each
residual belongs to an optimiser group with its own learning rate (AdamW, cosine decay, float32
throughout: the reference's fp16 Adam state underflows). The samples are the shots' augmented
views (V·C·K features, label = the shot's class), shuffled every epoch by the seed.

Loss: cross-entropy of the adapter's logits, plus `consistency`·mean_c(1 − cos(W⁺'_c, W⁺_c)) when a
positive text residual is trained and `consistency` > 0 (keeps W⁺ near its prompt ensemble).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax.adapters import adapter as adapter_lib
from vlm_jax.adapters import logits as L
from vlm_jax.adapters.task import Shots


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  epochs: int = 20
  batch_size: int = 256
  lrs: tuple = (("pos", 1e-4), ("neg", 5e-4))  # group -> learning rate
  weight_decay: float = 0.1
  eps: float = 1e-8
  consistency: float = 0.0
  views_per_epoch: int = 1  # the reference: each shot once per epoch, through a fresh view
  seed: int = 0


def effective(base: dict, residual: dict, renormalise: frozenset) -> dict:
  out = dict(base)
  for name, r in residual.items():
    v = base[name] + r
    out[name] = L.normalise(v) if name in renormalise else v
  return out


@partial(jax.jit, static_argnames=("renormalise",))
def effective_arrays(base: dict, residual: dict, renormalise: frozenset) -> dict:
  """`effective`, jitted: the one computation of an adapter's arrays, trained or not, so that zero
  residuals give the training-free arrays bit for bit."""
  return effective(base, residual, renormalise)


def with_zero_residuals(base: dict, names, renormalise: frozenset) -> dict:
  """The training-free arrays: `base` through `effective_arrays` with zero residuals on `names`."""
  zeros = {n: jnp.zeros(np.shape(base[n]), jnp.float32) for n in names}
  out = effective_arrays({n: jnp.asarray(a, jnp.float32) for n, a in base.items()}, zeros, renormalise)
  return {n: np.asarray(a) for n, a in out.items()}


def train(kind: str, base: dict, hparams: dict, shots: Shots, groups: dict, renormalise: frozenset,
          config: TrainConfig = TrainConfig()) -> tuple[dict, np.ndarray]:
  """Trains residuals on `groups` ({array name: optimiser group}); returns (effective arrays, losses)."""
  lrs = dict(config.lrs)
  unknown = sorted(set(groups.values()) - set(lrs))
  if unknown:
    raise ValueError(f"no learning rate for group(s) {unknown}; config.lrs has {sorted(lrs)}")
  v, c, k, d = shots.views.shape
  x = jnp.asarray(shots.views.reshape(-1, d), jnp.float32)
  y = jnp.asarray(np.broadcast_to(np.arange(c)[None, :, None], (v, c, k)).reshape(-1), jnp.int32)
  order = jnp.asarray(sample_order(v, c * k, config))
  steps = order.shape[0]

  base = {name: jnp.asarray(a, jnp.float32) for name, a in base.items()}
  residual = {name: jnp.zeros_like(base[name]) for name in groups}
  settings = (tuple(sorted(lrs.items())), tuple(sorted(groups.items())), max(steps, 1), config.eps,
              config.weight_decay)
  hp = {name: float(val) for name, val in hparams.items()}
  losses, residual = _run(kind, base, hp, residual, x, y, order, settings, renormalise,
                          float(config.consistency))
  return {n: np.asarray(a) for n, a in effective_arrays(base, residual, renormalise).items()}, np.asarray(losses)


def sample_order(views: int, shots: int, config: TrainConfig) -> np.ndarray:
  """[steps, batch] indices into the view-major [V·C·K] samples (index = view·C·K + shot).

  Every epoch each shot contributes `views_per_epoch` distinct views drawn by the seed, shuffled;
  an epoch's last batch is filled up from its start (a fixed batch shape: one compiled step).
  """
  if not 1 <= config.views_per_epoch <= views:
    raise ValueError(f"views_per_epoch={config.views_per_epoch} must be in [1, {views}] "
                     f"(the number of cached augmented views)")
  n = shots * config.views_per_epoch
  batch = min(config.batch_size, n)
  per_epoch = math.ceil(n / batch)
  rng = np.random.default_rng(config.seed)
  epochs = []
  for _ in range(config.epochs):
    picked = np.argsort(rng.random((shots, views)), axis=1)[:, :config.views_per_epoch]
    samples = (picked * shots + np.arange(shots)[:, None]).reshape(-1)
    epochs.append(np.resize(samples[rng.permutation(n)], per_epoch * batch))
  return np.concatenate(epochs or [np.zeros(0, np.int64)]).reshape(-1, batch)


def _optimiser(lrs, groups, steps, eps, weight_decay) -> optax.GradientTransformation:
  """AdamW + cosine per group, built from hashable settings: `_run` takes these (not the optax
  object, new at every call) as its static argument, so a second fit of the same shapes reuses
  the compiled scan."""
  return optax.multi_transform(
      {g: optax.adamw(optax.cosine_decay_schedule(lr, steps), eps=eps, weight_decay=weight_decay)
       for g, lr in lrs}, dict(groups))


@partial(jax.jit, static_argnames=("kind", "settings", "renormalise", "consistency"))
def _run(kind, base, hparams, residual, x, y, order, settings, renormalise, consistency):
  tx = _optimiser(*settings)

  def loss_fn(res, idx):
    arrays = effective(base, res, renormalise)
    logits = adapter_lib.apply(kind, arrays, hparams, x[idx])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()
    if consistency and "w_pos" in res:
      loss = loss + consistency * jnp.mean(1.0 - jnp.sum(arrays["w_pos"] * L.normalise(base["w_pos"]), -1))
    return loss

  def step(carry, idx):
    res, opt = carry
    loss, grads = jax.value_and_grad(loss_fn)(res, idx)
    updates, opt = tx.update(grads, opt, res)
    return (optax.apply_updates(res, updates), opt), loss

  (residual, _), losses = jax.lax.scan(step, (residual, tx.init(residual)), order)
  return losses, residual
