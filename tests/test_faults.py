"""Faults a run on a pod meets, each reproduced on the tiny config: nothing is lost, nothing
is silently wrong (torn checkpoints, another run's workdir, a changed config, data that runs
out, Ctrl-C, a signal on a checkpoint step, deleted checkpoints)."""

import json
import os
import shutil

import numpy as np
import pytest

from tests.test_train import abstract_of, assert_trees_equal, config, final_params, losses
from vlm_jax.data.synthetic import SyntheticBatches
from vlm_jax.train.checkpoint import Checkpointer, CheckpointMismatch, restore_params
from vlm_jax.train.loop import train


def _copy(run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(run, workdir)
  return workdir


def _truncate_data_files(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "params")):
    for f in files:
      if not f.startswith("_"):  # the arrays' data, not the metadata: shapes still read
        open(os.path.join(root, f), "w").close()


def test_a_torn_newest_checkpoint_is_set_aside_and_saved_again(straight_run, tmp_path):
  workdir = _copy(straight_run, tmp_path)
  _truncate_data_files(os.path.join(workdir, "checkpoints", "20"))
  summary = train(config(checkpoint_every=5), workdir)
  assert summary["steps"] == "15 -> 20 of 20"
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "20.corrupt"))
  assert Checkpointer(os.path.join(workdir, "checkpoints")).steps() == [10, 15, 20]  # 20 saved again
  c = config()  # and it is what the uninterrupted run saved
  assert_trees_equal(restore_params(workdir, abstract_of(c), step=20), restore_params(straight_run, abstract_of(c)))


def test_init_from_a_run_whose_newest_step_is_torn_falls_back_with_one_line(straight_run, tmp_path, caplog):
  workdir = _copy(straight_run, tmp_path)
  _truncate_data_files(os.path.join(workdir, "checkpoints", "20"))
  c = config()
  params = restore_params(workdir, abstract_of(c))
  assert_trees_equal(params, restore_params(straight_run, abstract_of(c), step=15))
  assert [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()] == [
      f"checkpoint {workdir}/checkpoints/20 is unreadable (CheckpointCorrupt); using an older one"]


def test_another_runs_workdir_is_refused_untouched_unless_overwrite_is_asked(straight_run, tmp_path):
  workdir = _copy(straight_run, tmp_path)
  before = {f: open(os.path.join(workdir, f)).read() for f in ("config.json", "metrics.jsonl")}
  other = config(total_steps=4, **{"model.text.mlp_dim": 64})
  with pytest.raises(CheckpointMismatch, match=r"holds checkpoints of another run: parameter "
                                               r"'lm/layers_0/down/kernel' is \(256, 128\) there and \(64, 128\)"
                                               r".*--config.checkpoint.overwrite=True"):
    train(other, workdir)
  assert {f: open(os.path.join(workdir, f)).read() for f in before} == before
  assert Checkpointer(os.path.join(workdir, "checkpoints")).steps() == [10, 15, 20]
  with other.unlocked():
    other.checkpoint.overwrite = True
  summary = train(other, workdir)
  assert summary["steps"] == "0 -> 4 of 4"
  assert Checkpointer(os.path.join(workdir, "checkpoints.old")).steps() == [10, 15, 20]
  assert open(os.path.join(workdir, "metrics.1.jsonl")).read() == before["metrics.jsonl"]
  assert open(os.path.join(workdir, "config.1.json")).read() == before["config.json"]


@pytest.mark.slow  # three runs: ~15 s
def test_a_resume_with_a_changed_config_keeps_the_earlier_one(tmp_path):
  train(config(total_steps=4), str(tmp_path))
  first = open(tmp_path / "config.json").read()
  train(config(total_steps=6, **{"optim.lr": 5e-4}), str(tmp_path))
  assert open(tmp_path / "config.1.json").read() == first
  assert json.load(open(tmp_path / "config.json"))["optim"]["lr"] == 5e-4
  train(config(total_steps=6, **{"optim.lr": 5e-4}), str(tmp_path))  # unchanged: no new copy
  assert not (tmp_path / "config.2.json").exists()


def test_data_that_runs_out_stops_with_a_checkpoint_and_says_so(tmp_path, monkeypatch):
  original = SyntheticBatches.__next__

  def six_batches(self):
    if self.get_state()["index"] >= 6:  # the data set's end
      raise StopIteration
    return original(self)

  monkeypatch.setattr(SyntheticBatches, "__next__", six_batches)
  summary = train(config(total_steps=20), str(tmp_path))
  assert summary["status"] == "the data ran out after 6 step(s) of this run (data.num_epochs?): saved step 6"
  assert Checkpointer(str(tmp_path / "checkpoints")).steps() == [6]
  assert max(losses(tmp_path)) == 6


@pytest.mark.parametrize("signal_name, status", [  # SIGTERM on any other step: test_train (default run)
    pytest.param("SIGINT", "interrupted by Ctrl-C", marks=pytest.mark.slow),  # ~20 s each
    pytest.param("SIGTERM", "preempted", marks=pytest.mark.slow)])
