"""The main job, scaled down: shapes world -> tokenizer -> three VILA stages -> evaluation table."""

import json
import os

import jax
import numpy as np

from configs import shapes_vila
from vlm_jax.train import vila


def test_three_stages_run_chain_and_evaluate(tmp_path, capsys):
  config = shapes_vila.get_config("quick=True")
  with config.unlocked():
    config.progress = False
  rows = vila.run(config, str(tmp_path))

  assert [r["stage"] for r in rows] == ["stage0", "stage1", "stage2"]
  for row in rows:
    assert {"caption CIDEr-D", "vqa acc", "vqa/color acc", "vqa/shape acc", "region acc", "text_qa acc"} <= set(row)
  assert json.load(open(tmp_path / "eval.json"))[-1]["stage"] == "stage2"
  out = capsys.readouterr().out
  assert "evaluation after each VILA stage" in out and "vqa/color acc" in out
  assert "total wall time" in out and all(r["train wall (s)"] > 0 for r in rows)
  # Each stage started from the previous one's checkpoint; stage 0 trained only the projector.
  from vlm_jax.train.checkpoint import Checkpointer
  for stage in config.stage_order:
    assert Checkpointer(str(tmp_path / stage / "checkpoints")).steps()[-1] > 0
  assert json.load(open(tmp_path / "stage0" / "config.json"))["init"] == "scratch"
  assert json.load(open(tmp_path / "stage1" / "config.json"))["init"] == f"checkpoint:{tmp_path / 'stage0'}"
  losses = [json.loads(l)["loss"] for l in open(tmp_path / "stage2" / "metrics.jsonl") if '"loss"' in l]
  assert losses[-1] < losses[0]


def test_stage_configs_follow_the_vila_freezing():
  config = shapes_vila.get_config()
  groups = {name: [tuple(g) for g in config.stages[name].groups] for name in config.stages}
  assert config.stage_order == ("stage0", "stage1", "stage2")
  assert groups["stage0"] == [("projector/.*", 1.0), (".*", None)]
  # VILA freezes its (pretrained CLIP) tower in stage 1; ours starts from random weights, so
  # stage 1 trains it too (README: "One deviation from VILA").
  assert groups["stage1"] == [(".*", 1.0)]
  assert groups["stage2"] == [(".*", 1.0)]
  assert sum(config.stages[n].fraction for n in config.stages) == np.float64(1.0)
