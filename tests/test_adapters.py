"""Few-shot adapters (vlm_jax/adapters, METHODS §5): formulas against hand computations and a NumPy
re-implementation, the validation-only search, the feature cache, the shapes-world default (image
folders: tests/test_fewshot_folder.py)."""

import os

import jax
import numpy as np
import pytest

import vlm_jax
from vlm_jax import adapters
from vlm_jax.adapters import dual_adapter, logits as L, search as search_lib, tip_adapter, zero_shot
from vlm_jax.adapters.adapter import Adapter
from vlm_jax.adapters.task import Features, Split, sample_shots
from vlm_jax.models.contrastive import ContrastiveConfig, ContrastiveModel, TextConfig
from vlm_jax.models.params import init_params
from vlm_jax.models.vit import ViTConfig


def nrm(a):
  a = np.asarray(a, np.float64)
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- hand computations

# Two classes in 2-D; K = 2 shots each; one query f = (1, 0).
W = np.array([[1.0, 0.0], [0.0, 1.0]])
KEYS = np.array([[[1.0, 0.0], [0.6, 0.8]],   # class 0
                 [[0.0, 1.0], [0.8, 0.6]]])  # class 1
F = np.array([[1.0, 0.0]])


def test_zero_shot_clip_and_siglip_by_hand():
  f = np.array([[0.6, 0.8]])
  np.testing.assert_allclose(L.zero_shot_logits(f, W, 10.0), [[6.0, 8.0]], rtol=1e-6)
  np.testing.assert_allclose(L.zero_shot_logits(f, W, 10.0, -3.0), [[3.0, 5.0]], rtol=1e-6)
  a = Adapter("zero_shot", ("a", "b"), {"w_pos": W}, {"scale": 10.0, "bias": -3.0})
  np.testing.assert_allclose(a(f), [[3.0, 5.0]], rtol=1e-6)


