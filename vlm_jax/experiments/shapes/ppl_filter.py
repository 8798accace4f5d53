r"""Perplexity filtering on the shapes world, end to end (METHODS §2; the `shapes_ppl_filter` job).

    python -m launch.main --config=configs/shapes/ppl_filter.py --workdir=workdirs/ppl_demo

A pool of captions, `world.corruption_rate` of them replaced by another scene's caption
(flagged `"corrupted": true` in meta, which the model never sees), is scored by a model
trained briefly on a small clean caption set (other scenes: another seed) and filtered to
its lowest-perplexity `keep_fraction`. Then the two questions of POINTS:

  1. Does the filter remove the corrupted pairs? Precision and recall of "removed" against
     "corrupted" (corrupted = positive, removed = predicted positive), next to what a
     perfect ranking reaches at this keep fraction, and the AUROC of PPL.
  2. Does it help downstream? The same model pretrained from scratch on the filtered vs
     the unfiltered pool for the same number of steps (same seed, batch, lr, everything
     else), each followed by the same short VQA fine-tuning, then VQA exact match on the
     held-out test split, overall and by question type.

Every run is an ordinary train config (`common.train_config`) run by the train loop; scoring
and filtering are the `score` and `filter` jobs (`vlm_jax.curation.jobs`: `score`, and
`filter_data`, which writes the filtered TFDS set the pretraining reads); VQA is
`common.evaluate`.

Workdir (a finished sub-step is skipped on a re-run; a killed train run resumes):
  data/ tokenizer/          the shapes-world sets (clean, pool, vqa) and the filtered set
  scorer/                   the scoring model
  score/                    scores.jsonl, kept_ids.txt, filter.json
  <arm>/pretrain <arm>/sft  arm = unfiltered | filtered
  results.json              each finished sub-step's result
  ppl_demo.json             the table and everything behind it
"""

import json
import os
import time

import jax

from vlm_jax import report
from vlm_jax.curation import jobs, perplexity, scoring
from vlm_jax.data import builders, rendering, sources
from vlm_jax.eval.metrics import auroc
from vlm_jax.data.tokenizer import load_tokenizer, shapes_world_tokenizer
from vlm_jax.experiments.shapes import common
from vlm_jax.train.loop import stop_unless_finished, train

ARMS = ("unfiltered", "filtered")


# --- Data --------------------------------------------------------------------------------


def prepare(config, workdir: str) -> tuple[dict, str, str]:
  """Builds the clean, pool and vqa sets and the tokenizer; returns ({set: TFDS name}, tokenizer dir, data dir)."""
  w = config.world
  data_dir = config.data_dir or os.path.join(workdir, "data")

  def build(task, n, seed, **options):
    b = builders.build_shapes_world(data_dir, task, sizes={"train": n}, image_size=w.image_size, seed=seed,
                                    **options)
    return f"{b.name}/{b.builder_config.name}"

  datasets = {"clean": build("caption", w.clean, w.clean_seed),
              "pool": build("caption", w.pool, w.seed, corruption_rate=w.corruption_rate),
              "vqa": build("vqa", w.vqa, w.seed)}
  tok_dir = config.tokenizer or os.path.join(workdir, "tokenizer")
  shapes_world_tokenizer(tok_dir, vocab_size=config.vocab_size)
  return datasets, tok_dir, data_dir


def corruption_flags(name: str, data_dir: str) -> dict:
  """id -> meta "corrupted" for every record of a TFDS set: the ground truth the filter never sees."""
  src = sources.open_source(sources.Source(name=name, split="train", data_dir=data_dir))
  flags = {}
  for i in range(len(src)):
    rec = rendering.parse_record(src[i])
    flags[rec.id] = bool(json.loads(rec.meta or "{}").get("corrupted", False))
  return flags


# --- Training ----------------------------------------------------------------------------


def train_stage(config, stage: str, init: str, datasets: dict, tok_dir: str, data_dir: str, workdir: str) -> dict:
  """One run of `config.stages[stage]` in `workdir` (resumed, or skipped when finished); the loop's summary."""
  s = config.stages[stage]
  return stop_unless_finished(train(common.train_config(config, s, s.steps, init, datasets, tok_dir, data_dir), workdir))


