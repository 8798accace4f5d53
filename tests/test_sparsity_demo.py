"""The prune job and the shapes-world prune-and-repair demonstration, scaled down."""

import json
import os

import pytest

from configs import prune as prune_config
from configs.shapes import sparsity as shapes_sparsity


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  from vlm_jax.experiments.shapes import sparsity as shapes_demo
  root = tmp_path_factory.mktemp("sparsity")
  config = shapes_sparsity.get_config(f"quick=True,main_workdir={root / 'main'}")
  table = shapes_demo.run(config, str(root / "demo"))
  return root, config, table


@pytest.mark.slow  # the scaled-down demonstration: ~45 s
def test_demo_writes_the_table_json_and_plot(demo):
  root, config, table = demo
  assert [r["setting"] for r in table] == ["dense", "unstructured50_vl"]
  row = table[1]
  assert row["vision sparsity"] == pytest.approx(0.5) and row["lm sparsity"] == pytest.approx(0.5)
  for key in ("pruned vqa acc", "repaired vqa acc", "pruned region acc", "repaired region acc"):
    assert 0.0 <= row[key] <= 1.0
  with open(root / "demo" / "sparsity_demo.json") as f:
    assert json.load(f)["rows"][0]["setting"] == "unstructured50_vl"
  assert os.path.getsize(root / "demo" / "accuracy_vs_sparsity.png") > 1000
  # A re-run reads finished settings back instead of recomputing them.
  from vlm_jax.experiments.shapes import sparsity as shapes_demo
  assert shapes_demo.run(config, str(root / "demo"))[1] == row


@pytest.mark.slow  # needs the demonstration's data
def test_prune_job_from_a_config_file(demo):
  root, _, _ = demo
  from vlm_jax.sparsity import jobs
  data_dir = root / "main" / "data"
  vqa = next(p.name for p in (data_dir / "shapes_world").iterdir() if p.name.startswith("vqa"))
  config = prune_config.get_config(
      f"model=shapes_vila,init=scratch,pattern=4:8,source=shapes_world/{vqa},data_dir={data_dir},"
      f"tokenizer={root / 'main' / 'tokenizer'},rows=16")
  with config.unlocked():
    config.progress = False
  rows = {r["name"]: r["sparsity"] for r in jobs.prune(config, str(root / "pruned"))}
  assert rows["[vision masked]"] == pytest.approx(0.5) and rows["[lm masked]"] == pytest.approx(0.5)
  assert rows["[projector linear]"] == 0.0 and rows["[lm linear]"] < 0.5  # the output head stays dense
  assert os.path.exists(root / "pruned" / "mask_paths.json")
  assert os.path.isdir(root / "pruned" / "checkpoints")
