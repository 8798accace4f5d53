"""Few-shot adaptation on your own data: an image folder through its TFDS builder (layouts, splits by
seed, the bad inputs of issue 17 item 4), the adapter's Orbax artifact, and the `fewshot` job and API
on a Hugging Face SigLIP / CLIP folder with its tokenizer, zero-shot logits against transformers."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vlm_jax import adapters
from vlm_jax.adapters import dual_adapter, search as search_lib, tip_adapter, zero_shot
from vlm_jax.adapters.adapter import Adapter
from vlm_jax.data import builders
from tests.test_adapters import synthetic_features, tiny_encoder

CLASSES = ("cat", "dog", "fire_truck")


def write_folder(root, counts: dict, size: int = 12, seed: int = 0) -> dict:
  """root/<class>/<i>.png, random RGB; returns {path relative to root: the image array}."""
  r = np.random.default_rng(seed)
  written = {}
  for c, n in counts.items():
    os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(n):
      image = r.integers(0, 256, (size, size, 3), dtype=np.uint8)
      Image.fromarray(image).save(os.path.join(root, c, f"{i}.png"))
      written[os.path.join(c, f"{i}.png")] = image
  return written


def read_records(builder, split):
  records = builder.as_data_source(split=split)
  return [records[i] for i in range(len(records))]


# ----------------------------------------------------------------------------- the builder

def test_builder_records_splits_by_seed_and_reuse(tmp_path):
  root, data_dir = str(tmp_path / "photos"), str(tmp_path / "tfds")
  written = write_folder(root, {"cat": 10, "fire_truck": 10})
  b = builders.build_image_folder(root, data_dir, validation_fraction=0.2, test_fraction=0.2, seed=3)
  cfg = b.builder_config
  assert cfg.class_names == ("cat", "fire_truck")
  per_split = {s: [label for _, label in f] for s, f in cfg.files.items()}
  assert {s: np.bincount(v).tolist() for s, v in per_split.items()} == {
      "train": [6, 6], "validation": [2, 2], "test": [2, 2]}
  # every image in exactly one split; the records hold its pixels, label and class in meta
  assert sorted(rel for f in cfg.files.values() for rel, _ in f) == sorted(written)
  for split, files in cfg.files.items():
    records = read_records(b, split)
    assert [r["id"].decode() for r in records] == [f"{split}/{rel}" for rel, _ in files]
    for r, (rel, label) in zip(records, files):
      meta = json.loads(r["meta"])
      assert meta == {"label": label, "class_name": cfg.class_names[label], "file": rel}
      assert r["kind"].decode() == "caption"
      assert r["turns"]["content"][1].decode() == f"a photo of a {cfg.class_names[label].replace('_', ' ')}."
      np.testing.assert_array_equal(r["images"][0], written[rel])
  # the same seed splits the same way (and reuses the prepared data set); another seed differently
  again = builders.build_image_folder(root, data_dir, seed=3)
  assert again.builder_config.name == cfg.name and again.data_dir == b.data_dir
  other = builders.image_folder_config(root, seed=4)
  assert other.files["test"] != cfg.files["test"] and other.name != cfg.name
  # the API's data set holds the same images
  data = adapters.image_folder(root, data_dir=data_dir, seed=3)
  assert data.class_names == ("cat", "fire_truck") and data.skipped == {}
  np.testing.assert_array_equal(data.splits["test"].labels, [label for _, label in cfg.files["test"]])
  np.testing.assert_array_equal(data.splits["test"].images[0], written[cfg.files["test"][0][0]])


def test_explicit_split_folders(tmp_path):
  root = tmp_path / "photos"
  for split, n in (("train", 3), ("val", 2), ("test", 1)):
    write_folder(root / split, {"cat": n, "dog": n}, seed=len(split))
  data = adapters.image_folder(str(root), data_dir=str(tmp_path / "tfds"))
  assert {s: np.bincount(v.labels).tolist() for s, v in data.splits.items()} == {
      "train": [3, 3], "validation": [2, 2], "test": [1, 1]}


def test_an_unreadable_image_is_skipped_and_counted(tmp_path):
  root = tmp_path / "photos"
  write_folder(root, {"cat": 10, "dog": 10})
  (root / "dog" / "broken.jpg").write_bytes(b"not an image")
  data = adapters.image_folder(str(root), data_dir=str(tmp_path / "tfds"))
  assert data.skipped == {"bad_image": 1}
  cfg = builders.image_folder_config(str(root))
  assert sum(len(f) for f in cfg.files.values()) == 21  # the broken file had its place in a split
  assert sum(len(s.labels) for s in data.splits.values()) == 20  # and was skipped, not read as an image
  b = builders.build_image_folder(str(root), str(tmp_path / "tfds"))
  assert builders.skipped_counts(b) == {"bad_image": 1}
  (example,) = builders.skipped_examples(b)["bad_image"]
  assert "broken.jpg" in example
  # once fixed, the image is read: the data set is rebuilt, not reused stale
  Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "dog" / "broken.jpg", format="PNG")
  fixed = adapters.image_folder(str(root), data_dir=str(tmp_path / "tfds"))
  assert fixed.skipped == {} and sum(len(s.labels) for s in fixed.splits.values()) == 21


def test_a_class_left_without_a_readable_image_is_an_error(tmp_path):
  root = tmp_path / "photos"
  write_folder(root / "train", {"cat": 2, "dog": 2})
  write_folder(root / "val", {"cat": 1})
  os.makedirs(root / "val" / "dog")
  (root / "val" / "dog" / "0.png").write_bytes(b"\x89PNG broken")
  with pytest.raises(ValueError, match="class 'dog' has no readable image in split 'validation'"):
    adapters.image_folder(str(root), data_dir=str(tmp_path / "tfds"))


def test_an_empty_class_folder_is_an_error(tmp_path):
  write_folder(tmp_path / "photos", {"cat": 5})
  os.makedirs(tmp_path / "photos" / "dog")
  (tmp_path / "photos" / "dog" / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match="dog.*is empty"):
    adapters.image_folder(str(tmp_path / "photos"), data_dir=str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    builders.build_image_folder(str(tmp_path / "nowhere"), str(tmp_path / "tfds"))


def test_split_folders_with_different_classes_are_an_error(tmp_path):
  root = tmp_path / "photos"
  write_folder(root / "train", {"cat": 3, "dog": 3})
  write_folder(root / "val", {"cat": 2, "cow": 2})
  with pytest.raises(ValueError, match="class names of 'validation' differ"):
    builders.build_image_folder(str(root), str(tmp_path / "tfds"))
  write_folder(tmp_path / "small", {"cat": 2, "dog": 5})
  with pytest.raises(ValueError, match="'cat'.*has 2 image\\(s\\): too few to split"):
    builders.image_folder_config(str(tmp_path / "small"))


def test_fewer_images_than_k_is_an_error_at_sampling(tmp_path):
  root = tmp_path / "photos"
  write_folder(root / "train", {"cat": 4, "dog": 2})
  write_folder(root / "val", {"cat": 2, "dog": 2})
  data = adapters.image_folder(str(root), data_dir=str(tmp_path / "tfds"))
  feats = adapters.extract(tiny_encoder(), data, views=1)
  assert adapters.sample_shots(feats, k=2).keys.shape[:2] == (2, 2)
  with pytest.raises(ValueError, match="'dog' has 2 training image\\(s\\), fewer than K=4"):
    adapters.sample_shots(feats, k=4)


def test_a_feature_cache_of_other_class_names_is_refused(tmp_path):
  cache = str(tmp_path / "features.npz")
  write_folder(tmp_path / "a", {"cat": 5, "dog": 5})
  write_folder(tmp_path / "b", {"cat": 5, "cow": 5})
  enc = tiny_encoder()
  adapters.extract(enc, adapters.image_folder(str(tmp_path / "a"), data_dir=str(tmp_path / "tfds")), views=1,
                   cache=cache)
  other = adapters.image_folder(str(tmp_path / "b"), data_dir=str(tmp_path / "tfds"))
  with pytest.raises(adapters.CacheMismatch, match=r"class names differ.*only in the cache: \['dog'\], "
                                                   r"only in the data: \['cow'\]"):
    adapters.extract(enc, other, views=1, cache=cache)


# ----------------------------------------------------------------------------- the Orbax artifact

@pytest.mark.parametrize("fit", ["zero_shot", "tip", "dual"])
def test_orbax_export_round_trip(tmp_path, fit):
  s = adapters.sample_shots(synthetic_features(), k=4, seed=0)
  grid = search_lib.Grid(alpha=(1, 2, 2), beta=(1, 2, 2), lam=(0.5, 1, 2))
  a = {"zero_shot": lambda: zero_shot.fit(s), "tip": lambda: tip_adapter.fit(s, grid=grid),
       "dual": lambda: dual_adapter.fit(s, grid=grid)}[fit]()
  path = a.save(str(tmp_path / "exported"), "orbax")
  assert os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter.json"))
  b = Adapter.load(path)
  assert (b.kind, b.class_names, b.hparams) == (a.kind, a.class_names, a.hparams)
  assert json.loads(json.dumps(b.info)) == json.loads(json.dumps(a.info, default=float))
  for name in a.arrays:
    np.testing.assert_array_equal(b.arrays[name], a.arrays[name])
  np.testing.assert_array_equal(b(s.validation.x), a(s.validation.x))
  npz = Adapter.load(a.save(str(tmp_path / "exported.npz")))
  np.testing.assert_array_equal(npz(s.validation.x), b(s.validation.x))
  # saving again replaces the folder; no temporary folder is left beside it
  a.save(path, "orbax")
  assert sorted(os.listdir(tmp_path)) == ["exported", "exported.npz"]


def test_orbax_export_bad_input(tmp_path):
  a = zero_shot.fit(adapters.sample_shots(synthetic_features(), k=1))
  with pytest.raises(ValueError, match="unknown adapter save format 'pickle'"):
    a.save(str(tmp_path / "x"), "pickle")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="is not a saved adapter \\(no adapter.json\\)"):
    Adapter.load(str(tmp_path / "empty"))
  path = a.save(str(tmp_path / "ok"), "orbax")
  meta = json.load(open(os.path.join(path, "adapter.json")))
  json.dump({**meta, "kind": "dual"}, open(os.path.join(path, "adapter.json"), "w"))
  with pytest.raises(ValueError, match="lacks the dual adapter's arrays"):
    Adapter.load(path)


# ----------------------------------------------------------------------------- Hugging Face folders

WORDS = ("a photo of picture single without no . cat dog fire truck").split()


def save_tokenizer(folder, eos_id: int):
  """A word-level tokenizer over the prompts' words: BOS text EOS, padded with EOS (as CLIP's)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  vocab = {"<unk>": 0, "<s>": 1, **{w: 2 + i for i, w in enumerate(WORDS)}, "</s>": eos_id}
  raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  raw.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1),
                                                                                          ("</s>", eos_id)])
  PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                          pad_token="</s>").save_pretrained(folder)


