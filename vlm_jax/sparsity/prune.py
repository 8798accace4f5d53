"""`prune`: one call from a model and its parameters to pruned parameters and their masks."""

from typing import Iterable, Optional, Sequence

from vlm_jax.models.params import flat, unflat
from vlm_jax.sparsity.calibrate import prune_sequential
from vlm_jax.sparsity.masks import DEFAULT_EXCLUDE, apply_masks, targets
from vlm_jax.sparsity.pruners import magnitude, resolve_pattern


def prune(model, params: dict, *, method: str = "wanda", pattern: Optional[str] = None,
          ratios: Optional[dict] = None, overrides: Iterable = (), include: Iterable[str] = (),
          exclude: Iterable[str] = DEFAULT_EXCLUDE, calibration: Optional[Sequence[dict]] = None,
          progress: bool = True, sparsegpt_kw: Optional[dict] = None,
          rows_sharding=None) -> tuple[dict, dict]:
  """Prunes `params` -> (pruned params, masks).

  method: "magnitude" (no calibration), "wanda" or "sparsegpt" (calibration:
    a list of batches in the device-batch format, run layer by layer).
  pattern: "row" (unstructured per output unit), "matrix" (per matrix),
    "variant" (Wanda's variant, Wanda only) or "N:M" (e.g. "2:4"); None (the
    default) or "": the method's reference rule, `pruners.DEFAULT_PATTERN`
    (magnitude "matrix", wanda "row", sparsegpt "matrix": its per-block rule).
  ratios: per tower, {"vision": s_V, "projector": s_P, "lm": s_L}; default
    0.5 for the vision tower and the LM, projector dense.
  overrides / include / exclude: see `masks.targets`.
  rows_sharding: shards the calibration rows over the mesh (see `prune_sequential`).
  """
  pattern = resolve_pattern(method, pattern)
  ratios = dict(ratios) if ratios is not None else {"vision": 0.5, "projector": 0.0, "lm": 0.5}
  chosen = targets(params, ratios, pattern, overrides, include, exclude)
  if method == "magnitude":
    fp = flat(params)
    masks = unflat({path: magnitude(fp[path], ratio, pattern) for path, ratio in chosen.items()})
    return apply_masks(params, masks), masks
  if not calibration:
    raise ValueError(f"{method} needs calibration batches (calibration=[batch, ...])")
  return prune_sequential(model, params, list(calibration), chosen, method, pattern,
                          sparsegpt_kw=sparsegpt_kw, rows_sharding=rows_sharding, progress=progress)
