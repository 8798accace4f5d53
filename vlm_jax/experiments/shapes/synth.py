r"""Synth² on the shapes world (`shapes_synth`, configs/shapes/synth.py): do synthetic pairs help
when real ones are scarce?

    python -m launch.main --config=configs/shapes/synth.py --workdir=workdirs/synth_demo

A pool of `world.pool` caption pairs; for each real fraction of it (`fractions`, e.g. 5% and
10%) the `synth` job's parts run on those real pairs only: image tokenizer, caption LM,
text-to-codes generator, `generate.num` synthetic pairs. Then the code-reading VLM trains
from scratch on real only vs real + synthetic (1 : `vlm.synthetic_weight`), at equal steps
and batch and on the same real pairs, for each seed of `seeds`; and real only on the whole
pool is the upper reference. Captioning CIDEr-D and BLEU-4 on `eval.num` held-out test
images, measured on each captioning VLM. Then every one of them gets the same VQA
fine-tuning (`vqa.steps` steps of `vqa.batch` on the same `vqa.train` real VQA pairs, same
lr, the run's seed; only the starting weights differ) and VQA exact match (one answer per
question, `vqa_exact_match`) on `vqa.num` held-out test questions: what the caption data
gave the model beyond captioning. The cost of one synthetic pair in embedding space
(caption -> codes) is measured beside the pixel-space route (caption -> codes -> decoded
pixels -> re-encoded codes) in the same run. Prints one table, writes synth_demo.json and
cider_vs_real_fraction.png (CIDEr-D and VQA against real pairs). Finished parts are skipped
on a re-run (results.json); a killed run resumes.

Workdir: data/, tokenizer_text/, and per real fraction real_<pct>pct/ with tokenizer/,
caption_lm/, generator/, pairs/ (below 100%) and <arm>/seed_<s> (the captioning VLM),
<arm>/seed_<s>_vqa (its VQA fine-tuning), arm = real | real_synthetic.
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np

from vlm_jax import report
from vlm_jax.data import builders, shapes_world
from vlm_jax.data.tokenizer import load_tokenizer, shapes_world_tokenizer
from vlm_jax.eval.evaluate import Generator, evaluate_captions, evaluate_vqa
from vlm_jax.experiments.shapes import common
from vlm_jax.synth import embeddings
from vlm_jax.synth import jobs as synth_jobs
from vlm_jax.train.loop import stop_unless_finished, train

PAPER = {"real": "baseline", "real + synthetic": "+17% captioning over real only (Synth², COCO)"}


def _read(path: str):
  with open(path) as f:
    return json.load(f)


def _percent(fraction: float) -> str:
  return f"{100 * fraction:g}%"


def real_set(config, fraction: float) -> tuple[str, int]:
  """The first `fraction` of the caption pool as a TFDS set: (name, pairs)."""
  w = config.world
  n = max(1, int(round(fraction * w.pool)))
  b = builders.build_shapes_world(config.data_dir, "caption", sizes={"train": n}, image_size=w.image_size,
                                  seed=w.seed, max_objects=w.max_objects)
  return f"{b.name}/{b.builder_config.name}", n


def part_config(config, real: str, tokenizer_dir: str):
  """The `synth` job's config for one real set."""
  c = config.synth.copy_and_resolve_references()
  with c.unlocked():
    c.real, c.tokenizer, c.data_dir = real, tokenizer_dir, config.data_dir
    c.seed, c.progress, c.checkpoint_every = config.seed, config.progress, config.checkpoint_every
  return c


def vqa_set(config) -> str:
  """The real VQA pairs every VLM is fine-tuned on (scenes of the pool's world), as a TFDS name."""
  w = config.world
  b = builders.build_shapes_world(config.data_dir, "vqa", sizes={"train": config.vqa.train}, image_size=w.image_size,
                                  seed=w.seed, max_objects=w.max_objects)
  return f"{b.name}/{b.builder_config.name}"


def test_records(config) -> dict:
  """{task: held-out test records}: `eval.num` caption images, `vqa.num` questions."""
  w = config.world
  return {task: list(shapes_world.records(task, "test", num, seed=w.seed, image_size=w.image_size,
                                          max_objects=w.max_objects))
          for task, num in (("caption", config.eval.num), ("vqa", config.vqa.num))}


def generator_of(config, summary: dict, tokenizer, max_new_tokens: int) -> Generator:
  return Generator(summary["model"], jax.device_get(summary["state"].params), tokenizer,
                   batch_size=config.eval.batch_size, max_new_tokens=max_new_tokens, image_slots=1)


