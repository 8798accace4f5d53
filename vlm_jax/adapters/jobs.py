"""The `fewshot` job (configs/fewshot.py): extract once, fit every method at every K and seed,
search on validation, evaluate on the test splits once, print the table, write JSON.

    features  <workdir>/features.npz (config.cache), reused by every later run of the same model,
              data and augmentation; another's is refused
    rows      one per (method, K, seed): accuracy on every evaluation split ("test", and
              "test/<domain>" for the shapes world's shifted renderings), the chosen α, β, λ and
              the validation accuracy of the search
    output    the table (mean over seeds), <workdir>/fewshot.json, and every fitted adapter as
              <workdir>/adapters/<method>_k<K>_s<seed>.npz, or that folder with
              `save_format = "orbax"` (`Adapter.load` applies either later)

Methods: zero_shot, tip (Tip-Adapter), tip_f (Tip-Adapter-F), dual (DualAdapter training-free),
dual_f (DualAdapter trained), and dual_norefine / dual_f_norefine (label refinement off).
The model: `init = "hf:<folder>"` (a CLIPModel / SiglipModel folder with its tokenizer), or
`"checkpoint:<run>"` / `"scratch"` with `model` (a contrastive model config) and `tokenizer` (a
folder; prompts are tokenised as the contrastive stage tokenised captions: BOS, text, EOS).
Images are resized as the model's own processor does unless `resize` says otherwise: CLIP the
shorter side then a centre crop, SigLIP stretched to the square.
The data: `data.source = "shapes"` or `"folder:<root>"` (an image folder, through its TFDS
builder, prepared under `data.data_dir`, default <workdir>/tfds, and reused).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import numpy as np

from vlm_jax import report
from vlm_jax.adapters import dual_adapter, tip_adapter, zero_shot
from vlm_jax.adapters.adapter import Adapter
from vlm_jax.adapters.data import ImageDataset, image_folder, shapes_world
from vlm_jax.adapters.features import Encoder, extract, hf_tokenizer
from vlm_jax.adapters.search import Grid
from vlm_jax.adapters.task import VALIDATION, Features, Shots, sample_shots
from vlm_jax.adapters.training import TrainConfig
from vlm_jax.data import rendering
from vlm_jax.data.tokenizer import load_tokenizer, shapes_world_tokenizer
from vlm_jax.interop import from_hf
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.train import init_from

log = logging.getLogger(__name__)

METHODS = ("zero_shot", "tip", "tip_f", "dual", "dual_f", "dual_norefine", "dual_f_norefine")
NAMES = {"zero_shot": "zero-shot", "tip": "Tip-Adapter", "tip_f": "Tip-Adapter-F", "dual": "DualAdapter",
         "dual_f": "DualAdapter-F", "dual_norefine": "DualAdapter (no refine)",
         "dual_f_norefine": "DualAdapter-F (no refine)"}


# ----------------------------------------------------------------------------- fitting and evaluation

def fit_method(method: str, shots: Shots, grid: Grid = Grid(), epochs: int = 20, views_per_epoch: int = 1) -> Adapter:
  """One method on one K-shot task (validation is the only split it can read); `epochs` and
  `views_per_epoch` (`training.TrainConfig`) for the trained ones."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")
  if method == "zero_shot":
    return zero_shot.fit(shots)
  if method.startswith("tip"):
    cfg = TrainConfig(epochs=epochs, lrs=(("pos", 1e-3),), weight_decay=0.01, eps=1e-4,
                      views_per_epoch=views_per_epoch, seed=shots.seed)
    return tip_adapter.fit(shots, train=method == "tip_f", grid=grid, train_config=cfg)
  cfg = TrainConfig(epochs=epochs, lrs=(("pos", 1e-4), ("neg", 5e-4)), weight_decay=0.1,
                    views_per_epoch=views_per_epoch, seed=shots.seed)
  return dual_adapter.fit(shots, train=method.startswith("dual_f"), refine="norefine" not in method, grid=grid,
                          train_config=cfg)


def evaluate(adapter: Adapter, features: Features) -> dict:
  """Accuracy on every split but validation: the one place the test splits are read."""
  if tuple(adapter.class_names) != tuple(features.class_names):
    raise ValueError("the adapter's class names differ from the features'")
  return {name: adapter.accuracy(split) for name, split in features.splits.items() if name != VALIDATION}


def run_grid(features: Features, methods: Sequence[str], shots: Sequence[int], seeds: Sequence[int],
             noise: float = 0.0, grid: Grid = Grid(), epochs: int = 20, save_dir: str = "",
             progress: Callable[[str], None] = log.info, save_format: str = "npz",
             views_per_epoch: int = 1) -> list[dict]:
  """Every method × K × seed -> rows {method, k, seed, noise, <split>: accuracy, hparams, val_search};
  with `save_dir`, every adapter saved there (`Adapter.save(path, save_format)`)."""
  rows = []
  for k in shots:
    for seed in seeds:
      task = sample_shots(features, k, seed, noise)
      for method in methods:
        start = time.perf_counter()
        adapter = fit_method(method, task, grid, epochs, views_per_epoch)
        row = {"method": NAMES[method], "k": k, "seed": seed, "noise": noise, **evaluate(adapter, features),
               "hparams": {n: v for n, v in adapter.hparams.items() if n in ("alpha", "beta", "lam")},
               "val_search": adapter.info.get("search", adapter.info.get("search_training_free", {})).get("accuracy"),
               "fit_s": time.perf_counter() - start}
        rows.append(row)
        if save_dir:
          adapter.save(os.path.join(save_dir, f"{method}_k{k}_s{seed}" + (f"_noise{noise:g}" if noise else "")),
                       save_format)
        progress(f"K={k} seed={seed} {row['method']}: test {row.get('test', float('nan')):.4f}")
  return rows


