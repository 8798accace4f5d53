"""`from_hf` on broken checkpoints: a clear error naming the tensor or file, never a partial load."""

import json
import os
import shutil

import pytest
import transformers
from safetensors.numpy import load_file, save_file

import vlm_jax
from tests import hf_reference as ref
from vlm_jax import CheckpointError


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
  _, folder = ref.build(transformers.LlamaForCausalLM, ref.tiny_lm_config("llama"),
                        tmp_path_factory.mktemp("llama"))
  return folder


def edited_copy(src, dst, edit):
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)
  return dst


def test_missing_tensor_is_named(llama_folder, tmp_path):
  folder = edited_copy(llama_folder, tmp_path / "c", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*layers_1/up/kernel"):
    vlm_jax.from_hf(folder)


def test_wrong_shape_names_tensor_and_both_shapes(llama_folder, tmp_path):
  def shrink(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:12]
  folder = edited_copy(llama_folder, tmp_path / "c", shrink)
  with pytest.raises(CheckpointError) as e:
    vlm_jax.from_hf(folder)
  msg = str(e.value)
  assert "model.layers.0.self_attn.k_proj.weight" in msg and "(12, 48)" in msg and "(48, 24)" in msg


def test_unknown_architecture(llama_folder, tmp_path):
  shutil.copytree(llama_folder, tmp_path / "c")
  cfg_path = tmp_path / "c" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["architectures"] = ["MambaForCausalLM"]
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="unknown architecture.*MambaForCausalLM"):
    vlm_jax.from_hf(tmp_path / "c")


def test_truncated_file_is_named(llama_folder, tmp_path):
  shutil.copytree(llama_folder, tmp_path / "c")
  path = tmp_path / "c" / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="model.safetensors"):
    vlm_jax.from_hf(tmp_path / "c")


def test_checkpoint_of_another_model(llama_folder, tmp_path):
  """Extra tensors mean the config and the weights disagree: refuse, naming them."""
  def add(t):
    t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"]
  folder = edited_copy(llama_folder, tmp_path / "c", add)
  with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
    vlm_jax.from_hf(folder)


def test_missing_folder_and_missing_weights(tmp_path):
  with pytest.raises(CheckpointError, match="no config.json"):
    vlm_jax.from_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
  with pytest.raises(CheckpointError, match="neither model.safetensors"):
    vlm_jax.from_hf(tmp_path)


def test_sharded_checkpoint_with_a_missing_shard(llama_folder, tmp_path):
  model, params = vlm_jax.from_hf(llama_folder)
  vlm_jax.to_hf(model, params, tmp_path / "sharded", max_shard_bytes=20_000)
  shards = sorted(p for p in os.listdir(tmp_path / "sharded") if p.endswith(".safetensors"))
  assert len(shards) > 1
  _, again = vlm_jax.from_hf(tmp_path / "sharded")  # reads back
  os.remove(tmp_path / "sharded" / shards[-1])
  with pytest.raises(CheckpointError, match=shards[-1]):
    vlm_jax.from_hf(tmp_path / "sharded")


def test_unrepresentable_config_is_refused(llama_folder, tmp_path):
  shutil.copytree(llama_folder, tmp_path / "c")
  cfg_path = tmp_path / "c" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="yarn"):
    vlm_jax.from_hf(tmp_path / "c")


@pytest.mark.parametrize("field, value, message", [("stem", (8,), "convolutional stem"),
                                                   ("pool", "mean_max", "pool='mean_max'")])
def test_a_tower_hugging_face_lacks_does_not_export(tmp_path, field, value, message):
  import jax
  from configs import models as presets
  from vlm_jax.models import build_model, init_params
  config = presets.get_config("tiny")
  config.vision[field] = value
  model = build_model(config)
  params = init_params(model, jax.random.key(0))
  with pytest.raises(CheckpointError, match=message):
    vlm_jax.to_hf(model, params, str(tmp_path / "out"))
  assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_text_tower_pooling_the_last_token_does_not_export(tmp_path):
  import jax
  from vlm_jax.models import build_model, init_params
  model = build_model(dict(kind="contrastive", projection_dim=16,
                           vision=dict(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32),
                           text=dict(vocab_size=64, width=16, depth=1, num_heads=2, mlp_dim=32, max_len=8,
                                     pool="last")))
  params = init_params(model, jax.random.key(0))
  with pytest.raises(CheckpointError, match="pool='last'"):
    vlm_jax.to_hf(model, params, str(tmp_path / "out"))
  assert not (tmp_path / "out" / "model.safetensors").exists()
