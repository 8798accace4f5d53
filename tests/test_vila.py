"""The main job, scaled down: shapes world -> tokenizer -> three VILA stages -> evaluation table."""

import json
import os

import jax
import numpy as np
import pytest

from configs.shapes import vila as shapes_vila
from vlm_jax.experiments.shapes import vila


def test_stages_run_chain_and_evaluate(tmp_path, capsys):
  """Every stage kind runs: contrastive tower, text-only LM, the three VILA stages."""
  config = shapes_vila.get_config("quick=True")
  with config.unlocked():
    config.progress = False
  rows = vila.run(config, str(tmp_path))

  assert [r["stage"] for r in rows] == ["vision", "lm", "stage0", "stage1", "stage2"]
  assert 0.0 <= rows[0]["pair retrieval (train) acc"] <= 1.0 and "vqa acc" not in rows[0]
  for row in rows[1:]:
    assert {"caption CIDEr-D", "vqa acc", "vqa/color acc", "vqa/shape acc", "region acc", "text_qa acc"} <= set(row)
  assert json.load(open(tmp_path / "eval.json"))[-1]["stage"] == "stage2"
  out = capsys.readouterr().out
  assert "evaluation after each VILA stage" in out and "vqa/color acc" in out
  assert "total wall time" in out and all(r["train wall (s)"] > 0 for r in rows)
  from vlm_jax.train.checkpoint import Checkpointer, restore_params
  for stage in config.stage_order:
    assert Checkpointer(str(tmp_path / stage / "checkpoints")).steps()[-1] > 0
  # The lm stage took the contrastive stage's tower; every later stage starts from the one before.
  lm = json.load(open(tmp_path / "lm" / "config.json"))
  assert lm["init"] == "scratch" and lm["init_parts"] == {"vision": f"checkpoint:{tmp_path / 'vision'}"}
  for before, stage in [("lm", "stage0"), ("stage0", "stage1"), ("stage1", "stage2")]:
    c = json.load(open(tmp_path / stage / "config.json"))
    assert c["init"] == f"checkpoint:{tmp_path / before}" and c["init_parts"] == {}
  assert json.load(open(tmp_path / "vision" / "config.json"))["model"]["kind"] == "contrastive"
  # What a stage freezes arrives bit for bit: the tower through lm and stage 0, the LM through stage 0.
  from vlm_jax.models import build_model
  from vlm_jax.models.params import abstract_params
  abstract = abstract_params(build_model(config.model))
  part = lambda stage, name: restore_params(str(tmp_path / stage), {name: abstract[name]}, partial=True)[name]
  for stage in ("lm", "stage0"):
    jax.tree.map(np.testing.assert_array_equal, part("vision", "vision"), part(stage, "vision"))
  jax.tree.map(np.testing.assert_array_equal, part("lm", "lm"), part("stage0", "lm"))
  losses = [json.loads(l)["loss"] for l in open(tmp_path / "stage2" / "metrics.jsonl") if '"loss"' in l]
  assert losses[-1] < losses[0]


def test_stage_configs_follow_the_vila_freezing():
  config = shapes_vila.get_config()
  groups = {name: [tuple(g) for g in config.stages[name].groups] for name in config.stages}
  assert config.stage_order == ("vision", "lm", "stage0", "stage1", "stage2")
  # the two pretrained towers: the contrastive stage trains its two towers, the lm stage the LM alone
  assert vila.is_contrastive(config.stages.vision) and groups["vision"] == [(".*", 1.0)]
  assert groups["lm"] == [("lm/.*", 1.0), (".*", None)]
  assert {task for task, _ in config.stages.lm.sources} == {"text_corpus", "text_qa"}
  # stage 0 the projector alone, stage 1 the LM too on the frozen tower, stage 2 (VILA1.5)
  # the tower too, at 0.3 of the learning rate
  assert groups["stage0"] == [("projector/.*", 1.0), (".*", None)]
  assert groups["stage1"] == [("vision/.*", None), (".*", 1.0)]
  assert groups["stage2"] == [("vision/.*", 0.3), (".*", 1.0)]
  assert sum(config.stages[n].fraction for n in config.stages) == np.float64(1.0)
  steps = {n: round(config.total_steps * config.stages[n].fraction) for n in config.stage_order}
  assert steps == shapes_vila.STEPS
  assert config.model.vision.pool == "mean_max" and config.world.train.caption_single.max_objects == 1


def test_without_pretraining_everything_trains_from_scratch():
  config = shapes_vila.get_config("pretrain=False")
  assert config.stage_order == ("stage0", "stage1", "stage2") and sorted(config.stages) == list(config.stage_order)
  assert [tuple(g) for g in config.stages.stage1.groups] == [(".*", 1.0)]
  assert [tuple(g) for g in config.stages.stage2.groups] == [(".*", 1.0)]
  steps = {n: round(config.total_steps * config.stages[n].fraction) for n in config.stage_order}
  assert steps == {n: shapes_vila.STEPS[n] for n in config.stage_order}


@pytest.mark.slow  # two scaled-down main jobs: ~40 s; test_job_preemption covers the rule in seconds
def test_preemption_in_a_stage_stops_the_job_and_the_rerun_finishes_it(tmp_path, monkeypatch):
  """SIGTERM in stage 1: nothing after it runs (no stage 2 on a partial stage 1, no eval.json);
  the same call again finishes stage 1 and then trains stage 2 from its last step."""
  from vlm_jax.train.loop import RunStopped
  config = shapes_vila.get_config("quick=True,pretrain=False")
  with config.unlocked():
    config.progress = False
    config.eval.tasks = ["vqa"]
    config.eval.num = 4
  real = vila.stage_config

  def preempting(config, name, *args, **kwargs):
    c = real(config, name, *args, **kwargs)
    if name == "stage1":
      with c.unlocked():
        c.debug.preempt_at_step = 3  # once per workdir (a marker file), so the rerun goes on
    return c

  monkeypatch.setattr(vila, "stage_config", preempting)
  with pytest.raises(RunStopped, match="stage1: preempted: saved step 3"):
    vila.run(config, str(tmp_path))
  assert not (tmp_path / "stage2").exists() and not (tmp_path / "eval.json").exists()

  rows = vila.run(config, str(tmp_path))
  from vlm_jax.train.checkpoint import Checkpointer
  stage1_steps = int(rows[1]["steps"])
  assert Checkpointer(str(tmp_path / "stage1" / "checkpoints")).steps()[-1] == stage1_steps > 3
  first = json.loads(open(tmp_path / "stage2" / "metrics.jsonl").readline())
  assert first["step"] == 1 and rows[-1]["stage"] == "stage2"
  assert json.load(open(tmp_path / "eval.json"))[-1]["stage"] == "stage2"
