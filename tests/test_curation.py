"""Perplexity scoring and filtering (METHODS §2): PPL against a hand computation, only target
tokens count, the "points_reference" mode against a transcription of the official POINTS
filter (rule and scored span), exact resume, sharding, the filter and the filtered data set
read back through the pipeline."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer

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


def one_record_batches(world, model, **overrides):
  """The pipeline's batches of one row each (the scoring data config, batch size 1)."""
  data = scoring.scoring_data_config(config(world, **overrides))
  data["global_batch_size"] = 1
  return list(pipeline.Pipeline.from_config(data, model=model.config))


def reference_softmax(x):
  """F.softmax(x.float(), dim=-1) as the reference writes it, correctly rounded to float32.

  torch's own CPU float32 softmax approximates exp (up to 3e-5 relative, measured here with
  torch 2.13 at every ATEN_CPU_CAPABILITY), which alone moves about 1 in 2000 bfloat16
  roundings: the reference's last digits depend on its torch build, its rule does not.
  """
  return F.softmax(x.double(), dim=-1).float()


def points_reference(logits, input_ids, first, last, softmax=reference_softmax):
  """The official POINTS filter on one row, transcribed in torch from WePOINTS/WePOINTS
  scripts/pretrain_filtering_with_ppl.py (`Qwen2VL.get_output_info`, `_calc_ppl`).

  The row holds the caption and its `<|im_end|>` at first..last and "\\n" at last + 1, as the
  reference's sequence ends. Returns (the bfloat16 target probabilities, -mean log p, PPL).
  """
  all_logits = torch.from_numpy(np.array(logits, np.float32)[None, :last + 2])
  inputs = torch.from_numpy(np.asarray(input_ids, np.int64)[None, :last + 2])
  valid_len = last + 2 - first  # caption + <|im_end|> + "\n"
  output_logits = all_logits[:, -valid_len - 1:-2, :].squeeze(dim=0)
  input_labels = inputs[:, -valid_len:-1].squeeze(dim=0)
  output_prob = softmax(output_logits)
  probs = torch.gather(output_prob, dim=-1, index=input_labels.unsqueeze(dim=-1)).squeeze(
      dim=-1).to(torch.bfloat16).detach().tolist()
  output_prob = torch.tensor(probs)  # float32, as `_calc_ppl` builds it
  mean_nll = -torch.mean(torch.log(output_prob))
  return probs, mean_nll.item(), torch.exp(mean_nll).item()


def bfloat16_logits_nll(logits, batch):
  """The rule the old "bfloat16" mode claimed as the reference: the log-softmax of bfloat16
  logits. Per position, [B, L-1], as `ppl.token_nll`."""
  logp = jax.nn.log_softmax(jnp.asarray(logits)[:, :-1].astype(jnp.bfloat16), axis=-1)
  return np.asarray(-jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0], np.float32)


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
  """lm_head = 0: every next-token distribution is uniform over the 512 ids -> PPL = 512 exactly,
  in float32 and in "points_reference" (1/512 is a bfloat16 number); the old bfloat16-logits
  rule gave exp(6.25) = 518.0."""
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
  nll_sum, tokens = ppl.record_nll(zeros, batch, "points_reference")
  assert math.exp(float(nll_sum[0]) / float(tokens[0])) == pytest.approx(512.0, rel=1e-6)
  old = np.sum(bfloat16_logits_nll(zeros, batch)[0] * np.asarray(batch["loss_mask"][0, 1:]))
  assert math.exp(old / float(tokens[0])) == pytest.approx(math.exp(6.25))


