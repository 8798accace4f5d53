"""Jobs that fail early and clearly, never silently or after minutes of work ("Nothing lost,
nothing silently wrong"): prune arguments, finished prune / repair outputs, non-finite weights,
broken soup ingredients and Hugging Face folders, launch.main's arguments, tpu_pod.sh's rm -rf."""

import json
import os
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

import vlm_jax
from configs import prune as prune_config
from tests.test_soups import save_run
from tests.test_sparse_training import _lm_and_masks, _lm_config, _train_config
from vlm_jax import CheckpointError, soups
from vlm_jax.models.build import build_model
from vlm_jax.models.params import init_params
from vlm_jax.sparsity import jobs
from vlm_jax.train.checkpoint import save_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Loaded(Exception):
  """Raised by a stand-in for loading or training: the job got past its checks."""


def _refuse(*_, **__):
  raise Loaded()


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
  """A tiny LM's dense parameters as an Orbax run: the prune job's `init=checkpoint:`."""
  path = str(tmp_path_factory.mktemp("dense"))
  save_params(path, jax.device_get(init_params(build_model(_lm_config()), jax.random.key(0))))
  return path


def _prune_config(arg: str, init: str) -> ml_collections.ConfigDict:
  c = prune_config.get_config(arg)
  with c.unlocked():
    c.init = init
    c.model = ml_collections.ConfigDict(_lm_config())
    c.progress = False
  return c


# ----------------------------------------------------------------------------- 12. prune arguments

