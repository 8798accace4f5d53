"""The pod configs (configs/pods/llava15.py): each `model=` builds the shapes its README row names, and a
bad argument fails in `get_config` with the fix, not inside a TPU compile. No compile here: the
compiles are tests/test_tpu_aot.py's (small) and the README's (pod-sized)."""

import functools

import pytest

from configs.pods import llava15
from vlm_jax.models import build_model, count_params
from vlm_jax.models.params import abstract_params

LLAVA15_7B = 7_063_427_072  # llava-hf/llava-1.5-7b-hf model page
LLAVA15_13B = 13_351_494_656  # the README's 13B row
VILA15_3B = 3_132_911_984  # the `vila15_3b` preset (tests/test_presets.py checks its parts against HF)


@functools.lru_cache(maxsize=None)
def params(arg: str) -> int:
  return count_params(abstract_params(build_model(llava15.get_config(arg).model)))


def test_default_is_the_7b_stage_1_recipe():
  config = llava15.get_config()
  assert config.is_locked
  assert (config.data.global_batch_size, config.data.seq_len) == (256, 2048)
  assert dict(config.mesh) == dict(data=1, fsdp=-1, tensor=1, dcn_data=1)
  assert config.optim.groups[-1] == (".*", None)  # the tower frozen
  assert params("") == LLAVA15_7B


@pytest.mark.parametrize("arg, layers, width, tower, projector, count", [
    ("model=llava15_13b", 40, 5120, 1024, "mlp2x_gelu", LLAVA15_13B),
    ("model=vila15_3b,data=2", 32, 2560, 1152, "downsample", VILA15_3B),
])
def test_models_keep_the_recipe(arg, layers, width, tower, projector, count):
  model = llava15.get_config(arg).model
  assert (model.text.num_layers, model.text.embed_dim, model.vision.width, model.projector) == (
      layers, width, tower, projector)
  assert (model.text.scan_layers, model.text.remat, model.text.dtype, model.vision.dtype) == (
      True, "full", "bfloat16", "bfloat16")
  assert params(arg) == count


def test_long_rows_grow_max_position():
  config = llava15.get_config("seq_len=8192")
  assert config.data.seq_len == config.model.text.max_position == 8192
  assert llava15.get_config("seq_len=4096").model.text.max_position == 4096


def test_v4_slice_and_data_split():
  config = llava15.get_config("chips=64,data=4")
  assert config.data.global_batch_size == 64 and config.mesh.data == 4


@pytest.mark.parametrize("arg, message", [
    ("model=vila15_3b", r"vision width 1152 is not divisible by fsdp=256 .* set data=2 \(fsdp=128\)"),
    ("chips=64,data=3", "data=3 must be a positive divisor of chips=64"),
    ("model=llava15_70b", "model must be one of llava15_7b, llava15_13b, vila15_3b"),
    ("stage=3", "stage 1 or 2"),
    ("lm=13b", "unknown config argument 'lm=13b'"),
])
def test_bad_arguments_say_what_to_do(arg, message):
  with pytest.raises(ValueError, match=message):
    llava15.get_config(arg)
