"""Contrastive region guidance (CRG): decoding and scoring with the regions of interest contrasted away.

Read top to bottom: masking.py (the contrast branch's input) -> decode.py (guided
generation and scoring, one doubled batch) -> tasks.py (records -> multiple choice,
alignment, region re-ranking, answers) -> jobs.py (the config-file evaluation).
"""

from vlm_jax.guidance.decode import branch_logits, combine, guided_generate, guided_score, rerank_boxes
from vlm_jax.guidance.masking import black_out, black_pixel, region_mask, region_masks

__all__ = ["branch_logits", "combine", "guided_generate", "guided_score", "rerank_boxes", "black_out", "black_pixel",
           "region_mask", "region_masks"]
