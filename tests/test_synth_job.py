"""The Synth² job's own pieces: the generator's condition at generation equals what training
saw, per-caption keys (batch- and resume-invariant codes), the config checks, and the whole
job end to end at toy scale (slow)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import synth as synth_config
from vlm_jax.data import builders, pipeline, sources
from vlm_jax.data.tokenizer import load_tokenizer, shapes_world_tokenizer
from vlm_jax.models.build import build_model
from vlm_jax.models.params import init_params
from vlm_jax.models.text_to_codes import TextToCodesConfig, caption_tokens
from vlm_jax.models.maskgit import MaskGITConfig
from vlm_jax.models.vq import VQConfig
from vlm_jax.synth import embeddings
from vlm_jax.synth import jobs


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tok"))
  shapes_world_tokenizer(folder)
  return folder


def tiny_generator_block(vocab_size=512):
  vq = dict(image_size=16, channels=(8, 8), codebook_size=16, code_dim=4, normalized=True)
  return dict(kind="text_to_codes", vq=vq, generator=dict(codebook_size=16, num_tokens=16, text_vocab_size=vocab_size,
                                                          max_text_len=48, width=32, depth=1, num_heads=2, mlp_dim=64))


def test_caption_tokens_moves_the_targets_to_the_front_in_order():
  ids = jnp.array([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
  mask = jnp.array([[0, 1, 0, 1, 1], [0, 0, 0, 0, 1]], jnp.float32)
  text, keep = caption_tokens(ids, mask, 4)
  np.testing.assert_array_equal(text, [[6, 8, 9, 0], [5, 0, 0, 0]])
  np.testing.assert_array_equal(keep, [[1, 1, 1, 0], [1, 0, 0, 0]])
  text, keep = caption_tokens(ids, mask, 7)  # padded past the row's length
  np.testing.assert_array_equal(text[0], [6, 8, 9, 0, 0, 0, 0])


def test_the_condition_at_generation_is_the_one_training_saw(tmp_path, text_tokenizer):
  """Captions rendered by `embeddings.condition` give exactly the caption tokens that the
  generator's train_loss cuts from a pipeline batch of the same records."""
  data_dir = str(tmp_path / "data")
  b = builders.build_shapes_world(data_dir, "caption", sizes={"train": 6}, image_size=16, seed=3, max_objects=2)
  block = tiny_generator_block()
  model = build_model(block)
  data = ml_collections.ConfigDict(dict(
      sources=[dict(name=f"{b.name}/{b.builder_config.name}", split="train")], data_dir=data_dir,
      tokenizer=text_tokenizer, global_batch_size=6, seq_len=96, image_slots=1, packing=False, shuffle=False))
  batch = next(iter(pipeline.from_config(data, model.config, seed=0)))
  trained_ids, trained_mask = caption_tokens(batch["input_ids"], batch["loss_mask"], 48)
  config = ml_collections.ConfigDict(dict(real=f"{b.name}/{b.builder_config.name}", data_dir=data_dir))
  records = sources.open_source(sources.Source(name=config.real), data_dir)
  by_id = dict(zip([records[i]["id"].decode() for i in range(len(records))], jobs.real_captions(config)))
  tokenizer, _ = load_tokenizer(text_tokenizer)
  ids, mask = embeddings.condition([by_id[i] for i in batch["id"]], tokenizer, 48)
  assert mask.sum(1).min() > 5  # a caption, not a stray token
  np.testing.assert_array_equal(ids, np.asarray(trained_ids))
  np.testing.assert_array_equal(mask, np.asarray(trained_mask))


def test_each_caption_has_its_own_key_so_batches_and_resumes_give_the_same_codes(text_tokenizer):
  model = build_model(tiny_generator_block())
  params = init_params(model, jax.random.key(0))
  tokenizer, _ = load_tokenizer(text_tokenizer)
  captions = ["a red circle.", "two blue squares.", "a small green triangle above a large red circle.",
              "a purple diamond.", "an orange square to the left of a blue circle."]
  kw = dict(steps=4, temperature=1.0, seed=7, progress=False)
  whole = embeddings.generate_embeddings(model, params, tokenizer, captions, batch_size=2, **kw)
  assert whole.shape == (5, 16) and whole.dtype == np.int32 and 0 <= whole.min() and whole.max() < 16
  # another batching of the same captions (one compiled shape throughout: batches of 2)
  np.testing.assert_array_equal(whole[1:], embeddings.generate_embeddings(model, params, tokenizer, captions[1:],
                                                                          batch_size=2, first_index=1, **kw))
  tail = embeddings.generate_embeddings(model, params, tokenizer, captions[2:], batch_size=2, first_index=2, **kw)
  np.testing.assert_array_equal(whole[2:], tail)  # a resumed chunk writes what the whole run would
  other_seed = embeddings.generate_embeddings(model, params, tokenizer, captions, batch_size=2,
                                              **{**kw, "seed": 8})
  assert (other_seed != whole).any()


def test_a_generator_of_another_grid_than_its_tokenizer_is_refused():
  with pytest.raises(ValueError, match="makes 16 codes of 16"):
    TextToCodesConfig(vq=VQConfig(image_size=16, channels=(8, 8), codebook_size=16),
                      generator=MaskGITConfig(codebook_size=16, num_tokens=64, text_vocab_size=8, max_text_len=4,
                                              width=8, depth=1, num_heads=1, mlp_dim=8))


def test_an_empty_concept_list_is_refused_before_anything_runs(tmp_path):
  c = synth_config.get_config("quick=True")
  with c.unlocked():
    c.concepts = []
  with pytest.raises(ValueError, match="concept"):
    jobs.synth(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "tokenizer")


@pytest.mark.slow
def test_the_synth_job_runs_end_to_end_and_resumes_without_redoing_anything(tmp_path):
  """Toy scale: every part trains, the synthetic set is written and read by the VLM's pipeline
  at 1:1 with the real pairs; a second run of the same config skips every part."""
  c = synth_config.get_config("quick=True")
  with c.unlocked():
    c.progress = False
  workdir = str(tmp_path / "run")
  first = jobs.synth(c, workdir)
  assert first["real pairs"] == c.shapes_world_pairs and first["synthetic pairs"] == c.generate.num
  with open(os.path.join(workdir, "pairs", "captions.json")) as f:
    assert len(json.load(f)) == c.generate.num
  mtimes = {p: os.path.getmtime(os.path.join(workdir, "pairs", "chunks", p))
            for p in os.listdir(os.path.join(workdir, "pairs", "chunks"))}
  second = jobs.synth(c, workdir)
  assert second["caption statistics"] == first["caption statistics"]
  assert {p: os.path.getmtime(os.path.join(workdir, "pairs", "chunks", p)) for p in mtimes} == mtimes