def train_scorer(config, datasets: dict, tok_dir: str, data_dir: str, workdir: str) -> dict:
  """The scoring model: from scratch on the clean captions only."""
  start = time.time()
  train_stage(config, "scorer", "scratch", datasets, tok_dir, data_dir, workdir)
  return {"loss": common.final_loss(workdir), "wall (s)": round(time.time() - start, 1)}


# --- Scoring and filtering ---------------------------------------------------------------


def score_config(config, scorer_dir: str, source: str, tok_dir: str, data_dir: str):
  """The score/filter config (`jobs.default_config`) for `source` under the scorer, with the prompt it
  was trained with (none), keeping `keep_fraction` and writing the filtered set next to the others."""
  c = jobs.default_config(model=config.model, init=f"checkpoint:{scorer_dir}", source=source,
                          data_dir=data_dir, tokenizer=tok_dir, batch=config.score.batch,
                          seq_len=config.seq_len, prompt="", keep_fraction=config.keep_fraction)
  with c.unlocked():
    c.seed = config.seed
    c.progress = config.progress
    c.filter.output_dir = data_dir
  return c


def score_and_filter(config, scorer_dir: str, datasets: dict, tok_dir: str, data_dir: str, workdir: str) -> dict:
  """Scores the pool (resumable) and writes its lowest-PPL `keep_fraction` as a TFDS set; returns filter.json."""
  start = time.time()
  c = score_config(config, scorer_dir, datasets["pool"], tok_dir, data_dir)
  if not os.path.exists(os.path.join(workdir, scoring.SCORES_FILE)):
    jobs.score(c, workdir)
  summary = jobs.filter_data(c, workdir)
  with open(os.path.join(workdir, "score.json")) as f:
    scored = json.load(f)
  return {**summary, "scoring wall (s)": scored.get("wall (s)"), "samples/s": scored.get("samples/s"),
          "wall (s)": round(time.time() - start, 1)}


def removal_quality(scores, kept_ids, flags: dict) -> dict:
  """How well "removed" (not kept) finds "corrupted", over every record of the pool.

  A record the scorer skipped has no score and is not kept: it counts as removed. The
  perfect-ranking columns say what removing exactly `removed` records can reach at best.
  """
  kept = set(kept_ids) & set(flags)
  removed = set(flags) - kept
  corrupted = {i for i, c in flags.items() if c}
  hit = len(removed & corrupted)
  ppl = {s["id"]: float(s["ppl"]) for s in scores}
  nan = float("nan")
  best = min(len(corrupted), len(removed))
  return {
      "records": len(flags), "corrupted": len(corrupted), "kept": len(kept), "removed": len(removed),
      "removed and corrupted": hit,
      "precision": hit / len(removed) if removed else nan,
      "recall": hit / len(corrupted) if corrupted else nan,
      "precision (perfect ranking)": best / len(removed) if removed else nan,
      "recall (perfect ranking)": best / len(corrupted) if corrupted else nan,
      "corrupted in kept": len(kept & corrupted) / len(kept) if kept else nan,
      "corrupted in pool": len(corrupted) / len(flags) if flags else nan,
      "auroc": auroc([ppl[i] for i in corrupted if i in ppl], [ppl[i] for i in set(flags) - corrupted if i in ppl]),
  }


# --- The two arms -------------------------------------------------------------------------


def run_arm(config, arm: str, datasets: dict, tok_dir: str, data_dir: str, workdir: str) -> dict:
  """Pretrains from scratch on the arm's captions, fine-tunes on VQA, evaluates; returns its results."""
  start = time.time()
  arm_dir = os.path.join(workdir, arm)
  pre_dir, sft_dir = os.path.join(arm_dir, "pretrain"), os.path.join(arm_dir, "sft")
  train_stage(config, "pretrain", "scratch", datasets, tok_dir, data_dir, pre_dir)
  sft = train_stage(config, "sft", f"checkpoint:{pre_dir}", datasets, tok_dir, data_dir, sft_dir)
  tokenizer, _ = load_tokenizer(tok_dir)
  results = common.evaluate(config, sft["model"], jax.device_get(sft["state"].params), tokenizer)
  return {"pretrain loss": common.final_loss(pre_dir), "sft loss": common.final_loss(sft_dir), **results,
          "wall (s)": round(time.time() - start, 1)}


