"""Sparsity masks as boolean pytrees beside the parameters (METHODS §4).

A mask tree has the nested-dict structure of the parameters but holds only the
pruned leaves: `masks["lm"]["layers_0"]["attn"]...` is missing where nothing is
pruned. `True` means kept. Masks are ordinary arrays: they shard like their
parameters and go into jitted steps as explicit inputs.

Kernels are `[in, out]` (`y = x @ W`), so the reference's "output row" is a
column here and N:M groups run down the input axis (axis -2). A leading layer
axis (scanned layers) is kept: every pattern works on the last two axes.

Patterns, each from a score array of the kernel's shape (low = pruned first):
  row       unstructured per output unit: the ⌊s·in⌋ lowest scores of each
            output unit, stable order (equal scores: lower input index first)
  matrix    unstructured per matrix, the reference magnitude pruner's rule:
            t = the ⌊s·n⌋-th smallest score (0-based); prune every score ≤ t,
            i.e. ⌊s·n⌋+1 weights when all scores differ
  variant   unstructured, Wanda's variant (the reference's `--use_variant`):
            each output unit prunes its lowest scores up to a running sum of
            α × its total, one α per matrix found by bisection so that the
            matrix is s-sparse (±0.001); units prune different counts
  N:M       in every group of M consecutive inputs, the N lowest (e.g. "2:4")
Which pattern a method takes by default is `pruners.DEFAULT_PATTERN`.
"""

import json
import os
import re
from functools import partial
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vlm_jax.models.params import check_companion_fits, flat, is_linear_kernel, unflat
from vlm_jax.report import print_table

Params = dict
Masks = dict

TOWERS = ("vision", "projector", "lm")
# Linear kernels (`models.params.is_linear_kernel`) are pruned; output heads and embeddings
# are opted in by path.
DEFAULT_EXCLUDE = (r"(^|.*/)lm_head/kernel$",)


def tower_of(path: str) -> str:
  """`vision` | `projector` | `lm`; a plain LM's parameters all belong to `lm`."""
  head = path.split("/", 1)[0]
  return head if head in TOWERS else "lm"


UNSTRUCTURED = ("row", "matrix", "variant")
# Wanda's variant as in the reference (lib/prune.py, `prune_wanda` with `use_variant`).
VARIANT_ALPHA, VARIANT_BOUNDS, VARIANT_TOLERANCE = 0.4, (0.0, 0.8), 0.001


def parse_pattern(pattern: str) -> tuple[str, int, int]:
  """"row" | "matrix" | "variant" | "N:M" -> (kind, n, m)."""
  if pattern in UNSTRUCTURED:
    return pattern, 0, 0
  match = re.fullmatch(r"(\d+):(\d+)", pattern)
  if not match or not 0 < int(match[1]) < int(match[2]):
    raise ValueError(f"sparsity pattern must be one of {UNSTRUCTURED} or 'N:M' with 0 < N < M, got {pattern!r}")
  return "nm", int(match[1]), int(match[2])


@partial(jax.jit, static_argnames="k")
def _keep_all_but_smallest(scores: jax.Array, k: int) -> jax.Array:
  """False at the k smallest entries along axis -2, ties to the lower index: the entries ranked
  below k in a stable ascending sort. `top_k` breaks ties to the lower index too, and on XLA:CPU
  is ~5x faster than the two stable argsorts of a rank (the largest cost of a Wanda call)."""
  last = jnp.swapaxes(scores, -1, -2)
  keep = jnp.ones(last.shape, bool)
  if k:
    _, smallest = jax.lax.top_k(-last, k)
    keep = jnp.put_along_axis(keep, smallest, False, axis=-1, inplace=False)
  return jnp.swapaxes(keep, -1, -2)


def row_mask(scores: jax.Array, ratio: float) -> jax.Array:
  return _keep_all_but_smallest(scores, int(scores.shape[-2] * ratio))


def matrix_mask(scores: jax.Array, ratio: float) -> jax.Array:
  lead = scores.shape[:-2]
  flat_scores = scores.reshape(*lead, -1)
  k = int(flat_scores.shape[-1] * ratio)
  threshold = jnp.sort(flat_scores, axis=-1)[..., k]
  return scores > threshold[..., None, None]


