"""Model soups: averages of fine-tuned models as streaming pytree means (METHODS §3).

Ingredients are k models fine-tuned from one checkpoint: Orbax runs or
checkpoints (`PATH@STEP` picks a step), Hugging Face folders, or in-memory
pytrees. Three soups, each a float32 mean streamed one ingredient at a time:

    uniform_soup(sources)                                  θ = (1/k) Σ θ_i
    maximum_soup(sources, scores, top_p)                   uniform soup of the top-p by held-out score
    greedy_soup(sources, evaluate, scores=None, tie="strict")  -> (params, log)

The package reads top to bottom:
  ingredients  what a source names, how it is read (`load`), what must agree (`check_compatible`)
  average      the float32 running sum and the three soups, with their ranking and tie rules
  jobs         `save` (Orbax checkpoint or Hugging Face folder) and the `soup` job of configs/soup.py
"""

from vlm_jax.soups.average import (TIES, RunningSum, greedy_soup, maximum_soup, rank, score_ingredients,
                                   top_p_count, uniform_soup)
from vlm_jax.soups.ingredients import Ingredient, StreamReader, check_compatible, load, read_stored, signature
from vlm_jax.soups.jobs import load_evaluator, output_format, save

__all__ = ["TIES", "Ingredient", "RunningSum", "StreamReader", "check_compatible", "greedy_soup", "load",
           "load_evaluator", "maximum_soup", "output_format", "rank", "read_stored", "save", "score_ingredients",
           "signature", "top_p_count", "uniform_soup"]
