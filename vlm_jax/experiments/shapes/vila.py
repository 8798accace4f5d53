"""The main job (`shapes_vila`): the VILA recipe on the shapes world, stage by stage.

Each stage is an ordinary train config (`stage_config`) run by the train loop
in `<workdir>/<stage>`, initialised from the previous stage's checkpoint; a
finished stage is skipped on a re-run (the loop resumes at its last step).

A stage with a `text` tower is a two-tower contrastive stage (SigLIP or CLIP
on image–caption pairs): it pretrains the vision tower, and the next stage
starts the VLM from scratch except for that tower (`init_parts`), as VILA
starts from a pretrained CLIP or SigLIP tower. Pretraining the LM needs no
special stage: a VLM stage that trains only `lm/.*` on text-only sources.
"""

import logging
import os
import time

import jax
import ml_collections

from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax import report
from vlm_jax.experiments.shapes.common import evaluate, prepare_data, train_config
from vlm_jax.train.loop import stop_unless_finished, train

log = logging.getLogger(__name__)


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


def run(config, workdir: str) -> list[dict]:
  """All stages, then the table of evaluations after each stage; returns its rows."""
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
    summary = stop_unless_finished(train(c, stage_dir))
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
