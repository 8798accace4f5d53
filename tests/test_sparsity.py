"""Masks, pruners and layer-wise calibration (vlm_jax.sparsity), against an independent reference."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import vlm_jax
from vlm_jax import sparsity
from vlm_jax.sparsity import masks as masks_lib
from vlm_jax.sparsity import pruners
from vlm_jax.models.params import unstack_layers

from tests import sparsity_reference as ref

TORCH_NAMES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
               "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def _ours(name: str, prefix: str = "") -> str:
  """"model.layers.1.mlp.up_proj" -> "layers_1/up/kernel"."""
  _, _, layer, rest = name.split(".", 3)
  return f"{prefix}layers_{layer}/{TORCH_NAMES[rest]}/kernel"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama")
  ref.tiny_llama().save_pretrained(folder)
  return str(folder)


@pytest.mark.parametrize("method,pattern,sparsity_ratio,n,m", [
    ("wanda", "row", 0.5, 0, 0), ("wanda", "2:4", 0.5, 2, 4), ("wanda", "4:8", 0.5, 4, 8),
    ("wanda", "row", 0.3, 0, 0),
    ("magnitude", "matrix", 0.5, 0, 0), ("magnitude", "2:4", 0.5, 2, 4),
])
@pytest.mark.parametrize("scan", [False, True])
def test_masks_equal_the_reference_procedure(llama, method, pattern, sparsity_ratio, n, m, scan):
  """Element for element, on a transformers LLaMA with fixed calibration tokens."""
  _assert_masks_equal_the_reference(llama, method, pattern, sparsity_ratio, n, m, scan)


@pytest.mark.parametrize("sparsity_ratio", [0.5, 0.3])
@pytest.mark.parametrize("scan", [False, True])
def test_wanda_variant_masks_equal_the_reference_procedure(llama, sparsity_ratio, scan):
  """pattern="variant" is the reference's `prune_wanda` with `--use_variant`, element for element."""
  want = _assert_masks_equal_the_reference(llama, "wanda", "variant", sparsity_ratio, 0, 0, scan, use_variant=True)
  for name, pruned in want.items():  # adaptive: rows prune different counts, the matrix hits the ratio
    assert len(set(pruned.sum(dim=1).tolist())) > 1, name
    assert abs(pruned.float().mean().item() - sparsity_ratio) <= 0.0011, name


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_default_pattern_is_the_methods_reference_rule(llama, method):
  """Without a pattern, magnitude prunes per matrix and Wanda per row, as their references do."""
  assert sparsity.DEFAULT_PATTERN == {"magnitude": "matrix", "wanda": "row", "sparsegpt": "matrix"}
  _assert_masks_equal_the_reference(llama, method, None, 0.5, 0, 0, scan=False)


def _assert_masks_equal_the_reference(llama, method, pattern, sparsity_ratio, n, m, scan, use_variant=False):
  """Ours against `sparsity_reference.reference_prune`; returns the reference's masks (True = pruned)."""
  import transformers
  torch_model = transformers.LlamaForCausalLM.from_pretrained(llama).float().eval()
  ids = ref.calibration_ids()
  want = ref.reference_prune(torch_model, ids, method, sparsity_ratio, n, m, use_variant)

  model, params = vlm_jax.from_hf(llama, scan_layers=scan)
  batches = [{"input_ids": ids[:5].numpy(), "attention_mask": np.ones((5, 16), np.int32)},
             {"input_ids": ids[5:].numpy(), "attention_mask": np.ones((3, 16), np.int32)}]
  pruned, got = sparsity.prune(model, params, method=method, pattern=pattern, ratios={"lm": sparsity_ratio},
                               calibration=batches, progress=False)
  if scan:  # compare layer by layer
    pruned, got = unstack_layers(pruned), unstack_layers(got)
  got, flat_pruned = masks_lib.flat(got), masks_lib.flat(pruned)
  assert sorted(got) == sorted(_ours(k) for k in want)
  for name, pruned_ref in want.items():
    ours = ~np.asarray(got[_ours(name)]).T  # ours: [in, out], True = kept
    np.testing.assert_array_equal(ours, pruned_ref.numpy(), err_msg=name)
  # The pruned weights are zero exactly where the reference's are.
  for name, module in ref.linears(torch_model.model.layers, "model.layers").items():
    np.testing.assert_array_equal(np.asarray(flat_pruned[_ours(name)]).T == 0,
                                  module.weight.detach().numpy() == 0, err_msg=name)
  return want


