"""Saving a soup, and the `soup` job of configs/soup.py.

Output (`save`): an Orbax params checkpoint (`<out>/checkpoints/<step>`, items
`params`, `train`, `data` like a training run, so `init="checkpoint:<out>"` and
`restore_params(<out>, abstract)` read it; `train.checkpoint.save_params`), or a
Hugging Face folder via `vlm_jax.to_hf`. `format="auto"` writes a Hugging Face
folder when `like` is a Flax model or names a Hugging Face folder (the
ingredients' own format), and an Orbax checkpoint otherwise.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np

from vlm_jax import report
from vlm_jax.interop import model_from_folder, to_hf
from vlm_jax.models.params import check_finite
from vlm_jax.soups.average import greedy_soup, maximum_soup, rank, score_ingredients, top_p_count, uniform_soup
from vlm_jax.soups.ingredients import Ingredient, Params, is_float
from vlm_jax.train.checkpoint import save_params

log = logging.getLogger(__name__)

_HF_EXTRAS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")


# ----------------------------------------------------------------------------- saving

def output_format(like: Any) -> str:
  """"hf" when `like` is a Flax module or names a Hugging Face folder, else "orbax"."""
  if isinstance(like, nn.Module):
    return "hf"
  if isinstance(like, (str, os.PathLike, Ingredient)):
    try:
      return "hf" if Ingredient.parse(like).kind == "hf" else "orbax"
    except FileNotFoundError:
      return "orbax"
  return "orbax"


def _refuse_nonempty(out: str) -> None:
  if os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f"the soup output {out!r} exists and is not empty; choose another")


def save(params: Params, like_source_or_model: Any, out: str, *, format: str = "auto",
         dtype: Optional[str] = None, step: int = 0) -> str:
  """Writes a soup; returns the format written ("orbax" or "hf").

  format="auto" follows `output_format(like_source_or_model)`:
    hf: `to_hf(model, params, out, dtype)` with the model given or built from the
        like folder's config.json (its tokenizer files are copied along);
    orbax: `train.checkpoint.save_params(out, params, step)`, readable by
        `restore_params(out, ...)` and `init="checkpoint:<out>"`.
  `dtype` casts the floating parameters on the way out (default: float32, the soup's).
  An existing non-empty `out` is refused, and so is a soup with a NaN or inf (nothing is written).
  """
  fmt = output_format(like_source_or_model) if format == "auto" else format
  if fmt not in ("orbax", "hf"):
    raise ValueError(f"format must be 'auto', 'orbax' or 'hf', got {format!r}")
  out = os.path.abspath(out)
  _refuse_nonempty(out)
  check_finite(params, f"refusing to write the soup {out}")
  if fmt == "hf":
    like = like_source_or_model
    if isinstance(like, nn.Module):
      model, folder = like, None
    else:
      ing = Ingredient.parse(like)
      if ing.kind != "hf":
        raise ValueError(f"format='hf' needs a Flax model or a Hugging Face folder as `like`, got {ing.name!r}")
      model, folder = model_from_folder(ing.path), ing.path
    to_hf(model, params, out, dtype=dtype)
    for name in _HF_EXTRAS if folder else ():
      if os.path.exists(os.path.join(folder, name)):
        shutil.copy2(os.path.join(folder, name), os.path.join(out, name))
    return "hf"
  if dtype is not None:
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype) if is_float(np.asarray(x).dtype) else x, params)
  save_params(out, params, step)
  return "orbax"


# ----------------------------------------------------------------------------- the config-file job

def load_evaluator(spec: str) -> Callable[[Params], float]:
  """"package.module:function" -> the callable."""
  module, sep, name = spec.partition(":")
  if not sep or not module or not name:
    raise ValueError(f"evaluator must be 'module:function', got {spec!r}")
  fn = getattr(importlib.import_module(module), name, None)
  if not callable(fn):
    raise ValueError(f"evaluator {spec!r}: {module} has no callable {name!r}")
  return fn


def soup(config, workdir: str) -> dict:
  """The `soup` job (configs/soup.py): soup, table, `<workdir>/soup.json`, saved soup; returns the JSON."""
  kind = config.kind
  if kind not in ("uniform", "maximum", "greedy"):
    raise ValueError(f"config.kind must be 'uniform', 'maximum' or 'greedy', got {kind!r}")
  ingredients = [Ingredient.parse(p) for p in config.ingredients]
  if not ingredients:
    raise ValueError("config.ingredients is empty: list the checkpoints to average")
  scores = [float(s) for s in config.scores] or None
  evaluate = load_evaluator(config.evaluator) if config.evaluator else None
  output = config.output or os.path.join(workdir, "soup")
  _refuse_nonempty(output)  # before the (long) soup, not after
  os.makedirs(workdir, exist_ok=True)

  start = time.time()
  history = None
  if kind == "uniform":
    params = uniform_soup(ingredients)
    chosen = set(range(len(ingredients)))
  elif kind == "maximum":
    if scores is None:
      if evaluate is None:
        raise ValueError("the maximum soup needs config.scores or config.evaluator")
      scores = score_ingredients(ingredients, evaluate)
    chosen = set(rank(scores)[:top_p_count(config.top_p, len(ingredients))])
    params = maximum_soup(ingredients, scores, config.top_p)
  else:
    if evaluate is None:
      raise ValueError("the greedy soup needs config.evaluator ('module:function', params -> float)")
    params, history = greedy_soup(ingredients, evaluate, scores, tie=config.tie)
    scores = [None] * len(ingredients)
    for e in history:
      scores[e["index"]] = e["score"]
    chosen = {e["index"] for e in history if e["accepted"]}
  seconds = time.time() - start

  if history is not None:
    rows = [{"rank": e["rank"], "ingredient": e["ingredient"], "score": e["score"],
             "soup score": e["soup_score"], "accepted": "yes" if e["accepted"] else "no"} for e in history]
  else:
    rows = [{"ingredient": ing.name, "score": None if scores is None else scores[i],
             "accepted": "yes" if i in chosen else "no"} for i, ing in enumerate(ingredients)]
  final = {"ingredient": f"= {kind} soup of {len(chosen)}", "accepted": ""}
  if history is not None:
    final["soup score"] = next(e["soup_score"] for e in reversed(history) if e["accepted"])
  report.print_table(rows + [final], f"{kind} soup of {len(ingredients)} ingredients")

  result = {"kind": kind, "seed": config.seed, "tie": config.tie if kind == "greedy" else None,
            "top_p": config.top_p if kind == "maximum" else None,
            "ingredients": [ing.name for ing in ingredients], "scores": scores,
            "accepted": [i in chosen for i in range(len(ingredients))], "greedy_log": history,
            "output": os.path.abspath(output), "seconds": round(seconds, 3)}
  if jax.process_index() == 0:
    result["format"] = save(params, ingredients[0], output)
    report.write_json(os.path.join(workdir, "soup.json"), result)
  log.info("soup written to %s", output)
  return result
