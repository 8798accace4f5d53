"""Evaluation: VQA / caption / classification / LM metrics and result reporting."""

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
from vlm_jax.eval.report import format_number, format_percent, print_table, write_json

__all__ = [
    "accuracy",
    "bleu",
    "bleu4",
    "cider_d",
    "cider_d_scores",
    "format_number",
    "format_percent",
    "mean_perplexity",
    "normalize_answer",
    "perplexity",
    "print_table",
    "tokenize",
    "vqa_accuracy_by_type",
    "vqa_exact_match",
    "write_json",
]
