"""Evaluation: VQA / caption / classification / LM metrics and the evaluators (tables: `vlm_jax.report`)."""

from vlm_jax.eval.metrics import (
    accuracy,
    bleu,
    bleu4,
    cider_d,
    cider_d_scores,
    mean_perplexity,
    normalize_answer,
    perplexity,
    tokenize,
    vqa_accuracy_by_type,
    vqa_exact_match,
)

__all__ = [
    "accuracy",
    "bleu",
    "bleu4",
    "cider_d",
    "cider_d_scores",
    "mean_perplexity",
    "normalize_answer",
    "perplexity",
    "tokenize",
    "vqa_accuracy_by_type",
    "vqa_exact_match",
]
