"""The shapes-world demonstrations of perplexity filtering and model soups, scaled down
(`:quick=True`): every sub-step runs, the numbers in the table are the ones a hand count
gives, a re-run skips what is done, and soups of identical ingredients are that ingredient."""

import json
import os

import jax
import numpy as np
import pytest

from configs.shapes import ppl_filter as shapes_ppl_filter
from configs.shapes import soups as shapes_soups
from vlm_jax import soups
from vlm_jax.data import rendering, shapes_world, sources
from vlm_jax.experiments.shapes import ppl_filter as shapes_demo
from vlm_jax.experiments.shapes import soups as soups_demo
from vlm_jax.models.build import build_model


def quick(module, **overrides):
  config = module.get_config("quick=True")
  with config.unlocked():
    config.progress = False
    config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def ppl_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ppl_demo")
  config = quick(shapes_ppl_filter)
  return config, str(workdir), shapes_demo.run(config, str(workdir))


@pytest.mark.slow  # a scaled-down demonstration end to end: ~1 min
def test_ppl_demo_precision_and_recall_are_a_hand_count_on_the_scores(ppl_run):
  config, workdir, result = ppl_run
  w = config.world
  # Ground truth from the generator itself, not from the stored meta the demo reads.
  corrupted = {f"shapes/caption/train/{i:06d}"
               for i in shapes_world.corrupted_indices(w.pool, w.corruption_rate, w.seed, "train")}
  assert len(corrupted) == round(w.pool * w.corruption_rate) == 12
  scores = [json.loads(l) for l in open(os.path.join(workdir, "score", "scores.jsonl"))]
  assert len(scores) == w.pool
  ranked = sorted(scores, key=lambda s: (s["ppl"], s["id"]))
  kept = {s["id"] for s in ranked[:int(w.pool * config.keep_fraction)]}
  removed = {s["id"] for s in scores} - kept
  q = result["removal"]
  assert (q["kept"], q["removed"], q["corrupted"]) == (20, 20, 12)
  assert q["precision"] == len(removed & corrupted) / len(removed)
  assert q["recall"] == len(removed & corrupted) / len(corrupted)
  assert q["precision (perfect ranking)"] == 12 / 20 and q["recall (perfect ranking)"] == 1.0
  ppl = {s["id"]: s["ppl"] for s in scores}
  pairs = [(ppl[c] > ppl[n]) + 0.5 * (ppl[c] == ppl[n]) for c in corrupted for n in set(ppl) - corrupted]
  assert q["auroc"] == pytest.approx(np.mean(pairs))
  # The filtered arm pretrained on exactly the kept records; the other on the whole pool.
  src = sources.open_source(sources.Source(name=result["filter"]["dataset"], split="train",
                                           data_dir=os.path.join(workdir, "data")))
  assert {rendering.parse_record(src[i]).id for i in range(len(src))} == kept
  pre = {arm: json.load(open(os.path.join(workdir, arm, "pretrain", "config.json"))) for arm in shapes_demo.ARMS}
  assert pre["filtered"]["data"]["sources"][0]["name"] == result["filter"]["dataset"]
  assert pre["unfiltered"]["data"]["sources"][0]["name"] == result["datasets"]["pool"]
  for key in ("seed", "total_steps", "optim", "model", "init"):  # equal steps, same everything else
    assert pre["filtered"][key] == pre["unfiltered"][key]


@pytest.mark.slow
def test_ppl_demo_table_json_and_rerun_skips_finished_steps(ppl_run, capsys):
  config, workdir, result = ppl_run
  metrics = [r["metric"] for r in result["table"]]
  for want in ("removal precision (perfect ranking)", "removal recall (perfect ranking)", "VQA acc",
               "VQA/color acc", "VQA/count acc", "VQA/shape acc", "VQA/size acc", "VQA/spatial acc"):
    assert want in metrics
  for arm in shapes_demo.ARMS:
    assert 0.0 <= result["arms"][arm]["vqa acc"] <= 1.0
  assert json.load(open(os.path.join(workdir, "ppl_demo.json")))["table"] == result["table"]
  before = {arm: os.path.getmtime(os.path.join(workdir, arm, "sft", "metrics.jsonl")) for arm in shapes_demo.ARMS}
  again = shapes_demo.run(config, workdir)  # everything cached: no training, no scoring
  assert again["table"] == result["table"]
  assert before == {arm: os.path.getmtime(os.path.join(workdir, arm, "sft", "metrics.jsonl"))
                    for arm in shapes_demo.ARMS}
  assert "perplexity filtering on the shapes world" in capsys.readouterr().out
  with pytest.raises(ValueError, match="keep_fraction"):  # the cache belongs to one config
    shapes_demo.run(quick(shapes_ppl_filter, keep_fraction=0.25), workdir)


