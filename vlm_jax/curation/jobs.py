r"""The config-file jobs `score` and `filter` (configs/score_perplexity.py) and their config.

    default_config(model=..., init=..., source=..., ...) -> the ConfigDict both jobs read
    score(config, workdir)        job "score": `scoring.score` -> <workdir>/scores.jsonl, score.json
    filter_data(config, workdir)  job "filter", same config and workdir, after `score`

Filtering reads `scores.jsonl`, keeps the lowest `filter.keep_fraction` (floor(fraction x n),
at least 1) or PPL <= `filter.threshold` (threshold wins when set; `perplexity.select`), and
writes a new TFDS array_record data set, `filtered_records/<name>`
(`vlm_jax.data.filtered.build_filtered`), holding the kept records copied byte for byte
from the source, in source order, which the pipeline reads like any other source:

    data.sources = [dict(name="filtered_records/<name>", split="train")]
    data.data_dir = "<filter.output_dir, default <workdir>/data>"

It prints a text histogram of PPL, the records of both tails (id, PPL, text: high PPL is
often rare knowledge rather than noise, look before you drop), a summary, and writes
`<workdir>/filter.json` (kept, total, threshold used, the data set's name and folder) and
`<workdir>/kept_ids.txt`.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax
import ml_collections
from ml_collections.config_dict import placeholder

from vlm_jax import report
from vlm_jax.curation import perplexity, scoring
from vlm_jax.data import filtered, pipeline
from vlm_jax.parallel.mesh import DEFAULT_RULES

log = logging.getLogger(__name__)


def default_config(model: Optional[ml_collections.ConfigDict] = None, init: str = "scratch",
                   source: str = "shapes_world/caption", split: str = "train", data_dir: str = "",
                   tokenizer: str = "", batch: int = 32, seq_len: int = 256,
                   prompt: str = perplexity.DEFAULT_PROMPT, keep_fraction: float = 0.2,
                   threshold: Optional[float] = None) -> ml_collections.ConfigDict:
  """The config of the `score` and `filter` jobs (locked: a mistyped key is an error).

  model: a model config, or None to read it from the folder of `init="hf:<folder>"`.
  init: "scratch" | "hf:<folder>" | "checkpoint:<workdir>".
  source, split, data_dir: the one TFDS data set to score. tokenizer: its folder (empty:
  the init folder for hf). batch: global batch size. prompt: placed after the image of
  caption records; it must be the one the scoring model knows. keep_fraction, threshold:
  what `filter` keeps (threshold wins when set).
  """
  c = ml_collections.ConfigDict()
  c.job = "score"  # | "filter" (same config and workdir, after `score`)
  c.seed = 0
  c.model = model
  c.init = init
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.rules = [tuple(r) for r in DEFAULT_RULES]
  c.batch_size = batch
  c.prompt = prompt
  c.logprob_dtype = "float32"  # | "points_reference": the official POINTS rule (perplexity.token_nll)
  c.max_batches = 0  # stop after this many batches (0: all); a re-run continues
  c.progress = True

  c.data = pipeline.default_config()
  c.data.sources = [dict(name=source, split=split, weight=1.0)]
  c.data.data_dir = data_dir or None
  c.data.tokenizer = tokenizer
  c.data.global_batch_size = c.get_ref("batch_size")
  c.data.seq_len = seq_len
  c.data.image_slots = 1
  c.data.packing = False   # required: one record per row
  c.data.truncate = False  # an over-long record is skipped (counted), never scored on a cut caption
  c.data.shuffle = False
  c.data.num_epochs = 1
  c.data.chat_template.caption_prompt = c.get_ref("prompt")

  c.filter = ml_collections.ConfigDict(dict(
      keep_fraction=keep_fraction,  # POINTS: 0.2
      threshold=float(threshold) if threshold is not None else placeholder(float),  # wins when set
      scores="",      # default <workdir>/scores.jsonl
      output_dir="",  # TFDS data_dir of the filtered set; default <workdir>/data
      tails=5,        # records shown from each end
      bins=20))       # histogram bins
  c.lock()
  return c


def score(config, workdir: str) -> dict:
  """Job "score": every record of `config.data` scored into `<workdir>/scores.jsonl` (resumable)."""
  return scoring.score(config, workdir)


def _shorten(text: str, n: int = 90) -> str:
  text = " ".join(text.split())
  return text if len(text) <= n else text[:n - 3] + "..."


def filter_data(config, workdir: str) -> dict:
  """Job "filter": select from `<workdir>/scores.jsonl` (or `filter.scores`), write the
  filtered TFDS data set, print the histogram, both tails and a summary, write filter.json."""
  if jax.process_index() != 0:
    return {}
  fc = config.filter
  scores_path = fc.get("scores") or os.path.join(workdir, scoring.SCORES_FILE)
  if not os.path.exists(scores_path):
    raise FileNotFoundError(f"{scores_path} does not exist: run the `score` job first (same config, "
                            f"--config.job=score) or set filter.scores")
  scores = perplexity.read_scores(scores_path)
  threshold = fc.get("threshold")
  keep_fraction = None if threshold is not None else fc.get("keep_fraction")
  if threshold is not None and fc.get("keep_fraction") is not None:
    log.info("filter.threshold=%s given: keeping PPL <= threshold (filter.keep_fraction ignored)", threshold)
  kept, used = perplexity.select(scores, keep_fraction, threshold)
  kept_ids = [s["id"] for s in kept]

  data_cfg = scoring.scoring_data_config(config)
  source = filtered.as_source(data_cfg["sources"][0], data_cfg.get("data_dir"))
  out_dir = fc.get("output_dir") or os.path.join(workdir, "data")
  ordered = perplexity.ranked(scores)
  k = int(fc.get("tails", 5))
  low, high = ordered[:k], ordered[::-1][:k]
  tail_ids = {s["id"] for s in low + high}
  ids_path = os.path.join(workdir, "kept_ids.txt")
  builder = filtered.build_filtered(source, kept_ids, out_dir, ids_path=ids_path, watch=tail_ids)
  texts = dict(builder.watched) or filtered.texts_by_id(source, tail_ids)
  name = f"{builder.name}/{builder.builder_config.name}"
  written = builder.info.splits[source.split].num_examples

  print(perplexity.ppl_histogram([s["ppl"] for s in scores], bins=int(fc.get("bins", 20)), threshold=used),
        flush=True)
  for title, rows in ((f"\nlowest PPL (the {len(low)} most predictable records)", low),
                      (f"\nhighest PPL (the {len(high)} least predictable: noise, or rare knowledge?)", high)):
    report.print_table([{"id": s["id"], "ppl": float(s["ppl"]), "tokens": s["tokens"],
                         "text": _shorten(texts.get(s["id"], "?"))} for s in rows], title,
                       columns=["id", "ppl", "tokens", "text"])
  summary = {
      "kept": len(kept_ids), "total": len(scores),
      "kept %": f"{100.0 * len(kept_ids) / max(len(scores), 1):.1f}%",
      "mode": f"threshold {threshold}" if threshold is not None else f"keep_fraction {keep_fraction}",
      "threshold": used, "written": written, "source": source.label,
      "dataset": name, "data_dir": os.path.abspath(out_dir), "split": source.split,
      "scores": scores_path, "kept_ids": ids_path,
  }
  report.print_rows("\nperplexity filtering", list(summary.items()))
  print(f"\nuse it: data.sources=[dict(name={name!r}, split={source.split!r})], "
        f"data.data_dir={os.path.abspath(out_dir)!r}", flush=True)
  report.write_json(os.path.join(workdir, "filter.json"),
                    {**summary, "keep_fraction": keep_fraction, "threshold_given": threshold})
  return summary