def test_points_reference_mode_is_the_official_rule_and_the_bfloat16_logits_rule_is_not():
  """Random logits over a 32k vocabulary (float16 values, as the reference's float16 model
  gives), targets from near-certain to unlikely: the same bfloat16 probabilities as the
  transcription, token by token, their logs to 1 ulp, and the same mean to 1e-6. The old
  bfloat16-logits rule is off on most tokens, by up to 1e-3 on a record's mean: further than
  the float32 mode."""
  rng = np.random.default_rng(0)
  rows, length, vocab = 4, 48, 32_000
  ids = rng.integers(3, vocab, (rows, length))
  logits = rng.normal(0.0, 2.5, (rows, length, vocab)).astype(np.float16).astype(np.float32)
  r, t = np.meshgrid(np.arange(rows), np.arange(1, length), indexing="ij")
  logits[r, t - 1, ids[:, 1:]] += rng.uniform(0.0, 18.0, r.shape).astype(np.float16)
  spans = [(5, 30), (10, 46), (2, 20), (20, 45)]  # (first, last) target; "\n" at last + 1
  mask = np.zeros((rows, length), np.float32)
  for b, (first, last) in enumerate(spans):
    mask[b, first:last + 1] = 1.0
  batch = {"input_ids": jnp.asarray(ids), "loss_mask": jnp.asarray(mask)}
  nll, _ = jax.jit(ppl.token_nll, static_argnums=2)(jnp.asarray(logits), batch, "points_reference")  # as scored
  nll_sum, tokens = (np.asarray(x) for x in ppl.record_nll(jnp.asarray(logits), batch, "points_reference"))
  f32_sum, _ = ppl.record_nll(jnp.asarray(logits), batch, "float32")
  old_nll = bfloat16_logits_nll(logits, batch)
  off = {"old": [], "float32": []}
  for b, (first, last) in enumerate(spans):
    probs, mean_nll, _ = points_reference(logits[b], ids[b], first, last)
    assert tokens[b] == last - first + 1 == len(probs)
    ours, theirs = np.asarray(nll[b, first - 1:last]), -torch.log(torch.tensor(probs)).numpy()
    # The same bfloat16 probabilities, bit for bit; the same float32 log, up to the last bit of `log`.
    np.testing.assert_array_equal(np.exp(-ours).astype(jnp.bfloat16).astype(np.float32), np.float32(probs))
    np.testing.assert_array_max_ulp(ours, theirs, maxulp=1)
    assert nll_sum[b] / tokens[b] == pytest.approx(mean_nll, rel=1e-6)
    old = old_nll[b, first - 1:last]
    assert np.mean(np.abs(old - theirs) > 1e-3) > 0.5
    off["old"].append(abs(old.mean() - mean_nll) / mean_nll)
    off["float32"].append(abs(float(f32_sum[b]) / tokens[b] - mean_nll) / mean_nll)
    # torch's own CPU softmax, literally: at most one bfloat16 step away, on a few tokens.
    literal, _, _ = points_reference(logits[b], ids[b], first, last, lambda x: F.softmax(x.float(), dim=-1))
    ratio = np.asarray(literal) / np.asarray(probs)
    assert np.abs(ratio - 1).max() <= 2.0 ** -7 and np.mean(ratio == 1) >= 0.9
  assert max(off["old"]) > 100e-6 and max(off["old"]) > 3 * max(off["float32"])


def test_points_reference_scores_the_caption_and_end_of_turn_not_the_newline(world, model_params, tmp_path):
  """Through the scoring job's own pipeline (its data config and chat template, prompt
  included), with a chat tokenizer whose EOS is the end-of-turn token `<|im_end|>` (as
  Qwen2-VL-Instruct's): `loss_mask` marks the caption and `<|im_end|>`, which is what the
  reference's slices pick from `caption <|im_end|> \\n`; no newline is rendered or scored."""
  model, _ = model_params
  tok = AutoTokenizer.from_pretrained(world["tok_dir"])
  tok.add_special_tokens({"eos_token": "<|im_end|>"})
  tok.save_pretrained(tmp_path / "chat_tok")
  im_end, newline = tok.eos_token_id, tok.encode("\n", add_special_tokens=False)
  prompt = tok.encode(ppl.DEFAULT_PROMPT, add_special_tokens=False)
  batches = one_record_batches(world, model, logprob_dtype="points_reference",
                               **{"data.tokenizer": str(tmp_path / "chat_tok")})
  assert len(batches) == N_RECORDS
  for batch in batches:
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
    targets = np.flatnonzero(mask)
    first, last = int(targets[0]), int(targets[-1])
    assert list(targets) == list(range(first, last + 1))
    caption = tok.encode(CAPTIONS[int(str(batch["id"][0])[-2:])], add_special_tokens=False)
    # The reference: inputs_caption[:, 14:] = caption <|im_end|> \n, labels [-valid_len:-1].
    tail = caption + [im_end] + newline
    assert len(newline) == 1 and list(ids[first:last + 1]) == tail[:-1]
    assert list(ids[first - len(prompt):first]) == prompt  # conditioned on the prompt, not scored
    assert not batch["attention_mask"][0][last + 1:].any()  # nothing after <|im_end|>
    logits = jnp.zeros((1, len(ids), len(tok)), jnp.float32)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "id"}
    assert float(ppl.record_nll(logits, device_batch, "points_reference")[1][0]) == len(caption) + 1


def test_points_reference_scoring_run_matches_the_reference_on_the_models_logits(world, model_params, tmp_path):
  model, params = model_params
  scoring.score(config(world, logprob_dtype="points_reference"), str(tmp_path), params=params,
                devices=jax.devices()[:1])
  scores = {s["id"]: s for s in ppl.read_scores(os.path.join(tmp_path, "scores.jsonl"))}
  assert list(scores) == world["ids"]
  apply = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["images"],
                                           attention_mask=b["attention_mask"], positions=b["positions"]).logits)
  for batch in one_record_batches(world, model):
    targets = np.flatnonzero(batch["loss_mask"][0])
    logits = np.asarray(apply(params, {k: v for k, v in batch.items() if k != "id"}))[0]
    ids = np.append(batch["input_ids"][0][:targets[-1] + 1], 0)  # the reference's "\n": never scored
    _, mean_nll, _ = points_reference(logits, ids, targets[0], targets[-1])
    s = scores[str(batch["id"][0])]
    assert s["nll"] == pytest.approx(mean_nll, rel=1e-6) and s["tokens"] == len(targets)


def test_the_old_bfloat16_mode_is_refused_with_the_new_name(world, tmp_path):
  with pytest.raises(ValueError, match="points_reference"):
    ppl.check_logprob_dtype("bfloat16")
  with pytest.raises(ValueError, match="points_reference"):
    scoring.score(config(world, logprob_dtype="bfloat16"), str(tmp_path))


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