# --- The table ----------------------------------------------------------------------------


def table_rows(config, quality: dict, arms: dict) -> list[dict]:
  """One row per metric, a column per arm; filter rows only under "filtered"."""
  pct, num = report.format_percent, report.format_number
  p, s = config.stages.pretrain, config.stages.sft
  rows = [
      ("pretraining captions", quality["records"], quality["kept"]),
      ("corrupted among them", pct(quality["corrupted in pool"]), pct(quality["corrupted in kept"])),
      ("removal precision (perfect ranking)", None,
       f"{pct(quality['precision'])} ({pct(quality['precision (perfect ranking)'])})"),
      ("removal recall (perfect ranking)", None,
       f"{pct(quality['recall'])} ({pct(quality['recall (perfect ranking)'])})"),
      ("AUROC of PPL for corrupted", None, num(quality["auroc"])),
      ("pretrain steps x batch", f"{p.steps} x {p.global_batch_size}", f"{p.steps} x {p.global_batch_size}"),
      ("VQA fine-tuning steps x batch", f"{s.steps} x {s.global_batch_size}", f"{s.steps} x {s.global_batch_size}"),
      ("pretrain final loss", *(num(arms[a]["pretrain loss"]) for a in ARMS)),
      ("VQA fine-tuning final loss", *(num(arms[a]["sft loss"]) for a in ARMS)),
  ]
  metrics = [k for k in arms[ARMS[0]] if k.startswith("vqa")]
  rows += [(k.replace("vqa", "VQA", 1), *(pct(arms[a][k]) for a in ARMS)) for k in metrics]
  rows.append(("wall (s), pretrain + fine-tune + eval", *(arms[a]["wall (s)"] for a in ARMS)))
  return [{"metric": m, **dict(zip(ARMS, values))} for m, *values in rows]


def run(config, workdir: str) -> dict:
  """The `ppl_demo` job: data, scorer, score + filter, both arms, the table; returns ppl_demo.json's content."""
  if jax.process_count() > 1:
    raise ValueError("the shapes_ppl_filter job runs in one process")
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  cache = os.path.join(workdir, "results.json")
  report.pin_config(os.path.join(workdir, "demo_config.json"), config.to_dict())
  datasets, tok_dir, data_dir = prepare(config, workdir)

  scorer_dir = os.path.join(workdir, "scorer")
  scorer = report.cached(cache, "scorer", lambda: train_scorer(config, datasets, tok_dir, data_dir, scorer_dir))
  score_dir = os.path.join(workdir, "score")
  filtered = report.cached(cache, "filter",
                           lambda: score_and_filter(config, scorer_dir, datasets, tok_dir, data_dir, score_dir))
  quality = report.cached(cache, "removal", lambda: removal_quality(
      perplexity.read_scores(os.path.join(score_dir, scoring.SCORES_FILE)),
      perplexity.filter_scores(os.path.join(score_dir, scoring.SCORES_FILE), config.keep_fraction),
      corruption_flags(datasets["pool"], data_dir)))

  arms = {}
  for arm in ARMS:
    arm_sets = {**datasets, "captions": filtered["dataset"] if arm == "filtered" else datasets["pool"]}
    arms[arm] = report.cached(cache, arm, lambda: run_arm(config, arm, arm_sets, tok_dir, data_dir, workdir))

  rows = table_rows(config, quality, arms)
  title = (f"perplexity filtering on the shapes world: {quality['records']} captions, "
           f"{report.format_percent(quality['corrupted in pool'])} corrupted, lowest-PPL "
           f"{report.format_percent(config.keep_fraction)} kept; VQA on {config.eval.num} held-out questions")
  report.print_table(rows, title, columns=["metric", *ARMS])
  result = {"table": rows, "removal": quality, "arms": arms,
            "scorer": scorer, "filter": filtered, "datasets": datasets,
            "wall (s)": {"scorer": scorer["wall (s)"], "score + filter": filtered["wall (s)"],
                         **{a: arms[a]["wall (s)"] for a in ARMS},
                         "this run": round(time.time() - start, 1)}}
  report.write_json(os.path.join(workdir, "ppl_demo.json"), result)
  return result

