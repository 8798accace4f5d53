"""Remat policies change what the backward pass keeps (memory), never the numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import init_params
from vlm_jax.models.lm import DecoderLM, LMConfig
from vlm_jax.models.remat import POLICIES, remat_policy
from vlm_jax.models.vit import ViTConfig, VisionTower

POLICY_NAMES = [p for p in POLICIES if p != "none"]
LM = LMConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
VIT = ViTConfig(style="clip", image_size=16, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64)


def _lm_loss_and_grads(config: LMConfig, params: dict, ids: jax.Array):
  model = DecoderLM(config)
  mask = jnp.arange(ids.shape[1])[None] >= jnp.asarray([[0], [3]])  # left padding in row 1
  loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, ids, attention_mask=mask).logits) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan, policies", [(True, POLICY_NAMES), (False, ["full"]),
                                            pytest.param(False, POLICY_NAMES, marks=pytest.mark.slow)],
                         ids=["scanned", "layers-full", "layers"])
def test_lm_policies_give_the_loss_and_gradients_of_none(scan, policies):
  base = dataclasses.replace(LM, scan_layers=scan)
  params = init_params(DecoderLM(base), jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (2, 10), 0, 64)
  want_loss, want_grads = _lm_loss_and_grads(base, params, ids)
  for policy in policies:
    loss, grads = _lm_loss_and_grads(dataclasses.replace(base, remat=policy), params, ids)
    assert abs(float(loss) - float(want_loss)) <= 1e-6, policy
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, atol=1e-6, rtol=0, err_msg=policy)


@pytest.mark.parametrize("policy", ["save_attention_out", *(pytest.param(p, marks=pytest.mark.slow)
                                                            for p in ("full", "save_dots"))])
def test_vit_policies_give_the_loss_and_gradients_of_none(policy):
  params = init_params(VisionTower(VIT), jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))

  def loss_and_grads(config):
    loss = lambda p: jnp.sum(VisionTower(config).apply({"params": p}, images).pooled ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  want_loss, want_grads = loss_and_grads(VIT)
  loss, grads = loss_and_grads(dataclasses.replace(VIT, remat=policy))
  assert abs(float(loss) - float(want_loss)) <= 1e-6 * max(1.0, abs(float(want_loss)))
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)


def _scanned_lm_temporaries(policies) -> dict:
  """XLA's temporaries (bytes) of the compiled gradient of a 4-layer scanned LM, by policy."""
  config = LMConfig(vocab_size=64, embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                    mlp_dim=256, scan_layers=True)
  params = jax.eval_shape(lambda: init_params(DecoderLM(config), jax.random.key(0)))
  ids = jnp.zeros((4, 64), jnp.int32)

  def temporaries(policy):
    model = DecoderLM(dataclasses.replace(config, remat=policy))
    loss = lambda p: jnp.mean(model.apply({"params": p}, ids).logits ** 2)
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  return {p: temporaries(p) for p in policies}


def test_full_remat_shrinks_the_memory_of_a_scanned_lm():
  sizes = _scanned_lm_temporaries(["none", "full"])
  assert sizes["full"] < sizes["none"] / 2, sizes  # measured: 3.3 MB against 14.1 MB


@pytest.mark.slow  # four compiles
def test_policies_order_the_memory_of_a_scanned_lm():
  """"none" keeps every activation of the 4 layers, "save_dots" the projections' and the MLP's
  outputs, "save_attention_out" one [b, l, heads] tensor per layer, "full" the layer inputs only."""
  sizes = _scanned_lm_temporaries(list(POLICIES))
  assert sizes["full"] < sizes["save_attention_out"] < sizes["save_dots"] < sizes["none"], sizes


def test_bools_of_older_configs_and_bad_names():
  assert LMConfig(remat=True).remat == "full" and LMConfig(remat=False).remat == "none"
  assert ViTConfig(remat=True).remat == "full" and ViTConfig().remat == "none"
  assert remat_policy("save_dots") == "save_dots"
  with pytest.raises(ValueError, match=r"remat='dots': unknown remat policy; choose one of \['full', 'none', "
                                       r"'save_attention_out', 'save_dots'\]"):
    LMConfig(remat="dots")


def test_remat_keeps_parameter_names():
  """A checkpoint (or a Hugging Face import) made without remat loads into a model with it."""
  shapes = lambda model: jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  for policy in POLICY_NAMES:
    for scan in (False, True):
      a = shapes(DecoderLM(dataclasses.replace(LM, scan_layers=scan)))
      b = shapes(DecoderLM(dataclasses.replace(LM, scan_layers=scan, remat=policy)))
      assert jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.leaves(a) == jax.tree.leaves(b)
    a, b = shapes(VisionTower(VIT)), shapes(VisionTower(dataclasses.replace(VIT, remat=policy)))
    assert jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.leaves(a) == jax.tree.leaves(b)