def hf_folder(style: str, folder) -> tuple:
  """A tiny random transformers CLIPModel / SiglipModel (28 px images) and its tokenizer, saved."""
  import transformers
  from tests import hf_reference as ref
  text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=16, eos_token_id=98)
  vision = ref.tiny_vision_config(style, num_hidden_layers=2).to_dict()
  if style == "clip":
    cls, config = transformers.CLIPModel, transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                  projection_dim=24)
  else:
    cls, config = transformers.SiglipModel, transformers.SiglipConfig(text_config=text, vision_config=vision)
  hf, folder = ref.build(cls, config, folder)
  save_tokenizer(folder, eos_id=98)
  return hf, folder


def hf_zero_shot_logits(hf, folder, style, images, templates) -> np.ndarray:
  """What transformers computes: its own embeddings of the images (x / 255, normalised by hand) and of
  each class's prompts (averaged over the templates, renormalised), scaled, plus SigLIP's bias."""
  import torch
  import transformers
  mean, std = ((0.5,) * 3, (0.5,) * 3) if style == "siglip" else (
      (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
  x = (np.stack(images).astype(np.float64) / 255.0 - mean) / std
  pixels = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  prompts = [t.replace("{}", c.replace("_", " ")) for c in CLASSES for t in templates]
  enc = tok(prompts, padding="max_length", max_length=16, return_tensors="pt")
  assert (enc["input_ids"] == 0).sum() == 0  # every word known: the prompts are really read
  with torch.no_grad():
    f = hf.get_image_features(pixel_values=pixels)
    t = hf.get_text_features(input_ids=enc["input_ids"],
                             **({} if style == "siglip" else {"attention_mask": enc["attention_mask"]}))
    f, t = (getattr(v, "pooler_output", v) for v in (f, t))  # transformers 5 may return an output object
    f = f / f.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    w = t.reshape(len(CLASSES), len(templates), -1).mean(1)
    w = w / w.norm(dim=-1, keepdim=True)
    logits = hf.logit_scale.exp() * f @ w.T
    if style == "siglip":
      logits = logits + hf.logit_bias
  return logits.numpy()


def test_images_are_resized_as_the_models_own_processor_unless_told():
  import ml_collections
  from vlm_jax.adapters.jobs import image_resize
  assert image_resize(ml_collections.ConfigDict({"resize": ""}), "siglip") == "resize"  # stretched
  assert image_resize(ml_collections.ConfigDict({"resize": ""}), "clip") == "crop"  # shorter side, centre crop
  assert image_resize(ml_collections.ConfigDict({"resize": "pad"}), "clip") == "pad"


@pytest.mark.slow
@pytest.mark.parametrize("style,save_format", [("siglip", "npz"), ("clip", "orbax")])
def test_fewshot_job_on_a_hugging_face_folder_and_an_image_folder(tmp_path, style, save_format, capsys):
  from configs import fewshot as fewshot_config
  from launch.main import JOBS
  from vlm_jax.adapters.jobs import METHODS, NAMES
  hf, folder = hf_folder(style, tmp_path / "model")
  root = str(tmp_path / "photos")
  written = write_folder(root, {c: 8 for c in CLASSES}, size=28, seed=1)
  config = fewshot_config.get_config(f"init=hf:{folder},data=folder:{root},shots=2,seeds=0,views=2,epochs=2,"
                                     f"methods={';'.join(METHODS)},save_format={save_format}")
  workdir = str(tmp_path / "job")
  out = JOBS["fewshot"](config, workdir)
  text = capsys.readouterr().out
  assert "few-shot accuracy" in text
  # every method is in the table (and printed), at K = 2
  assert sorted(r["method"] for r in out["table"]) == sorted(NAMES[m] for m in METHODS)
  assert all(r["shots"] == 2 and 0.0 <= r["test"] <= 1.0 for r in out["table"])
  for m in METHODS:
    assert NAMES[m] in text
  # zero-shot: the saved adapter on the extracted test features gives transformers' own logits
  test_files = builders.image_folder_config(root).files["test"]
  with np.load(os.path.join(workdir, "features.npz")) as z:
    x, y = z["split/test/x"], z["split/test/y"]
  np.testing.assert_array_equal(y, [label for _, label in test_files])
  saved = os.path.join(workdir, "adapters", "zero_shot_k2_s0" + (".npz" if save_format == "npz" else ""))
  assert os.path.isdir(saved) == (save_format == "orbax")
  ours = Adapter.load(saved)(x)
  theirs = hf_zero_shot_logits(hf, folder, style, [written[rel] for rel, _ in test_files], config.templates)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert out["rows"][0]["test"] == pytest.approx(float(np.mean(theirs.argmax(-1) == y)))


@pytest.mark.slow
def test_fewshot_api_on_a_hugging_face_siglip_folder(tmp_path):
  """The notebook path: Encoder.from_hf + image_folder + extract + fit, then apply the Orbax artifact."""
  hf, folder = hf_folder("siglip", tmp_path / "model")
  root = str(tmp_path / "photos")
  written = write_folder(root, {c: 6 for c in CLASSES}, size=28, seed=2)
  data = adapters.image_folder(root, data_dir=str(tmp_path / "tfds"))
  enc = adapters.Encoder.from_hf(folder, resize="resize")
  templates = ("a photo of a {}.",)
  features = adapters.extract(enc, data, templates=templates, views=1)
  shots = adapters.sample_shots(features, k=2, seed=0)
  test = features.splits["test"]
  zs = zero_shot.fit(shots)
  test_images = [written[rel] for rel, _ in builders.image_folder_config(root).files["test"]]
  np.testing.assert_allclose(zs(test.x), hf_zero_shot_logits(hf, folder, "siglip", test_images, templates),
                             atol=1e-4)
  dual = dual_adapter.fit(shots, grid=search_lib.Grid(alpha=(0.5, 2, 3), beta=(1, 5, 3), lam=(0, 1, 3)))
  restored = Adapter.load(dual.save(str(tmp_path / "dual"), "orbax"))
  new = enc.image_features(test_images)  # "new images": features computed again, applied later
  np.testing.assert_allclose(restored(new), dual(test.x), atol=1e-5)
