"""Preemption inside jobs that chain a training run with more work: SIGTERM stops the job
after the run's checkpoint, nothing built from the partial weights is written, and the
same call again resumes and finishes (the loop's own resume is tested in test_train)."""

import jax
import ml_collections
import numpy as np
import pytest

from tests.test_sparse_training import _lm_and_masks, _train_config
from vlm_jax.models.params import flat
from vlm_jax.sparsity import jobs
from vlm_jax.train.checkpoint import save_params
from vlm_jax.train.loop import RunStopped


@pytest.mark.slow  # ~15 s; preemption itself is tested in test_train and test_faults
def test_a_preempted_repair_merges_nothing_and_the_rerun_merges_the_finished_run(tmp_path):
  model, dense, pruned, masks = _lm_and_masks("2:4")
  masks_dir = str(tmp_path / "prune")
  jobs.write_outputs(masks_dir, model, pruned, masks)
  save_params(str(tmp_path / "dense"), jax.device_get(dense))

  def config():
    c = ml_collections.ConfigDict(_train_config(str(tmp_path / "run"), masks_dir, "sparse_lora"))
    with c.unlocked():
      c.init = f"checkpoint:{tmp_path / 'dense'}"
      c.export_hf = ""
      c.debug.preempt_at_step = 2
    return c

  with pytest.raises(RunStopped, match="saved step 2"):
    jobs.repair(config(), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "merged").exists() and not (tmp_path / "run" / "adapters").exists()

  summary = jobs.repair(config(), str(tmp_path / "run"))
  assert summary["status"] == "finished" and summary["steps"] == "2 -> 6 of 6"
  for path, m in flat(masks).items():
    assert (np.asarray(flat(summary["merged"])[path])[~np.asarray(m)] == 0).all()
  assert (tmp_path / "run" / "merged" / "sparsity.json").exists()