def test_wanda_variant_on_a_hand_made_score_matrix():
  """Columns are output units ([in, out]). Bisection: α = 0.4 prunes 5 of 8, 0.2 prunes 3, 0.3 prunes 4 = 50%.

  At α = 0.3 column 0 (sorted 1, 2, 2.5, 14.5; total 20; running sums 1, 3, 5.5, 20) prunes
  the three whose running sum is ≤ 6; column 1 (3, 4, 6, 7; sums 3, 7, 13, 20) only its 3.
  The per-row rule would prune two of each.
  """
  scores = jnp.asarray([[14.5, 4.0], [1.0, 7.0], [2.5, 3.0], [2.0, 6.0]])
  want = np.array([[1, 1], [0, 1], [0, 0], [0, 1]], bool)
  np.testing.assert_array_equal(np.asarray(masks_lib.mask_from_scores(scores, 0.5, "variant")), want)
  np.testing.assert_array_equal(~ref.variant_mask(torch.tensor(np.asarray(scores).T), 0.5).numpy().T, want)
  np.testing.assert_array_equal(np.sum(~np.asarray(masks_lib.row_mask(scores, 0.5)), axis=0), [2, 2])
  # A stack (scanned layers) gets one α per matrix; scaling a matrix changes nothing.
  stacked = np.asarray(masks_lib.variant_mask(jnp.stack([scores, 10 * scores[::-1]]), 0.5))
  np.testing.assert_array_equal(stacked, np.stack([want, want[::-1]]))


def test_variant_is_wandas_only_and_the_job_defaults_to_the_reference_rule():
  for method in ("magnitude", "sparsegpt"):
    with pytest.raises(ValueError, match="Wanda's"):
      pruners.resolve_pattern(method, "variant")
  with pytest.raises(ValueError, match="Wanda's"):
    pruners.sparsegpt(jnp.ones((4, 4)), jnp.eye(4), 0.5, "variant")
  assert [pruners.resolve_pattern(m, None) for m in pruners.METHODS] == ["matrix", "row", "matrix"]
  assert pruners.resolve_pattern("magnitude", "2:4") == "2:4"  # an explicit pattern wins
  from configs import prune as prune_config
  c = prune_config.get_config("method=magnitude")
  assert c.prune.pattern == "" and pruners.resolve_pattern(c.prune.method, c.prune.pattern) == "matrix"
  assert prune_config.get_config("pattern=variant").prune.pattern == "variant"