def summarise(rows: list[dict], splits: Sequence[str]) -> list[dict]:
  """Mean (and spread) over seeds per (method, K, noise)."""
  out, groups = [], {}
  for r in rows:
    groups.setdefault((r["method"], r["k"], r["noise"]), []).append(r)
  for (method, k, noise), rs in groups.items():
    row = {"method": method, "shots": k, "noise": noise, "seeds": len(rs)}
    for s in splits:
      vals = [r[s] for r in rs if s in r]
      row[s] = float(np.mean(vals))
      row[f"{s} sd"] = float(np.std(vals))
    out.append(row)
  return out


# ----------------------------------------------------------------------------- the model and the data

def caption_tokenizer(tokenizer, max_len: int) -> Callable:
  """Prompts tokenised as the contrastive stage tokenises captions (a caption record: BOS, text,
  EOS), right-padded to `max_len`, with the attention mask."""
  enc = rendering.TextEncoder(tokenizer)
  dummy = np.zeros((1, 1, 3), np.uint8)

  def tokenize(texts):
    ids = np.full((len(texts), max_len), enc.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for i, t in enumerate(texts):
      record = {"id": str(i), "kind": "caption", "images": [dummy],
                "turns": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": t}], "meta": "{}"}
      row, _, _ = rendering.render(record, enc, 0, -1)
      row = row[:max_len]
      ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask
  return tokenize


def image_resize(config, style: str) -> str:
  """config.resize, or the model's own processor: SigLIP stretches to the square, CLIP crops."""
  return config.resize or ("resize" if style == "siglip" else "crop")


def make_encoder(config, workdir: str = "") -> Encoder:
  kind, path = init_from.parse(config.init)
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  rules = [tuple(r) for r in config.rules]
  if kind == "hf" and not config.get("model"):
    model, params = from_hf(path)
    tokenize = hf_tokenizer(path, model.config.text.max_len, model.config.style)
    return Encoder(model, params, tokenize, mesh=mesh, rules=rules, batch_size=config.batch_size,
                   name=os.path.abspath(path), resize=image_resize(config, model.config.style))
  model, params, _ = init_from.load_model(config, mesh, rules)
  if kind == "hf":
    tokenize = hf_tokenizer(path, model.config.text.max_len, model.config.style)
  else:
    if config.tokenizer:
      tokenizer, _ = load_tokenizer(config.tokenizer)
    elif kind == "scratch":  # a random model: the shapes world's tokenizer, trained once in the workdir
      tokenizer = shapes_world_tokenizer(os.path.join(workdir, "tokenizer"), model.config.text.vocab_size)
    else:
      raise ValueError("config.tokenizer: the tokenizer folder of this model (init is not a Hugging Face folder)")
    tokenize = caption_tokenizer(tokenizer, model.config.text.max_len)
  return Encoder(model, params, tokenize, mesh=mesh, rules=rules, batch_size=config.batch_size,
                 name=str(config.init), resize=image_resize(config, model.config.style))


def make_dataset(config, workdir: str = "") -> ImageDataset:
  d = config.data
  if d.source == "shapes":
    return shapes_world(train=d.train, validation=d.validation, test=d.test, domains=tuple(d.domains),
                        seed=d.seed, image_size=d.image_size)
  kind, _, root = d.source.partition(":")
  if kind != "folder" or not root:
    raise ValueError(f"config.data.source must be 'shapes' or 'folder:<root>', got {d.source!r}")
  return image_folder(root, data_dir=d.get("data_dir") or os.path.join(workdir, "tfds"),
                      validation_fraction=d.validation_fraction, test_fraction=d.test_fraction, seed=d.seed)


# ----------------------------------------------------------------------------- the job

def fewshot(config, workdir: str) -> dict:
  """The `fewshot` job; returns what it writes to <workdir>/fewshot.json."""
  bad = [m for m in config.methods if m not in METHODS]
  if bad:
    raise ValueError(f"unknown method(s) {bad}; known: {METHODS}")
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  dataset = make_dataset(config, workdir)
  encoder = make_encoder(config, workdir)
  features = extract(encoder, dataset, templates=tuple(config.templates),
                     negative_templates=tuple(config.negative_templates), views=config.views, seed=config.seed,
                     cache=config.cache or os.path.join(workdir, "features.npz"))
  extract_s = time.perf_counter() - start
  grid = Grid(alpha=tuple(config.grid.alpha), beta=tuple(config.grid.beta), lam=tuple(config.grid.lam),
              geometric=tuple(config.grid.get("geometric", ())))
  rows = []
  for noise in config.noise:
    rows += run_grid(features, tuple(config.methods), tuple(config.shots), tuple(config.seeds), noise, grid,
                     config.epochs, os.path.join(workdir, "adapters") if config.save_adapters else "",
                     save_format=config.get("save_format", "npz"), views_per_epoch=config.views_per_epoch)
  splits = [s for s in features.splits if s != VALIDATION]
  table = summarise(rows, splits)
  report.print_table(table, f"few-shot accuracy ({features.meta['key']['data']['source']}; mean over seeds "
                            f"{list(config.seeds)})", ["method", "shots", "noise"] + splits)
  out = {"rows": rows, "table": table, "features": {"cache": features.meta["cache"], "key": features.meta["key"],
                                                     "skipped": features.meta["skipped"], "extract_s": extract_s},
         "config": config.to_dict(), "wall_s": time.perf_counter() - start}
  report.write_json(os.path.join(workdir, "fewshot.json"), out)
  return out
