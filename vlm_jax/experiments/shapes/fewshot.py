"""Few-shot adaptation on the shapes world (`shapes_fewshot`, configs/shapes/fewshot.py).

The contrastive model is the main job's `vision` stage (experiments/shapes/vila.py), trained
here through the engine; the few-shot part is `vlm_jax.adapters` exactly as the `fewshot` job
runs it: features extracted once, every method fitted per K and seed with α, β, λ searched on
the validation split, the test splits (standard rendering, and outline / palette / noise: the
domain shift) read once per fitted adapter. Then the same with mislabelled shots.
"""

import logging
import os
import time

import numpy as np

from vlm_jax import report
from vlm_jax.adapters import jobs as fewshot_jobs
from vlm_jax.adapters.features import extract
from vlm_jax.adapters.search import Grid
from vlm_jax.adapters.task import VALIDATION
from vlm_jax.experiments.shapes.common import prepare_data
from vlm_jax.experiments.shapes.vila import contrastive_model, stage_config
from vlm_jax.train.loop import stop_unless_finished, train

log = logging.getLogger(__name__)


def train_tower(config, workdir: str) -> tuple[str, str, dict]:
  """The two-tower model of the main job's vision stage -> (run dir, tokenizer dir, model config)."""
  v = config.vila
  datasets, tok_dir = prepare_data(v, workdir)
  data_dir = v.data_dir or os.path.join(workdir, "data")
  c = stage_config(v, "vision", "scratch", datasets, tok_dir, data_dir)
  with c.unlocked():
    c.total_steps = config.vision_steps
  run_dir = os.path.join(workdir, "vision")
  summary = stop_unless_finished(train(c, run_dir))
  log.info("vision stage: %s steps, last loss %s, in-batch accuracy %s", summary["steps"], summary["last loss"],
           summary.get("last accuracy"))
  return run_dir, tok_dir, contrastive_model(v.model.vision, v.stages.vision.text.to_dict())


def plot(table: list, path: str, splits) -> None:
  import matplotlib  # heavy and optional: only the plot needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # see above
  fig, axes = plt.subplots(1, len(splits), figsize=(4 * len(splits), 3.6), sharey=True)
  for ax, split in zip(np.atleast_1d(axes), splits):
    for method in dict.fromkeys(r["method"] for r in table):
      rows = sorted((r for r in table if r["method"] == method), key=lambda r: r["shots"])
      ax.errorbar([r["shots"] for r in rows], [100 * r[split] for r in rows],
                  yerr=[100 * r[f"{split} sd"] for r in rows], marker="o", capsize=2, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shots per class")
    ax.set_title(split)
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].set_ylabel("accuracy (%)")
  np.atleast_1d(axes)[-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(config, workdir: str) -> dict:
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  run_dir, tok_dir, model = train_tower(config, workdir)
  f = config.fewshot
  with f.unlocked():
    f.init, f.model, f.tokenizer = f"checkpoint:{run_dir}", model, tok_dir
  dataset = fewshot_jobs.make_dataset(f)
  encoder = fewshot_jobs.make_encoder(f, workdir)
  t = time.perf_counter()
  features = extract(encoder, dataset, templates=tuple(f.templates), negative_templates=tuple(f.negative_templates),
                     views=f.views, seed=f.seed, cache=os.path.join(workdir, "features.npz"))
  extract_s = time.perf_counter() - t
  grid = Grid(alpha=tuple(f.grid.alpha), beta=tuple(f.grid.beta), lam=tuple(f.grid.lam),
              geometric=tuple(f.grid.get("geometric", ())))
  splits = [s for s in features.splits if s != VALIDATION]
  clean = fewshot_jobs.run_grid(features, tuple(f.methods), tuple(f.shots), tuple(f.seeds), 0.0, grid, f.epochs,
                                os.path.join(workdir, "adapters"), views_per_epoch=f.views_per_epoch)
  noisy = fewshot_jobs.run_grid(features, tuple(config.noise_methods), tuple(f.shots), tuple(f.seeds),
                                config.noise, grid, f.epochs,
                                views_per_epoch=f.views_per_epoch) if config.noise else []
  table = fewshot_jobs.summarise(clean, splits)
  noisy_table = fewshot_jobs.summarise(noisy, splits)
  report.print_table(table, "shapes world, 24 classes: accuracy (mean over seeds)", ["method", "shots"] + splits)
  if noisy_table:
    report.print_table(noisy_table, f"{config.noise:.0%} of the shots mislabelled", ["method", "shots"] + splits)
  plot(table, os.path.join(workdir, "accuracy_vs_shots.png"), ["test", *[s for s in splits if s != "test"]])
  out = {"table": table, "noisy_table": noisy_table, "rows": clean + noisy, "extract_s": extract_s,
         "features": {"cache": features.meta["cache"], "key": features.meta["key"]},
         "wall_s": time.perf_counter() - start}
  report.write_json(os.path.join(workdir, "shapes_fewshot.json"), out)
  return out
