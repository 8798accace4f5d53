"""Layer-by-layer calibration and pruning, as the Wanda reference procedure (METHODS §4).

The model is cut into units run in order: the vision tower's blocks, the
projector, the decoder's layers (and the output head when it is pruned). Each
unit
  1. runs dense on the calibration activations it is given, every linear
     layer inside it collecting its input statistics in that one pass,
  2. has its kernels pruned from those statistics,
  3. runs again, pruned, to produce the next unit's inputs,
so unit i sees the outputs of the already-pruned units before it. Kernels with
no input statistics (embeddings, norms, blocks the model never runs) are pruned
by magnitude. Only one
boundary's activations (all calibration rows) are held at a time; each unit
runs jitted, one calibration batch at a time, and the statistics are summed
on the device.

Padding never counts: decoder tokens are weighted by the attention mask, and
unused image slots of a row are left out.
"""

import functools
import logging
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vlm_jax.models.attention import STRUCTURED, Segments
from vlm_jax.models.layers import Linear, RMSNorm
from vlm_jax.models.lm import DecoderBlock, DecoderLM, attention_mask_matrix
from vlm_jax.models.params import stack_layers, unstack_layers
from vlm_jax.models.vit import VisionTower, encoder_block
from vlm_jax.models.vlm import VLM, projector_of
from vlm_jax.sparsity import pruners
from vlm_jax.models.params import flat, unflat

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- statistics of one unit

def _linear_stats(apply: Callable, hessian: bool) -> Callable:
  """Wraps `apply(params, x, extra) -> y` to also return every Linear's input statistics.

  Returns `(y, {module path: {"sq": [in], "h": [in, in]}})`, tokens weighted by
  `weights` (shape [rows] or [rows, tokens], matched to the input's leading axes).
  """

  def run(params, x, extra, weights):
    stats = {}

    def grab(next_fun, args, kwargs, context):
      if isinstance(context.module, Linear) and context.method_name == "__call__":
        inp = args[0].astype(jnp.float32)
        w = weights if weights.ndim == inp.ndim - 1 and weights.shape == inp.shape[:-1] else \
            jnp.broadcast_to(weights.reshape(weights.shape[0], *([1] * (inp.ndim - 2))), inp.shape[:-1])
        rows = inp.reshape(-1, inp.shape[-1])
        w = w.reshape(-1).astype(jnp.float32)
        entry = {"sq": jnp.einsum("ti,t->i", jnp.square(rows), w)}
        if hessian:
          entry["h"] = jnp.einsum("ti,tj,t->ij", rows, rows, w)
        stats["/".join(context.module.path)] = entry
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      y = apply(params, x, extra)
    return y, stats

  return run


class Unit:
  """One piece of the model run on its own: `apply(params at prefix, x, extra) -> y`.

  It prunes the targets under `scope` (default: everything under `prefix`). `apply` comes from
  one of the cached builders below (one function per config), so every layer of a kind, and
  every later `prune` call on the same model, reuses the compiled programs.
  """

  def __init__(self, prefix: str, apply: Callable, hessian: bool, scope: Optional[str] = None):
    self.prefix = prefix
    self.scope = scope if scope is not None else prefix + "/"
    self.forward, self.stats = _compiled(apply, hessian)


@functools.lru_cache(maxsize=64)
def _compiled(apply: Callable, hessian: bool) -> tuple[Callable, Callable]:
  return jax.jit(apply), jax.jit(_linear_stats(apply, hessian))


@functools.lru_cache(maxsize=64)
def _decoder_block_apply(config) -> Callable:
  block = DecoderBlock(config)
  return lambda p, x, extra: block.apply({"params": p}, x, extra[0], extra[1], 0, None)[0]


@functools.lru_cache(maxsize=64)
def _encoder_block_apply(vision_config) -> Callable:
  block = encoder_block(vision_config)
  return lambda p, x, extra: block.apply({"params": p}, x)


