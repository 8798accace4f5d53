"""The shapes-world Synth² demonstration, scaled down (`:quick=True`): every arm is scored on
captions and, after the same VQA fine-tuning, on VQA by exact match (a number recomputed here
from the fine-tuned weights); a re-run skips what is done."""

import json
import os

import numpy as np
import pytest

from configs.shapes import synth as shapes_synth
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.eval import metrics
from vlm_jax.eval.evaluate import Generator
from vlm_jax.experiments.shapes import synth as demo
from vlm_jax.synth import jobs as synth_jobs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = shapes_synth.get_config("quick=True")
  with config.unlocked():
    config.progress = False
  workdir = str(tmp_path_factory.mktemp("synth_demo"))
  return config, workdir, demo.run(config, workdir)


def arm_dirs(workdir):
  """{(fraction, arm): the seed-0 captioning VLM's workdir}."""
  return {("5%", "real"): os.path.join(workdir, "real_5pct", "real", "seed_0"),
          ("5%", "real + synthetic"): os.path.join(workdir, "real_5pct", "real_synthetic", "seed_0"),
          ("100%", "real"): os.path.join(workdir, "real_100pct", "real", "seed_0")}


@pytest.mark.slow  # the scaled-down demonstration end to end: ~2.5 CPU-min (6 min on 2 loaded cores)
def test_every_arm_has_captioning_and_vqa_in_the_json_and_the_table(run):
  config, workdir, result = run
  assert json.load(open(os.path.join(workdir, "synth_demo.json")))["table"] == result["table"]
  for (fraction, arm) in arm_dirs(workdir):
    scores = result["results"][fraction]["arms"][arm][0]
    assert 0.0 <= scores["vqa acc"] <= 1.0 and scores["caption CIDEr-D"] >= 0.0
    assert "vqa official acc" not in scores  # one answer per question: exact match, not the official rule
    assert {"vqa/color acc", "vqa/count acc", "vqa/shape acc"} <= set(scores)
  rows = {(r["real fraction"], r["arm"]): r for r in result["table"]}
  assert set(rows) == set(arm_dirs(workdir))
  for (fraction, arm), row in rows.items():
    vqa = result["results"][fraction]["arms"][arm][0]["vqa acc"]
    assert row["VQA exact match (mean ± sd)"] == f"{vqa:.3f} ± 0.000"  # one seed


@pytest.mark.slow
def test_every_arm_gets_the_same_vqa_fine_tuning_from_its_own_captioning_vlm(run):
  _, workdir, _ = run
  configs = {k: json.load(open(os.path.join(d + "_vqa", "config.json"))) for k, d in arm_dirs(workdir).items()}
  first = next(iter(configs.values()))
  for k, c in configs.items():
    assert c["init"] == f"checkpoint:{arm_dirs(workdir)[k]}"
    for key in ("seed", "total_steps", "optim", "model", "data"):
      assert c[key] == first[key], key


@pytest.mark.slow
def test_the_vqa_number_is_exact_match_of_the_fine_tuned_model(run):
  """The JSON's number is exact match of the fine-tuned weights' answers; and the demo's scorer,
  given references set to the model's own answers on half the questions, gives each of those
  1 and the rest what exact match gives them (the official rule would give a lone match 1/3)."""
  config, workdir, result = run
  vlm_dir = arm_dirs(workdir)[("5%", "real + synthetic")]
  model, params = synth_jobs.load_run(config.synth.vlm.model, vlm_dir + "_vqa")
  tokenizer, _ = load_tokenizer(os.path.join(workdir, "tokenizer_text"))
  records = demo.test_records(config)["vqa"]
  assert len(records) == config.vqa.num
  preds, refs, _ = Generator(model, params, tokenizer, batch_size=config.eval.batch_size,
                             max_new_tokens=config.vqa.max_new_tokens, image_slots=1)(records)
  by_hand = np.mean([metrics.vqa_exact_match([p], [r]) for p, r in zip(preds, refs)])
  assert result["results"]["5%"]["arms"]["real + synthetic"][0]["vqa acc"] == pytest.approx(by_hand)
  half = len(records) // 2
  answered = [{**r, "meta": json.dumps({**json.loads(r["meta"]), "answer": p})} for r, p in zip(records[:half], preds)]
  c = demo.part_config(config, "", os.path.join(workdir, "tokenizer_text"))
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data_dir = os.path.join(workdir, "data")
  scores = demo.vqa_run(config, c, vlm_dir, demo.vqa_set(config), 0, tokenizer, answered + records[half:])
  want = (half + sum(metrics.vqa_exact_match([p], [r]) for p, r in zip(preds[half:], refs[half:]))) / len(records)
  assert scores["vqa acc"] == pytest.approx(want) and want >= 0.5


@pytest.mark.slow
def test_a_rerun_trains_nothing(run):
  config, workdir, result = run
  vqa_metrics = os.path.join(arm_dirs(workdir)[("100%", "real")] + "_vqa", "metrics.jsonl")
  before = os.path.getmtime(vqa_metrics)
  again = demo.run(config, workdir)
  assert again["table"] == result["table"]
  assert os.path.getmtime(vqa_metrics) == before