def test_tip_adapter_by_hand():
  # f·F: class 0 keys 1.0, 0.6; class 1 keys 0.0, 0.8. α = 2, β = 1.
  # cache_0 = e^0 + e^-0.4 = 1.670320; cache_1 = e^-1 + e^-0.2 = 1.186610
  want = np.array([[100.0 + 2 * (1 + np.exp(-0.4)), 0.0 + 2 * (np.exp(-1.0) + np.exp(-0.2))]])
  np.testing.assert_allclose(want, [[103.340640, 2.373220]], rtol=1e-6)
  got = L.tip_logits(F, W, KEYS, np.ones((2, 2)), 2.0, 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_dual_adapter_by_hand():
  w_neg = np.array([[0.0, 1.0], [1.0, 0.0]])
  neg_keys = np.array(L.negative_cache(KEYS))
  # F⁻[0, j] = normalise(F[1, j]); F⁻[1, j] = normalise(F[0, j]) (two classes)
  np.testing.assert_allclose(neg_keys, KEYS[::-1], atol=1e-7)
  pos_labels = np.array([[1.5, 0.5], [1.0, 1.0]])
  alpha, beta, lam = 2.0, 1.0, 0.25
  p_pos = np.array([100 + alpha * (1.5 * 1 + 0.5 * np.exp(-0.4)), 0 + alpha * (np.exp(-1) + np.exp(-0.2))])
  # f·F⁻: class 0 -> keys of class 1: 0.0, 0.8; class 1 -> keys of class 0: 1.0, 0.6
  p_neg = np.array([15 * (1 - 0) + alpha * (np.exp(-0.0) + np.exp(-0.8)),
                    15 * (1 - 1) + alpha * (np.exp(-1.0) + np.exp(-0.6))])
  want = lam * p_pos + (1 - lam) * p_neg
  got = L.dual_logits(F, W, w_neg, KEYS, neg_keys, pos_labels, np.ones((2, 2)), alpha, beta, lam)
  np.testing.assert_allclose(got, want[None], rtol=1e-6)


# ----------------------------------------------------------------------------- METHODS §5 in NumPy

def ref_negative_cache(F):
  C, K, _ = F.shape
  out = np.zeros_like(F)
  for c in range(C):
    for j in range(K):
      m = np.mean([F[o, j] for o in range(C) if o != c], axis=0)
      out[c, j] = m / np.linalg.norm(m)
  return out


def ref_refined_labels(F, T=0.1):
  C, K, _ = F.shape
  if K == 1:
    return np.ones((C, K))
  out = np.zeros((C, K))
  for c in range(C):
    s = np.array([(sum(F[c, j] @ F[c, i] for i in range(K)) - 1) / (K - 1) for j in range(K)])
    w = np.exp(s / T - np.max(s / T))
    out[c] = K * w / w.sum()
  return out


def ref_dual_logits(f, Wp, Wn, F, alpha, beta, lam, refine=True):
  C, K, D = F.shape
  keys = F.reshape(C * K, D)
  onehot = np.repeat(np.eye(C), K, axis=0)  # [C·K, C]
  lt = (ref_refined_labels(F) if refine else np.ones((C, K))).reshape(C * K, 1) * onehot
  neg = ref_negative_cache(F).reshape(C * K, D)
  p_pos = 100 * f @ Wp.T + alpha * np.exp(-beta * (1 - f @ keys.T)) @ lt
  p_neg = 15 * (1 - f @ Wn.T) + alpha * np.exp(-beta * f @ neg.T) @ onehot
  return lam * p_pos + (1 - lam) * p_neg


def random_case(C=5, K=4, D=8, N=7, seed=0):
  r = np.random.default_rng(seed)
  return (nrm(r.normal(size=(N, D))), nrm(r.normal(size=(C, D))), nrm(r.normal(size=(C, D))),
          nrm(r.normal(size=(C, K, D))))


@pytest.mark.parametrize("k", [1, 4])
def test_negative_cache_refinement_and_fused_logits_match_numpy(k):
  f, wp, wn, keys = random_case(K=k)
  np.testing.assert_allclose(L.negative_cache(keys), ref_negative_cache(keys), atol=1e-6)
  np.testing.assert_allclose(L.refine_labels(keys), ref_refined_labels(keys), rtol=1e-5)
  if k > 1:  # the refinement does change the labels, and keeps their sum per class at K
    assert np.abs(np.asarray(L.refine_labels(keys)) - 1).max() > 0.05
    np.testing.assert_allclose(np.asarray(L.refine_labels(keys)).sum(1), k, rtol=1e-5)
  s = adapters.Shots(tuple("abcde"), keys.astype(np.float32), keys[None].astype(np.float32), wp, wn, 100.0,
                     None, Split(f.astype(np.float32), np.zeros(len(f), np.int32), "validation"),
                     np.zeros(keys.shape[:2], int))
  hp = {"alpha": 1.7, "beta": 3.2, "lam": 0.3}
  a = dual_adapter.fit(s, search=False, hparams=hp)
  np.testing.assert_allclose(a(f), ref_dual_logits(f, wp, wn, keys, 1.7, 3.2, 0.3), rtol=1e-5, atol=1e-4)
  a = dual_adapter.fit(s, search=False, hparams=hp, refine=False)
  np.testing.assert_allclose(a(f), ref_dual_logits(f, wp, wn, keys, 1.7, 3.2, 0.3, refine=False),
                             rtol=1e-5, atol=1e-4)


def test_noisy_shot_is_down_weighted():
  # three shots of a class agree, the fourth (a mislabelled image) points elsewhere
  keys = nrm(np.array([[[1, 0.1, 0], [1, -0.1, 0], [1, 0, 0.1], [0, 0, 1]]], float))
  keys = np.concatenate([keys, keys[:, ::-1]])
  w = np.asarray(L.refine_labels(keys))
  assert w[0, 3] < 0.01 and w[0, :3].sum() > 3.99 and np.all(w[0, :3] > 1.0)


# ----------------------------------------------------------------------------- synthetic features

def synthetic_features(C=4, D=16, V=2, N=80, seed=0, test=None):
  r = np.random.default_rng(seed)
  protos = r.normal(size=(C, D))

  def feats(n, labels=None):
    y = r.integers(0, C, n) if labels is None else labels
    return nrm(protos[y] + 1.2 * r.normal(size=(n, D))).astype(np.float32), y.astype(np.int32)
  ytr = np.repeat(np.arange(C), N // C)
  views = np.stack([feats(N, ytr)[0] for _ in range(V)])
  splits = {"validation": Split(*feats(60), "validation")}
  splits["test"] = test if test is not None else Split(*feats(60), "test")
  return Features(tuple(f"c{i}" for i in range(C)), views, ytr.astype(np.int32),
                  nrm(protos + r.normal(size=(C, D))).astype(np.float32),
                  nrm(r.normal(size=(C, D))).astype(np.float32), 100.0, None, splits)


def test_zero_residuals_give_the_training_free_logits_exactly():
  from vlm_jax.adapters import training
  s = sample_shots(synthetic_features(), k=4, seed=0)
  hp = {"alpha": 1.3, "beta": 2.0, "lam": 0.6, "text_scale": 100.0, "neg_scale": 15.0}
  x = s.validation.x
  free_adapter = dual_adapter.fit(s, search=False, hparams=hp)
  free = free_adapter(x)
  np.testing.assert_array_equal(Adapter("dual", s.class_names, dual_adapter.base_arrays(s), hp)(x), free)
  # training for zero epochs keeps the residuals at zero: the same logits, bit for bit
  trained, _ = training.train("dual", dual_adapter.raw_arrays(s), hp, s, dual_adapter.GROUPS,
                              frozenset(dual_adapter.GROUPS),
                              training.TrainConfig(epochs=0, lrs=(("pos", 1e-4), ("neg", 5e-4))))
  np.testing.assert_array_equal(Adapter("dual", s.class_names, trained, hp)(x), free)
  # and one epoch moves them (the residuals are trained)
  moved, _ = training.train("dual", dual_adapter.raw_arrays(s), hp, s, dual_adapter.GROUPS,
                            frozenset(dual_adapter.GROUPS), training.TrainConfig(epochs=1))
  assert np.abs(Adapter("dual", s.class_names, moved, hp)(x) - free).max() > 1e-3


def test_training_lowers_the_loss_and_the_fits_report_choices():
  import dataclasses
  feats = synthetic_features()
  s = sample_shots(feats, k=4, seed=0)
  # every view every epoch: each step sees the same one batch, so its loss must fall
  every_view = lambda cfg: dataclasses.replace(cfg, views_per_epoch=s.views.shape[0])
  for fit in (lambda: tip_adapter.fit(s, train=True, train_config=every_view(tip_adapter.TRAIN)),
              lambda: dual_adapter.fit(s, train=True, train_config=every_view(dual_adapter.TRAIN))):
    a = fit()
    first, last = a.info["loss_first_last"]
    assert last < first
    assert set(a.info["search"]) >= {"alpha", "beta", "accuracy"}
  assert "lam" in a.info["search"]
  zs = zero_shot.fit(s)
  assert zs.hparams == {"scale": 100.0}


@pytest.mark.parametrize("views_per_epoch", [1, 2, 3])
def test_an_epoch_is_one_pass_over_the_shots_through_fresh_views(views_per_epoch):
  """The reference's loader re-augments every shot each epoch: an epoch sees each shot through
  `views_per_epoch` distinct cached views (index = view·shots + shot), drawn afresh per epoch."""
  from vlm_jax.adapters.training import TrainConfig, sample_order
  views, shots, batch = 3, 10, 4
  cfg = TrainConfig(epochs=6, batch_size=batch, views_per_epoch=views_per_epoch, seed=1)
  order = sample_order(views, shots, cfg)
  per_epoch = -(-shots * views_per_epoch // batch)
  assert order.shape == (6 * per_epoch, batch)
  picks = []
  for epoch in order.reshape(6, -1):
    seen = epoch[:shots * views_per_epoch]  # the rest refills the last batch from the epoch's start
    np.testing.assert_array_equal(epoch[shots * views_per_epoch:], seen[:len(epoch) - len(seen)])
    view, shot = np.divmod(seen, shots)
    np.testing.assert_array_equal(np.bincount(shot, minlength=shots), views_per_epoch)
    assert len(set(zip(view, shot))) == len(seen)  # distinct views of a shot
    picks.append(tuple(sorted(zip(shot, view))))
  if views_per_epoch < views:
    assert len(set(picks)) > 1  # not the same views every epoch
  with pytest.raises(ValueError, match="views_per_epoch=4 must be in \\[1, 3\\]"):
    sample_order(views, shots, TrainConfig(views_per_epoch=4))


class _Poison:
  """A test split that fails the test if anything reads it."""

  def __getattribute__(self, name):
    raise AssertionError(f"the test split was read ({name})")


def test_search_never_reads_the_test_split():
  feats = synthetic_features(test=_Poison())
  s = sample_shots(feats, k=2, seed=1)  # sampling, fitting and searching: none of them touch "test"
  tip_adapter.fit(s, train=True, train_config=adapters.TrainConfig(epochs=1, lrs=(("pos", 1e-3),)))
  dual_adapter.fit(s)
  good = synthetic_features()
  with pytest.raises(ValueError, match="validation"):
    search_lib.search(tip_adapter.base_arrays(s), good.splits["test"], negative=False)


def test_search_picks_the_grid_optimum():
  s = sample_shots(synthetic_features(seed=3), k=4, seed=0)
  arrays = dual_adapter.base_arrays(s)
  grid = search_lib.Grid(alpha=(0.5, 4.0, 3), beta=(1.0, 5.0, 3), lam=(0.0, 1.0, 3))
  found = search_lib.search(arrays, s.validation, grid, negative=True)
  best = -1
  for b in grid.values("beta"):
    for a in grid.values("alpha"):
      for l in grid.values("lam"):
        acc = Adapter("dual", s.class_names, arrays, {"alpha": a, "beta": b, "lam": l, "text_scale": 100.0,
                                                      "neg_scale": 15.0}).accuracy(s.validation)
        best = max(best, acc)
  assert found["accuracy"] == pytest.approx(best)
  chosen = Adapter("dual", s.class_names, arrays, {**found, "text_scale": 100.0, "neg_scale": 15.0})
  assert chosen.accuracy(s.validation) == pytest.approx(best)


def test_fewer_shots_than_k_is_an_error():
  feats = synthetic_features(N=12)  # 3 per class
  with pytest.raises(ValueError, match="fewer than K=4"):
    sample_shots(feats, k=4)


def test_noisy_shots_are_mislabelled_at_the_rate():
  s = sample_shots(synthetic_features(), k=5, seed=2, noise=0.2)
  true = s.true_labels
  assert int(np.sum(true != np.arange(4)[:, None])) == 4  # 20 % of 20 slots


def test_adapter_export_round_trip(tmp_path):
  s = sample_shots(synthetic_features(), k=4, seed=0)
  a = dual_adapter.fit(s, grid=search_lib.Grid(alpha=(1, 2, 2), beta=(1, 2, 2), lam=(0.5, 1, 2)))
  b = Adapter.load(a.save(str(tmp_path / "dual")))
  assert b.kind == "dual" and b.hparams == a.hparams and b.class_names == a.class_names
  np.testing.assert_array_equal(b(s.validation.x), a(s.validation.x))


# ----------------------------------------------------------------------------- features and the cache

def tiny_encoder(seed=0):
  cfg = ContrastiveConfig(
      vision=ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32),
      text=TextConfig(vocab_size=40, width=16, depth=1, num_heads=2, mlp_dim=32, max_len=24, pool="last"),
      projection_dim=8)
  model = ContrastiveModel(cfg)
  params = init_params(model, jax.random.PRNGKey(seed))

  def tokenize(texts):
    ids = np.zeros((len(texts), 24), np.int32)
    mask = np.zeros_like(ids)
    for i, t in enumerate(texts):
      codes = [3 + (ord(ch) % 37) for ch in t][:24]
      ids[i, :len(codes)], mask[i, :len(codes)] = codes, 1
    return ids, mask
  return adapters.Encoder(model, params, tokenize, name=f"tiny{seed}", batch_size=16)


def tiny_dataset(n=3, classes=("red circle", "blue square"), size=20, seed=0):
  r = np.random.default_rng(seed)
  splits = {s: adapters.LabelledImages([r.integers(0, 255, (size, size, 3), dtype=np.uint8)
                                        for _ in range(n * len(classes))], np.repeat(np.arange(len(classes)), n))
            for s in ("train", "validation", "test")}
  return adapters.ImageDataset(tuple(classes), splits, source=f"tiny{seed}")


def test_text_weights_are_the_renormalised_template_mean():
  enc = tiny_encoder()
  w = enc.class_weights(["red circle"], ["a {}.", "the {} here."])
  e = enc.text_features(["a red circle.", "the red circle here."])
  np.testing.assert_allclose(w[0], nrm(nrm(e).mean(0)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(enc.image_features(tiny_dataset().splits["train"].images), axis=-1),
                             1.0, rtol=1e-5)


def test_a_template_without_braces_is_refused(tmp_path):
  with pytest.raises(ValueError, match="has no '\\{\\}'"):
    adapters.extract(tiny_encoder(), tiny_dataset(), templates=("a photo of a thing.",))
  with pytest.raises(ValueError, match="has no '\\{\\}'"):
    adapters.extract(tiny_encoder(), tiny_dataset(), negative_templates=("a photo without it.",))


def test_augmented_views_are_averaged_into_the_keys():
  feats = adapters.extract(tiny_encoder(), tiny_dataset(), views=3, seed=0)
  assert feats.train_views.shape == (3, 6, 8)
  assert np.abs(feats.train_views[0] - feats.train_views[1]).max() > 1e-4  # the views differ
  s = sample_shots(feats, k=2, seed=0)
  np.testing.assert_allclose(s.keys, nrm(s.views.mean(0)), rtol=1e-5, atol=1e-6)


def test_feature_cache_reused_and_mismatches_refused(tmp_path):
  cache = str(tmp_path / "features.npz")
  enc, data = tiny_encoder(0), tiny_dataset()
  first = adapters.extract(enc, data, views=2, cache=cache)
  assert first.meta["cache"] == "written"
  mtime = os.path.getmtime(cache)
  again = adapters.extract(tiny_encoder(0), tiny_dataset(), views=2, cache=cache)
  assert again.meta["cache"] == "reused" and os.path.getmtime(cache) == mtime
  np.testing.assert_array_equal(again.train_views, first.train_views)
  np.testing.assert_array_equal(again.splits["test"].x, first.splits["test"].x)
  with pytest.raises(adapters.CacheMismatch, match=r"another model \(tiny0\), not this one \(tiny1\)"):
    adapters.extract(tiny_encoder(1), data, views=2, cache=cache)
  retrained = tiny_encoder(1)
  retrained.name = enc.name  # the same run, retrained (or its config changed)
  with pytest.raises(adapters.CacheMismatch, match=r"another model of the same name \(tiny0\): the digest"):
    adapters.extract(retrained, data, views=2, cache=cache)
  with pytest.raises(adapters.CacheMismatch, match="other data"):
    adapters.extract(enc, tiny_dataset(seed=1), views=2, cache=cache)
  with pytest.raises(adapters.CacheMismatch, match="class names differ"):
    adapters.extract(enc, tiny_dataset(classes=("red circle", "green square")), views=2, cache=cache)
  with pytest.raises(adapters.CacheMismatch, match="augmentation"):
    adapters.extract(enc, data, views=3, cache=cache)


# ----------------------------------------------------------------------------- the shapes world
# (image folders, their TFDS builder and bad inputs: tests/test_fewshot_folder.py)

def test_shapes_world_default_has_24_classes_and_the_domains():
  data = adapters.shapes_world(train=48, validation=24, test=24)
  assert len(data.class_names) == 24
  assert set(data.splits) == {"train", "validation", "test", "test/outline", "test/palette", "test/noise"}
  np.testing.assert_array_equal(data.splits["test"].labels, data.splits["test/outline"].labels)
  assert np.abs(data.splits["test"].images[0].astype(int) - data.splits["test/outline"].images[0]).max() > 0


# ----------------------------------------------------------------------------- the job (slow: ~15 s each)

@pytest.mark.slow
def test_fewshot_job_quick_end_to_end_and_cache_reuse(tmp_path, capsys):
  import json
  from configs import fewshot as fewshot_config
  from launch.main import JOBS
  config = fewshot_config.get_config("quick=True,methods=zero_shot;tip;dual_f")
  workdir = str(tmp_path / "job")
  out = JOBS["fewshot"](config, workdir)
  text = capsys.readouterr().out
  assert "few-shot accuracy" in text and "DualAdapter-F" in text and "test/outline" in text
  result = json.load(open(os.path.join(workdir, "fewshot.json")))
  assert result["features"]["cache"] == "written"
  assert {(r["method"], r["k"]) for r in result["rows"]} == {(m, k) for m in ("zero-shot", "Tip-Adapter", "DualAdapter-F")
                                                            for k in (1, 2)}
  # the saved adapter applies later, to features of new images, with the same logits
  adapter = Adapter.load(os.path.join(workdir, "adapters", "dual_f_k2_s0.npz"))
  assert adapter.kind == "dual" and len(adapter.class_names) == 24
  again = JOBS["fewshot"](config, workdir)
  assert again["features"]["cache"] == "reused"
  assert [r["test"] for r in again["rows"]] == [r["test"] for r in out["rows"]]


@pytest.mark.slow
def test_encoder_matches_transformers_clip_image_and_text_embeddings(tmp_path):
  import torch
  import transformers
  from tests import hf_reference as ref
  text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=16, eos_token_id=98)
  config = transformers.CLIPConfig(text_config=text, vision_config=ref.tiny_vision_config("clip").to_dict(),
                                   projection_dim=24)
  hf, folder = ref.build(transformers.CLIPModel, config, tmp_path)
  model, params = vlm_jax.from_hf(folder)
  ids = np.random.RandomState(0).randint(1, 97, (3, 10))
  ids[:, -1] = 98
  enc = adapters.Encoder(model, params, lambda texts: (ids[:len(texts)], None), batch_size=2)
  images = [np.random.RandomState(i).randint(0, 255, (28, 28, 3)).astype(np.uint8) for i in range(3)]
  pixels = np.stack([enc.preprocess(im) for im in images])
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), pixel_values=ref.to_torch_images(pixels))
  np.testing.assert_allclose(enc.image_features(images), theirs.image_embeds.numpy(), atol=2e-5)
  np.testing.assert_allclose(enc.text_features(["a", "b", "c"]), theirs.text_embeds.numpy(), atol=2e-5)
  assert enc.logit_scale == pytest.approx(float(hf.logit_scale.exp()))


