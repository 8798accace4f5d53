"""Optimiser, schedules and parameter groups.

Freezing happens in the optimiser, not in the model: `config.optim.groups` is
an ordered list of `(regex over the parameter path, lr multiplier)`; the first
match wins and a multiplier of `None` freezes the parameter. Frozen parameters
get no gradient, no optimiser state and no update. Paths look like
`lm/layers_3/q/kernel` (or `lm/layers/q/kernel` when layers are scanned).
"""

import re
from typing import Any, Optional, Sequence

import jax
import optax
from flax import traverse_util

FROZEN = "frozen"


def schedule(optim) -> optax.Schedule:
  """Learning rate by step: warmup, then `cosine` | `linear` | `constant` decay."""
  total = int(optim.total_steps)
  warmup = int(optim.get("warmup_steps", 0) or round(optim.get("warmup_frac", 0.0) * total))
  peak, end = float(optim.lr), float(optim.lr) * float(optim.get("end_lr_frac", 0.0))
  decay_steps = max(total - warmup, 1)
  kind = optim.get("schedule", "cosine")
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.schedule must be cosine, linear or constant, got {kind!r}")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def path_labels(params: Any, groups: Sequence[tuple[str, Optional[float]]]) -> dict:
  """Flat `{"a/b/kernel": label}`: `g{i}` for the first matching group, or `frozen`.

  A parameter that no group matches is an error: a forgotten group must not
  silently freeze (or train) half the model.
  """
  labels = {}
  for name in traverse_util.flatten_dict(params, sep="/"):
    for i, (pattern, mult) in enumerate(groups):
      if re.fullmatch(pattern, name):
        labels[name] = FROZEN if mult is None else f"g{i}"
        break
    else:
      raise ValueError(f"parameter {name!r} matches no optim.groups pattern {[g[0] for g in groups]}")
  return labels


def decays(name: str) -> bool:
  """Weight decay applies to matrices only: not to norms, biases or scalars."""
  parts = name.split("/")
  return parts[-1] in ("kernel", "embedding", "in_proj") and not any("norm" in p for p in parts)


def split(params: dict, labels: dict) -> tuple[dict, dict]:
  """Flat (trainable, frozen) dicts keyed by `a/b/kernel` paths."""
  flat = traverse_util.flatten_dict(params, sep="/")
  trainable = {k: v for k, v in flat.items() if labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if labels[k] == FROZEN}
  return trainable, frozen


def merge(trainable: dict, frozen: dict) -> dict:
  return traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")


def scale_by_tree(factors: dict) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-parameter factor (the group's lr multiplier)."""
  def update(updates, state, params=None):
    return jax.tree.map(lambda u, f: u * f, updates, factors), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim, labels: dict) -> optax.GradientTransformation:
  """AdamW over the trainable flat dict, each group at `lr(step) × multiplier`.

  Equivalent to one `optax.adamw` per group (decoupled weight decay, scaled by
  the group's learning rate), with gradient clipping across all groups.
  """
  groups = [tuple(g) for g in optim.groups]
  trainable = {k: float(groups[int(v[1:])][1]) for k, v in labels.items() if v != FROZEN}
  if not trainable:
    raise ValueError("every parameter is frozen: nothing to train")
  clip = optim.get("clip_norm", None)
  return optax.chain(
      optax.clip_by_global_norm(float(clip)) if clip else optax.identity(),
      optax.scale_by_adam(b1=optim.get("b1", 0.9), b2=optim.get("b2", 0.999), eps=optim.get("eps", 1e-8)),
      optax.add_decayed_weights(float(optim.get("weight_decay", 0.0)), mask={k: decays(k) for k in trainable}),
      optax.scale_by_learning_rate(schedule(optim)),
      scale_by_tree(trainable),
  )
