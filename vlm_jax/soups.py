"""Model soups: averages of fine-tuned models as streaming pytree means (METHODS §3).

Ingredients are k models fine-tuned from one checkpoint. Three soups:

    uniform_soup(sources)                                  θ = (1/k) Σ θ_i
    maximum_soup(sources, scores, top_p)                   uniform soup of the top-p by held-out score
    greedy_soup(sources, evaluate, scores=None, tie="strict")  -> (params, log)

Sources (`Ingredient.parse`): a string naming
  * an Orbax run dir (`<workdir>` holding `checkpoints/`), a checkpoint-manager
    dir (`<workdir>/checkpoints`), one step dir (`.../checkpoints/20`) or a
    `params` item dir; the latest step unless `PATH@STEP` names one. Only the
    `params` item is read. `checkpoint:PATH` forces this reading;
  * a Hugging Face folder (it has a `config.json`), read with `vlm_jax.from_hf`;
    `hf:PATH` forces this reading;
or an in-memory pytree of arrays (NumPy or JAX). Ingredients are numbered from
0 in the order given (the numbers in errors and in the greedy log).

Streaming: ingredients are loaded one at a time and added into one float32
accumulator (a running sum and a count), so peak host memory is about one
ingredient as stored plus the float32 sum, never k models. The greedy soup holds
one more float32 tree: the trial soup it hands to `evaluate`.

Precision: every floating parameter is upcast to float32 *before* it is added,
whatever its stored dtype, and the sum is divided by the count at the end. The
soup comes back as float32 NumPy arrays. (The reference soup code casts the
ingredients to bfloat16 first and averages in bfloat16: a known flaw — e.g. the
mean of the bf16 values 1 and 1+2⁻⁷ is 1 in bf16 arithmetic, 1+2⁻⁸ here.)

Ranking (maximum and greedy): by held-out score, descending; equal scores put
the LATER-listed ingredient first, as the original soups code does (a stable
ascending sort, then reversed).

Greedy (one pass, each ingredient tried once): P = {best}; for each next θ_i,
accept it if Score(avg(P ∪ {θ_i})) beats Score(avg(P)). `tie="strict"` (the
default, the original soups code) needs `>`; `tie="geq"` (POINTS Algorithm 1)
accepts `≥`. Score(avg({best})) is the best ingredient's held-out score, as in
the original code, so `scores` must come from the same evaluation as `evaluate`.
Each trial costs one ingredient load and one evaluation, not |P| loads.

Ingredients must agree with the first one in tree structure, every shape and
every dtype class (floating / integer / bool / complex): a mismatch is a
ValueError naming the first differing parameter path (paths ordered key by key)
and both shapes. Only floating parameters can be averaged.

Output (`save`): an Orbax params checkpoint (`<out>/checkpoints/<step>`, items
`params`, `train`, `data` like a training run, so `init="checkpoint:<out>"` and
`restore_params(<out>, abstract)` read it), or a Hugging Face folder via
`vlm_jax.to_hf`. `format="auto"` writes a Hugging Face folder when `like` is a
Flax model or names a Hugging Face folder (the ingredients' own format), and an
Orbax checkpoint otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

Params = Any
Source = Union["Ingredient", str, os.PathLike, Any]
Loader = Callable[["Ingredient"], Params]

TIES = ("strict", "geq")
_STEP = re.compile(r"^(.*)@(\d+)$")


# ----------------------------------------------------------------------------- ingredients

@dataclasses.dataclass
class Ingredient:
  """One soup ingredient: `kind` is "orbax", "hf" or "tree".

  orbax: `path` is the checkpoint-manager dir, `step` the step (None = latest);
  hf: `path` is the folder; tree: `tree` is the pytree itself.
  """
  kind: str
  path: Optional[str] = None
  step: Optional[int] = None
  tree: Any = dataclasses.field(default=None, repr=False)
  name: str = ""

  def __post_init__(self):
    if self.kind not in ("orbax", "hf", "tree"):
      raise ValueError(f"ingredient kind must be 'orbax', 'hf' or 'tree', got {self.kind!r}")
    if not self.name:
      self.name = ("<in-memory tree>" if self.kind == "tree" else
                   self.path + (f"@{self.step}" if self.step is not None else ""))

  @classmethod
  def parse(cls, source: Source) -> "Ingredient":
    """A path string (see the module docstring), an `Ingredient`, or a pytree."""
    if isinstance(source, Ingredient):
      return source
    if not isinstance(source, (str, os.PathLike)):
      return cls("tree", tree=source)
    text = os.fspath(source)
    forced = None
    for prefix, kind in (("checkpoint:", "orbax"), ("orbax:", "orbax"), ("hf:", "hf")):
      if text.startswith(prefix):
        forced, text = kind, text[len(prefix):]
    step = None
    m = _STEP.match(text)
    if m and not os.path.exists(text):
      text, step = m.group(1), int(m.group(2))
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isdir(path):
      raise FileNotFoundError(f"soup ingredient {os.fspath(source)!r}: no such directory {path!r}")
    # A training workdir also holds a config.json (the run's); its checkpoints/ decides.
    is_hf = os.path.exists(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints"))
    kind = forced or ("hf" if is_hf else "orbax")
    if kind == "hf":
      if step is not None:
        raise ValueError(f"soup ingredient {os.fspath(source)!r}: a Hugging Face folder has no steps")
      return cls("hf", path=path, name=os.fspath(source))
    return cls("orbax", path=path, step=step, name=os.fspath(source))


def _orbax_item_dir(ing: Ingredient) -> str:
  """The `params` item directory of an Orbax ingredient (resolving run / manager / step dirs)."""
  import orbax.checkpoint as ocp
  path = ing.path
  if os.path.isdir(os.path.join(path, "checkpoints")):  # a run's workdir
    path = os.path.join(path, "checkpoints")
  if os.path.exists(os.path.join(path, "_METADATA")) or os.path.exists(os.path.join(path, "manifest.ocdbt")):
    if ing.step is not None:
      raise ValueError(f"soup ingredient {ing.name!r}: {path!r} is a single checkpoint item; it has no steps")
    return path  # a params item dir itself
  if os.path.isdir(os.path.join(path, "params")) and ing.step is None:
    return os.path.join(path, "params")  # one step dir
  manager = ocp.CheckpointManager(path, item_names=("params", "train", "data"))
  try:
    steps = sorted(manager.all_steps())
  finally:
    manager.close()
  if not steps:
    raise FileNotFoundError(f"soup ingredient {ing.name!r}: no Orbax checkpoint in {path!r}")
  step = steps[-1] if ing.step is None else ing.step
  if step not in steps:
    raise FileNotFoundError(f"soup ingredient {ing.name!r}: no step {step} in {path!r} (steps: {steps})")
  item = os.path.join(path, str(step), "params")
  if not os.path.isdir(item):
    raise FileNotFoundError(f"soup ingredient {ing.name!r}: checkpoint {path}/{step} has no 'params' item")
  return item


def _read_orbax(ing: Ingredient) -> Params:
  """The params item as host NumPy arrays in their stored dtype."""
  import orbax.checkpoint as ocp
  from etils import epath
  item = _orbax_item_dir(ing)
  handler = ocp.PyTreeCheckpointHandler()
  checkpointer = ocp.Checkpointer(handler)
  try:
    metadata = handler.metadata(epath.Path(item)).tree  # the handler's own: no step-metadata warning
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # noqa: BLE001 — name the ingredient, keep the cause
    raise ValueError(f"soup ingredient {ing.name!r}: cannot read the Orbax checkpoint {item!r} "
                     f"({type(e).__name__}: {e}); pick another step with PATH@STEP") from e
  finally:
    checkpointer.close()


def _read_stored(ing: Ingredient) -> Params:
  """The default loader: the ingredient's tree as stored (no dtype change), arrays on host."""
  if ing.kind == "tree":
    return jax.tree.map(np.asarray, ing.tree)
  if ing.kind == "hf":
    from vlm_jax.interop import from_hf
    _, params = from_hf(ing.path)
    return jax.tree.map(np.asarray, params)
  return _read_orbax(ing)


