"""The soups themselves: float32 streaming means of ingredients.

    uniform_soup(sources)                                  θ = (1/k) Σ θ_i
    maximum_soup(sources, scores, top_p)                   uniform soup of the top-p by held-out score
    greedy_soup(sources, evaluate, scores=None, tie="strict")  -> (params, log)

Streaming: ingredients are loaded one at a time and added into one float32
accumulator (a running sum and a count), so peak host memory is about one
ingredient as stored plus the float32 sum, never k models. The uniform and maximum
soups read every Orbax ingredient into the same host arrays (`StreamReader`), so
one ingredient is allocated once. The greedy soup holds one more float32 tree: the
trial soup it hands to `evaluate` (its ingredients are read into fresh arrays, as
`evaluate` may keep what it is given).

Precision: every floating parameter is upcast to float32 *before* it is added,
whatever its stored dtype, and the sum is divided by the count at the end. The
soup comes back as float32 NumPy arrays. (The reference soup code casts the
ingredients to bfloat16 first and averages in bfloat16: a known flaw — e.g. the
mean of the bf16 values 1 and 1+2⁻⁷ is 1 in bf16 arithmetic, 1+2⁻⁸ here.)
Only floating parameters can be averaged.

Ranking (maximum and greedy): by held-out score, descending; equal scores put
the LATER-listed ingredient first, as the original soups code does (a stable
ascending sort, then reversed).

Greedy (one pass, each ingredient tried once): P = {best}; for each next θ_i,
accept it if Score(avg(P ∪ {θ_i})) beats Score(avg(P)). `tie="strict"` (the
default, the original soups code) needs `>`; `tie="geq"` (POINTS Algorithm 1)
accepts `≥`. Score(avg({best})) is the best ingredient's held-out score, as in
the original code, so `scores` must come from the same evaluation as `evaluate`.
Each trial costs one ingredient load and one evaluation, not |P| loads.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable, Optional, Sequence, Union

import jax
import numpy as np

from vlm_jax.soups.ingredients import (Ingredient, Loader, Params, Source, StreamReader, check_compatible, flatten,
                                       is_float, read_stored, signature)

log = logging.getLogger(__name__)

TIES = ("strict", "geq")


def _label(i: int, ing: Ingredient) -> str:
  return f"ingredient {i} ({ing.name})"


# ----------------------------------------------------------------------------- the float32 running sum

class RunningSum:
  """Σ θ_i in float32 plus the count: the streaming accumulator of every soup.

  `add(tree)` adds into the existing buffers in place (upcasting each leaf as
  it is added); `mean()` is a fresh float32 tree, `finish()` divides in place.
  """

  def __init__(self, first: Params, name: str = "ingredient 0"):
    paths, leaves, self.treedef = flatten(first)
    self.paths = paths
    self.reference = signature(first)
    for p, x in zip(paths, leaves):
      if not is_float(x.dtype):
        raise ValueError(f"{name}: parameter {'/'.join(p)!r} is {x.dtype}; only floating-point "
                         f"parameters can be averaged")
    self.sums = [np.array(x, dtype=np.float32, copy=True) for x in leaves]
    self.count = 1

  def check(self, tree: Params, name: str) -> list:
    check_compatible(self.reference, tree, name)
    return jax.tree_util.tree_leaves(tree)

  def add(self, tree: Params, name: str) -> None:
    for s, x in zip(self.sums, self.check(tree, name)):
      np.add(s, x, out=s)  # a bf16 leaf is upcast element-wise, never summed in bf16
    self.count += 1

  def trial_mean(self, tree: Params, name: str) -> Params:
    """avg(P ∪ {tree}) without changing the sum."""
    n = self.count + 1
    out = []
    for s, x in zip(self.sums, self.check(tree, name)):
      t = np.add(s, x, dtype=np.float32)
      t /= np.float32(n)
      out.append(t)
    return jax.tree_util.tree_unflatten(self.treedef, out)

  def mean(self) -> Params:
    return jax.tree_util.tree_unflatten(self.treedef, [s / np.float32(self.count) for s in self.sums])

  def finish(self) -> Params:
    """The mean, divided in place: no second tree; the accumulator is spent."""
    sums, self.sums = self.sums, None
    for s in sums:
      s /= np.float32(self.count)
    return jax.tree_util.tree_unflatten(self.treedef, sums)


def _stream_sum(ingredients: Sequence[tuple[int, Ingredient]], loader: Loader) -> RunningSum:
  """Loads the ingredients one at a time into one RunningSum (one ingredient alive at once)."""
  if not ingredients:
    raise ValueError("a soup needs at least one ingredient")
  acc = None
  for i, ing in ingredients:
    tree = loader(ing)
    if acc is None:
      acc = RunningSum(tree, _label(i, ing))
    else:
      acc.add(tree, _label(i, ing))
    del tree  # before the next load: never two ingredients alive at once
    log.info("soup: added %s (%d so far)", _label(i, ing), acc.count)
  return acc


# ----------------------------------------------------------------------------- soups

def uniform_soup(sources: Sequence[Source], *, loader: Optional[Loader] = None) -> Params:
  """θ = (1/k) Σ θ_i over all ingredients, streamed, in float32 (returns float32 NumPy arrays).

  `loader(ingredient) -> tree` replaces the default reader (stored dtypes, host arrays).
  """
  ingredients = [Ingredient.parse(s) for s in sources]
  return _stream_sum(list(enumerate(ingredients)), loader or StreamReader()).finish()


def rank(scores: Sequence[float]) -> list[int]:
  """Indices by score, best first; equal scores put the later-listed ingredient first."""
  order = sorted(range(len(scores)), key=lambda i: float(scores[i]))  # stable ascending
  return order[::-1]


def top_p_count(top_p: Union[int, float, str], k: int) -> int:
  """How many ingredients `top_p` keeps out of k.

  An int is a count (1 ≤ top_p ≤ k). A float is a fraction in (0, 1]: it keeps
  ceil(top_p · k), at least 1 (so 1.0 keeps all, 0.5 of 5 keeps 3). A string
  (the config file's form) is parsed: "3" is a count, "0.5" and "50%" fractions.
  """
  if isinstance(top_p, str):
    text = top_p.strip()
    if text.endswith("%"):
      top_p = float(text[:-1]) / 100.0
    elif re.fullmatch(r"\d+", text):
      top_p = int(text)
    else:
      top_p = float(text)
  if isinstance(top_p, (bool, np.bool_)):
    raise ValueError(f"top_p must be a count (int) or a fraction (float), got {top_p!r}")
  if isinstance(top_p, (int, np.integer)):
    if not 1 <= top_p <= k:
      raise ValueError(f"top_p={top_p} is a count: it must be between 1 and the {k} ingredients")
    return int(top_p)
  top_p = float(top_p)
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} is a fraction: it must be in (0, 1] (pass an int for a count)")
  return max(1, min(k, math.ceil(top_p * k - 1e-9)))


def _check_scores(scores: Sequence[float], k: int) -> list[float]:
  scores = [float(s) for s in scores]
  if len(scores) != k:
    raise ValueError(f"{len(scores)} scores for {k} ingredients")
  if any(math.isnan(s) for s in scores):
    raise ValueError(f"a held-out score is NaN: {scores}")
  return scores


def maximum_soup(sources: Sequence[Source], scores: Sequence[float], top_p: Union[int, float, str], *,
                 loader: Optional[Loader] = None) -> Params:
  """Uniform soup of the `top_p` best ingredients by held-out `scores` (see `top_p_count`)."""
  ingredients = [Ingredient.parse(s) for s in sources]
  scores = _check_scores(scores, len(ingredients))
  chosen = rank(scores)[:top_p_count(top_p, len(ingredients))]
  log.info("maximum soup: the top %d of %d: %s", len(chosen), len(ingredients), chosen)
  return _stream_sum([(i, ingredients[i]) for i in chosen], loader or StreamReader()).finish()


def score_ingredients(sources: Sequence[Source], evaluate: Callable[[Params], float], *,
                      loader: Optional[Loader] = None) -> list[float]:
  """`evaluate` of every ingredient (float32 NumPy params), one loaded at a time."""
  loader = loader or read_stored
  scores, reference = [], None
  for i, source in enumerate(sources):
    ing = Ingredient.parse(source)
    tree = loader(ing)
    if reference is None:
      reference = signature(tree)
    else:
      check_compatible(reference, tree, _label(i, ing))
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32) if is_float(x.dtype) else x, tree)
    scores.append(float(evaluate(tree)))
    del tree
    log.info("soup: %s scores %.6g", _label(i, ing), scores[-1])
  return scores


def greedy_soup(sources: Sequence[Source], evaluate: Callable[[Params], float],
                scores: Optional[Sequence[float]] = None, tie: str = "strict", *,
                loader: Optional[Loader] = None) -> tuple[Params, list[dict]]:
  """The greedy soup of METHODS §3; returns (params, log).

  `evaluate(params) -> float`, higher is better, is called on float32 NumPy
  trees. Without `scores`, every ingredient is first scored with `evaluate`.
  `tie="strict"` accepts only a higher soup score (original soups code);
  `tie="geq"` also an equal one (POINTS Algorithm 1).

  The log has one dict per ingredient in the order tried: `rank` (0 = best),
  `index` (position in `sources`), `ingredient` (its name), `score` (its own
  held-out score), `soup_score` (Score(avg(P ∪ {θ_i})); for the first, its own
  score), `accepted`, `soup_size` (|P| after the decision).
  """
  if tie not in TIES:
    raise ValueError(f"tie must be one of {TIES}, got {tie!r}")
  loader = loader or read_stored
  ingredients = [Ingredient.parse(s) for s in sources]
  if not ingredients:
    raise ValueError("a soup needs at least one ingredient")
  if scores is None:
    scores = score_ingredients(ingredients, evaluate, loader=loader)
  scores = _check_scores(scores, len(ingredients))
  order = rank(scores)

  def entry(r, i, soup_score, accepted, size):
    return {"rank": r, "index": i, "ingredient": ingredients[i].name, "score": scores[i],
            "soup_score": soup_score, "accepted": accepted, "soup_size": size}

  best = order[0]
  tree = loader(ingredients[best])
  acc = RunningSum(tree, _label(best, ingredients[best]))
  del tree
  current = scores[best]
  history = [entry(0, best, current, True, 1)]
  log.info("greedy soup: start from %s, score %.6g", _label(best, ingredients[best]), current)
  for r, i in enumerate(order[1:], start=1):
    tree = loader(ingredients[i])
    trial = acc.trial_mean(tree, _label(i, ingredients[i]))
    value = float(evaluate(trial))
    del trial
    if math.isnan(value):
      raise ValueError(f"evaluate returned NaN for the soup with {_label(i, ingredients[i])}")
    accepted = value > current if tie == "strict" else value >= current
    log.info("greedy soup: %s %s: soup score %.6g vs %.6g without it (tie=%s); soup of %d",
             "accept" if accepted else "reject", _label(i, ingredients[i]), value, current, tie,
             acc.count + accepted)
    if accepted:
      acc.add(tree, _label(i, ingredients[i]))
      current = value
    del tree
    history.append(entry(r, i, value, accepted, acc.count))
  return acc.finish(), history
