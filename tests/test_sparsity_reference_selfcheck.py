"""Checks of the PyTorch reference pruning (tests/sparsity_reference.py) itself, so it can be trusted."""

import copy

import pytest
import torch

from tests import sparsity_reference as ref

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _pruned(method, **kw):
  model = ref.tiny_llama()
  dense = copy.deepcopy(model)
  masks = ref.reference_prune(model, ref.calibration_ids(), method, **kw)
  return model, dense, masks


def test_layer_call_reproduces_the_model():
  """Captured layer-0 inputs + kwargs, replayed layer by layer (batch 1), give the model's logits."""
  model, ids = ref.tiny_llama(), ref.calibration_ids(nsamples=3)
  inps, kwargs = ref.capture_layer0_inputs(model, ids)
  assert {"attention_mask", "position_embeddings"} <= set(kwargs)
  assert torch.equal(inps, model.model.embed_tokens(ids))
  hidden = inps
  for layer in model.model.layers:
    hidden = ref.run_layer(layer, hidden, kwargs)
  with torch.no_grad():
    logits = model.lm_head(model.model.norm(hidden))
    expected = model(ids, use_cache=False).logits
  torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_masks_cover_every_layer_linear_and_match_zeros():
  for method in ("wanda", "magnitude"):
    model, dense, masks = _pruned(method, sparsity=0.5)
    assert set(masks) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    params, dense_params = dict(model.named_parameters()), dict(dense.named_parameters())
    for name, mask in masks.items():
      w, w0 = params[name + ".weight"], dense_params[name + ".weight"]
      assert mask.dtype == torch.bool and mask.shape == w.shape
      assert torch.equal(w == 0, mask)  # random weights have no zeros before pruning
      assert torch.equal(w[~mask], w0[~mask])
    for name, p in params.items():  # embeddings, norms, lm_head untouched
      if name.removesuffix(".weight") not in masks:
        assert torch.equal(p, dense_params[name]), name


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_wanda_unstructured_rows(sparsity):
  _, _, masks = _pruned("wanda", sparsity=sparsity)
  for name, mask in masks.items():
    counts = mask.sum(dim=1)
    assert (counts == int(mask.shape[1] * sparsity)).all(), name


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_groups(method, n, m):
  _, _, masks = _pruned(method, prune_n=n, prune_m=m)
  for name, mask in masks.items():
    groups = mask.reshape(mask.shape[0], -1, m).sum(dim=-1)
    assert (groups == n).all(), name


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_magnitude_unstructured_threshold_rule(sparsity):
  _, dense, masks = _pruned("magnitude", sparsity=sparsity)
  weights = dict(dense.named_parameters())
  for name, mask in masks.items():
    w = weights[name + ".weight"].detach().abs()
    assert mask.sum() == int(w.numel() * sparsity) + 1, name
    assert w[mask].max() < w[~mask].min()


def test_layer1_statistics_come_from_the_pruned_layer0():
  model, dense, masks = _pruned("wanda", sparsity=0.5)
  inps, kwargs = ref.capture_layer0_inputs(dense, ref.calibration_ids())
  layer0, layer1 = dense.model.layers

  def layer1_masks(layer1_inputs):
    rows = ref.collect_scaler_rows(layer1, layer1_inputs, kwargs, "model.layers.1")
    return {name: ref.wanda_mask(lin.weight.data, rows[name], 0.5)
            for name, lin in ref.linears(layer1, "model.layers.1").items()}

  from_dense = layer1_masks(ref.run_layer(layer0, inps, kwargs))
  with torch.no_grad():
    for name, lin in ref.linears(layer0, "model.layers.0").items():
      lin.weight.data[masks[name]] = 0
  from_pruned = layer1_masks(ref.run_layer(layer0, inps, kwargs))

  for name in from_pruned:
    assert torch.equal(from_pruned[name], masks[name]), name
  assert any(not torch.equal(from_dense[name], masks[name]) for name in from_dense)
