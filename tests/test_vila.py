"""The main job, scaled down: shapes world -> tokenizer -> three VILA stages -> evaluation table."""

import json
import os

import jax
import numpy as np

from configs import shapes_vila
from vlm_jax.train import vila


def test_stages_run_chain_and_evaluate(tmp_path, capsys):
  """The main job with its tower pretrained (`pretrain_tower=True`): every stage kind runs."""
  config = shapes_vila.get_config("quick=True,pretrain_tower=True")
  with config.unlocked():
    config.progress = False
  rows = vila.run(config, str(tmp_path))

  assert [r["stage"] for r in rows] == ["vision", "stage0", "stage1", "stage2"]
  assert 0.0 <= rows[0]["pair retrieval (train) acc"] <= 1.0 and "vqa acc" not in rows[0]
  for row in rows[1:]:
    assert {"caption CIDEr-D", "vqa acc", "vqa/color acc", "vqa/shape acc", "region acc", "text_qa acc"} <= set(row)
  assert json.load(open(tmp_path / "eval.json"))[-1]["stage"] == "stage2"
  out = capsys.readouterr().out
  assert "evaluation after each VILA stage" in out and "vqa/color acc" in out
  assert "total wall time" in out and all(r["train wall (s)"] > 0 for r in rows)
  # Each stage started from the previous one's checkpoint; stage 0 took the contrastive
  # stage's vision tower and trained only the projector, so its tower is that one, bit for bit.
  from vlm_jax.train.checkpoint import Checkpointer, restore_params
  for stage in config.stage_order:
    assert Checkpointer(str(tmp_path / stage / "checkpoints")).steps()[-1] > 0
  stage0 = json.load(open(tmp_path / "stage0" / "config.json"))
  assert stage0["init"] == "scratch" and stage0["init_parts"] == {"vision": f"checkpoint:{tmp_path / 'vision'}"}
  stage1 = json.load(open(tmp_path / "stage1" / "config.json"))
  assert stage1["init"] == f"checkpoint:{tmp_path / 'stage0'}" and stage1["init_parts"] == {}
  assert json.load(open(tmp_path / "vision" / "config.json"))["model"]["kind"] == "contrastive"
  from vlm_jax.models import build_model
  from vlm_jax.models.params import abstract_params
  vision = {"vision": abstract_params(build_model(config.model))["vision"]}
  tower, vlm = (restore_params(str(tmp_path / s), vision, partial=True)["vision"] for s in ("vision", "stage0"))
  jax.tree.map(np.testing.assert_array_equal, tower, vlm)
  losses = [json.loads(l)["loss"] for l in open(tmp_path / "stage2" / "metrics.jsonl") if '"loss"' in l]
  assert losses[-1] < losses[0]


def test_stage_configs_follow_the_vila_freezing():
  config = shapes_vila.get_config()
  groups = {name: [tuple(g) for g in config.stages[name].groups] for name in config.stages}
  assert config.stage_order == ("stage0", "stage1", "stage2")
  assert groups["stage0"] == [("projector/.*", 1.0), (".*", None)]
  # VILA freezes its (pretrained) tower in stage 1; ours starts from random weights, so
  # stage 1 trains it too (README: "One deviation from VILA").
  assert groups["stage1"] == [(".*", 1.0)]
  assert groups["stage2"] == [(".*", 1.0)]
  assert sum(config.stages[n].fraction for n in config.stages) == np.float64(1.0)


def test_a_pretrained_tower_is_frozen_as_vila_freezes_it():
  config = shapes_vila.get_config("pretrain_tower=True")
  groups = {name: [tuple(g) for g in config.stages[name].groups] for name in config.stages}
  assert config.stage_order == ("vision", "stage0", "stage1", "stage2")
  assert vila.is_contrastive(config.stages.vision) and groups["vision"] == [(".*", 1.0)]
  # stage 0 the projector alone, stage 1 the LM too on the frozen tower, stage 2 (VILA1.5)
  # the tower too, at a tenth of the learning rate
  assert groups["stage0"] == [("projector/.*", 1.0), (".*", None)]
  assert groups["stage1"] == [("vision/.*", None), (".*", 1.0)]
  assert groups["stage2"] == [("vision/.*", 0.1), (".*", 1.0)]
  assert sum(config.stages[n].fraction for n in config.stages) == np.float64(1.0)
  assert config.model.vision.pool == "mean_max" and config.world.train.caption_single.max_objects == 1