def vqa_config(config, c, vlm_dir: str, vqa: str, seed: int) -> ml_collections.ConfigDict:
  """The VQA fine-tuning of the captioning VLM in `vlm_dir`: the same for every arm (steps, batch,
  lr, frozen tokenizer, data, seed), only the starting weights differ."""
  v = config.vqa
  run = ml_collections.ConfigDict(dict(seed=seed, model=c.vlm.model, checkpoint_every=config.checkpoint_every,
                                       progress=config.progress, seq_len=c.seq_len, image_slots=1, packing=False,
                                       truncate=False))
  stage = ml_collections.ConfigDict(dict(lr=v.lr, groups=list(c.vlm.groups), sources=[("vqa", 1.0)],
                                         global_batch_size=v.batch))
  return common.train_config(run, stage, v.steps, f"checkpoint:{vlm_dir}", {"vqa": vqa}, c.tokenizer,
                             config.data_dir)


def vqa_run(config, c, vlm_dir: str, vqa: str, seed: int, tokenizer, records) -> dict:
  """Fine-tunes the VLM of `vlm_dir` on VQA (in `<vlm_dir>_vqa`) and scores it by exact match."""
  start = time.time()
  summary = stop_unless_finished(train(vqa_config(config, c, vlm_dir, vqa, seed), f"{vlm_dir}_vqa"))
  scores = evaluate_vqa(generator_of(config, summary, tokenizer, config.vqa.max_new_tokens), records)
  return {**scores, "vqa last loss": summary["last loss"], "vqa wall (s)": round(time.time() - start, 1)}


def synthesis_cost(c, tokenizer, generator_dir: str, captions, repeats: int = 3) -> dict:
  """Seconds per synthetic pair in embedding space vs through pixels, measured in one run
  (compiled once before timing, best of `repeats`)."""
  model, params = synth_jobs.load_run(c.generator.model, generator_dir)
  g = c.generate
  kw = dict(steps=g.code_steps, temperature=g.code_temperature, guidance_scale=g.guidance_scale,
            batch_size=g.batch_size, progress=False)

  def embedding_space():
    return embeddings.generate_embeddings(model, params, tokenizer, captions, **kw)

  def pixel_space():
    pixels = embeddings.decode_to_pixels(model, params, embedding_space(), g.batch_size)
    return embeddings.encode_pixels(model, params, pixels, g.batch_size)

  out = {}
  for name, fn in (("embedding space", embedding_space), ("pixel space (decode + re-encode)", pixel_space)):
    fn()  # compile
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    out[name] = len(captions) / min(times)
  out["pixel / embedding time"] = out["embedding space"] / out["pixel space (decode + re-encode)"]
  return out


def run_fraction(config, fraction: float, tok_dir: str, vqa: str, records: dict, cache: str, workdir: str) -> dict:
  """Everything of one real fraction: the synth parts (below 100%) and the VLM arms x seeds, each
  evaluated on captions, then fine-tuned on `vqa` and evaluated on VQA."""
  real, n = real_set(config, fraction)
  c = part_config(config, real, tok_dir)
  tokenizer, _ = load_tokenizer(tok_dir)
  key = _percent(fraction)
  d = os.path.join(workdir, f"real_{key.rstrip('%')}pct")
  image_tokenizer = report.cached(cache, f"{key}/image_tokenizer",
                                  lambda: synth_jobs.train_tokenizer(c, os.path.join(d, "tokenizer")))
  out = {"real pairs": n, "arms": {}}
  pairs = None
  if fraction < 1:
    real_captions = synth_jobs.real_captions(c)
    lm = report.cached(cache, f"{key}/caption_lm",
                       lambda: synth_jobs.train_caption_lm(c, os.path.join(d, "caption_lm"), real_captions))
    gen = report.cached(cache, f"{key}/generator",
                        lambda: synth_jobs.train_generator(c, os.path.join(d, "generator"), image_tokenizer))
    pairs = report.cached(cache, f"{key}/pairs", lambda: synth_jobs.generate_pairs(
        c, os.path.join(d, "pairs"), image_tokenizer, lm, gen, real_captions))
    out["caption statistics"] = pairs["stats"]
    out["synthetic pairs"] = pairs["num"]
    if not os.path.exists(os.path.join(workdir, "cost.json")):
      texts = _read(os.path.join(d, "pairs", "captions.json"))[:config.cost_pairs]
      report.write_json(os.path.join(workdir, "cost.json"), synthesis_cost(c, tokenizer, gen, texts))
  arms = {"real": 0.0}
  if pairs is not None:
    arms["real + synthetic"] = float(c.vlm.synthetic_weight)
  for arm, weight in arms.items():
    for seed in config.seeds:
      name = f"{key}/{arm}/seed {seed}"
      vlm_dir = os.path.join(d, arm.replace(" + ", "_"), f"seed_{seed}")

      def one_run():
        start = time.time()
        summary = synth_jobs.train_vlm(c, vlm_dir, image_tokenizer, pairs["dataset"] if weight else None, seed=seed,
                                       synthetic_weight=weight)
        generator = generator_of(config, summary, tokenizer, config.eval.max_new_tokens)
        return {**evaluate_captions(generator, records["caption"]), "last loss": summary["last loss"],
                "wall (s)": round(time.time() - start, 1)}
      captioning = report.cached(cache, name, one_run)
      answering = report.cached(cache, f"{name}/vqa",
                                lambda: vqa_run(config, c, vlm_dir, vqa, seed, tokenizer, records["vqa"]))
      out["arms"].setdefault(arm, {})[seed] = {**captioning, **answering}
  return out


