"""The VILA recipe on the shapes world: data, tokenizer, stages, evaluation.

Each stage is an ordinary train config (`stage_config`) run by the train loop
in `<workdir>/<stage>`, initialised from the previous stage's checkpoint; a
finished stage is skipped on a re-run (the loop resumes at its last step).

A stage with a `text` tower is a two-tower contrastive stage (SigLIP or CLIP
on image–caption pairs): it pretrains the vision tower, and the next stage
starts the VLM from scratch except for that tower (`init_parts`), as VILA
starts from a pretrained CLIP or SigLIP tower. Pretraining the LM needs no
special stage: a VLM stage that trains only `lm/.*` on text-only sources.
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
  """Builds the shapes-world TFDS sets and the tokenizer; returns ({name: tfds name}, tokenizer dir).

  `config.world.train` maps a name to a size (the task of that name), or to
  {task, num, **options} (e.g. single-object captions: task="caption", max_objects=1).
  """
  from vlm_jax.data import builders, tokenizer
  data_dir = config.data_dir or os.path.join(workdir, "data")
  names = {}
  for name, spec in config.world.train.items():
    options = {"num": spec} if isinstance(spec, int) else dict(spec.items())
    task, num = options.pop("task", name), options.pop("num")
    builder = builders.build_shapes_world(data_dir, task, sizes={"train": num}, image_size=config.world.image_size,
                                          seed=config.world.seed, **options)
    names[name] = f"{builder.name}/{builder.builder_config.name}"
  tok_dir = config.tokenizer or os.path.join(workdir, "tokenizer")
  tokenizer.shapes_world_tokenizer(tok_dir, vocab_size=config.vocab_size)
  return names, tok_dir


def stage_config(config, name: str, init: str, datasets: dict, tokenizer_dir: str,
                 data_dir: str) -> ml_collections.ConfigDict:
  """The full train config of one stage (a contrastive stage: the two-tower model of its
  `text` tower and the main model's vision tower, one image–caption pair per row)."""
  s = config.stages[name]
  c = train_config(config, s, max(1, round(config.total_steps * s.fraction)), init, datasets,
                   tokenizer_dir, data_dir)
  if is_contrastive(s):
    with c.unlocked():
      c.model = contrastive_model(config.model.vision, s.text.to_dict())
      c.data.update(seq_len=s.seq_len, image_slots=1, packing=False, truncate=True)
  return c


def is_contrastive(stage) -> bool:
  return "text" in stage


def contrastive_model(vision, text) -> ml_collections.ConfigDict:
  """The two-tower model that pretrains `vision`; `text` is a TextConfig dict. The embeddings
  have the tower's width (a SigLIP tower has no image projection: its pooled output is the embedding)."""
  return ml_collections.ConfigDict(dict(kind="contrastive", vision=vision.to_dict(), text=dict(text),
                                        projection_dim=vision.width))


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
  init, parts, rows = "scratch", {}, []
  for name in config.stage_order:
    stage_dir = os.path.join(workdir, name)
    c = stage_config(config, name, init, datasets, tok_dir, data_dir)
    contrastive = is_contrastive(config.stages[name])
    if not contrastive:
      with c.unlocked():
        c.init_parts = parts
    summary = train(c, stage_dir)
    row = {"stage": name, "steps": summary["steps"].split(" of ")[-1], "train loss": summary["last loss"],
           "train wall (s)": summary["wall (s)"]}
    if contrastive:  # a tower for the next stage; its train accuracy is in-batch retrieval
      parts = {"vision": f"checkpoint:{stage_dir}"}
      rows.append({**row, "pair retrieval (train) acc": summary["last accuracy"]})
      continue
    t_eval = time.perf_counter()
    results = evaluate(config, summary["model"], jax.device_get(summary["state"].params), tokenizer)
    rows.append({**row, "eval wall (s)": round(time.perf_counter() - t_eval, 1), **results})
    init, parts = f"checkpoint:{stage_dir}", {}
  if jax.process_index() == 0:
    print_stage_table(rows)
    print(f"total wall time (data, tokenizer, training, evaluation): {(time.perf_counter() - start) / 60:.1f} min")
    report.write_json(os.path.join(workdir, "eval.json"), rows)
  return rows


def print_stage_table(rows: list[dict]) -> str:
  """One row per metric, one column per stage (accuracies as percentages)."""
  metrics = list(dict.fromkeys(k for r in rows for k in r if k != "stage"))
  def fmt(k, v):
    if v is None:  # not measured for this stage (a contrastive stage has no VLM to evaluate)
      return "-"
    if isinstance(v, float):
      return report.format_percent(v) if k.endswith("acc") else report.format_number(v)
    return v
  table = [{"metric": k, **{r["stage"]: fmt(k, r.get(k)) for r in rows}} for k in metrics]
  return report.print_table(table, "shapes world: evaluation after each VILA stage (held-out test split)")
