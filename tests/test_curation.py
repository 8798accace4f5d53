"""Perplexity scoring and filtering (METHODS §2): PPL against a hand computation, only target
tokens count, float32 vs the reference's bfloat16, exact resume, sharding, the filter and the
filtered data set read back through the pipeline."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import score_perplexity
from vlm_jax.curation import jobs, scoring
from vlm_jax.curation import perplexity as ppl
from vlm_jax.data import builders, pipeline, rendering, sources
from vlm_jax.data import tokenizer as tokenizers_lib
from vlm_jax.models.build import build_model
from vlm_jax.models.params import init_params

N_RECORDS = 10  # batches of 4: the last one has 2 padding rows
CAPTIONS = ["a red circle above a blue square", "two green stars", "What colour is the heart?",
            "a tiny yellow triangle", "zebra", "a large purple hexagon left of a cross",
            "the picture shows three cyan ellipses", "xq zz vv", "one", "a pink diamond below a star"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A caption data set (JSONL + PNGs through the real `captions` builder) and a tokenizer."""
  root = tmp_path_factory.mktemp("world")
  rng = np.random.default_rng(0)
  os.makedirs(root / "imgs")
  with open(root / "caps.jsonl", "w") as f:
    for i, caption in enumerate(CAPTIONS):
      Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
      f.write(json.dumps({"id": f"r{i:02d}", "image": f"imgs/{i}.png", "caption": caption}) + "\n")
  builder = builders.build_from_files("captions", str(root / "caps.jsonl"), str(root / "tfds"))
  tok = tokenizers_lib.train_bpe(tokenizers_lib.builtin_corpus(300), 512, str(root / "tok"))
  return dict(root=root, name=f"{builder.name}/{builder.builder_config.name}", data_dir=str(root / "tfds"),
              tok_dir=str(root / "tok"), tokenizer=tok, ids=[f"caps/r{i:02d}" for i in range(N_RECORDS)])


def config(world, **overrides):
  c = score_perplexity.get_config(f"source={world['name']},data_dir={world['data_dir']},"
                                  f"tokenizer={world['tok_dir']},batch=4,seq_len=64")
  with c.unlocked():
    c.progress = False
    c.update_from_flattened_dict(overrides)  # keys like "optim.lr"
  return c


@pytest.fixture(scope="module")
def model_params(world):
  model = build_model(config(world).model)
  return model, jax.device_get(jax.jit(lambda key: init_params(model, key))(jax.random.key(3)))


@pytest.fixture(scope="module")
def straight(world, model_params, tmp_path_factory):
  """An uninterrupted scoring run on one device: the reference of the other tests."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  summary = scoring.score(config(world), workdir, params=model_params[1], devices=jax.devices()[:1])
  return workdir, summary, {s["id"]: s for s in ppl.read_scores(os.path.join(workdir, "scores.jsonl"))}


def one_record_batches(world, model):
  """The pipeline's batches of one row each (the scoring data config, batch size 1)."""
  data = scoring.scoring_data_config(config(world))
  data["global_batch_size"] = 1
  return list(pipeline.Pipeline.from_config(data, model=model.config))


def log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_every_record_once_in_source_order_and_padding_rows_unwritten(world, straight):
  workdir, summary, scores = straight
  with open(os.path.join(workdir, "scores.jsonl")) as f:
    ids = [json.loads(line)["id"] for line in f]
  assert ids == world["ids"]  # 10 records in batches of 4: the 2 padding rows are not written
  assert summary["status"] == "finished" and summary["records"] == N_RECORDS
  for s in scores.values():
    assert s["ppl"] == pytest.approx(math.exp(s["nll"]), rel=1e-12) and s["ppl"] > 1


def test_ppl_matches_a_numpy_computation_on_the_models_own_logits(world, model_params, straight):
  model, params = model_params
  scores = straight[2]
  apply = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["images"],
                                           attention_mask=b["attention_mask"], positions=b["positions"]).logits)
  for batch in one_record_batches(world, model):
    rid = str(batch["id"][0])
    logits = apply(params, {k: v for k, v in batch.items() if k != "id"})
    logp = log_softmax64(logits[0])  # NumPy, float64
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
    targets = np.flatnonzero(mask)  # token t is predicted from position t - 1
    nll = -np.mean([logp[t - 1, ids[t]] for t in targets])
    assert scores[rid]["ppl"] == pytest.approx(math.exp(nll), rel=2e-5), rid
    # N = the caption's tokens + its end token: nothing of BOS, image, prompt counts.
    caption = CAPTIONS[int(rid[-2:])]
    n_caption = len(world["tokenizer"].encode(caption, add_special_tokens=False))
    assert scores[rid]["tokens"] == len(targets) == n_caption + 1
    assert ids[targets[-1]] == world["tokenizer"].eos_token_id


