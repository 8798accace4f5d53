"""A fitted few-shot classifier: its arrays, its hyper-parameters, `logits = adapter(f)`, and a small
artifact that applies later to new images' features:

    adapter.save("dual.npz")                 # one npz: the arrays and a JSON `meta`
    adapter.save("dual_adapter", "orbax")    # a folder: adapter.json (kind, class names, hparams,
                                             # info) beside an Orbax params checkpoint of the arrays
    Adapter.load(path)                       # either (a folder is the Orbax artifact)

The Orbax artifact is written as the stack writes parameters (`train.checkpoint.save_params`:
<folder>/checkpoints/0, CRC32-checked on read), so the tools that read checkpoints read it too.

Kinds and the arrays they hold (all float32; see `logits.py` for the formulas):
    zero_shot   w_pos                                   hparams scale, bias (SigLIP; else absent)
    tip         w_pos, keys, pos_labels                 hparams alpha, beta, text_scale
    dual        w_pos, w_neg, keys, neg_keys,           hparams alpha, beta, lam, text_scale, neg_scale
                pos_labels, neg_labels
A trained adapter stores its effective arrays (base + residual, renormalised), so applying it needs
nothing but this artifact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from functools import partial

import jax
import numpy as np

from vlm_jax.adapters import logits as L
from vlm_jax.train import checkpoint

KINDS = {
    "zero_shot": ("w_pos",),
    "tip": ("w_pos", "keys", "pos_labels"),
    "dual": ("w_pos", "w_neg", "keys", "neg_keys", "pos_labels", "neg_labels"),
}
FORMAT = "vlm_jax.adapters/1"
SAVE_FORMATS = ("npz", "orbax")
ORBAX_META = "adapter.json"  # beside the Orbax checkpoint in the artifact's folder


@partial(jax.jit, static_argnames=("kind",))
def apply(kind: str, arrays: dict, hparams: dict, f: jax.Array) -> jax.Array:
  """The logits of adapter `kind` on features f [N, D] -> [N, C]."""
  a, h = arrays, hparams
  if kind == "zero_shot":
    return L.zero_shot_logits(f, a["w_pos"], h["scale"], h.get("bias"))
  if kind == "tip":
    return L.tip_logits(f, a["w_pos"], a["keys"], a["pos_labels"], h["alpha"], h["beta"], h["text_scale"])
  return L.dual_logits(f, a["w_pos"], a["w_neg"], a["keys"], a["neg_keys"], a["pos_labels"], a["neg_labels"],
                       h["alpha"], h["beta"], h["lam"], h["text_scale"], h["neg_scale"])


@dataclasses.dataclass
class Adapter:
  kind: str
  class_names: tuple
  arrays: dict
  hparams: dict
  info: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown adapter kind {self.kind!r}; known: {sorted(KINDS)}")
    missing = [n for n in KINDS[self.kind] if n not in self.arrays]
    if missing:
      raise ValueError(f"a {self.kind} adapter needs arrays {missing}")
    self.arrays = {n: np.asarray(self.arrays[n], np.float32) for n in KINDS[self.kind]}
    self.hparams = {k: float(v) for k, v in self.hparams.items() if v is not None}
    self.class_names = tuple(self.class_names)

  def __call__(self, f) -> np.ndarray:
    f = np.asarray(f, np.float32)
    d = self.arrays["w_pos"].shape[1]
    if f.ndim != 2 or f.shape[1] != d:
      raise ValueError(f"features must be [N, {d}] (this adapter's width), got {f.shape}")
    return np.asarray(apply(self.kind, self.arrays, self.hparams, f))

  def predict(self, f) -> np.ndarray:
    return np.argmax(self(f), axis=-1)

  def accuracy(self, split) -> float:
    return float(np.mean(self.predict(split.x) == split.y))

  # --------------------------------------------------------------------------- the artifact

  def meta(self) -> dict:
    return {"format": FORMAT, "kind": self.kind, "class_names": list(self.class_names),
            "hparams": self.hparams, "info": self.info}

  def save(self, path: str, save_format: str = "npz") -> str:
    """Writes the artifact atomically; returns its path. npz: `<path>` (.npz appended if
    missing); orbax: the folder `<path>` (replaced when it exists)."""
    if save_format not in SAVE_FORMATS:
      raise ValueError(f"unknown adapter save format {save_format!r}; known: {SAVE_FORMATS}")
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if save_format == "orbax":
      tmp = tempfile.mkdtemp(dir=folder, prefix=f".{os.path.basename(path)}.")
      checkpoint.save_params(tmp, self.arrays)
      with open(os.path.join(tmp, ORBAX_META), "w") as f:
        json.dump(self.meta(), f, indent=1, default=float)
      if os.path.exists(path):
        shutil.rmtree(path)
      os.replace(tmp, path)
      return path
    path = path if path.endswith(".npz") else path + ".npz"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, meta=np.array(json.dumps(self.meta(), default=float)), **self.arrays)
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls, path: str) -> "Adapter":
    """An artifact `save` wrote: a folder is the Orbax one, a file the npz."""
    if os.path.isdir(path):
      meta_path = os.path.join(path, ORBAX_META)
      if not os.path.exists(meta_path):
        raise ValueError(f"{path!r} is not a saved adapter (no {ORBAX_META})")
      with open(meta_path) as f:
        meta = _checked(json.load(f), path)
      stored = checkpoint.read_params(path)
      missing = [n for n in KINDS[meta["kind"]] if n not in stored]
      if missing:
        raise ValueError(f"{path!r}: the checkpoint lacks the {meta['kind']} adapter's arrays {missing}")
      arrays = {n: stored[n] for n in KINDS[meta["kind"]]}
    else:
      with np.load(path, allow_pickle=False) as z:
        if "meta" not in z:
          raise ValueError(f"{path!r} is not a saved adapter (no meta)")
        meta = _checked(json.loads(str(z["meta"])), path)
        arrays = {n: z[n] for n in KINDS[meta["kind"]]}
    return cls(meta["kind"], tuple(meta["class_names"]), arrays, meta["hparams"], meta.get("info", {}))


def _checked(meta: dict, path: str) -> dict:
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path!r}: unknown adapter format {meta.get('format')!r}, expected {FORMAT!r}")
  if meta.get("kind") not in KINDS:
    raise ValueError(f"{path!r}: unknown adapter kind {meta.get('kind')!r}; known: {sorted(KINDS)}")
  return meta
