"""The training engine on CPU: learning, sharding invariance, multi-host, resume, preemption, freezing, NaN."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny_train
from vlm_jax.data.synthetic import SyntheticBatches
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.checkpoint import restore_params
from vlm_jax.train.loop import train
from vlm_jax.train.setup import param_shapes_and_shardings
from vlm_jax.parallel import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**overrides):
  c = tiny_train.get_config()
  with c.unlocked():
    c.progress = False
    c.update_from_flattened_dict(overrides)  # keys like "optim.lr"
  return c


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def abstract_of(like_config):
  """The config's parameters as ShapeDtypeStructs on one device: what a checkpoint restores into."""
  from vlm_jax.models import build_model
  from vlm_jax.train.checkpoint import abstract_like
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  abstract, shardings = param_shapes_and_shardings(build_model(like_config.model), mesh, like_config.rules)
  return abstract_like(abstract, shardings)


def final_params(workdir, like_config):
  return restore_params(workdir, abstract_of(like_config))


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
  """20 steps on 8 devices, the reference the other tests (here and in test_faults) compare with."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train(config(checkpoint_every=5), workdir)
  return workdir


@pytest.mark.slow  # ~15 s; learning through the loop is also what test_vila's quick main job shows
def test_loss_falls_on_a_fixed_batch(tmp_path):
  c = config(total_steps=30, **{"data.repeat_first": True, "optim.lr": 3e-3, "optim.warmup_frac": 0.0})
  summary = train(c, str(tmp_path))
  assert summary["last loss"] < 0.5 * summary["first loss"], summary


def test_one_device_and_eight_sharded_devices_agree(straight_run, tmp_path):
  sharded = config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  train(sharded, str(tmp_path / "8"))
  train(config(), str(tmp_path / "1"), devices=jax.devices()[:1])
  one, eight = losses(tmp_path / "1"), losses(tmp_path / "8")
  assert sorted(one) == list(range(1, 21))
  np.testing.assert_allclose([eight[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=1e-5)


@pytest.mark.slow  # two JAX processes through jax.distributed: ~40 s
def test_two_processes_match_one_process(tmp_path):
  """2 processes x 2 devices through jax.distributed on 127.0.0.1 == 1 process x 4 devices."""
  args = [f"--config={ROOT}/configs/tiny_train.py", f"--workdir={tmp_path / 'multi'}",
          "--config.progress=False", "--config.mesh.fsdp=2"]
  env = {**os.environ, "XLA_FLAGS": ""}
  code = subprocess.run([sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=2", "--", *args],
                        cwd=ROOT, env=env, timeout=600).returncode
  assert code == 0
  train(config(**{"mesh.fsdp": 2}), str(tmp_path / "single"), devices=jax.devices()[:4])
  multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
  assert sorted(multi) == list(range(1, 21))
  np.testing.assert_allclose([multi[s] for s in sorted(single)], [single[s] for s in sorted(single)], rtol=1e-5)


@pytest.mark.slow  # two launcher processes: ~30 s; SIGTERM resume runs in the default suite
def test_sigkill_then_same_command_resumes_bit_identically(straight_run, tmp_path):
  workdir = str(tmp_path)
  cmd = [sys.executable, "-m", "launch.main", f"--config={ROOT}/configs/tiny_train.py", f"--workdir={workdir}",
         "--config.progress=False", "--config.checkpoint_every=5",
         "--config.debug.preempt_at_step=12", "--config.debug.preempt_signal=SIGKILL"]
  first = subprocess.run(cmd, cwd=ROOT, timeout=600)
  assert first.returncode == -signal.SIGKILL
  second = subprocess.run(cmd, cwd=ROOT, timeout=600)
  assert second.returncode == 0
  c = config()
  assert_trees_equal(final_params(workdir, c), final_params(straight_run, c))


def test_sigterm_saves_a_restorable_checkpoint_and_resume_matches(straight_run, tmp_path):
  c = config(checkpoint_every=5, **{"debug.preempt_at_step": 7})
  summary = train(c, str(tmp_path))
  assert summary["status"] == "preempted: saved step 7"
  params = final_params(str(tmp_path), c)  # the step-7 checkpoint restores
  assert jax.tree.leaves(params)
  train(c, str(tmp_path))  # the same command continues from step 7
  assert_trees_equal(final_params(str(tmp_path), c), final_params(straight_run, c))


def test_an_incomplete_checkpoint_is_skipped(straight_run, tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(straight_run, workdir)
  broken = os.path.join(workdir, "checkpoints", "25")
  shutil.copytree(os.path.join(workdir, "checkpoints", "20"), broken)
  for root, _, files in os.walk(os.path.join(broken, "params")):
    for f in files:
      open(os.path.join(root, f), "w").close()  # a write cut off midway
  summary = train(config(total_steps=22), workdir)
  assert summary["steps"] == "20 -> 22 of 22"


def test_restore_onto_another_mesh_shape(straight_run, tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(straight_run, workdir)
  summary = train(config(total_steps=22, **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4}), workdir)
  assert summary["steps"] == "20 -> 22 of 22"
  np.testing.assert_allclose(final_params(workdir, config())["projector"]["linear_1"]["kernel"].shape,
                             (64, 128))


def test_frozen_parameters_are_bit_identical(tmp_path):
  c = config(total_steps=5, **{"optim.groups": [("projector/.*", 1.0), (".*", None)]})
  summary = train(c, str(tmp_path))
  from vlm_jax.models import build_model
  model = build_model(c.model)
  initial = jax.jit(lambda r: model.init(r, *__import__("vlm_jax.models.params", fromlist=["x"]).example_inputs(model)))(
      jax.random.key(c.seed))["params"]
  import flax.linen as nn
  initial = nn.meta.unbox(initial)
  after = jax.device_get(summary["state"].params)
  assert_trees_equal(after["vision"], initial["vision"])
  assert_trees_equal(after["lm"], initial["lm"])
  assert not np.array_equal(after["projector"]["linear_1"]["kernel"], initial["projector"]["linear_1"]["kernel"])
  # frozen parameters have no optimiser state at all
  opt_leaves = jax.tree.leaves(summary["state"].opt_state)
  n_projector = sum(x.size for x in jax.tree.leaves(initial["projector"]))
  assert sum(x.size for x in opt_leaves if x.ndim) == 2 * n_projector


def test_nan_loss_stops_with_the_step_and_batch(tmp_path, monkeypatch):
  original = SyntheticBatches.batch

  def poisoned(self, i):
    batch = original(self, i)
    if i == 3:
      batch["images"] = batch["images"] * np.nan
    return batch

  monkeypatch.setattr(SyntheticBatches, "batch", poisoned)
  with pytest.raises(FloatingPointError, match=r"step 3 .*synthetic/3/0"):
    train(config(checkpoint_every=2), str(tmp_path))
  from vlm_jax.train.checkpoint import Checkpointer
  assert max(Checkpointer(str(tmp_path / "checkpoints")).steps()) == 2  # nothing past the NaN saved


def test_groups_must_cover_every_parameter():
  with pytest.raises(ValueError, match="matches no optim.groups pattern"):
    optim_lib.path_labels({"lm": {"q": {"kernel": 0}}, "vision": {"x": {"bias": 0}}}, [("lm/.*", 1.0)])


def test_weight_decay_skips_norms_and_biases():
  assert optim_lib.decays("lm/layers_0/q/kernel")
  assert not optim_lib.decays("lm/layers_0/q/bias")
  assert not optim_lib.decays("lm/layers_0/attn_norm/scale")
  assert not optim_lib.decays("vision/post_norm/bias")


def test_grad_accumulation_equals_the_full_batch(tmp_path):
  """Same losses and gradient norms through the whole loop; the same update through the step under SGD."""
  train(config(total_steps=3), str(tmp_path / "a"), devices=jax.devices()[:1])
  train(config(total_steps=3, grad_accum=4), str(tmp_path / "b"), devices=jax.devices()[:1])
  rows = [[json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")] for d in "ab"]
  for key in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose([r[key] for r in rows[0]], [r[key] for r in rows[1]], rtol=1e-5)

  import optax
  from vlm_jax.models import build_model, init_params
  from vlm_jax.train.step import TrainState, make_train_step
  c = config()
  model = build_model(c.model)
  params = init_params(model, jax.random.key(0))
  labels = optim_lib.path_labels(params, [(".*", 1.0)])
  tx = optax.sgd(0.5)  # linear in the gradient: the updates must agree to float noise
  batch = {k: v for k, v in SyntheticBatches(global_batch=8, seq_len=48, vocab_size=512, image_size=32,
                                             tokens_per_image=16, image_token_id=511).batch(0).items() if k != "id"}
  results = []
  for accum in (1, 4):
    step = jax.jit(make_train_step(model, tx, labels, lambda s: 0.5, grad_accum=accum))
    trainable, _ = optim_lib.split(params, labels)
    state = TrainState(np.int32(0), params, tx.init(trainable), jax.random.key_data(jax.random.key(0)))
    results.append(step(state, batch)[0].params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), *results)


def test_metrics_go_to_jsonl_and_tensorboard(straight_run):
  rows = [json.loads(l) for l in open(os.path.join(straight_run, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, 21))
  assert {"loss", "accuracy", "grad_norm", "param_norm", "lr", "tokens_per_s"} <= set(rows[0])
  events = [f for _, _, fs in os.walk(os.path.join(straight_run, "tensorboard")) for f in fs]
  assert any(f.startswith("events.out.tfevents") for f in events)
  assert json.load(open(os.path.join(straight_run, "config.json")))["total_steps"] == 20


def test_init_from_a_hugging_face_folder(tmp_path):
  """`init: hf:<folder>` loads the weights (stacked when the config scans layers) or names the mismatch."""
  import vlm_jax
  from vlm_jax.models import build_model, init_params
  from vlm_jax.train.init_from import initial_params
  c = config()
  model = build_model(c.model)
  params = init_params(model, jax.random.key(3))
  vlm_jax.to_hf(model, params, str(tmp_path / "hf"))
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  with c.unlocked():
    c.model.text.scan_layers = True
  scanned = build_model(c.model)
  abstract, shardings = param_shapes_and_shardings(scanned, mesh, c.rules)
  loaded = initial_params(f"hf:{tmp_path / 'hf'}", scanned, abstract, shardings, seed=0)
  np.testing.assert_array_equal(loaded["lm"]["layers"]["q"]["kernel"][1], params["lm"]["layers_1"]["q"]["kernel"])
  with c.unlocked():
    c.model.text.num_layers = 3
  other = build_model(c.model)
  abstract, shardings = param_shapes_and_shardings(other, mesh, c.rules)
  with pytest.raises(ValueError, match="does not fit config.model: parameter 'lm/layers/"):
    initial_params(f"hf:{tmp_path / 'hf'}", other, abstract, shardings, seed=0)
