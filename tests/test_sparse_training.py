"""Training a pruned model: masked updates, LoRA / SparseLoRA, distillation, repair and export."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from vlm_jax.train.config import default_config
from vlm_jax import sparsity
from vlm_jax.models.build import build_model
from vlm_jax.models.params import init_params
from vlm_jax.peft import lora as lora_lib
from vlm_jax.sparsity import masks as masks_lib
from vlm_jax.sparsity import repair as repair_lib
from vlm_jax.sparsity.repair import repair_groups, sparse_config
from vlm_jax.train import step as step_lib


def _lm_and_masks(pattern="row", ratio=0.5):
  model = build_model(_lm_config())
  params = init_params(model, jax.random.key(0))
  pruned, masks = sparsity.prune(model, params, method="magnitude", pattern=pattern, ratios={"lm": ratio})
  return model, params, pruned, masks


def _lm_config():
  c = models.preset("tiny").text.to_dict()
  return {"kind": "lm", **c}


def _batch(b=4, l=12, vocab=512, seed=0):
  ids = np.random.default_rng(seed).integers(0, vocab, (b, l)).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}


def test_sparselora_merge_is_exactly_as_sparse_and_equals_the_masked_forward():
  model, dense, _, masks = _lm_and_masks()
  adapters = lora_lib.init(dense, [(".*", 4)], jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B != 0, so the adapters matter
  merged = lora_lib.merge(dense, adapters, masks, alpha=16.0)
  fm, fmerged, fdense = masks_lib.flat(masks), masks_lib.flat(merged), masks_lib.flat(dense)
  for path, m in fm.items():
    assert (np.asarray(fmerged[path])[~np.asarray(m)] == 0).all()
  # Hand formula for one kernel: (W + (α/r)·A·B) ⊙ M.
  path = "layers_0/q/kernel"
  a, b = masks_lib.flat(adapters)[f"{path}/a"], masks_lib.flat(adapters)[f"{path}/b"]
  want = (np.asarray(fdense[path]) + 16.0 / 4 * np.asarray(a) @ np.asarray(b)) * np.asarray(fm[path])
  np.testing.assert_allclose(np.asarray(fmerged[path]), want, rtol=1e-6, atol=1e-6)
  # The exported (merged) model's logits are the training-time forward's.
  batch = _batch()
  train_logits = step_lib.forward(model, lora_lib.merge(dense, adapters, masks, 16.0), batch)
  export_logits = model.apply({"params": jax.device_get(merged)}, batch["input_ids"]).logits
  np.testing.assert_array_equal(np.asarray(train_logits), np.asarray(export_logits))


def test_sparselora_forward_modes_match_hand_computations():
  """W = [[1, 2], [3, 4]], M keeps the diagonal, A = [[1], [2]], B = [[0.5, 1]], α = 2, r = 1.

  (α/r)·A·B = [[1, 2], [2, 4]]; only the sparse mode keeps M's zeros.
  """
  from vlm_jax import peft
  params = {"w": {"kernel": jnp.asarray([[1.0, 2.0], [3.0, 4.0]])}}
  masks = {"w": {"kernel": jnp.asarray([[True, False], [False, True]])}}
  adapters = {"w": {"kernel": {"a": jnp.asarray([[1.0], [2.0]]), "b": jnp.asarray([[0.5, 1.0]])}}}
  want = {"sparse": [[2.0, 0.0], [0.0, 8.0]],  # (W + ΔW) ⊙ M
          "non_sparse": [[2.0, 2.0], [2.0, 8.0]],  # W ⊙ M + ΔW
          "dense": [[2.0, 4.0], [5.0, 8.0]]}  # W + ΔW
  assert peft.MODES == tuple(want)
  for mode, kernel in want.items():
    got = np.asarray(peft.forward_kernels(params, adapters, masks, 2.0, mode)["w"]["kernel"])
    np.testing.assert_array_equal(got, kernel, err_msg=mode)
    assert np.array_equal(got == 0, ~np.asarray(masks["w"]["kernel"])) == (mode == "sparse"), mode
  np.testing.assert_array_equal(np.asarray(peft.merge(params, adapters, masks, 2.0)["w"]["kernel"]), want["sparse"])
  with pytest.raises(ValueError, match="forward mode"):
    peft.forward_kernels(params, adapters, masks, 2.0, "masked")


def test_kd_loss_matches_a_hand_computation():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
  batch = {"loss_mask": np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])}
  T = 2.0
  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  p, q = softmax(t[:, :-1] / T), softmax(s[:, :-1] / T)
  kl = (p * (np.log(p) - np.log(q))).sum(-1)
  want = (kl * batch["loss_mask"][:, 1:]).sum()
  got = repair_lib.kd_sum(jnp.asarray(s), jnp.asarray(t), batch, T)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_distillation_needs_sparselora():
  with pytest.raises(ValueError, match="dense teacher"):
    repair_lib.SparseTraining(lora_alpha=None, kd_weight=0.1)


def _train_config(workdir, masks_dir, mode, steps=6):
  c = default_config()
  c.model = _lm_config()
  c.total_steps = steps
  c.checkpoint_every = steps
  c.progress = False
  c.optim.lr = 1e-2
  c.optim.groups = repair_groups(mode)
  c.sparse = sparse_config(masks_dir, mode, kd=0.5 if mode == "sparse_lora" else 0.0)
  c.data = {"source": "synthetic", "global_batch_size": 8, "seq_len": 16}
  c.checkpoint.asynchronous = False
  return c


@pytest.mark.parametrize("mode", ["masked", "sparse_lora"])
def test_repair_keeps_pruned_weights_zero_and_exports_to_hf(tmp_path, mode):
  import ml_collections
  from vlm_jax.sparsity import jobs
  model, dense, pruned, masks = _lm_and_masks("2:4")
  masks_dir = str(tmp_path / "prune")
  jobs.write_outputs(masks_dir, model, pruned, masks)
  # The dense model the masks came from, as a run to start from.
  from vlm_jax.train.checkpoint import save_params
  save_params(str(tmp_path / "dense"), jax.device_get(dense))
  config = ml_collections.ConfigDict(_train_config(str(tmp_path / "run"), masks_dir, mode))
  with config.unlocked():
    config.init = f"checkpoint:{tmp_path / 'dense'}"
    config.export_hf = str(tmp_path / "hf")
  summary = jobs.repair(config, str(tmp_path / "run"))
  merged = masks_lib.flat(summary["merged"])
  fm = masks_lib.flat(masks)
  for path, m in fm.items():
    assert (np.asarray(merged[path])[~np.asarray(m)] == 0).all(), path
  changed = any(not np.array_equal(np.asarray(merged[p]), np.asarray(masks_lib.flat(pruned)[p])) for p in fm)
  assert changed, "repair did not change any kept weight"
  if mode == "sparse_lora":  # the frozen dense base is untouched
    base = masks_lib.flat(jax.device_get(summary["state"].params["base"]))
    for path, w in masks_lib.flat(dense).items():
      np.testing.assert_array_equal(np.asarray(base[path]), np.asarray(w))
    assert "kd" in [l for l in open(tmp_path / "run" / "metrics.jsonl")][-1]
    # The adapters exported alone merge back into the same weights.
    adapters, alpha = lora_lib.load_adapters(str(tmp_path / "run" / "adapters"))
    again = masks_lib.flat(lora_lib.merge(dense, adapters, masks, alpha))
    for path in fm:
      np.testing.assert_allclose(np.asarray(again[path]), np.asarray(merged[path]), rtol=1e-6, atol=1e-7)
  # Sparsity after the merge is reported exactly (2:4 = 0.5 of every pruned kernel).
  rows = {r["name"]: r["sparsity"] for r in summary["sparsity"]}
  assert all(rows[p] == pytest.approx(0.5) for p in fm)
  # The exported Hugging Face checkpoint keeps the zeros and loads in transformers.
  import torch
  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  q = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
  np.testing.assert_array_equal(q == 0, ~np.asarray(fm["layers_0/q/kernel"]).T)
  ids = _batch()["input_ids"]
  want = model.apply({"params": summary["merged"]}, ids).logits
  got = hf(torch.as_tensor(ids, dtype=torch.long)).logits.detach().numpy()
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)


def test_masks_of_another_model_are_refused_by_the_run(tmp_path):
  import ml_collections
  from vlm_jax.sparsity import jobs
  masks_dir = str(tmp_path / "prune")
  masks_lib.save_masks(masks_dir, {"vision": {"layers_0": {"mlp": {"fc1": {"kernel": np.ones((4, 4), bool)}}}}})
  config = ml_collections.ConfigDict(_train_config(str(tmp_path / "run"), masks_dir, "masked"))
  with pytest.raises(ValueError, match="another model"):
    jobs.repair(config, str(tmp_path / "run"))