@functools.lru_cache(maxsize=64)
def _projector_apply(vlm_config) -> Callable:
  projector = projector_of(vlm_config)
  return lambda p, x, extra: projector.apply({"params": p}, x)


@functools.lru_cache(maxsize=64)
def _embeddings(model_type: type, config) -> Callable:
  """The decoder's input embeddings (token ids, and the image embeddings for a VLM), jitted once
  per model config."""
  model = model_type(config)
  if isinstance(model, VLM):
    return jax.jit(lambda p, ids, e: model.apply({"params": p}, ids, e, method=VLM.input_embeddings))
  return jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=DecoderLM.embed))


@functools.lru_cache(maxsize=64)
def _patch_features(vision_config) -> Callable:
  """The tower's patch embeddings (layer 0's input), jitted once per tower config."""
  tower = VisionTower(vision_config)
  return jax.jit(lambda p, im: tower.apply({"params": p}, im, feature_layer=0).features)


@functools.lru_cache(maxsize=64)
def _head_apply(config) -> Callable:
  """The final norm and the output head of an LM config."""
  class Head(nn.Module):
    @nn.compact
    def __call__(self, x):
      kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
      x = RMSNorm(config.norm_eps, name="norm", **kw)(x)
      return Linear(config.vocab_size, ("embed", "vocab"), name="lm_head", **kw)(x)

  return lambda p, x, extra: Head().apply({"params": {"norm": p["norm"], "lm_head": p["lm_head"]}}, x)


def _params_at(params: dict, prefix: str) -> dict:
  for key in filter(None, prefix.split("/")):
    params = params[key]
  return params


def _set_at(params: dict, prefix: str, value: dict) -> dict:
  if not prefix:
    return value
  key, _, rest = prefix.partition("/")
  return {**params, key: _set_at(params[key], rest, value)}


def _sum_stats(total: Optional[dict], new: dict) -> dict:
  return new if total is None else jax.tree.map(jnp.add, total, new)


# ----------------------------------------------------------------------------- pruning one unit

def _prune_unit(unit: Unit, params: dict, xs: list, extras: list, weights: list,
                targets: dict[str, float], method: str, pattern: str, masks: dict, sparsegpt_kw: dict):
  """Steps 1-3 for one unit: returns (params with this unit pruned, the next unit's inputs)."""
  unit_params = _params_at(params, unit.prefix)
  own = {p: r for p, r in targets.items() if p.startswith(unit.scope)}
  local_start = len(unit.prefix) + 1 if unit.prefix else 0
  if own:
    stats = None
    for x, extra, w in zip(xs, extras, weights):
      stats = _sum_stats(stats, unit.stats(unit_params, x, extra, w)[1])
    flat_unit = flat(unit_params)
    for path, ratio in own.items():
      local = path[local_start:]
      module = local.rsplit("/", 1)[0]
      kernel = flat_unit[local]
      if module not in stats or kernel.ndim != 2:  # not a Linear's input (an embedding, a norm)
        keep = pruners.magnitude(kernel, ratio, pattern)
        new = jnp.where(keep, kernel, 0)
      elif method == "wanda":
        keep = pruners.wanda(kernel, stats[module]["sq"], ratio, pattern)
        new = jnp.where(keep, kernel, 0)
      else:
        new, keep = pruners.sparsegpt(kernel, stats[module]["h"], ratio, pattern, **sparsegpt_kw)
      flat_unit[local] = new
      masks[path] = keep
    unit_params = unflat(flat_unit)
    params = _set_at(params, unit.prefix, unit_params)
  ys = [unit.forward(unit_params, x, extra) for x, extra in zip(xs, extras)]
  return params, ys


# ----------------------------------------------------------------------------- the units of a model

