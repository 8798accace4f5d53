"""Parameter-tree utilities: initialise, count, name axes, stack scanned layers, path-keyed views.

Techniques address parameters by their `/`-joined path (`lm/layers_0/mlp/up/kernel`):
`flat` / `unflat` convert, and `is_linear_kernel` is the one rule for what counts as a
linear layer's weight (pruning and LoRA both act on exactly these).
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vlm_jax.models.contrastive import ContrastiveModel
from vlm_jax.models.vit import VisionTower
from vlm_jax.models.maskgit import example_inputs as generator_inputs
from vlm_jax.models.text_to_codes import TextToCodes
from vlm_jax.models.vq import ImageTokenizer


# Linear kernels (2-D, or 3-D when layers are scanned); 4-D conv kernels (patch embeddings) are not.
LINEAR_KERNEL = re.compile(r".*/kernel$")


def flat(tree: dict) -> dict:
  """{"a": {"b": x}} -> {"a/b": x}."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(tree: dict) -> dict:
  """Inverse of `flat`."""
  return traverse_util.unflatten_dict(tree, sep="/")


def is_linear_kernel(path: str, leaf: Any) -> bool:
  """Whether the parameter at `path` is a linear layer's `[..., in, out]` kernel."""
  return bool(LINEAR_KERNEL.fullmatch(path)) and np.ndim(leaf) in (2, 3)


def check_companion_fits(params: dict, tree: dict, what: str) -> None:
  """A clear error when `tree` (masks, adapters: keyed by parameter paths, a subset of them)
  names a parameter `params` lacks or shapes one otherwise: a tree from another model."""
  fp = flat(params)
  for path, leaf in flat(tree).items():
    if path not in fp:
      raise ValueError(f"{what} for {path!r}, which is not a parameter of this model")
    if tuple(np.shape(leaf)) != tuple(np.shape(fp[path])):
      raise ValueError(f"{what} for {path!r} has shape {np.shape(leaf)}, the parameter {np.shape(fp[path])}")


def check_finite(tree: Any, what: str) -> None:
  """A ValueError naming the first parameter holding NaN or inf: such weights are never written."""
  for path, x in flat(tree).items() if isinstance(tree, dict) else enumerate(jax.tree.leaves(tree)):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.inexact):
      bad = x.size - int(np.count_nonzero(np.isfinite(x)))
      if bad:
        raise ValueError(f"{what}: parameter {path!r} has {bad} non-finite value(s) (NaN or inf) "
                         f"of {x.size}; nothing was written")


def example_inputs(model: nn.Module) -> tuple:
  """The smallest inputs that create every parameter of `model`."""
  if isinstance(model, VisionTower):
    s = model.config.image_size
    return (jnp.zeros((1, s, s, 3)),)
  if isinstance(model, ImageTokenizer):
    s = model.config.image_size
    return (jnp.zeros((1, s, s, 3)),)
  if isinstance(model, TextToCodes):
    return generator_inputs(model.config.generator)
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
