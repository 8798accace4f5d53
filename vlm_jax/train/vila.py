"""The VILA recipe on the shapes world: data, tokenizer, three stages, evaluation.

Each stage is an ordinary train config (`stage_config`) run by the train loop
in `<workdir>/<stage>`, initialised from the previous stage's checkpoint; a
finished stage is skipped on a re-run (the loop resumes at its last step).
"""

import json
import logging
import os
import time

import jax
import ml_collections

from configs import common
from vlm_jax.data import shapes_world
from vlm_jax.eval import report
from vlm_jax.eval.evaluate import EVALUATORS, Generator
from vlm_jax.train.loop import train

log = logging.getLogger(__name__)


def prepare_data(config, workdir: str) -> tuple[dict, str]:
  """Builds the shapes-world TFDS sets and the tokenizer; returns ({task: tfds name}, tokenizer dir)."""
  from vlm_jax.data import builders, tokenizer
  data_dir = config.data_dir or os.path.join(workdir, "data")
  names = {}
  for task, n in config.world.train.items():
    builder = builders.build_shapes_world(data_dir, task, sizes={"train": n},
                                          image_size=config.world.image_size, seed=config.world.seed)
    names[task] = f"{builder.name}/{builder.builder_config.name}"
  tok_dir = config.tokenizer or os.path.join(workdir, "tokenizer")
  tokenizer.shapes_world_tokenizer(tok_dir, vocab_size=config.vocab_size)
  return names, tok_dir


def stage_config(config, name: str, init: str, datasets: dict, tokenizer_dir: str,
                 data_dir: str) -> ml_collections.ConfigDict:
  """The full train config of one stage."""
  s = config.stages[name]
  return train_config(config, s, max(1, round(config.total_steps * s.fraction)), init, datasets,
                      tokenizer_dir, data_dir)


def train_config(config, s, steps: int, init: str, datasets: dict, tokenizer_dir: str,
                 data_dir: str) -> ml_collections.ConfigDict:
  """A shapes-world train config: `s` gives lr, groups, sources [(task, weight)] and
  global_batch_size, `datasets` the TFDS name of each task; the rest comes from `config`
  (seed, model, checkpoint_every, progress, seq_len, image_slots, packing, truncate).
  Shared with the curation and soup demonstrations, so every shapes-world run trains alike."""
  c = common.train_base()
  c.seed = config.seed
  c.model = config.model
  c.init = init
  c.total_steps = steps
  c.checkpoint_every = config.checkpoint_every
  c.progress = config.progress
  c.optim.lr = s.lr
  c.optim.groups = [tuple(g) for g in s.groups]
  c.data = ml_collections.ConfigDict(dict(
      source="pipeline", sources=[dict(name=datasets[task], split="train", weight=w) for task, w in s.sources],
      data_dir=data_dir, tokenizer=tokenizer_dir, global_batch_size=s.global_batch_size,
      seq_len=config.seq_len, image_slots=config.image_slots, packing=config.packing,
      truncate=config.truncate))
  return c


def final_loss(workdir: str):
  """The last train loss logged in a run's metrics.jsonl (a re-run of a finished run logs none)."""
  loss = None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      loss = json.loads(line).get("loss", loss)
  return loss


def evaluate(config, model, params, tokenizer) -> dict:
  generator = Generator(model, params, tokenizer, batch_size=config.eval.batch_size,
                        max_new_tokens=config.eval.max_new_tokens, image_slots=1)
  results = {}
  for task in config.eval.tasks:
    records = shapes_world.records(task, "test", config.eval.num, seed=config.world.seed,
                                   image_size=config.world.image_size)
    results.update(EVALUATORS[task](generator, records, prefix=task))
  return results


def run(config, workdir: str) -> list[dict]:
  """All stages, then the table of evaluations after each stage; returns its rows."""
  from vlm_jax.data.tokenizer import load_tokenizer
  if sorted(config.stage_order) != sorted(config.stages):
    raise ValueError(f"stage_order {list(config.stage_order)} must name each of the stages {sorted(config.stages)} once")
  start = time.perf_counter()
  datasets, tok_dir = prepare_data(config, workdir)
  data_dir = config.data_dir or os.path.join(workdir, "data")
  tokenizer, _ = load_tokenizer(tok_dir)
  init, rows = "scratch", []
  for name in config.stage_order:
    stage_dir = os.path.join(workdir, name)
    summary = train(stage_config(config, name, init, datasets, tok_dir, data_dir), stage_dir)
    t_eval = time.perf_counter()
    results = evaluate(config, summary["model"], jax.device_get(summary["state"].params), tokenizer)
    rows.append({"stage": name, "steps": summary["steps"].split(" of ")[-1],
                 "train loss": summary["last loss"], "train wall (s)": summary["wall (s)"],
                 "eval wall (s)": round(time.perf_counter() - t_eval, 1), **results})
    init = f"checkpoint:{stage_dir}"
  if jax.process_index() == 0:
    print_stage_table(rows)
    print(f"total wall time (data, tokenizer, training, evaluation): {(time.perf_counter() - start) / 60:.1f} min")
    report.write_json(os.path.join(workdir, "eval.json"), rows)
  return rows


def print_stage_table(rows: list[dict]) -> str:
  """One row per metric, one column per stage (accuracies as percentages)."""
  metrics = [k for k in rows[0] if k != "stage"]
  def fmt(k, v):
    if isinstance(v, float):
      return report.format_percent(v) if k.endswith("acc") else report.format_number(v)
    return v
  table = [{"metric": k, **{r["stage"]: fmt(k, r.get(k)) for r in rows}} for k in metrics]
  return report.print_table(table, "shapes world: evaluation after each VILA stage (held-out test split)")