def _decoder_inputs(batch: dict, structured: bool = False) -> tuple[Any, jax.Array]:
  """(positions, mask) for running decoder layers on their own, and the token weights; the mask is
  [b, l, l], or its structure (`Segments`) for a kernel that takes no dense mask (`structured`)."""
  ids = batch["input_ids"]
  b, l = ids.shape
  valid = jnp.asarray(batch.get("attention_mask", np.ones((b, l))), bool)
  positions = jnp.asarray(batch["positions"]) if batch.get("positions") is not None else \
      jnp.broadcast_to(jnp.arange(l), (b, l))
  segments = batch.get("segment_ids")
  slots = jnp.arange(l)
  segments = None if segments is None else jnp.asarray(segments)
  mask = Segments.of(valid, segments, causal=True) if structured else attention_mask_matrix(valid, slots, slots, segments)
  return (positions, mask), valid.astype(jnp.float32)


def _image_slot_weights(model: VLM, batch: dict) -> jax.Array:
  """1 for the images a row really uses, 0 for its unused (zero) slots; [num images]."""
  images = batch["images"]
  if images.ndim == 4:
    return jnp.ones((images.shape[0],), jnp.float32)
  b, m = images.shape[:2]
  used = np.sum(np.asarray(batch["input_ids"]) == model.config.image_token_id, axis=1) // model.config.tokens_per_image
  return jnp.asarray(np.arange(m)[None, :] < used[:, None], jnp.float32).reshape(-1)


def _decoder_units(config, prefix: str, hessian: bool) -> list[Unit]:
  apply = _decoder_block_apply(config)
  return [Unit(f"{prefix}layers_{i}", apply, hessian) for i in range(config.num_layers)]


def _head_unit(config, prefix: str, hessian: bool) -> Unit:
  """The final norm and the output head (only run when the head is pruned)."""
  return Unit(prefix.rstrip("/"), _head_apply(config), hessian, scope=f"{prefix}lm_head/")


