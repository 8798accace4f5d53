"""Contrastive (CLIP / SigLIP) training in the train loop, and starting a VLM from its tower."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlm_jax.train.config import default_config
from vlm_jax.models import build_model, clip_loss, init_params, siglip_loss
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.step import TrainState, make_train_step

VISION = dict(style="clip", image_size=16, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32,
              pool="mean_max")
TEXT = dict(style="clip", vocab_size=512, width=16, depth=1, num_heads=2, mlp_dim=32, max_len=24, pool="last")


def two_towers(style="clip"):
  return ml_collections.ConfigDict(dict(kind="contrastive", vision={**VISION, "style": style},
                                        text={**TEXT, "style": style}, projection_dim=32 if style == "siglip" else 16))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Single-object caption pairs (TFDS) and the shapes-world tokenizer."""
  from vlm_jax.data import builders, tokenizer
  root = tmp_path_factory.mktemp("pairs")
  b = builders.build_shapes_world(str(root / "data"), "caption", sizes={"train": 64}, image_size=16, max_objects=1)
  tokenizer.shapes_world_tokenizer(str(root / "tok"), vocab_size=512, num_examples=200)
  return dict(name=f"{b.name}/{b.builder_config.name}", data_dir=str(root / "data"), tokenizer=str(root / "tok"))


def pairs_config(world, model, steps=6):
  c = default_config()
  c.model = model
  c.total_steps = steps
  c.checkpoint_every = steps
  c.progress = False
  c.optim.lr = 3e-3
  c.data = ml_collections.ConfigDict(dict(
      sources=[dict(name=world["name"], split="train", weight=1.0)], data_dir=world["data_dir"],
      tokenizer=world["tokenizer"], global_batch_size=8, seq_len=24, image_slots=1, packing=False, truncate=True))
  return c


def test_pipeline_gives_a_contrastive_model_image_caption_pairs(world):
  from vlm_jax.data import pipeline
  from vlm_jax.data.tokenizer import load_tokenizer
  from vlm_jax.models.build import config_from_dict
  _, model_config = config_from_dict(two_towers())
  batch = next(pipeline.from_config(pairs_config(world, two_towers()).data, model_config))
  tok, _ = load_tokenizer(world["tokenizer"])
  ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
  n = int(mask.sum())
  # BOS caption EOS, no image tokens; the image is the row's only image
  assert ids[0] == tok.bos_token_id and ids[n - 1] == tok.eos_token_id and (ids[n:] == tok.pad_token_id).all()
  from vlm_jax.data import shapes_world
  captions = {r["id"]: r["turns"][-1]["content"]
              for r in shapes_world.records("caption", "train", 64, image_size=16, max_objects=1)}
  assert tok.decode(ids[1:n - 1]).strip() == captions[str(batch["id"][0])]
  assert batch["images"].shape == (8, 1, 16, 16, 3) and np.abs(batch["images"]).sum(axis=(1, 2, 3, 4)).min() > 0


@pytest.mark.parametrize("style, loss_of", [("clip", clip_loss), ("siglip", siglip_loss)])
def test_contrastive_step_reports_the_two_tower_loss_and_learns(style, loss_of):
  model = build_model(two_towers(style))
  params = init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"images": rng.normal(size=(6, 1, 16, 16, 3)).astype(np.float32),
           "input_ids": rng.integers(3, 500, size=(6, 10)).astype(np.int32),
           "attention_mask": np.ones((6, 10), np.int32)}
  out = model.apply({"params": params}, batch["images"][:, 0], batch["input_ids"], batch["attention_mask"])
  want_loss = float(loss_of(out.logits_per_text))
  hits = np.arange(6)
  want_acc = (np.mean(np.argmax(out.logits_per_text, 1) == hits) + np.mean(np.argmax(out.logits_per_text, 0) == hits)) / 2

  labels = optim_lib.path_labels(params, [(".*", 1.0)])
  optim = default_config().optim
  optim.update(dict(lr=3e-3, schedule="constant", warmup_frac=0.0, clip_norm=0.0))
  optim.total_steps = 20
  tx = optim_lib.make_optimizer(optim, labels)
  step = jax.jit(make_train_step(model, tx, labels, lambda s: 3e-3))
  trainable, _ = optim_lib.split(params, labels)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(trainable), jax.random.key_data(jax.random.key(0)))
  state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], want_acc)
  np.testing.assert_allclose(metrics["temperature"], np.exp(2.6592), rtol=1e-5)
  for _ in range(15):
    state, metrics = step(state, batch)
  assert metrics["loss"] < 0.5 * want_loss and metrics["accuracy"] == 1.0


def test_contrastive_step_refuses_microbatches():
  model = build_model(two_towers())
  with pytest.raises(ValueError, match="trains on its own train_loss over whole batches"):
    make_train_step(model, optax.sgd(0.1), {}, lambda s: 0.1, grad_accum=2)


@pytest.fixture(scope="module")
def tower_run(world, tmp_path_factory):
  from vlm_jax.train.loop import train
  workdir = str(tmp_path_factory.mktemp("clip"))
  summary = train(pairs_config(world, two_towers()), workdir)
  return workdir, summary


def test_loop_trains_two_towers_on_pairs(tower_run):
  _, summary = tower_run
  assert summary["status"] == "finished" and summary["last loss"] < summary["first loss"]
  assert 0.0 <= summary["last accuracy"] <= 1.0 and summary["skipped records"] == "none"


def vlm_with_tower():
  from configs import models
  c = models.preset("tiny")
  c.vision.update(VISION)
  return c


def test_a_vlm_starts_from_the_two_tower_runs_vision_tower(world, tower_run, tmp_path):
  from vlm_jax.models.params import abstract_params
  from vlm_jax.train.checkpoint import restore_params
  from vlm_jax.train.loop import train
  tower_dir, _ = tower_run
  c = pairs_config(world, vlm_with_tower(), steps=1)
  c.init_parts = {"vision": f"checkpoint:{tower_dir}"}
  c.optim.groups = [("projector/.*", 1.0), (".*", None)]  # the tower stays as it was loaded
  c.data.update(seq_len=64, tokenizer=world["tokenizer"])
  train(c, str(tmp_path))
  vlm = restore_params(str(tmp_path), abstract_params(build_model(c.model)))
  tower = restore_params(tower_dir, abstract_params(build_model(two_towers())))["vision"]
  jax.tree.map(np.testing.assert_array_equal, vlm["vision"], tower)
  fresh = init_params(build_model(c.model), jax.random.key(0))["vision"]
  assert not np.array_equal(vlm["vision"]["patch_embed"]["kernel"], fresh["patch_embed"]["kernel"])


def test_init_parts_refuses_a_checkpoint_of_another_model(world, tower_run, tmp_path):
  from vlm_jax.train.loop import train
  tower_dir, _ = tower_run
  c = pairs_config(world, vlm_with_tower(), steps=1)
  c.model.vision.width = 32  # another tower
  c.model.vision.mlp_dim = 64
  c.init_parts = {"vision": f"checkpoint:{tower_dir}"}
  with pytest.raises(ValueError, match="does not fit"):
    train(c, str(tmp_path / "a"))
  c.init_parts = {"tower": f"checkpoint:{tower_dir}"}
  with pytest.raises(ValueError, match="names 'tower'"):
    train(c, str(tmp_path / "b"))
  c.init_parts = {"vision": tower_dir}
  with pytest.raises(ValueError, match="must be 'checkpoint:<workdir>'"):
    train(c, str(tmp_path / "c"))