def _is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def _dtype_class(dtype) -> str:
  for name, kind in (("bool", jnp.bool_), ("complex", jnp.complexfloating), ("floating", jnp.floating),
                     ("integer", jnp.integer)):
    if jnp.issubdtype(dtype, kind):
      return name
  return str(dtype)


def load(source: Source, like: Any = None, dtype: Any = np.float32) -> Params:
  """An ingredient's parameters as host NumPy arrays; floating ones cast to `dtype`.

  `dtype=None` keeps the stored dtypes (what the soups read). `like` (a pytree
  of arrays or ShapeDtypeStructs): the result must match its structure and
  shapes (else the ValueError of the soups); a Hugging Face folder read for a
  `like` whose decoder layers are stacked (`scan_layers=True`) is restacked.
  """
  ing = Ingredient.parse(source)
  tree = _read_stored(ing)
  if like is not None:
    tree = _fit_layers(tree, like)
    check_compatible(signature(like), tree, ing.name, what="`like`")
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype, copy=False) if _is_float(x.dtype) else x, tree)


def _fit_layers(tree: Params, like: Any) -> Params:
  """Stack `layers_{i}` into `layers` where `like` has them stacked (HF folders are read unstacked)."""
  from vlm_jax.models.params import stack_layers
  if not (isinstance(tree, dict) and isinstance(like, dict)):
    return tree
  if "layers" in like and "layers" not in tree and "layers_0" in tree:
    return jax.tree.map(np.asarray, stack_layers(tree))
  return {k: _fit_layers(v, like[k]) if k in like else v for k, v in tree.items()}