def test_removal_quality_counts_unscored_records_as_removed():
  flags = {"a": True, "b": False, "c": True, "d": False}
  scores = [{"id": "a", "ppl": 9.0}, {"id": "b", "ppl": 1.0}, {"id": "d", "ppl": 2.0}]  # "c" was skipped
  q = shapes_demo.removal_quality(scores, ["b", "d"], flags)
  assert (q["removed"], q["removed and corrupted"], q["precision"], q["recall"]) == (2, 2, 1.0, 1.0)
  assert q["auroc"] == 1.0 and shapes_demo.auroc([1.0], [1.0]) == 0.5


@pytest.mark.slow  # ~50 s
def test_soup_demo_runs_every_row_and_selects_on_validation(tmp_path, capsys):
  config = quick(shapes_soups)
  result = soups_demo.run(config, str(tmp_path))
  names = [r["model"] for r in result["table"]]
  assert names == ["base (no fine-tuning)", "count", "color", "spatial", "region", "uniform soup",
                   "maximum soup (top 2)", "greedy soup (strict)"]
  rows = {r["model"]: r for r in result["table"]}
  for r in result["table"]:
    assert {"validation", "test", "count acc", "color acc", "spatial acc", "region acc"} <= set(r)
  val = [rows[n]["validation"] for n in config.ingredients]
  top = [config.ingredients[i] for i in soups.rank(val)[:2]]
  assert rows["maximum soup (top 2)"]["soup of"] == "+".join(top)
  log = result["greedy log"]
  assert [e["ingredient"] for e in log] == [config.ingredients[i] for i in soups.rank(val)]
  assert [e["score"] for e in log] == sorted(val, reverse=True)
  # Same steps / lr / seed, different data: the ingredients moved away from the base, differently.
  ing = [leaf_concat(soups.load(f"checkpoint:{tmp_path / 'ingredients' / n}")) for n in config.ingredients]
  base = leaf_concat(soups_demo.base_params(config, build_model(config.model)))
  assert all(not np.array_equal(x, base) for x in ing)
  assert not np.array_equal(ing[0], ing[1])
  cfgs = [json.load(open(tmp_path / "ingredients" / n / "config.json")) for n in config.ingredients]
  assert len({json.dumps((c["optim"], c["total_steps"], c["seed"], c["init"])) for c in cfgs}) == 1
  assert len({c["data"]["sources"][0]["name"] for c in cfgs}) == len(cfgs)
  assert json.load(open(tmp_path / "soup_demo.json"))["table"] == result["table"]
  assert "model soups on the shapes world" in capsys.readouterr().out


def test_soups_of_identical_ingredients_are_the_ingredient(tmp_path):
  """Every soup of three copies of one model answers exactly as that model does."""
  from vlm_jax.data.tokenizer import shapes_world_tokenizer
  from vlm_jax.eval.evaluate import Generator
  from vlm_jax.models.params import init_params
  config = quick(shapes_soups)
  model = build_model(config.model)
  params = jax.device_get(init_params(model, jax.random.key(7)))
  tokenizer = shapes_world_tokenizer(str(tmp_path / "tok"), vocab_size=config.vocab_size, num_examples=200)
  records = soups_demo.heldout(config, "validation")
  flat = [r for recs in records.values() for r in recs]
  answers = lambda p: Generator(model, p, tokenizer, batch_size=8, max_new_tokens=4, image_slots=1)(flat)[0]
  reference = answers(params)
  # A continuous stand-in score (real answers are ~0% right at random init, so equal either way).
  total = lambda p: {"score": float(sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(p)))}
  seen = []
  def validate(p):
    seen.append(answers(p))
    return total(p)
  rows = soups_demo.soup_rows(["a", "b", "c"], [params] * 3, validate, total)
  assert [r["model"] for r in rows] == ["a", "b", "c", "uniform soup", "maximum soup (top 2)", "greedy soup (strict)"]
  for r in rows:
    assert r["test"] == pytest.approx(rows[0]["test"], rel=1e-6)
  assert all(s == reference for s in seen)  # every soup validated answers like the ingredient
  assert rows[-1]["soup of"] == "c"  # equal scores: the later-listed first; strict ties add nothing
  np.testing.assert_allclose(leaf_concat(soups.uniform_soup([params] * 3)), leaf_concat(params), rtol=1e-6)


def leaf_concat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree_util.tree_leaves(tree)])