@pytest.mark.parametrize("arg, message", [
    ("method=pruneit", "unknown pruning method 'pruneit'"),
    ("pattern=3:2", "0 < N < M, got '3:2'"),
    ("method=sparsegpt,pattern=variant", "Wanda's"),
    ("method=magnitude,lm=1.0", r"ratios.lm = 1.0: a sparsity ratio must be in \[0, 1\)"),
    ("method=magnitude,vision=-0.1", r"ratios.vision = -0.1: .* \[0, 1\)"),
    ("method=magnitude,pattern=2:4,lm=0.3", "pattern 2:4 prunes exactly 0.5"),
    ("method=wanda", "name a data set"),
    ("method=sparsegpt,source=some_set", "needs a tokenizer: pass tokenizer="),
])
def test_prune_arguments_are_refused_before_the_model_loads(monkeypatch, tmp_path, arg, message):
  monkeypatch.setattr(jobs, "load_model", _refuse)
  with pytest.raises(ValueError, match=message):
    jobs.prune(_prune_config(arg, "checkpoint:/nowhere"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_prune_override_ratio_and_init_are_checked(monkeypatch, tmp_path):
  monkeypatch.setattr(jobs, "load_model", _refuse)
  c = _prune_config("method=magnitude", "checkpoint:/nowhere")
  c.prune.overrides = [("lm/layers_0/.*", 1.5)]
  with pytest.raises(ValueError, match=r"overrides 'lm/layers_0/\.\*' = 1.5"):
    jobs.prune(c, str(tmp_path / "out"))
  with pytest.raises(ValueError, match="config.init must be"):
    jobs.prune(_prune_config("method=magnitude", ""), str(tmp_path / "out"))


def test_calibration_takes_the_tokenizer_of_the_hf_folder(monkeypatch, tmp_path):
  monkeypatch.setattr(jobs, "load_model", _refuse)
  folder = tmp_path / "hf"
  folder.mkdir()
  c = _prune_config("method=wanda,source=some_set", f"hf:{folder}")
  with pytest.raises(ValueError, match="has no tokenizer files"):
    jobs.prune(c, str(tmp_path / "out"))
  (folder / "tokenizer_config.json").write_text("{}")
  with pytest.raises(Loaded):  # past the checks, with the folder as the tokenizer
    jobs.prune(c, str(tmp_path / "out"))
  assert c.data.tokenizer == str(folder)


# ----------------------------------------------------------------------------- 13. finished outputs

def test_a_finished_prune_is_reported_not_redone(monkeypatch, dense, tmp_path, capsys):
  c = _prune_config("method=magnitude", f"checkpoint:{dense}")
  out = str(tmp_path / "out")
  rows = jobs.prune(c, out)
  with monkeypatch.context() as m:
    m.setattr(jobs, "load_model", _refuse)
    again = jobs.prune(c, out)
  assert json.loads(json.dumps(rows)) == again
  assert "already done in" in capsys.readouterr().out
  c.overwrite = True  # redo: the finished output moves aside, nothing is deleted
  assert jobs.prune(c, out) == rows
  assert os.path.exists(os.path.join(out + ".old", "sparsity.json"))
  assert os.path.exists(os.path.join(out, "sparsity.json"))


def test_a_finished_repair_is_reported_not_redone(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(jobs, "train", _refuse)
  run = tmp_path / "run"
  (run / "merged").mkdir(parents=True)
  rows = [{"name": "layers_0/q/kernel", "sparsity": 0.5}]
  (run / "merged" / "sparsity.json").write_text(json.dumps(rows))
  c = ml_collections.ConfigDict(_train_config(str(run), str(tmp_path / "masks"), "masked"))
  c.job = "repair"
  summary = jobs.repair(c, str(run))
  assert summary["status"] == "finished" and summary["sparsity"] == rows
  assert "already done in" in capsys.readouterr().out
  with c.unlocked():
    c.export_hf = str(tmp_path / "hf")  # asked for, not written: not finished
  with pytest.raises(Loaded):
    jobs.repair(c, str(run))
  with c.unlocked():
    c.export_hf = ""
    c.overwrite = True
  with pytest.raises(Loaded):
    jobs.repair(c, str(run))
  assert (tmp_path / "run.old" / "merged" / "sparsity.json").exists() and not run.exists()


@pytest.mark.slow  # a real repair: ~10 s; the default suite checks the rule on a finished workdir
def test_a_real_repair_rerun_is_reported_not_redone(monkeypatch, tmp_path, capsys):
  model, dense_params, pruned, masks = _lm_and_masks("2:4")
  masks_dir, dense_dir, run = str(tmp_path / "prune"), str(tmp_path / "dense"), str(tmp_path / "run")
  jobs.write_outputs(masks_dir, model, pruned, masks)
  save_params(dense_dir, jax.device_get(dense_params))
  c = ml_collections.ConfigDict(_train_config(run, masks_dir, "sparse_lora", steps=2))
  c.job, c.init = "repair", f"checkpoint:{dense_dir}"
  first = jobs.repair(c, run)
  assert os.path.isdir(os.path.join(run, "adapters"))
  monkeypatch.setattr(jobs, "train", _refuse)
  again = jobs.repair(c, run)
  assert again["sparsity"] == json.loads(json.dumps(first["sparsity"]))
  assert "already done in" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 4. non-finite weights

def test_a_soup_with_nan_is_not_written(tmp_path):
  runs = [save_run(tmp_path / f"r{i}", {1: {"w": np.array([1.0, v], np.float32)}}) for i, v in
          enumerate([2.0, np.inf])]
  with pytest.raises(ValueError, match=r"parameter 'a/w' has 1 non-finite value"):
    soups.save({"a": {"w": np.array([np.nan, 1.0], np.float32)}, "b": np.zeros(2, np.int32)}, runs[0],
               str(tmp_path / "soup"))
  assert not (tmp_path / "soup").exists()
  from configs import soup as soup_config
  with pytest.raises(ValueError, match="refusing to write the soup .*'w'"):
    soups.jobs.soup(soup_config.get_config(f"kind=uniform,ingredients={';'.join(runs)}"), str(tmp_path / "job"))
  assert not (tmp_path / "job" / "soup").exists() and not (tmp_path / "job" / "soup.json").exists()


def test_repair_refuses_non_finite_merged_weights(monkeypatch, tmp_path):
  model, _, pruned, masks = _lm_and_masks("2:4")
  masks_dir = str(tmp_path / "prune")
  jobs.write_outputs(masks_dir, model, pruned, masks)
  trained = jax.tree.map(np.array, jax.device_get(pruned))
  trained["layers_1"]["down"]["kernel"][0, :] = np.nan  # a row holds kept weights whatever the mask
  run = str(tmp_path / "run")
  monkeypatch.setattr(jobs, "train", lambda *_, **__: {
      "status": "finished", "workdir": run, "model": model, "state": types.SimpleNamespace(params=trained)})
  c = ml_collections.ConfigDict(_train_config(run, masks_dir, "masked"))
  with pytest.raises(ValueError, match=r"refusing to write .*'merged/layers_1/down/kernel' has \d+ non-finite"):
    jobs.repair(c, run)
  assert not os.path.exists(os.path.join(run, "merged"))


def test_prune_refuses_non_finite_weights(dense, tmp_path):
  from vlm_jax.train.checkpoint import read_params
  params = read_params(dense)
  params["norm"]["scale"][1] = np.inf
  bad = str(tmp_path / "bad")
  save_params(bad, params)
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=r"'norm/scale' has 1 non-finite"):
    jobs.prune(_prune_config("method=magnitude", f"checkpoint:{bad}"), str(out))
  assert not (out / "checkpoints").exists() and not (out / "sparsity.json").exists()


# ----------------------------------------------------------------------------- 14. clear errors

_TRUNCATED_SOUP = """
import os, sys
import numpy as np
from vlm_jax import soups
from tests.test_soups import save_run
d = sys.argv[1]
tree = lambda s: {f"l{i}": np.random.default_rng(s).normal(size=(128, 512)).astype(np.float32) for i in range(40)}
a, b = save_run(os.path.join(d, "a"), {1: tree(0)}), save_run(os.path.join(d, "b"), {1: tree(1)})
step = os.path.join(b, "checkpoints", "1")
if os.path.exists(os.path.join(step, "checksums.json")):
  os.remove(os.path.join(step, "checksums.json"))  # a checkpoint written without checksums
files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step, "params")) for f in fs]
big = max(files, key=os.path.getsize)
open(big, "r+b").truncate(os.path.getsize(big) // 2)
soups.uniform_soup([a, b])
"""


def _python(args, **kw):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **kw.pop("env", {})}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_a_truncated_ingredient_is_one_clear_error(tmp_path):
  got = _python(["-c", _TRUNCATED_SOUP, str(tmp_path)], cwd=ROOT)
  assert got.returncode != 0
  assert "Event loop is closed" not in got.stderr  # Orbax's orphaned reads, dozens of tracebacks before
  last = got.stderr.strip().splitlines()[-1]
  assert last.startswith("ValueError: soup ingredient ") and "cannot read the Orbax checkpoint" in last
  assert got.stderr.count("Traceback") == 1


def test_a_pickle_only_folder_says_why(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(CheckpointError, match="pytorch_model.bin: no safetensors; pickle files are not loaded"):
    vlm_jax.from_hf(tmp_path)


def test_broken_json_names_the_file(tmp_path):
  (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
  with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
    vlm_jax.from_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
  (tmp_path / "model.safetensors.index.json").write_text("{")
  with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not valid JSON"):
    vlm_jax.from_hf(tmp_path)


def test_main_refuses_no_steps_and_a_missing_config_in_one_line(tmp_path):
  run = _python(["-m", "launch.main", f"--config={ROOT}/configs/tiny_train.py", "--config.total_steps=0",
                 f"--workdir={tmp_path / 'run'}"], cwd=str(tmp_path))
  assert run.returncode != 0 and run.stderr.strip().splitlines()[-1] == \
      "config.total_steps is 0; it must be at least 1"
  assert not (tmp_path / "run").exists()
  run = _python(["-m", "launch.main", f"--config={tmp_path}/nope.py", f"--workdir={tmp_path / 'run'}"],
                cwd=str(tmp_path))
  assert run.returncode != 0 and "Traceback" not in run.stderr
  assert run.stderr.strip().splitlines()[-1] == (
      f"cannot load the config file '{tmp_path}/nope.py': [Errno 2] No such file or directory: '{tmp_path}/nope.py'")


def test_main_says_a_mistyped_config_key_in_one_line(tmp_path):
  run = _python(["-m", "launch.main", f"--config={ROOT}/configs/tiny_train.py", "--config.optim.lrr=3",
                 f"--workdir={tmp_path / 'run'}"], cwd=str(tmp_path))
  assert run.returncode == 1 and "Traceback" not in run.stderr
  assert run.stderr.strip().splitlines()[-2:] == ["config error: 'lrr'", 'Did you mean "lr" instead of "lrr"?']
  assert not (tmp_path / "run").exists()


def test_main_expands_a_tilde_workdir(tmp_path):
  ingredient = save_run(tmp_path / "r", {1: {"w": np.ones(2, np.float32)}})
  (tmp_path / "home").mkdir()
  run = _python(["-m", "launch.main", f"--config={ROOT}/configs/soup.py:ingredients={ingredient}",
                 "--workdir=~/soup"], cwd=str(tmp_path), env={"HOME": str(tmp_path / "home")})
  assert run.returncode == 0, run.stderr[-2000:]
  assert (tmp_path / "home" / "soup" / "soup.json").exists() and not (tmp_path / "~").exists()


# ----------------------------------------------------------------------------- 15. tpu_pod.sh

def _check_remote(value: str) -> subprocess.CompletedProcess:
  script = f'source {ROOT}/launch/tpu_pod.sh; check_remote "$1" && remote_word "$1"'
  return subprocess.run(["bash", "-c", script, "_", value], capture_output=True, text=True)


@pytest.mark.parametrize("value", ["", "/", "//", "~", "~/", "~bob", "~bob/x", "/home/alice/", "/root", "/usr",
                                   "/tmp/..", "a b", "$HOME", "x;rm -rf /", "-rf", "./x/.."])
def test_tpu_pod_refuses_a_dangerous_remote(value):
  got = _check_remote(value)
  assert got.returncode != 0 and "refusing REMOTE" in got.stderr and not got.stdout


@pytest.mark.parametrize("value, word", [("~/vlm_jax", '"$HOME"/vlm_jax'), ("/mnt/code/vlm_jax", "/mnt/code/vlm_jax"),
                                         ("code/vlm_jax", "code/vlm_jax")])
def test_tpu_pod_quotes_a_safe_remote(value, word):
  got = _check_remote(value)
  assert got.returncode == 0 and got.stdout == word


def test_tpu_pod_stops_before_touching_any_worker(tmp_path):
  calls = tmp_path / "calls"
  (tmp_path / "gcloud").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
  (tmp_path / "gcloud").chmod(0o755)
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU": "t", "ZONE": "z", "WORKDIR": "/w",
         "REMOTE": "/"}
  got = subprocess.run(["bash", f"{ROOT}/launch/tpu_pod.sh", "--config=c.py"], capture_output=True, text=True,
                       env=env)
  assert got.returncode == 2 and "refusing REMOTE='/'" in got.stderr
  assert not calls.exists()