def prune_sequential(model: nn.Module, params: dict, batches: Sequence[dict], targets: dict[str, float],
                     method: str, pattern: Optional[str] = None, *, sparsegpt_kw: Optional[dict] = None,
                     rows_sharding: Optional[jax.sharding.Sharding] = None,
                     progress: bool = True) -> tuple[dict, dict]:
  """Calibrates and prunes `targets` ({path: ratio}) with Wanda or SparseGPT -> (params, masks).

  batches: calibration batches in the device-batch format (`vlm_jax.data.schema`);
  for a VLM, image–text rows (text-only rows calibrate the decoder only).
  pattern: as `sparsity.prune`'s (None: the method's reference rule; "variant":
    Wanda's variant); kernels without input statistics take it on |W|.
  rows_sharding: places the calibration rows (and so every unit's activations)
    over the mesh, e.g. `vlm_jax.parallel.mesh.batch_sharding(mesh)`; the
    parameters keep whatever placement they have.
  """
  if rows_sharding is not None:
    batches = [{k: jax.device_put(np.asarray(v), rows_sharding) for k, v in b.items() if v is not None}
               for b in batches]
  if method not in ("wanda", "sparsegpt"):
    raise ValueError(f"prune_sequential runs 'wanda' or 'sparsegpt', got {method!r}")
  pattern = pruners.resolve_pattern(method, pattern)
  hessian = method == "sparsegpt"
  sparsegpt_kw = sparsegpt_kw or {}
  if isinstance(model, VLM):
    c = model.config
    text, lm_prefix = c.text, "lm/"
  elif isinstance(model, DecoderLM):
    c, text, lm_prefix = None, model.config, ""
  else:
    raise ValueError(f"layer-wise calibration supports VLMs and decoder LMs, not {type(model).__name__}; "
                     f"use method='magnitude' (no calibration)")
  scanned = text.scan_layers
  if scanned:  # calibrate layer by layer on the unstacked tree, stack back at the end
    params = _with_lm(params, lm_prefix, unstack_layers(_lm_of(params, lm_prefix)))
    targets = {_unscanned(p, lm_prefix, i): r for p, r in targets.items()
               for i in (range(text.num_layers) if p.startswith(f"{lm_prefix}layers/") else [None])}

  masks: dict = {}
  prune = lambda unit, params, xs, extras, weights: _prune_unit(
      unit, params, xs, extras, weights, targets, method, pattern, masks, sparsegpt_kw)
  units_total = text.num_layers + (c.vision.depth + 1 if c else 0)
  bar = tqdm(total=units_total, desc=f"{method} calibration", disable=not progress, dynamic_ncols=True)

  image_embeds = [None] * len(batches)
  if c is not None and any(b.get("images") is not None for b in batches):
    with_images = [i for i, b in enumerate(batches) if b.get("images") is not None]
    xs, weights = [], []
    for i in with_images:
      images = jnp.asarray(batches[i]["images"])
      flat_images = images.reshape(-1, *images.shape[-3:])
      xs.append(_patch_features(c.vision)(params["vision"], flat_images))
      w = _image_slot_weights(model, batches[i])
      weights.append(w if rows_sharding is None else jax.device_put(w, rows_sharding))
    extras = [None] * len(xs)
    last = c.feature_layer % (c.vision.depth + 1)
    for layer in range(last):
      unit = Unit(f"vision/layers_{layer}", _encoder_block_apply(c.vision), hessian)
      params, xs = prune(unit, params, xs, extras, weights)
      bar.update(1)
    if c.feature_select == "default":
      xs = [x[:, 1:] for x in xs]
    unit = Unit("projector", _projector_apply(c), hessian)
    params, xs = prune(unit, params, xs, extras, weights)
    bar.update(1 + c.vision.depth - last)
    for i, x in zip(with_images, xs):
      images = batches[i]["images"]
      image_embeds[i] = x.reshape(*images.shape[:-3], *x.shape[1:])

  xs, extras, weights = [], [], []
  embed = _embeddings(type(model), model.config)
  for batch, embeds in zip(batches, image_embeds):
    ids = jnp.asarray(batch["input_ids"])
    xs.append(embed(params, ids, embeds) if c is not None else embed(params, ids))
    extra, w = _decoder_inputs(batch, text.attention in STRUCTURED)
    extras.append(extra)
    weights.append(w)
  for unit in _decoder_units(text, lm_prefix, hessian):
    params, xs = prune(unit, params, xs, extras, weights)
    bar.update(1)
  if any(p.startswith(f"{lm_prefix}lm_head/") for p in targets):
    params, xs = prune(_head_unit(text, lm_prefix, hessian), params, xs, extras, weights)
  bar.close()
  # Targets no unit runs (embeddings; vision blocks past the feature layer): by magnitude.
  fp = flat(params)
  for path in sorted(set(targets) - set(masks)):
    masks[path] = pruners.magnitude(fp[path], targets[path], pattern)
    fp[path] = jnp.where(masks[path], fp[path], 0)
  params = unflat(fp)

  if scanned:
    params = _with_lm(params, lm_prefix, stack_layers(_lm_of(params, lm_prefix)))
    masks = _restack_masks(masks, lm_prefix, text.num_layers)
  return params, unflat(masks)


def _lm_of(params: dict, prefix: str) -> dict:
  return params["lm"] if prefix else params


def _with_lm(params: dict, prefix: str, lm: dict) -> dict:
  return {**params, "lm": lm} if prefix else lm


def _unscanned(path: str, prefix: str, i: Optional[int]) -> str:
  return path if i is None else path.replace(f"{prefix}layers/", f"{prefix}layers_{i}/", 1)


def _restack_masks(masks: dict, prefix: str, num_layers: int) -> dict:
  out, per_layer = {}, {}
  for path, m in masks.items():
    head = f"{prefix}layers_"
    if path.startswith(head):
      i, rest = path[len(head):].split("/", 1)
      per_layer.setdefault(rest, {})[int(i)] = m
    else:
      out[path] = m
  for rest, layers in per_layer.items():
    if len(layers) != num_layers:
      raise ValueError(f"scanned layers must be pruned alike; {rest} is pruned in {len(layers)} of {num_layers}")
    out[f"{prefix}layers/{rest}"] = jnp.stack([layers[i] for i in range(num_layers)])
  return out