# ----------------------------------------------------------------------------- structure checks

def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flatten(tree: Params) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [tuple(_key_name(k) for k in p) for p, _ in paths_leaves]
  return paths, [leaf for _, leaf in paths_leaves], treedef


def signature(tree: Params) -> dict:
  """{path tuple: (shape, dtype class)} of a tree: what every ingredient must match."""
  paths, leaves, _ = _flatten(tree)
  return {p: (tuple(np.shape(x)), _dtype_class(x.dtype)) for p, x in zip(paths, leaves)}


def check_compatible(reference: dict, tree: Params, name: str, what: str = "the first ingredient") -> None:
  """Raises a ValueError naming the first parameter where `tree` differs from `reference` (a signature)."""
  got = signature(tree)
  if got == reference:
    return
  for path in sorted(set(got) | set(reference)):
    p = "/".join(path)
    if path not in got:
      raise ValueError(f"{name}: parameter {p!r} is missing; {what} has it with shape {reference[path][0]}")
    if path not in reference:
      raise ValueError(f"{name}: parameter {p!r} (shape {got[path][0]}) is not in {what}")
    (shape, kind), (ref_shape, ref_kind) = got[path], reference[path]
    if shape != ref_shape:
      raise ValueError(f"{name}: parameter {p!r} has shape {shape}, {what} {ref_shape}")
    if kind != ref_kind:
      raise ValueError(f"{name}: parameter {p!r} is {kind} with shape {shape}, {what} is {ref_kind} "
                       f"with shape {ref_shape}")


def _label(i: int, ing: Ingredient) -> str:
  return f"ingredient {i} ({ing.name})"


# ----------------------------------------------------------------------------- the float32 running sum

class RunningSum:
  """Σ θ_i in float32 plus the count: the streaming accumulator of every soup.

  `add(tree)` adds into the existing buffers in place (upcasting each leaf as
  it is added); `mean()` is a fresh float32 tree, `finish()` divides in place.
  """

  def __init__(self, first: Params, name: str = "ingredient 0"):
    paths, leaves, self.treedef = _flatten(first)
    self.paths = paths
    self.reference = signature(first)
    for p, x in zip(paths, leaves):
      if not _is_float(x.dtype):
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
  return _stream_sum(list(enumerate(ingredients)), loader or _read_stored).finish()


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
  return _stream_sum([(i, ingredients[i]) for i in chosen], loader or _read_stored).finish()


def score_ingredients(sources: Sequence[Source], evaluate: Callable[[Params], float], *,
                      loader: Optional[Loader] = None) -> list[float]:
  """`evaluate` of every ingredient (float32 NumPy params), one loaded at a time."""
  loader = loader or _read_stored
  scores, reference = [], None
  for i, source in enumerate(sources):
    ing = Ingredient.parse(source)
    tree = loader(ing)
    if reference is None:
      reference = signature(tree)
    else:
      check_compatible(reference, tree, _label(i, ing))
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32) if _is_float(x.dtype) else x, tree)
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
  loader = loader or _read_stored
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


# ----------------------------------------------------------------------------- saving

