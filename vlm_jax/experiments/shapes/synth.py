r"""Synth² on the shapes world (`shapes_synth`, configs/shapes/synth.py): do synthetic pairs help
when real ones are scarce?

    python -m launch.main --config=configs/shapes/synth.py --workdir=workdirs/synth_demo

A pool of `world.pool` caption pairs; for each real fraction of it (`fractions`, e.g. 5% and
10%) the `synth` job's parts run on those real pairs only: image tokenizer, caption LM,
text-to-codes generator, `generate.num` synthetic pairs. Then the code-reading VLM trains
from scratch on real only vs real + synthetic (1 : `vlm.synthetic_weight`), at equal steps
and batch and on the same real pairs, for each seed of `seeds`; and real only on the whole
pool is the upper reference. Captioning CIDEr-D and BLEU-4 on `eval.num` held-out test
images. The cost of one synthetic pair in embedding space (caption -> codes) is measured
beside the pixel-space route (caption -> codes -> decoded pixels -> re-encoded codes) in
the same run. Prints one table, writes synth_demo.json and cider_vs_real_fraction.png.
Finished parts are skipped on a re-run (results.json); a killed run resumes.
"""

import json
import os
import time

import jax
import numpy as np

from vlm_jax import report
from vlm_jax.data import builders, shapes_world
from vlm_jax.data.tokenizer import load_tokenizer, shapes_world_tokenizer
from vlm_jax.eval.evaluate import Generator, evaluate_captions
from vlm_jax.synth import embeddings
from vlm_jax.synth import jobs as synth_jobs

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


def test_records(config) -> list:
  w = config.world
  return list(shapes_world.records("caption", "test", config.eval.num, seed=w.seed, image_size=w.image_size,
                                   max_objects=w.max_objects))


def evaluate(config, summary: dict, tokenizer, records) -> dict:
  generator = Generator(summary["model"], jax.device_get(summary["state"].params), tokenizer,
                        batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens, image_slots=1)
  return evaluate_captions(generator, records)


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


def run_fraction(config, fraction: float, tok_dir: str, records, cache: str, workdir: str) -> dict:
  """Everything of one real fraction: the synth parts (below 100%) and the VLM arms x seeds."""
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

      def one_run():
        start = time.time()
        summary = synth_jobs.train_vlm(c, os.path.join(d, arm.replace(" + ", "_"), f"seed_{seed}"), image_tokenizer,
                                       pairs["dataset"] if weight else None, seed=seed, synthetic_weight=weight)
        return {**evaluate(config, summary, tokenizer, records), "last loss": summary["last loss"],
                "wall (s)": round(time.time() - start, 1)}
      out["arms"].setdefault(arm, {})[seed] = report.cached(cache, name, one_run)
  return out


def table_rows(config, results: dict) -> list[dict]:
  rows = []
  for key, r in results.items():
    for arm, seeds in r["arms"].items():
      cider = [s["caption CIDEr-D"] for s in seeds.values()]
      bleu = [s["caption BLEU-4"] for s in seeds.values()]
      rows.append({"real fraction": key, "real pairs": r["real pairs"],
                   "synthetic pairs": r.get("synthetic pairs", 0) if arm != "real" else 0, "arm": arm,
                   "CIDEr-D (mean ± sd)": f"{np.mean(cider):.3f} ± {np.std(cider):.3f}",
                   "BLEU-4": f"{np.mean(bleu):.3f}", "seeds": len(cider),
                   "paper": PAPER[arm] if key != "100%" else "upper reference"})
  return rows


def plot(results: dict, path: str) -> None:
  import matplotlib  # heavy and optional: only the plot needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # see above
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for arm, marker in (("real", "o"), ("real + synthetic", "s")):
    points = sorted((r["real pairs"], [s["caption CIDEr-D"] for s in r["arms"][arm].values()])
                    for r in results.values() if arm in r["arms"])
    ax.errorbar([p for p, _ in points], [np.mean(c) for _, c in points], yerr=[np.std(c) for _, c in points],
                marker=marker, capsize=3, label=arm)
  ax.set_xscale("log")
  ax.set_xlabel("real caption pairs")
  ax.set_ylabel("CIDEr-D (test)")
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
  cache = os.path.join(workdir, "results.json")
  results = {_percent(f): run_fraction(config, f, tok_dir, records, cache, workdir)
             for f in list(config.fractions) + [1.0]}
  rows = table_rows(config, results)
  report.print_table(rows, f"Synth² on the shapes world: captioning on {config.eval.num} held-out images, "
                           f"{len(config.seeds)} seeds, {config.synth.vlm.steps} VLM steps each",
                     columns=list(rows[0]))
  cost = _read(os.path.join(workdir, "cost.json")) if config.fractions else {}
  if cost:
    report.print_rows("synthesis cost (pairs/s, one run)", list(cost.items()))
  plot(results, os.path.join(workdir, "cider_vs_real_fraction.png"))
  result = {"table": rows, "results": results, "cost": cost, "wall (s)": round(time.time() - start, 1)}
  report.write_json(os.path.join(workdir, "synth_demo.json"), result)
  return result