@jax.jit
def _running_sums(scores: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each output unit's scores in ascending order, their running sums, and the unit's total."""
  ordered = jnp.sort(scores, axis=-2)
  return ordered, jnp.cumsum(ordered, axis=-2), jnp.sum(scores, axis=-2, keepdims=True)


@jax.jit
def _pruned_given_alpha(scores, ordered, running, total, alpha) -> tuple[jax.Array, jax.Array]:
  """The reference's `return_given_alpha`: (pruned, how many) for one α.

  Per output unit, t = the largest sorted score whose running sum is ≤ α·total;
  every score ≤ t is pruned. Where even the smallest score's sum exceeds α·total
  (the reference's index -1, an error in torch) the unit prunes nothing.
  """
  count = jnp.sum(running <= total * alpha, axis=-2, keepdims=True)
  threshold = jnp.take_along_axis(ordered, jnp.maximum(count - 1, 0), axis=-2)
  pruned = scores <= jnp.where(count > 0, threshold, -jnp.inf)
  return pruned, jnp.sum(pruned)


def variant_mask(scores: jax.Array, ratio: float) -> jax.Array:
  """Wanda's variant: one α per matrix, bisected as the reference does (its bounds, start and stops).

  α is kept in float64 on the host and the achieved sparsity compared in
  float32, as the reference's Python floats and torch tensors are, so the
  bisection takes the same steps.
  """
  if scores.ndim > 2:  # one α per matrix of a stack
    return jnp.stack([variant_mask(s, ratio) for s in scores])
  scores = jnp.asarray(scores, jnp.float32)  # running sums of bf16 scores would drift
  ordered, running, total = _running_sums(scores)
  size, target, tolerance = np.float32(scores.size), np.float32(ratio), np.float32(VARIANT_TOLERANCE)

  def prune_at(alpha):
    pruned, count = _pruned_given_alpha(scores, ordered, running, total, np.float32(alpha))
    return pruned, np.float32(int(count)) / size

  alpha, (low, high) = VARIANT_ALPHA, VARIANT_BOUNDS
  pruned, achieved = prune_at(alpha)
  while abs(achieved - target) > tolerance and high - low >= VARIANT_TOLERANCE:
    if achieved > target:
      alpha, high = (alpha + low) / 2, alpha
    else:
      alpha, low = (alpha + high) / 2, alpha
    pruned, achieved = prune_at(alpha)
  return ~pruned


def nm_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
  *lead, fan_in, out = scores.shape
  if fan_in % m:
    raise ValueError(f"{n}:{m} sparsity needs the input size to be a multiple of {m}, got {fan_in}")
  groups = scores.reshape(*lead, fan_in // m, m, out)
  return _keep_all_but_smallest(groups, n).reshape(scores.shape)


def mask_from_scores(scores: jax.Array, ratio: float, pattern: str) -> jax.Array:
  """The kept-mask of one kernel (any leading axes) from its scores."""
  kind, n, m = parse_pattern(pattern)
  if kind == "nm":
    return nm_mask(scores, n, m)
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"sparsity ratio must be in [0, 1), got {ratio}")
  return {"row": row_mask, "matrix": matrix_mask, "variant": variant_mask}[kind](scores, ratio)


# ----------------------------------------------------------------------------- allocation

def targets(params: Params, ratios: dict, pattern: str = "row",
            overrides: Iterable[tuple[str, float]] = (), include: Iterable[str] = (),
            exclude: Iterable[str] = DEFAULT_EXCLUDE) -> dict[str, float]:
  """Which kernels to prune, and at what ratio: `{path: ratio}`.

  ratios: per tower, e.g. {"vision": 0.5, "projector": 0.0, "lm": 0.5}.
  overrides: (path regex, ratio), first match wins, e.g. ("lm/layers_0/.*", 0.3).
  include: extra path regexes to prune besides linear kernels (embeddings,
    norms, `lm_head`: their ratios come from their tower or an override).
  With an N:M pattern each ratio must be 0 (not pruned) or N/M.
  """
  unknown = sorted(set(ratios) - set(TOWERS))
  if unknown:
    raise ValueError(f"unknown tower(s) {unknown} in sparsity ratios; towers are {TOWERS}")
  overrides = [(re.compile(p), float(r)) for p, r in overrides]
  include = [re.compile(p) for p in include]
  exclude = [re.compile(p) for p in exclude]
  kind, n, m = parse_pattern(pattern)
  out = {}
  for path, leaf in flat(params).items():
    explicit = any(p.fullmatch(path) for p in include)
    is_linear = is_linear_kernel(path, leaf) and not any(
        p.fullmatch(path) for p in exclude)
    if not (explicit or is_linear):
      continue
    ratio = next((r for p, r in overrides if p.fullmatch(path)), ratios.get(tower_of(path), 0.0))
    if ratio == 0.0:
      continue
    if kind == "nm" and not np.isclose(ratio, n / m):
      raise ValueError(f"{pattern} prunes exactly {n / m:g} of {path}; its ratio is {ratio} (use 0 or {n / m:g})")
    out[path] = float(ratio)
  return out


# ----------------------------------------------------------------------------- applying and reporting

def apply_masks(params: Params, masks: Masks) -> Params:
  """Zeroes the pruned weights (params outside the mask tree are returned as they are)."""
  check_masks_fit(params, masks)
  fm = flat(masks)
  return unflat({k: (jnp.where(fm[k], v, jnp.zeros((), v.dtype)) if k in fm else v)
                 for k, v in flat(params).items()})


def check_masks_fit(params: Params, masks: Masks) -> None:
  """A clear error for a mask tree from another model."""
  check_companion_fits(params, masks, "mask")


def sparsity_report(params: Params, masks: Optional[Masks] = None) -> list[dict]:
  """Actual sparsity (exact zeros) per pruned kernel, per tower and overall.

  Rows: one per kernel in `masks` (or every linear kernel when None); per tower
  `[<tower> masked]` over its masked kernels and `[<tower> linear]` over all its
  linear kernels (output head included); `[all linear]` over the whole model's.
  """
  fp = flat(params)
  linear = {p for p, v in fp.items() if is_linear_kernel(p, v)}
  masked = set(flat(masks)) if masks is not None else linear
  counts: dict[str, list[int]] = {}
  rows = []
  for path in sorted(linear | masked):
    v = np.asarray(fp[path])
    z, n = int(np.sum(v == 0)), int(v.size)
    groups = ([f"[{tower_of(path)} linear]", "[all linear]"] if path in linear else []) + \
             ([f"[{tower_of(path)} masked]"] if path in masked else [])
    for g in groups:
      c = counts.setdefault(g, [0, 0])
      c[0], c[1] = c[0] + z, c[1] + n
    if path in masked:
      rows.append({"name": path, "zeros": z, "size": n, "sparsity": z / n})
  order = [f"[{t} {kind}]" for t in TOWERS for kind in ("masked", "linear")] + ["[all linear]"]
  rows += [{"name": g, "zeros": counts[g][0], "size": counts[g][1], "sparsity": counts[g][0] / max(counts[g][1], 1)}
           for g in order if g in counts]
  return rows


def print_report(rows: list[dict], per_layer: bool = True) -> str:
  shown = [r for r in rows if per_layer or r["name"].startswith("[")]
  return print_table(shown, "actual sparsity (exact zeros)", ["name", "zeros", "size", "sparsity"])


# ----------------------------------------------------------------------------- files

def save_masks(directory: str, masks: Masks) -> None:
  """`<directory>/masks` (Orbax) and `<directory>/mask_paths.json` (what a run needs to shard them)."""
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(directory, "masks"), masks, force=True)
  with open(os.path.join(directory, "mask_paths.json"), "w") as f:
    json.dump(sorted(flat(masks)), f, indent=1)


def mask_paths(directory: str) -> list[str]:
  path = os.path.join(directory, "mask_paths.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no masks in {directory!r} (expected mask_paths.json from the prune job)")
  with open(path) as f:
    return json.load(f)


def mask_shardings(directory: str, param_shardings: dict) -> dict:
  """The masks' shardings: each its parameter's."""
  fs = flat(param_shardings)
  missing = [p for p in mask_paths(directory) if p not in fs]
  if missing:
    raise ValueError(f"the masks in {directory!r} are for another model: {missing[0]!r} is not a parameter here")
  return unflat({p: fs[p] for p in mask_paths(directory)})


def load_masks(directory: str, abstract_params: dict, param_shardings: dict) -> Masks:
  """Masks saved by `save_masks`, placed like their parameters; a clear error when they don't fit."""
  fa, shardings = flat(abstract_params), flat(mask_shardings(directory, param_shardings))
  abstract = unflat({p: jax.ShapeDtypeStruct(fa[p].shape, jnp.bool_, sharding=s) for p, s in shardings.items()})
  with ocp.StandardCheckpointer() as ckpt:
    try:
      return ckpt.restore(os.path.join(os.path.abspath(directory), "masks"), abstract)
    except ValueError as e:
      raise ValueError(f"the masks in {directory!r} do not fit this model: {e}") from e