def test_uniform_next_token_distribution_gives_ppl_equal_to_vocab_size(world, model_params, tmp_path):
  """lm_head = 0: every next-token distribution is uniform over the 512 ids -> PPL = 512 exactly.
  The reference's bfloat16 log-softmax cannot even get this right: log 512 rounds to 6.25."""
  model, params = model_params
  params = jax.tree.map(np.array, params)
  params["lm"]["lm_head"]["kernel"][:] = 0.0
  scoring.score(config(world), str(tmp_path), params=params, devices=jax.devices()[:1])
  scores = ppl.read_scores(os.path.join(tmp_path, "scores.jsonl"))
  assert len(scores) == N_RECORDS
  for s in scores:
    assert s["ppl"] == pytest.approx(512.0, rel=1e-6)
  batch = {k: jnp.asarray(v) for k, v in one_record_batches(world, model)[0].items() if k != "id"}
  zeros = jnp.zeros((*batch["input_ids"].shape, 512), jnp.float32)
  nll_sum, tokens = ppl.record_nll(zeros, batch, "bfloat16")
  assert math.exp(float(nll_sum[0]) / float(tokens[0])) == pytest.approx(math.exp(6.25), rel=1e-6)


def test_only_target_positions_count(world, model_params):
  """Changing the distribution that predicts a non-target token (BOS, image, prompt) changes
  nothing; changing one that predicts a target token does."""
  model, _ = model_params
  batch = one_record_batches(world, model)[0]
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "id"}
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(*batch["input_ids"].shape, 512)).astype(np.float32)
  base = np.asarray(ppl.record_nll(jnp.asarray(logits), batch)[0])
  mask = np.asarray(batch["loss_mask"][0])
  predicts_target = np.zeros_like(mask, bool)
  predicts_target[:-1] = mask[1:] > 0  # logits at t predict token t + 1
  noisy = logits.copy()
  noisy[0, ~predicts_target] += 5 * rng.normal(size=(int((~predicts_target).sum()), 512))
  np.testing.assert_array_equal(np.asarray(ppl.record_nll(jnp.asarray(noisy), batch)[0]), base)
  noisy = logits.copy()
  noisy[0, np.flatnonzero(predicts_target)[0]] += 5 * rng.normal(size=512)
  assert not np.allclose(np.asarray(ppl.record_nll(jnp.asarray(noisy), batch)[0]), base)


def test_resume_after_a_kill_writes_each_id_once_with_the_same_ppl(world, model_params, straight, tmp_path):
  workdir = str(tmp_path)

  class Killed(Exception):
    pass

  def kill_after_two(info):
    if info["batches"] >= 2:
      raise Killed()

  with pytest.raises(Killed):
    scoring.score(config(world), workdir, params=model_params[1], hook=kill_after_two, devices=jax.devices()[:1])
  with open(os.path.join(workdir, "scores.0.jsonl")) as f:
    assert len(f.readlines()) == 8
  # A kill between writing a batch's lines and saving its progress: lines past the progress.
  with open(os.path.join(workdir, "scores.0.jsonl"), "a") as f:
    f.write(json.dumps({"id": "caps/r08", "ppl": 1.0, "nll": 0.0, "tokens": 3}) + '\n{"id": "caps/r0')
  summary = scoring.score(config(world), workdir, params=model_params[1], devices=jax.devices()[:1])
  assert summary["scored in this run"] == 2
  resumed = ppl.read_scores(os.path.join(workdir, "scores.jsonl"))
  assert [s["id"] for s in resumed] == world["ids"]
  reference = straight[2]
  np.testing.assert_allclose([s["ppl"] for s in resumed], [reference[s["id"]]["ppl"] for s in resumed],
                             rtol=1e-6)
  # A finished run re-run scores nothing and keeps the file.
  again = scoring.score(config(world), workdir, params=model_params[1], devices=jax.devices()[:1])
  assert again["scored in this run"] == 0 and again["records"] == N_RECORDS


