"""Data curation by perplexity (METHODS §2), read top to bottom: `perplexity` (the formula and
the selection) -> `scoring` (the resumable, sharded loop over a data set) -> `jobs` (the
config-file jobs `score` and `filter`)."""

from vlm_jax.curation.jobs import filter_data
from vlm_jax.curation.perplexity import (DEFAULT_PROMPT, filter_scores, make_score_fn, ppl_histogram,
                                         read_scores, record_nll, select, token_nll)
from vlm_jax.curation.scoring import score

__all__ = ["DEFAULT_PROMPT", "filter_data", "filter_scores", "make_score_fn", "ppl_histogram", "read_scores",
           "record_nll", "score", "select", "token_nll"]
