"""Data curation: perplexity scoring and filtering (METHODS §2). See `perplexity`."""

from vlm_jax.curation.perplexity import (DEFAULT_PROMPT, build_filtered, filter_data, filter_scores,
                                         make_score_fn, ppl_histogram, read_scores, record_nll, score,
                                         select)

__all__ = ["DEFAULT_PROMPT", "build_filtered", "filter_data", "filter_scores", "make_score_fn",
           "ppl_histogram", "read_scores", "record_nll", "score", "select"]