def test_nm_groups_have_exactly_n_zeros():
  k = jax.random.normal(jax.random.key(0), (3, 64, 24))  # a leading (layer) axis too
  for n, m in [(2, 4), (4, 8), (1, 4), (3, 8)]:
    keep = np.asarray(masks_lib.nm_mask(k, n, m))
    groups = keep.reshape(3, 64 // m, m, 24)
    assert (np.sum(~groups, axis=2) == n).all()


def test_row_ratios_are_exact_and_ties_prune_the_lower_index():
  scores = jnp.asarray(np.random.default_rng(0).normal(size=(50, 7)))
  for ratio in (0.1, 0.5, 0.7, 0.99):
    keep = np.asarray(masks_lib.row_mask(scores, ratio))
    assert (np.sum(~keep, axis=0) == int(50 * ratio)).all()
  ties = jnp.zeros((6, 2))
  np.testing.assert_array_equal(np.asarray(masks_lib.row_mask(ties, 0.5))[:, 0], [0, 0, 0, 1, 1, 1])


def test_row_and_nm_masks_equal_a_stable_sort_rank_with_many_ties():
  """The masks prune the entries a stable ascending sort ranks first (torch.sort(stable=True) in the
  reference): checked against NumPy's stable argsort on scores with many ties, leading axes included."""
  scores = np.random.default_rng(1).integers(0, 4, size=(2, 24, 5)).astype(np.float32)

  def stable_keep(s, k):  # per column (axis -2): the k first in stable ascending order are pruned
    ranks = np.argsort(np.argsort(s, axis=-2, kind="stable"), axis=-2, kind="stable")
    return ranks >= k

  for ratio in (0.0, 0.25, 0.5, 0.9):
    np.testing.assert_array_equal(np.asarray(masks_lib.row_mask(jnp.asarray(scores), ratio)),
                                  stable_keep(scores, int(24 * ratio)))
  groups = scores.reshape(2, 6, 4, 5)
  np.testing.assert_array_equal(np.asarray(masks_lib.nm_mask(jnp.asarray(scores), 2, 4)),
                                stable_keep(groups, 2).reshape(scores.shape))


def test_allocation_by_tower_and_override_and_errors():
  params = {"vision": {"layers_0": {"mlp": {"fc1": {"kernel": np.ones((4, 8))}}}},
            "projector": {"linear_1": {"kernel": np.ones((4, 8)), "bias": np.ones(8)}},
            "lm": {"layers_0": {"q": {"kernel": np.ones((8, 8))}, "attn_norm": {"scale": np.ones(8)}},
                   "lm_head": {"kernel": np.ones((8, 16))}, "embed": {"embedding": np.ones((16, 8))}}}
  t = masks_lib.targets(params, {"vision": 0.5, "lm": 0.7}, overrides=[("lm/layers_0/q/.*", 0.2)])
  assert t == {"vision/layers_0/mlp/fc1/kernel": 0.5, "lm/layers_0/q/kernel": 0.2}
  t = masks_lib.targets(params, {"lm": 0.5}, include=[r"lm/embed/embedding"], exclude=())
  assert set(t) == {"lm/layers_0/q/kernel", "lm/lm_head/kernel", "lm/embed/embedding"}
  with pytest.raises(ValueError, match="unknown tower"):
    masks_lib.targets(params, {"text": 0.5})
  with pytest.raises(ValueError, match="2:4 prunes exactly 0.5"):
    masks_lib.targets(params, {"lm": 0.7}, pattern="2:4")
  with pytest.raises(ValueError, match="N:M"):
    masks_lib.parse_pattern("4:2")


def test_sparsegpt_prunes_exactly_and_beats_magnitude_on_the_layer_output():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 32)) * rng.uniform(0.1, 3.0, size=32)  # uneven input scales
  w = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  h = jnp.asarray(x.T @ x, jnp.float32)
  for pattern in ("row", "2:4"):
    new, keep = pruners.sparsegpt(w, h, 0.5, pattern, blocksize=16)
    keep = np.asarray(keep)
    assert (np.asarray(new)[~keep] == 0).all()
    if pattern == "2:4":
      assert (np.sum(~keep.reshape(8, 4, 16), axis=1) == 2).all()
    else:
      assert abs((~keep).mean() - 0.5) < 0.05
    err = np.linalg.norm(x @ (np.asarray(w) - np.asarray(new)))
    mag = np.asarray(pruners.magnitude(w, 0.5, pattern))
    err_mag = np.linalg.norm(x @ (np.asarray(w) * (1 - mag)))
    assert err < 0.7 * err_mag, (pattern, err, err_mag)


def test_vlm_calibration_prunes_every_tower_at_its_ratio(tmp_path):
  from configs import models
  from vlm_jax.models.build import build_model
  from vlm_jax.models.params import init_params
  model = build_model(models.preset("tiny"))
  params = init_params(model, jax.random.key(0))
  c = model.config
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 100, (2, 40)).astype(np.int32)
  ids[0, 2:2 + c.tokens_per_image] = c.image_token_id  # row 0 uses one of its 2 slots, row 1 none
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "images": rng.normal(size=(2, 2, 32, 32, 3)).astype(np.float32)}
  pruned, m = sparsity.prune(model, params, method="wanda", ratios={"vision": 0.5, "projector": 0.25, "lm": 0.7},
                             calibration=[batch], progress=False)
  rows = {r["name"]: r["sparsity"] for r in sparsity.sparsity_report(pruned, m)}
  assert rows["[vision masked]"] == rows["[vision linear]"] == pytest.approx(0.5)
  assert rows["[projector masked]"] == pytest.approx(0.25)
  lm_kernels = [k for k in rows if k.startswith("lm/")]
  assert lm_kernels and all(rows[k] == pytest.approx(0.7, abs=0.01) for k in lm_kernels)
  assert "lm/lm_head/kernel" not in rows
  # The output head and the embeddings when asked for: the head by Wanda (its own unit), the
  # embeddings (no input statistics) by magnitude.
  _, m = sparsity.prune(model, params, method="wanda", ratios={"lm": 0.5}, calibration=[batch], progress=False,
                        include=[r"lm/lm_head/kernel", r"lm/embed/embedding"], exclude=())
  flat_m = masks_lib.flat(m)
  assert np.mean(~np.asarray(flat_m["lm/lm_head/kernel"])) == pytest.approx(0.5)
  emb = np.asarray(masks_lib.flat(params)["lm/embed/embedding"])
  np.testing.assert_array_equal(np.asarray(flat_m["lm/embed/embedding"]), np.asarray(pruners.magnitude(emb, 0.5, "row")))