def test_grid_spacing():
  g = search_lib.Grid(alpha=(0.1, 10.0, 3), beta=(1.0, 3.0, 3), geometric=("alpha",))
  np.testing.assert_allclose(g.values("alpha"), [0.1, 1.0, 10.0], rtol=1e-6)
  np.testing.assert_allclose(g.values("beta"), [1.0, 2.0, 3.0])
  assert g.size == 3 * 3 * 11


@pytest.mark.slow
def test_extraction_sharded_over_two_devices_matches_one():
  import subprocess
  import sys
  script = (
      "import os; os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'\n"
      "import numpy as np, jax\n"
      "from tests.test_adapters import tiny_encoder, tiny_dataset\n"
      "from vlm_jax import adapters\n"
      "from vlm_jax.parallel.mesh import make_mesh\n"
      "enc = tiny_encoder(); mesh = make_mesh({'data': -1}); assert len(jax.devices()) == 2\n"
      "sh = adapters.Encoder(enc.model, enc.params, enc.tokenize, mesh=mesh, batch_size=5)\n"
      "imgs = tiny_dataset(n=7).splits['train'].images\n"
      "assert np.abs(enc.image_features(imgs) - sh.image_features(imgs)).max() < 1e-6\n"
      "t = ['a red circle.', 'x']\n"
      "assert np.abs(enc.text_features(t) - sh.text_features(t)).max() < 1e-6\n"
      "print('ok')\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("negative", [True, False])
def test_search_equals_a_brute_force_vmapped_search(negative):
  import jax.numpy as jnp
  s = sample_shots(synthetic_features(C=5, D=16, seed=5), k=4, seed=0)
  arrays = dual_adapter.base_arrays(s) if negative else tip_adapter.base_arrays(s)
  grid = search_lib.Grid(alpha=(0.1, 5.0, 7), beta=(0.5, 7.0, 6), lam=(0.0, 1.0, 5))
  found = search_lib.search(arrays, s.validation, grid, negative=negative)
  lams = grid.values("lam") if negative else np.ones(1, np.float32)
  b, a, l = (g.ravel() for g in np.meshgrid(grid.values("beta"), grid.values("alpha"), lams, indexing="ij"))
  x = jnp.asarray(s.validation.x)

  def acc(alpha, beta, lam):  # the fused logits of each grid point, from scratch
    if negative:
      names = ("w_pos", "w_neg", "keys", "neg_keys", "pos_labels", "neg_labels")
      z = L.dual_logits(x, *(arrays[n] for n in names), alpha, beta, lam)
    else:
      z = L.tip_logits(x, arrays["w_pos"], arrays["keys"], arrays["pos_labels"], alpha, beta)
    return jnp.mean(jnp.argmax(z, -1) == s.validation.y)
  accs = np.asarray(jax.vmap(acc)(a, b, l))
  i = int(np.argmax(accs))  # the first best in (β, α, λ) order, as the search breaks ties
  assert found["accuracy"] == pytest.approx(float(accs[i]), abs=1e-6)
  assert (found["alpha"], found["beta"]) == (a[i], b[i])
  assert found.get("lam", 1.0) == l[i]
  assert found["grid"] == accs.size
