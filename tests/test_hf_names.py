"""`vlm_jax.hf_names`: our parameter paths -> Hugging Face tensor names, checked against what
transformers' `save_pretrained` writes for a tiny LLaMA (untied and tied) and a tiny LLaVA."""

import json

import numpy as np
import pytest
import transformers
from flax import traverse_util
from safetensors.numpy import load_file

import vlm_jax
from tests import hf_reference as ref
from vlm_jax.interop import ARCHITECTURES


def llava_config():
  return transformers.LlavaConfig(
      vision_config=ref.tiny_vision_config("clip").to_dict(), text_config=ref.tiny_lm_config("llama").to_dict(),
      image_token_index=96, vision_feature_select_strategy="default", vision_feature_layer=-2,
      image_seq_length=16)


CASES = {
    "llama": (transformers.LlamaForCausalLM, lambda: ref.tiny_lm_config("llama")),
    "llama-tied": (transformers.LlamaForCausalLM, lambda: ref.tiny_lm_config("llama", tie_word_embeddings=True)),
    "llava": (transformers.LlavaForConditionalGeneration, llava_config),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
  """(folder, model, params, the tensors save_pretrained wrote) of one tiny random model."""
  cls, config = CASES[request.param]
  _, folder = ref.build(cls, config(), tmp_path_factory.mktemp(request.param))
  model, params = vlm_jax.from_hf(folder)
  return folder, model, params, load_file(f"{folder}/model.safetensors")


def as_ours(path: str, tensor: np.ndarray) -> np.ndarray:
  """A Hugging Face tensor in our layout: a linear weight [out, in] is our kernel [in, out]
  transposed, a conv weight OIHW our HWIO kernel; the rest is the same array."""
  if path.endswith("kernel"):
    return tensor.T if tensor.ndim == 2 else tensor.transpose(2, 3, 1, 0)
  return tensor


def test_every_written_tensor_is_named_exactly_once(saved):
  folder, model, _, tensors = saved
  with open(f"{folder}/config.json") as f:
    arch = ARCHITECTURES[json.load(f)["architectures"][0]]
  tied = getattr(getattr(model.config, "text", model.config), "tie_embeddings")
  written = [n for n in tensors if not n.endswith(arch.ignorable) and not (tied and n.endswith("lm_head.weight"))]
  names = vlm_jax.hf_names(model)
  assert sorted(names.values()) == sorted(written)  # a list: a name given twice fails too
  assert tied == ("lm_head/kernel" not in names and "lm/lm_head/kernel" not in names)


def test_each_name_holds_that_parameter(saved):
  """from_hf's parameters equal the tensors hf_names points at (layouts as in its docstring)."""
  _, model, params, tensors = saved
  names = vlm_jax.hf_names(model)
  flat = traverse_util.flatten_dict(params, sep="/")
  assert set(names) == set(flat)
  for path, name in names.items():
    np.testing.assert_array_equal(np.asarray(flat[path]), as_ours(path, tensors[name]), err_msg=path)
  prefix, hf_prefix = ("lm/", "language_model.") if "lm" in params else ("", "")
  assert names[f"{prefix}embed/embedding"] == f"{hf_prefix}model.embed_tokens.weight"
  assert names[f"{prefix}layers_1/q/kernel"] == f"{hf_prefix}model.layers.1.self_attn.q_proj.weight"


def test_scanned_layers_are_named_as_the_unscanned_tree(saved):
  """Layer i of a scanned `layers/<rest>` is the tensor named for `layers_{i}/<rest>`."""
  folder, model, _, tensors = saved
  scanned, params = vlm_jax.from_hf(folder, scan_layers=True)
  names = vlm_jax.hf_names(scanned)
  assert names == vlm_jax.hf_names(model)
  prefix = "lm/" if "lm" in params else ""
  stacked = traverse_util.flatten_dict((params["lm"] if prefix else params)["layers"], sep="/")
  for rest, value in stacked.items():
    for i in range(value.shape[0]):
      path = f"{prefix}layers_{i}/{rest}"
      np.testing.assert_array_equal(np.asarray(value[i]), as_ours(path, tensors[names[path]]), err_msg=path)