def _hf_model(folder: str):
  """The vlm_jax module of a Hugging Face folder, from its config.json alone (no weights read)."""
  import json
  from transformers import AutoConfig
  from vlm_jax.interop import ARCHITECTURES, CheckpointError
  with open(os.path.join(folder, "config.json")) as f:
    names = json.load(f).get("architectures") or []
  known = [n for n in names if n in ARCHITECTURES]
  if not known:
    raise CheckpointError(f"unknown architecture {names or '(none given)'} in {folder}/config.json")
  arch = ARCHITECTURES[known[0]]
  return arch.module(arch.config_from_hf(AutoConfig.from_pretrained(folder)))


_HF_EXTRAS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")


def output_format(like: Any) -> str:
  """"hf" when `like` is a Flax module or names a Hugging Face folder, else "orbax"."""
  import flax.linen as nn
  if isinstance(like, nn.Module):
    return "hf"
  if isinstance(like, (str, os.PathLike, Ingredient)):
    try:
      return "hf" if Ingredient.parse(like).kind == "hf" else "orbax"
    except FileNotFoundError:
      return "orbax"
  return "orbax"


def save(params: Params, like_source_or_model: Any, out: str, *, format: str = "auto",
         dtype: Optional[str] = None, step: int = 0) -> str:
  """Writes a soup; returns the format written ("orbax" or "hf").

  format="auto" follows `output_format(like_source_or_model)`:
    hf: `to_hf(model, params, out, dtype)` with the model given or built from the
        like folder's config.json (its tokenizer files are copied along);
    orbax: `<out>/checkpoints/<step>` with items `params` (the soup), `train`
        (`{"step": step}`) and `data` (`{}`), readable by `restore_params(out, ...)`
        and `init="checkpoint:<out>"`.
  `dtype` casts the floating parameters on the way out (default: float32, the soup's).
  An existing non-empty `out` is refused.
  """
  import flax.linen as nn
  fmt = output_format(like_source_or_model) if format == "auto" else format
  if fmt not in ("orbax", "hf"):
    raise ValueError(f"format must be 'auto', 'orbax' or 'hf', got {format!r}")
  out = os.path.abspath(out)
  if os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f"the soup output {out!r} exists and is not empty; choose another")
  if fmt == "hf":
    like = like_source_or_model
    if isinstance(like, nn.Module):
      model, folder = like, None
    else:
      ing = Ingredient.parse(like)
      if ing.kind != "hf":
        raise ValueError(f"format='hf' needs a Flax model or a Hugging Face folder as `like`, got {ing.name!r}")
      model, folder = _hf_model(ing.path), ing.path
    from vlm_jax.interop import to_hf
    to_hf(model, params, out, dtype=dtype)
    for name in _HF_EXTRAS if folder else ():
      if os.path.exists(os.path.join(folder, name)):
        shutil.copy2(os.path.join(folder, name), os.path.join(out, name))
    return "hf"
  from vlm_jax.train.checkpoint import Checkpointer
  if dtype is not None:
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype) if _is_float(np.asarray(x).dtype) else x,
                          params)
  ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=1, asynchronous=False)
  try:
    ckpt.save(step, params, {"step": np.asarray(step, np.int32)}, {}, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  return "orbax"


# ----------------------------------------------------------------------------- the config-file job

def load_evaluator(spec: str) -> Callable[[Params], float]:
  """"package.module:function" -> the callable."""
  import importlib
  module, sep, name = spec.partition(":")
  if not sep or not module or not name:
    raise ValueError(f"evaluator must be 'module:function', got {spec!r}")
  fn = getattr(importlib.import_module(module), name, None)
  if not callable(fn):
    raise ValueError(f"evaluator {spec!r}: {module} has no callable {name!r}")
  return fn


def run(config, workdir: str) -> dict:
  """The `soup` job (configs/soup.py): soup, table, `<workdir>/soup.json`, saved soup; returns the JSON."""
  import time
  from vlm_jax import report
  kind = config.kind
  if kind not in ("uniform", "maximum", "greedy"):
    raise ValueError(f"config.kind must be 'uniform', 'maximum' or 'greedy', got {kind!r}")
  ingredients = [Ingredient.parse(p) for p in config.ingredients]
  if not ingredients:
    raise ValueError("config.ingredients is empty: list the checkpoints to average")
  scores = [float(s) for s in config.scores] or None
  evaluate = load_evaluator(config.evaluator) if config.evaluator else None
  output = config.output or os.path.join(workdir, "soup")
  if os.path.isdir(output) and os.listdir(output):  # before the (long) soup, not after
    raise FileExistsError(f"the soup output {output!r} exists and is not empty; choose another")
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
