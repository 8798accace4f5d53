"""The `region_guidance` job: a trained VLM on the shapes-world region-guidance tasks, α swept.

For every task of `config.guidance.tasks` and every α of `config.guidance.alphas`, the
metric on the validation split and on the test split; α is chosen per task on
validation (ties: the smaller α) and its test score reported beside the sweep. Writes
<workdir>/guidance.json and prints the table (task x α, test split).

Tasks (shapes-world task in brackets; metric):
  region_mc       [region]         answer among the colour / shape names, guided score; acc
  spatial_mc      [spatial_boxes]  answer among the choices; acc
  region_answer   [region]         guided greedy answer, exact match; acc (+ changed vs α = 0)
  spatial_answer  [spatial_boxes]  the same for spatial questions
  hard_negative   [hard_negative]  true caption scored above its one-word negative; acc
  refer           [refer]          candidate box whose masking lowers the expression most; acc
  generated       [generated]      guided caption score vs the known errors; AUROC
"""

import logging
import os
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from vlm_jax import report
from vlm_jax.data import shapes_world
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.guidance import tasks as tasks_lib
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.parallel.mesh import DEFAULT_RULES
from vlm_jax.train import init_from

log = logging.getLogger(__name__)

# name -> (shapes-world task, kind of evaluation, metric key)
TASKS = {
    "region_mc": ("region", "mc", "acc"),
    "spatial_mc": ("spatial_boxes", "mc", "acc"),
    "region_answer": ("region", "answer", "acc"),
    "spatial_answer": ("spatial_boxes", "answer", "acc"),
    "hard_negative": ("hard_negative", "hard_negative", "acc"),
    "refer": ("refer", "refer", "acc"),
    "generated": ("generated", "alignment", "auroc"),
}


def default_config(model: Optional[ml_collections.ConfigDict] = None, init: str = "scratch",
                   tokenizer: str = "", alphas=(0.0, 0.5, 1.0, 2.0), tasks=tuple(TASKS),
                   num_validation: int = 200, num_test: int = 500, batch_size: int = 32,
                   image_size: int = 64, world_seed: int = 0, mode: str = "pixel") -> ml_collections.ConfigDict:
  """The config of the `region_guidance` job (locked).

  model: a model config, or None to read it from `init="hf:<folder>"`; init:
  "checkpoint:<workdir>" | "hf:<folder>" | "scratch"; tokenizer: its folder (empty: the
  hf folder). guidance.alphas: the sweep (0 = plain decoding); guidance.mode: "pixel"
  (boxes black before the tower) | "tokens" (the boxes' patch tokens after it).
  """
  c = ml_collections.ConfigDict()
  c.job = "region_guidance"
  c.seed = 0
  c.model = model
  c.init = init
  c.tokenizer = tokenizer
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.rules = [tuple(r) for r in DEFAULT_RULES]
  c.world = ml_collections.ConfigDict(dict(seed=world_seed, image_size=image_size))
  c.guidance = ml_collections.ConfigDict(dict(
      alphas=[float(a) for a in alphas], mode=mode, tasks=list(tasks), num_validation=num_validation,
      num_test=num_test, batch_size=batch_size, max_new_tokens=8))
  c.lock()
  return c


def _tokenizer_dir(config) -> str:
  if config.tokenizer:
    return config.tokenizer
  kind, path = init_from.parse(config.init)
  if kind == "hf":
    return path
  raise ValueError("config.tokenizer is empty: give the tokenizer folder (e.g. <main job workdir>/tokenizer)")


def run_task(name: str, model, params, tokenizer, config, split: str, num: int) -> dict:
  """One task on one split: {"metric": [len(alphas)] ..., plus the evaluation's details}."""
  if name not in TASKS:
    raise ValueError(f"unknown region-guidance task {name!r}; known: {sorted(TASKS)}")
  world_task, kind, key = TASKS[name]
  g = config.guidance
  alphas = [float(a) for a in g.alphas]
  records = list(shapes_world.records(world_task, split, num, seed=config.world.seed,
                                      image_size=config.world.image_size))
  if kind == "answer":
    out = tasks_lib.answers(model, params, tokenizer, records, alphas, batch_size=g.batch_size,
                            max_new_tokens=g.max_new_tokens)
  else:
    scorer = tasks_lib.Scorer(model, params, tokenizer, batch_size=g.batch_size, mode=g.mode)
    fn = {"mc": tasks_lib.multiple_choice, "hard_negative": tasks_lib.hard_negatives,
          "refer": tasks_lib.refer, "alignment": tasks_lib.alignment_auroc}[kind]
    out = fn(scorer, records, alphas)
  return {"metric": np.asarray(out[key], np.float64), "metric_name": key, **out}


def choose_alpha(alphas, validation) -> float:
  """The α with the best validation metric (the smaller α on a tie)."""
  v = np.asarray(validation)
  return float(alphas[int(np.flatnonzero(v >= v.max() - 1e-12)[0])])


def sweep(model, params, tokenizer, config) -> dict:
  """{task: {"validation": [...], "test": [...], "alpha": chosen α, "test_at_alpha", "details"}}."""
  g = config.guidance
  alphas = [float(a) for a in g.alphas]
  results = {}
  for name in g.tasks:
    t0 = time.perf_counter()
    val = run_task(name, model, params, tokenizer, config, "validation", g.num_validation)
    test = run_task(name, model, params, tokenizer, config, "test", g.num_test)
    alpha = choose_alpha(alphas, val["metric"])
    extra = {k: v for k, v in test.items() if "/" in k or k in ("changed", "drop_acc", "chance")}
    results[name] = {"metric": val["metric_name"], "validation": val["metric"].tolist(),
                     "test": test["metric"].tolist(), "alpha": alpha,
                     "test_at_alpha": float(test["metric"][alphas.index(alpha)]),
                     "test_details": {k: np.asarray(v).tolist() for k, v in extra.items()},
                     "wall (s)": round(time.perf_counter() - t0, 1)}
    log.info("%s: test %s, α chosen on validation %s", name, results[name]["test"], alpha)
  return results


def print_results(results: dict, alphas) -> str:
  rows = []
  for name, r in results.items():
    row = {"task": name, "metric": r["metric"]}
    row.update({f"α={a:g}": v for a, v in zip(alphas, r["test"])})
    row.update({"α (val)": f"{r['alpha']:g}", "test at α (val)": r["test_at_alpha"]})
    rows.append(row)
  return report.print_table(rows, "region guidance: test split, metric per α (α chosen on validation)")


def evaluate(config, workdir: str, params=None) -> dict:
  """Job "region_guidance": the sweep, printed and written to <workdir>/guidance.json."""
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  model, params, _ = init_from.load_model(config, mesh, [tuple(r) for r in config.rules], params)
  tokenizer, _ = load_tokenizer(_tokenizer_dir(config))
  alphas = [float(a) for a in config.guidance.alphas]
  results = sweep(model, params, tokenizer, config)
  out = {"alphas": alphas, "mode": config.guidance.mode, "init": config.init, "tasks": results,
         "wall (s)": round(time.perf_counter() - start, 1)}
  if jax.process_index() == 0:
    print_results(results, alphas)
    report.write_json(os.path.join(workdir, "guidance.json"), out)
  return out