def test_calibration_rows_sharded_over_8_devices_give_the_same_masks(llama):
  from vlm_jax.parallel import mesh as mesh_lib
  model, params = vlm_jax.from_hf(llama)
  ids = ref.calibration_ids(16, 16).numpy()
  batches = [{"input_ids": ids, "attention_mask": np.ones((16, 16), np.int32)}]
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert mesh.devices.size == 8
  _, plain = sparsity.prune(model, params, method="wanda", calibration=batches, progress=False)
  _, sharded = sparsity.prune(model, params, method="wanda", calibration=batches, progress=False,
                              rows_sharding=mesh_lib.batch_sharding(mesh))
  for path, m in masks_lib.flat(plain).items():
    np.testing.assert_array_equal(np.asarray(masks_lib.flat(sharded)[path]), np.asarray(m), err_msg=path)


def test_masks_from_another_model_are_refused():
  params = {"a": {"kernel": np.ones((4, 4))}}
  with pytest.raises(ValueError, match="not a parameter"):
    masks_lib.check_masks_fit(params, {"b": {"kernel": np.ones((4, 4), bool)}})
  with pytest.raises(ValueError, match="shape"):
    masks_lib.check_masks_fit(params, {"a": {"kernel": np.ones((4, 2), bool)}})


def test_calibration_with_splash_attention_gives_the_xla_masks():
  """Layer-wise calibration hands a kernel the mask's structure: the Pallas kernel (interpret mode)
  sees the same padded, packed rows as `xla` and Wanda picks the same weights."""
  import dataclasses
  from vlm_jax.models import DecoderLM, LMConfig, init_params as init
  from vlm_jax.models.attention import interpret_kernels
  config = LMConfig(vocab_size=256, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=64, max_position=64)
  params = init(DecoderLM(config), jax.random.key(0))
  ids = np.random.default_rng(0).integers(0, 256, (2, 32)).astype(np.int32)
  valid = np.ones_like(ids).astype(bool)
  valid[1, 24:] = False  # right padding
  segments = np.where(np.arange(32) < 12, 0, 1)[None].repeat(2, 0).astype(np.int32)  # two packed rows
  batch = [{"input_ids": ids, "attention_mask": valid.astype(np.int32), "segment_ids": segments,
            "positions": np.where(segments == 0, np.arange(32), np.arange(32) - 12).astype(np.int32)}]
  prune = lambda cfg: sparsity.prune(DecoderLM(cfg), params, method="wanda", ratios={"lm": 0.5},
                                     calibration=batch, progress=False)[1]
  want = prune(config)
  with interpret_kernels():
    got = prune(dataclasses.replace(config, attention="splash"))
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_plain_lm_calibrates_on_ids_and_attention_mask_alone():
  """The README's minimal calibration batch: positions and segments default to an unpacked row."""
  from vlm_jax.models import DecoderLM, LMConfig, init_params as init
  model = DecoderLM(LMConfig(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=4,
                             head_dim=16, mlp_dim=128, max_position=128))
  params = init(model, jax.random.key(0))
  ids = np.random.default_rng(0).integers(0, 512, (4, 64)).astype(np.int32)
  minimal = [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]
  full = [{**minimal[0], "positions": np.broadcast_to(np.arange(64, dtype=np.int32), ids.shape),
           "segment_ids": np.ones_like(ids)}]
  _, got = sparsity.prune(model, params, method="wanda", ratios={"lm": 0.5}, calibration=minimal, progress=False)
  _, want = sparsity.prune(model, params, method="wanda", ratios={"lm": 0.5}, calibration=full, progress=False)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert all(float(np.mean(~np.asarray(m))) == 0.5 for m in jax.tree.leaves(got))
