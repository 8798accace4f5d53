"""Soup ingredients: where they come from, how they are read, what must agree.

Sources (`Ingredient.parse`): a string naming
  * an Orbax run dir (`<workdir>` holding `checkpoints/`), a checkpoint-manager
    dir (`<workdir>/checkpoints`), one step dir (`.../checkpoints/20`) or a
    `params` item dir; the latest step unless `PATH@STEP` names one. Only the
    `params` item is read. `checkpoint:PATH` forces this reading;
  * a Hugging Face folder (it has a `config.json`), read with `vlm_jax.from_hf`;
    `hf:PATH` forces this reading;
or an in-memory pytree of arrays (NumPy or JAX). Ingredients are numbered from
0 in the order given (the numbers in errors and in the greedy log).

Ingredients must agree with the first one in tree structure, every shape and
every dtype class (floating / integer / bool / complex): a mismatch is a
ValueError naming the first differing parameter path (paths ordered key by key)
and both shapes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.interop import from_hf
from vlm_jax.models.params import stack_layers
from vlm_jax.train.checkpoint import CheckpointMismatch, read_params

Params = Any
Source = Union["Ingredient", str, os.PathLike, Any]
Loader = Callable[["Ingredient"], Params]

_STEP = re.compile(r"^(.*)@(\d+)$")


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


# ----------------------------------------------------------------------------- loading

def read_stored(ing: Ingredient, out: Params = None) -> Params:
  """The default loader: the ingredient's tree as stored (no dtype change), arrays on host.

  `out` (Orbax ingredients): host arrays of an earlier read of the same model to read into
  (see `train.checkpoint.read_params`); a CheckpointMismatch when the ingredient does not fit them.
  """
  if ing.kind == "tree":
    return jax.tree.map(np.asarray, ing.tree)
  if ing.kind == "hf":
    _, params = from_hf(ing.path)
    return jax.tree.map(np.asarray, params)
  try:
    return read_params(ing.path, ing.step, out=out)
  except CheckpointMismatch:
    raise
  except (FileNotFoundError, ValueError) as e:  # the same error, naming the ingredient as given
    _silence_orphaned_reads()
    raise type(e)(f"soup ingredient {ing.name!r}: {e}") from None  # the message carries the cause


class StreamReader:
  """The default loader of a streamed soup: each Orbax ingredient is read into the host arrays
  of the one before (one model allocated once, not k times). The caller drops each tree before
  the next load (the next read overwrites it). An ingredient that does not fit those arrays
  (another dtype, or another model: refused by the soup's own check) is read into new ones.
  """

  def __init__(self):
    self.buffers = None

  def __call__(self, ing: Ingredient) -> Params:
    if ing.kind != "orbax":
      return read_stored(ing)
    try:
      tree = read_stored(ing, out=self.buffers)
    except CheckpointMismatch:
      tree = read_stored(ing)
    self.buffers = tree
    return tree


def _silence_orphaned_reads() -> None:
  """Drops the `RuntimeError('Event loop is closed')` reports of a failed Orbax read.

  When one tensor of a truncated checkpoint fails, Orbax closes its event loop while
  TensorStore still completes the other reads; each completion then reports that error
  through `sys.unraisablehook`, also after the job has exited (dozens of tracebacks burying
  the one that matters). Closing the checkpointer does not stop them; this hook drops exactly
  those reports and passes every other one on.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_vlm_jax_orphaned_reads", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)
  hook._vlm_jax_orphaned_reads = True
  sys.unraisablehook = hook


def is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def load(source: Source, like: Any = None, dtype: Any = np.float32) -> Params:
  """An ingredient's parameters as host NumPy arrays; floating ones cast to `dtype`.

  `dtype=None` keeps the stored dtypes (what the soups read). `like` (a pytree
  of arrays or ShapeDtypeStructs): the result must match its structure and
  shapes (else the ValueError of the soups); a Hugging Face folder read for a
  `like` whose decoder layers are stacked (`scan_layers=True`) is restacked.
  """
  ing = Ingredient.parse(source)
  tree = read_stored(ing)
  if like is not None:
    tree = _fit_layers(tree, like)
    check_compatible(signature(like), tree, ing.name, what="`like`")
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype, copy=False) if is_float(x.dtype) else x, tree)


def _fit_layers(tree: Params, like: Any) -> Params:
  """Stack `layers_{i}` into `layers` where `like` has them stacked (HF folders are read unstacked)."""
  if not (isinstance(tree, dict) and isinstance(like, dict)):
    return tree
  if "layers" in like and "layers" not in tree and "layers_0" in tree:
    return jax.tree.map(np.asarray, stack_layers(tree))
  return {k: _fit_layers(v, like[k]) if k in like else v for k, v in tree.items()}


# ----------------------------------------------------------------------------- structure checks

def _dtype_class(dtype) -> str:
  for name, kind in (("bool", jnp.bool_), ("complex", jnp.complexfloating), ("floating", jnp.floating),
                     ("integer", jnp.integer)):
    if jnp.issubdtype(dtype, kind):
      return name
  return str(dtype)


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree: Params) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  """(path tuples, leaves, treedef): paths as key names, so errors and sort orders read as parameter names."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [tuple(_key_name(k) for k in p) for p, _ in paths_leaves]
  return paths, [leaf for _, leaf in paths_leaves], treedef


def signature(tree: Params) -> dict:
  """{path tuple: (shape, dtype class)} of a tree: what every ingredient must match."""
  paths, leaves, _ = flatten(tree)
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