def table_rows(config, results: dict) -> list[dict]:
  rows = []
  for key, r in results.items():
    for arm, seeds in r["arms"].items():
      cider, bleu, vqa = ([s[k] for s in seeds.values()] for k in ("caption CIDEr-D", "caption BLEU-4", "vqa acc"))
      rows.append({"real fraction": key, "real pairs": r["real pairs"],
                   "synthetic pairs": r.get("synthetic pairs", 0) if arm != "real" else 0, "arm": arm,
                   "CIDEr-D (mean ± sd)": f"{np.mean(cider):.3f} ± {np.std(cider):.3f}",
                   "BLEU-4": f"{np.mean(bleu):.3f}",
                   "VQA exact match (mean ± sd)": f"{np.mean(vqa):.3f} ± {np.std(vqa):.3f}", "seeds": len(cider),
                   "paper": PAPER[arm] if key != "100%" else "upper reference"})
  return rows


def plot(results: dict, path: str) -> None:
  import matplotlib  # heavy and optional: only the plot needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # see above
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, metric, label, title in zip(axes, ("caption CIDEr-D", "vqa acc"), ("CIDEr-D (test)", "VQA exact match (test)"),
                                      ("captioning", "VQA, after the same VQA fine-tuning")):
    for arm, marker in (("real", "o"), ("real + synthetic", "s")):
      points = sorted((r["real pairs"], [s[metric] for s in r["arms"][arm].values()])
                      for r in results.values() if arm in r["arms"])
      ax.errorbar([p for p, _ in points], [np.mean(c) for _, c in points], yerr=[np.std(c) for _, c in points],
                  marker=marker, capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("real caption pairs")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(config, workdir: str) -> dict:
  if jax.process_count() > 1:
    raise ValueError("the shapes_synth job runs in one process")
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data_dir = config.data_dir or os.path.join(workdir, "data")
  report.pin_config(os.path.join(workdir, "demo_config.json"), config.to_dict())
  tok_dir = os.path.join(workdir, "tokenizer_text")
  shapes_world_tokenizer(tok_dir, vocab_size=config.vocab_size)
  records = test_records(config)
  vqa = vqa_set(config)
  cache = os.path.join(workdir, "results.json")
  results = {_percent(f): run_fraction(config, f, tok_dir, vqa, records, cache, workdir)
             for f in list(config.fractions) + [1.0]}
  rows = table_rows(config, results)
  report.print_table(rows, f"Synth² on the shapes world: captioning on {config.eval.num} held-out images after "
                           f"{config.synth.vlm.steps} VLM steps; VQA on {config.vqa.num} held-out questions after "
                           f"{config.vqa.steps} more steps of VQA fine-tuning; {len(config.seeds)} seeds",
                     columns=list(rows[0]))
  cost = _read(os.path.join(workdir, "cost.json")) if config.fractions else {}
  if cost:
    report.print_rows("synthesis cost (pairs/s, one run)", list(cost.items()))
  plot(results, os.path.join(workdir, "cider_vs_real_fraction.png"))
  result = {"table": rows, "results": results, "cost": cost, "wall (s)": round(time.time() - start, 1)}
  report.write_json(os.path.join(workdir, "synth_demo.json"), result)
  return result
