"""Pruning with explicit masks, and repairing the pruned model (METHODS §4, RESSA).

    params, masks = sparsity.prune(model, params, method="wanda", pattern="2:4",
                                   ratios={"vision": 0.5, "lm": 0.5}, calibration=batches)
    sparsity.print_report(sparsity.sparsity_report(params, masks))

`masks` is a boolean pytree (True = kept) holding the pruned kernels' paths of
`params`; the returned params are already zero where the masks are False.
Without `pattern`, each method prunes by its reference rule (`DEFAULT_PATTERN`:
magnitude per matrix, Wanda per output row, SparseGPT per block);
`pattern="variant"` is Wanda's variant (the reference's `--use_variant`).
Read the folder top to bottom: `masks.py` (patterns, allocation across towers, files),
`pruners.py` (magnitude / Wanda / SparseGPT criteria), `calibrate.py` (the layer-by-layer
procedure), `prune.py` (the one call), `repair.py` (SparseLoRA + distillation or masked
fine-tuning, as a TrainExtension of the engine), `jobs.py` (the `prune` and `repair` jobs).
"""

from vlm_jax.sparsity.calibrate import prune_sequential
from vlm_jax.sparsity.masks import (apply_masks, check_masks_fit, mask_from_scores, print_report, sparsity_report,
                                    targets)
from vlm_jax.sparsity.prune import prune
from vlm_jax.sparsity.pruners import DEFAULT_PATTERN, METHODS

__all__ = ["prune", "prune_sequential", "apply_masks", "check_masks_fit", "sparsity_report", "print_report",
           "targets", "mask_from_scores", "METHODS", "DEFAULT_PATTERN"]
