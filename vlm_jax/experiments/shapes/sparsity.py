"""Prune and repair the main job's VLM on the shapes world (the `shapes_sparsity` job, configs/shapes/sparsity.py).

For every (pattern, allocation) setting: Wanda-prune the dense VLM, evaluate,
repair with SparseLoRA + distillation from the dense model, merge, evaluate
again; then one table (dense / pruned / repaired accuracy, actual sparsity
after the merge), `sparsity_demo.json` and a plot of accuracy against sparsity.
Finished settings are read back on a re-run.
"""

import json
import os

import jax
import ml_collections

from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax import report
from vlm_jax.experiments.shapes import common
from vlm_jax.sparsity import jobs
from vlm_jax.sparsity.repair import repair_groups, sparse_config


def _accuracy(results: dict, tasks) -> dict:
  return {t: results.get(f"{t} acc") for t in tasks}


def _train_config(config, init: str, datasets: dict, tok_dir: str, data_dir: str, steps: int, lr: float,
                  groups) -> ml_collections.ConfigDict:
  stage = ml_collections.ConfigDict(dict(lr=lr, groups=groups, sources=config.sources,
                                         global_batch_size=config.batch))
  c = common.train_config(config.main, stage, steps, init, datasets, tok_dir, data_dir)
  with c.unlocked():
    c.calibration = ml_collections.ConfigDict(dict(rows=config.calibration_rows))
  return c


def run_setting(config, setting: dict, dense_init: str, datasets, tok_dir, data_dir, tokenizer, workdir) -> dict:
  """Prune -> evaluate -> repair -> evaluate, for one setting; returns its table row."""
  done = os.path.join(workdir, "row.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  c = _train_config(config, dense_init, datasets, tok_dir, data_dir, config.repair_steps, config.repair_lr,
                    repair_groups("sparse_lora"))
  with c.unlocked():
    c.prune = ml_collections.ConfigDict(dict(method=config.method, pattern=setting["pattern"],
                                             ratios=setting["ratios"], overrides=[], include=[]))
  model, params = jobs.load_model(c)
  pruned, masks = jobs.prune_params(c, model, params, jobs.calibration_batches(c, model))
  prune_dir = os.path.join(workdir, "prune")
  jobs.write_outputs(prune_dir, model, pruned, masks)
  pruned_acc = _accuracy(common.evaluate(config.main, model, jax.device_get(pruned), tokenizer), config.main.eval.tasks)

  with c.unlocked():
    c.sparse = sparse_config(prune_dir, "sparse_lora", config.lora_alpha, config.rank_vision, config.rank_lm,
                            config.kd_weight, 1.0)
    c.job = "repair"
  summary = jobs.repair(c, os.path.join(workdir, "repair"))
  repaired_acc = _accuracy(common.evaluate(config.main, model, summary["merged"], tokenizer), config.main.eval.tasks)
  actual = {r["name"]: r["sparsity"] for r in summary["sparsity"]}
  row = {"setting": setting["name"], "pattern": setting["pattern"], "allocation": setting["allocation"],
         **{f"pruned {t} acc": v for t, v in pruned_acc.items()},
         **{f"repaired {t} acc": v for t, v in repaired_acc.items()},
         "vision sparsity": actual.get("[vision masked]", 0.0), "lm sparsity": actual.get("[lm masked]", 0.0),
         "all sparsity": actual["[all linear]"]}
  report.write_json(done, row)
  return row


def plot(rows: list[dict], dense: dict, tasks, path: str) -> None:
  """Accuracy against actual sparsity: pruned vs repaired, one panel per task."""
  import matplotlib  # heavy and only for the plot
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after choosing the file-only backend
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for allocation, marker in (("vision+LM", "o"), ("LM only", "s")):
      chosen = sorted((r for r in rows if r["allocation"] == allocation), key=lambda r: r["all sparsity"])
      xs = [r["all sparsity"] for r in chosen]
      for kind, style in (("pruned", "--"), ("repaired", "-")):
        ax.plot(xs, [r[f"{kind} {task} acc"] for r in chosen], style, marker=marker, label=f"{kind}, {allocation}")
      for r in chosen:
        ax.annotate(r["pattern"], (r["all sparsity"], r[f"repaired {task} acc"]), fontsize=7)
    ax.axhline(dense[task], color="k", lw=0.8, label="dense")
    ax.set(xlabel="actual sparsity of all linear kernels", ylabel=f"{task} exact match", title=task)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def run(config, workdir: str) -> list[dict]:
  main = config.main
  datasets, tok_dir = common.prepare_data(main, config.main_workdir)
  data_dir = main.data_dir or os.path.join(config.main_workdir, "data")
  tokenizer, _ = load_tokenizer(tok_dir)
  dense_init = config.base if config.base == "scratch" else f"checkpoint:{config.base}"
  c = _train_config(config, dense_init, datasets, tok_dir, data_dir, 1, 0.0, [(".*", 1.0)])
  model, params = jobs.load_model(c)
  dense = _accuracy(common.evaluate(main, model, jax.device_get(params), tokenizer), main.eval.tasks)
  rows = [run_setting(config, s, dense_init, datasets, tok_dir, data_dir, tokenizer, os.path.join(workdir, s["name"]))
          for s in config.settings]
  table = [{"setting": "dense", **{f"pruned {t} acc": v for t, v in dense.items()}}] + rows
  if jax.process_index() == 0:
    report.print_table(table, "prune and repair the shapes-world VLM (Wanda, SparseLoRA + KD)")
    report.write_json(os.path.join(workdir, "sparsity_demo.json"), {"dense": dense, "rows": rows})
    plot(rows, dense, main.eval.tasks, os.path.join(workdir, "accuracy_vs_sparsity.png"))
  return table