def test_sharded_over_eight_devices_matches_one_device(world, model_params, straight, tmp_path):
  c = config(world, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  scoring.score(c, str(tmp_path), params=model_params[1])
  sharded = ppl.read_scores(os.path.join(tmp_path, "scores.jsonl"))
  assert [s["id"] for s in sharded] == world["ids"]
  np.testing.assert_allclose([s["ppl"] for s in sharded], [straight[2][s["id"]]["ppl"] for s in sharded],
                             rtol=1e-5)


def test_packing_and_several_sources_are_refused(world, tmp_path):
  with pytest.raises(ValueError, match="packing"):
    scoring.score(config(world, **{"data.packing": True}), str(tmp_path))
  two = config(world)
  with two.unlocked():
    two.data.sources = [dict(name=world["name"], split="train"), dict(name="other", split="train")]
  with pytest.raises(ValueError, match="one data set"):
    scoring.score(two, str(tmp_path))


def test_filter_scores_keeps_the_expected_ids(tmp_path):
  path = tmp_path / "scores.jsonl"
  rows = [("b", 1.0), ("d", 3.0), ("c", 3.0), ("a", 5.0), ("e", math.inf), ("f", math.nan)]
  with open(path, "w") as f:
    for rid, p in rows:
      f.write(json.dumps({"id": rid, "ppl": p, "nll": math.log(p) if p == p else p, "tokens": 4}) + "\n")
  assert ppl.filter_scores(path, keep_fraction=0.5) == {"b", "c", "d"}
  assert ppl.filter_scores(path, keep_fraction=0.34) == {"b", "c"}  # floor(2.04); tie at 3.0 -> id c
  assert ppl.filter_scores(path, keep_fraction=0.01) == {"b"}       # at least one
  assert ppl.filter_scores(path, keep_fraction=1.0) == {"a", "b", "c", "d", "e", "f"}
  assert ppl.filter_scores(path, threshold=3.0) == {"b", "c", "d"}
  assert ppl.filter_scores(path, threshold=1e300) == {"a", "b", "c", "d"}  # inf and NaN never pass
  kept, used = ppl.select(ppl.read_scores(path), keep_fraction=0.5)
  assert [s["id"] for s in kept] == ["b", "c", "d"] and used == 3.0
  assert ppl.keep_count(0.29, 100) == 29 and ppl.keep_count(0.2, 5_000_000) == 1_000_000
  for bad in (dict(), dict(keep_fraction=0.5, threshold=2.0), dict(keep_fraction=0.0)):
    with pytest.raises(ValueError):
      ppl.filter_scores(path, **bad)


def test_filter_job_writes_a_data_set_the_pipeline_reads(world, straight, tmp_path, capsys):
  workdir = str(tmp_path)
  shutil.copy(os.path.join(straight[0], "scores.jsonl"), workdir)
  c = config(world, **{"job": "filter", "filter.keep_fraction": 0.4, "filter.tails": 2})
  summary = jobs.filter_data(c, workdir)
  printed = capsys.readouterr().out
  scores = straight[2]
  want = sorted(scores, key=lambda i: (scores[i]["ppl"], i))[:4]
  assert summary["kept"] == 4 and summary["total"] == N_RECORDS
  assert summary["threshold"] == pytest.approx(scores[want[-1]]["ppl"])
  assert "PPL histogram" in printed and "highest PPL" in printed
  worst = max(scores, key=lambda i: scores[i]["ppl"])
  assert CAPTIONS[int(worst[-2:])][:20] in printed  # the tails show the caption text
  with open(os.path.join(workdir, "filter.json")) as f:
    assert json.load(f)["kept"] == 4

  filtered = sources.open_source(sources.Source(name=summary["dataset"], split="train",
                                                data_dir=summary["data_dir"]))
  source = sources.open_source(sources.Source(name=world["name"], split="train", data_dir=world["data_dir"]))
  by_id = {rendering.parse_record(source[i]).id: rendering.parse_record(source[i]) for i in range(len(source))}
  got = [rendering.parse_record(filtered[i]) for i in range(len(filtered))]
  assert [r.id for r in got] == [i for i in world["ids"] if i in set(want)]  # the kept ones, source order
  for r in got:
    src = by_id[r.id]
    assert (r.kind, r.turns, r.meta) == (src.kind, src.turns, src.meta)
    assert [bytes(x) for x in r.images] == [bytes(x) for x in src.images]
  # ... and through the whole pipeline, by name.
  data = scoring.scoring_data_config(c)
  data.update(sources=[dict(name=summary["dataset"], split="train")], data_dir=summary["data_dir"])
  batches = list(pipeline.Pipeline.from_config(data, tokens_per_image=16, image_size=32))
  assert [i for b in batches for i in b["id"] if i] == [r.id for r in got]
