"""Evaluation: VQA / caption / classification / LM metrics and the evaluators (tables: `vlm_jax.report`)."""

from vlm_jax.eval.metrics import (
    accuracy,
    bleu,
    bleu4,
    bleu_scores,
    cider_d,
    cider_d_scores,
    mean_perplexity,
    mean_vqa_accuracy,
    normalize_answer,
    perplexity,
    tokenize,
    vqa_accuracy,
    vqa_accuracy_by_type,
    vqa_exact_match,
    vqa_exact_match_by_type,
)

__all__ = [
    "accuracy",
    "bleu",
    "bleu4",
    "bleu_scores",
    "cider_d",
    "cider_d_scores",
    "mean_perplexity",
    "mean_vqa_accuracy",
    "normalize_answer",
    "perplexity",
    "tokenize",
    "vqa_accuracy",
    "vqa_accuracy_by_type",
    "vqa_exact_match",
    "vqa_exact_match_by_type",
]