def test_a_signal_on_a_checkpoint_step_saves_once_and_resumes(straight_run, tmp_path, signal_name, status):
  """Ctrl-C is handled like SIGTERM; a signal right after a checkpoint step (10) does not save it twice,
  and that step's metrics line is written; the same command then finishes as an uninterrupted run."""
  c = config(checkpoint_every=5, **{"debug.preempt_at_step": 10, "debug.preempt_signal": signal_name})
  summary = train(c, str(tmp_path))
  assert summary["status"] == f"{status}: saved step 10"
  assert max(losses(tmp_path)) == 10
  train(c, str(tmp_path))
  assert_trees_equal(final_params(str(tmp_path), c), final_params(straight_run, c))
  np.testing.assert_array_equal(sorted(losses(tmp_path)), np.arange(1, 21))


@pytest.mark.slow  # two runs: ~20 s
def test_deleted_checkpoints_restart_from_zero_and_keep_the_old_metrics(tmp_path):
  train(config(total_steps=3), str(tmp_path))
  old = open(tmp_path / "metrics.jsonl").read()
  shutil.rmtree(tmp_path / "checkpoints")
  summary = train(config(total_steps=2), str(tmp_path))
  assert summary["steps"] == "0 -> 2 of 2"
  assert open(tmp_path / "metrics.1.jsonl").read() == old
  assert sorted(losses(tmp_path)) == [1, 2]


def test_bit_rot_in_a_checkpoint_is_caught_by_its_checksums(straight_run, tmp_path):
  """Random bytes inside a data file, same size: resume sets the step aside (and uses the one
  before), and reading its parameters directly (soups, pruning) is an error naming the file."""
  from vlm_jax.train.checkpoint import CheckpointCorrupt, read_params
  workdir = _copy(straight_run, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "20")
  assert os.path.exists(os.path.join(step_dir, "checksums.json"))
  data_files = sorted(os.path.join(root, f) for root, _, files in os.walk(os.path.join(step_dir, "params"))
                      for f in files)
  victim = max(data_files, key=os.path.getsize)
  size = os.path.getsize(victim)
  with open(victim, "r+b") as f:
    f.seek(size // 2)
    f.write(np.random.default_rng(0).bytes(64))
  assert os.path.getsize(victim) == size
  with pytest.raises(CheckpointCorrupt, match=f"{os.path.basename(victim)} has changed since it was written"):
    read_params(workdir)
  summary = train(config(checkpoint_every=5), workdir)
  assert summary["steps"] == "15 -> 20 of 20" and os.path.isdir(step_dir + ".corrupt")


def test_nonpositive_total_steps_is_refused(tmp_path):
  with pytest.raises(ValueError, match="total_steps must be positive, got 0"):
    train(config(total_steps=0), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def _private_tmpfs_prefix() -> list:
  """`unshare` arguments that give a child its own mount namespace (and, without root, a user
  namespace that may mount), or None where this machine allows neither."""
  import subprocess
  for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
    probe = subprocess.run(prefix + ["sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    if probe.returncode == 0:
      return prefix
  return None


def test_a_full_disk_during_a_save_ends_with_one_message_and_the_previous_checkpoint_intact(tmp_path):
  """A real full disk: the run's workdir on a 10 MiB tmpfs (in a private mount namespace), one
  checkpoint of the tiny model (~6 MiB) fits and the next does not. The space check before the
  save ends the run with one line naming the step, the free space and the intact step; no
  traceback; nothing partial is left and the step before reads back, checksums and all."""
  import subprocess
  import sys
  from vlm_jax.train.checkpoint import verify_checksums
  prefix = _private_tmpfs_prefix()
  if prefix is None:
    pytest.skip("this machine lets no process mount a tmpfs (no root, no user namespaces)")
  mnt, out = tmp_path / "mnt", tmp_path / "out"
  mnt.mkdir(), out.mkdir()
  script = ('mount -t tmpfs -o size=10m tmpfs "$1" || exit 99; '
            '"$2" -m launch.main --config=configs/tiny_train.py --workdir="$1/run" --config.total_steps=4 '
            '--config.checkpoint_every=2 --config.progress=False 2> "$3/stderr"; echo $? > "$3/rc"; '
            'cp -r "$1/run" "$3/run"')
  subprocess.run(prefix + ["sh", "-c", script, "sh", str(mnt), sys.executable, str(out)], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  stderr = (out / "stderr").read_text()
  assert int((out / "rc").read_text()) == 1, stderr
  assert "Traceback" not in stderr, stderr
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith("error: cannot write checkpoint step 4 to "), stderr
  assert "not enough space" in errors[0] and "Intact checkpoints: [2]" in errors[0], errors[0]
  assert "resumes from step 2" in errors[0]
  ckpts = out / "run" / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["2"]  # the partial step-4 write was removed
  verify_checksums(str(ckpts / "2"))
  restored = final_params(str(out / "run"), config())
  assert np.isfinite(np.concatenate([np.ravel(x) for x in jax_leaves(restored)])).all()


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)
