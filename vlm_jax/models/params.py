"""Parameter-tree utilities: initialise, count, name axes, stack scanned layers."""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def example_inputs(model: nn.Module) -> tuple:
  """The smallest inputs that create every parameter of `model`."""
  from vlm_jax.models.contrastive import ContrastiveModel
  from vlm_jax.models.vit import VisionTower
  if isinstance(model, VisionTower):
    s = model.config.image_size
    return (jnp.zeros((1, s, s, 3)),)
  if isinstance(model, ContrastiveModel):
    s = model.config.vision.image_size
    return (jnp.zeros((1, s, s, 3)), jnp.zeros((1, 1), jnp.int32))
  return (jnp.zeros((1, 1), jnp.int32),)


def init_params(model: nn.Module, rng: jax.Array) -> dict:
  """Random parameters as a plain nested dict (logical-axis boxes removed)."""
  variables = model.init(rng, *example_inputs(model))
  return nn.meta.unbox(variables["params"])


def abstract_params(model: nn.Module) -> dict:
  """ShapeDtypeStructs of the parameters, computed without allocating them."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(model))["params"])
  return nn.meta.unbox(boxed)


def logical_axes(model: nn.Module) -> dict:
  """The logical axis names of every parameter, as a tree of `PartitionSpec`s."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(model))["params"])
  return nn.get_partition_spec(boxed)


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


_LAYER = re.compile(r"^layers_(\d+)$")


def stack_layers(lm_params: dict) -> dict:
  """A decoder's `layers_0..layers_{n-1}` -> one `layers` subtree stacked on a leading axis."""
  out = {k: v for k, v in lm_params.items() if not _LAYER.match(k)}
  n = len(lm_params) - len(out)
  if n:
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[lm_params[f"layers_{i}"] for i in range(n)])
  return out


def unstack_layers(lm_params: dict) -> dict:
  """Inverse of `stack_layers`."""
  if "layers" not in lm_params:
    return lm_params
  out = {k: v for k, v in lm_params.items() if k != "layers"}
  n = jax.tree.leaves(lm_params["layers"])[0].shape[0]
  for i in range(n):
    out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], lm_params["layers"])
  return out
