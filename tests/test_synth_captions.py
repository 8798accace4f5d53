"""Synth² captions: concept matching, balanced prompts, sampling, diversity statistics, and the
caption LM's training data going through the normal pipeline and engine."""

import collections
import itertools
import json
import math

import jax
import ml_collections
import numpy as np
import pytest

from vlm_jax.eval import metrics
from vlm_jax.models import DecoderLM, LMConfig, init_params
from vlm_jax.synth import captions as C

CONCEPTS = ["red", "blue", "circle", "left of"]
TINY_LM = dict(vocab_size=512, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
               mlp_dim=64, max_position=128)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  from vlm_jax.data import tokenizer
  folder = str(tmp_path_factory.mktemp("tok"))
  tokenizer.shapes_world_tokenizer(folder, vocab_size=512, num_examples=200)
  return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
  from vlm_jax.data.tokenizer import load_tokenizer
  return load_tokenizer(tok_dir)[0]


def test_concepts_in_matches_whole_words_any_case_and_multi_word_concepts():
  assert C.concepts_in("A Red circle to the LEFT  OF a blue square.", CONCEPTS) == CONCEPTS
  assert C.concepts_in("a reddish circles, bluer, leftover", CONCEPTS) == []
  assert C.concepts_in("the circle is left; of course", CONCEPTS) == ["circle"]
  assert C.concepts_in("red-blue", CONCEPTS) == ["red", "blue"]
  assert C.concepts_in("", CONCEPTS) == []


def test_an_empty_or_broken_concept_list_is_a_clear_error():
  for call in (lambda: C.concepts_in("a red circle", []), lambda: C.training_records(["a red circle"], []),
               lambda: C.concept_sets([], 3), lambda: C.caption_stats(["a red circle"], [])):
    with pytest.raises(ValueError, match="concept_list is empty"):
      call()
  with pytest.raises(ValueError, match="repeats"):
    C.concept_sets(["red", "Red "], 3)
  with pytest.raises(ValueError, match="non-blank"):
    C.concept_sets(["red", " "], 3)
  with pytest.raises(TypeError, match="not the string"):
    C.concepts_in("a red circle", "red")
  with pytest.raises(ValueError, match="at least 4 concepts"):
    C.concept_sets(CONCEPTS[:3], 2, per_prompt=(4, 5))
  with pytest.raises(ValueError, match="per_prompt"):
    C.concept_sets(CONCEPTS, 2, per_prompt=(2, 1))


def test_training_records_prompt_the_mentioned_concepts_in_a_seeded_shuffle(tmp_path):
  caps = ["a red circle to the left of a blue circle.", "a green square."]
  records = C.training_records(caps, CONCEPTS, seed=3)
  assert records == C.training_records(caps, CONCEPTS, seed=3)
  first = records[0]["conversations"]
  assert first[0]["from"] == "human" and first[1] == {"from": "gpt", "value": caps[0]}
  named = first[0]["value"].removeprefix("Write a caption that mentions: ").removesuffix(".").split(", ")
  assert sorted(named) == sorted(CONCEPTS)
  orders = {tuple(C.training_records(caps, CONCEPTS, seed=s)[0]["conversations"][0]["value"].split(", "))
            for s in range(20)}
  assert len(orders) > 1  # the order is shuffled, not the list's
  assert records[1]["conversations"][0]["value"] == "Write a caption."
  path = C.write_training_data(str(tmp_path / "lm.jsonl"), caps, CONCEPTS, seed=3)
  assert [json.loads(l) for l in open(path)] == records
  short = C.training_records(caps * 20, CONCEPTS, seed=0, per_prompt=(1, 2))
  named = [r["conversations"][0]["value"].removeprefix("Write a caption that mentions: ").removesuffix(".")
           for r in short[::2]]
  assert {len(n.split(", ")) for n in named} == {1, 2} and all(set(n.split(", ")) <= set(CONCEPTS) for n in named)


@pytest.mark.parametrize("m, n, per_prompt", [(7, 50, (1, 3)), (4, 33, (3, 3)), (3, 10, (1, 10)), (5, 1, (2, 2))])
def test_concept_sets_are_balanced_to_one_and_repeat_nothing(m, n, per_prompt):
  concepts = [f"c{i}" for i in range(m)]
  for seed in range(5):
    sets = C.concept_sets(concepts, n, per_prompt, seed=seed)
    assert len(sets) == n
    assert all(len(s) == len(set(s)) and per_prompt[0] <= len(s) <= min(per_prompt[1], m) for s in sets)
    counts = collections.Counter(c for s in sets for c in s)
    assert set(counts) <= set(concepts)
    full = [counts[c] for c in concepts]
    assert max(full) - min(full) <= 1, (seed, full)
  assert C.concept_sets(concepts, n, per_prompt, seed=1) == C.concept_sets(concepts, n, per_prompt, seed=1)
  assert C.concept_sets(concepts, 0) == []


def test_distinct_n_and_concept_balance_against_hand_computed_values():
  caps = ["a red circle", "a red square", "a blue circle", "Red!"]
  # words: [a red circle] [a red square] [a blue circle] [red]
  assert C.distinct_n(caps, 1) == pytest.approx(5 / 10)  # a red circle square blue
  assert C.distinct_n(caps, 2) == pytest.approx(5 / 6)   # a-red twice
  assert C.distinct_n(caps, 3) == pytest.approx(1.0)
  stats = C.caption_stats(caps, ["red", "blue", "circle"])
  p = [3 / 6, 1 / 6, 2 / 6]  # red 3 captions, blue 1, circle 2
  assert stats["concept balance (norm. entropy)"] == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(3))
  assert stats["concept max/min count"] == 3.0 and stats["concept coverage"] == 1.0
  assert stats["mean length (words)"] == pytest.approx(10 / 4) and stats["unique captions"] == 1.0
  stats = C.caption_stats(caps + ["a  RED circle"], ["red", "blue", "circle", "green"])
  p = [4 / 8, 1 / 8, 3 / 8]
  assert stats["concept balance (norm. entropy)"] == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(4))
  assert stats["concept coverage"] == 0.75 and stats["concept max/min count"] == math.inf
  assert stats["unique captions"] == 4 / 5 and stats["captions"] == 5
  assert C.balance([2, 2, 2]) == pytest.approx((1.0, 1.0))


def test_self_bleu_is_bleu_against_the_other_captions():
  caps = ["a red circle to the left of a blue square.", "a red circle above a blue square.",
          "a small green triangle.", "there is a large red circle.", "two shapes: a red circle and a star."]
  loo = [caps[:i] + caps[i + 1:] for i in range(len(caps))]
  want = float(np.mean(metrics.bleu_scores(caps, loo, 4)[3]))
  assert C.self_bleu(caps) == pytest.approx(want) and 0 < want < 1
  assert C.caption_stats(caps, CONCEPTS)["self-BLEU-4"] == pytest.approx(want)
  # A sample of 3: the same formula over some 3 of the 5 captions.
  got = C.self_bleu(caps, max_captions=3, seed=1)
  subsets = [[caps[i] for i in idx] for idx in itertools.combinations(range(5), 3)]
  options = [float(np.mean(metrics.bleu_scores(s, [s[:i] + s[i + 1:] for i in range(3)], 4)[3])) for s in subsets]
  assert any(got == pytest.approx(o) for o in options)
  assert C.self_bleu(caps, max_captions=3, seed=1) == got
  assert C.self_bleu(["x y z w v"] * 3) == pytest.approx(1.0)
  assert math.isnan(C.self_bleu(caps[:1]))


def test_compare_stats_puts_both_sets_side_by_side():
  rows = C.compare_stats(["a red circle", "a red circle"], ["a blue circle", "a red square"], CONCEPTS)
  by = {r["statistic"]: r for r in rows}
  assert by["unique captions"]["real"] == 0.5 and by["unique captions"]["synthetic"] == 1.0
  assert by["concept coverage"]["real"] == 0.5 and by["concept coverage"]["synthetic"] == 0.75


def test_drop_real_duplicates_ignores_case_and_spacing():
  generated = ["A red circle.", "a  red circle.", "a blue square.", "A Blue  square.", "a star."]
  kept, dropped = C.drop_real_duplicates(generated, ["a red circle."])
  assert kept == ["a blue square.", "A Blue  square.", "a star."] and dropped == 2
  kept, dropped = C.drop_real_duplicates(generated, ["a red circle."], dedupe=True)
  assert kept == ["a blue square.", "a star."] and dropped == 3


def test_prompt_ids_are_the_rendered_user_turn(tok):
  ids = C.prompt_ids(["red", "left of"], tok)
  assert ids[0] == tok.bos_token_id
  assert tok.decode(ids[1:]) == "USER: Write a caption that mentions: red, left of.\nASSISTANT:"


def test_generate_captions_returns_one_caption_a_set_deterministically(tok):
  lm = DecoderLM(LMConfig(**TINY_LM))
  params = init_params(lm, jax.random.key(0))
  sets = C.concept_sets(C.SHAPES_WORLD_CONCEPTS, 5, seed=0)
  kw = dict(max_new_tokens=8, batch_size=4, progress=False)  # 2 batches, the last one filled up
  out = C.generate_captions(lm, params, tok, sets, seed=1, **kw)
  assert len(out) == 5 and all(isinstance(c, str) for c in out) and any(out)
  assert out == C.generate_captions(lm, params, tok, sets, seed=1, **kw)
  assert out != C.generate_captions(lm, params, tok, sets, seed=2, **kw)
  # Greedy: a row is what decoding its prompt alone (no left padding) gives; the shortest
  # prompt (most padding) and the longest (none).
  from vlm_jax.models.generate import generate
  greedy = C.generate_captions(lm, params, tok, sets, temperature=0.0, **kw)
  by_length = sorted(range(5), key=lambda i: len(C.prompt_ids(sets[i], tok)))
  assert len(C.prompt_ids(sets[by_length[0]], tok)) < len(C.prompt_ids(sets[by_length[-1]], tok))
  for i in (by_length[0], by_length[-1]):
    s, got = sets[i], greedy[i]
    row = np.asarray(generate(lm, params, C.prompt_ids(s, tok)[None], max_new_tokens=8,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))[0].tolist()
    row = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
    assert got == tok.decode(row, skip_special_tokens=True).strip()
  assert C.generate_captions(lm, params, tok, [], **kw) == []


def test_training_records_train_a_caption_lm_through_the_pipeline_and_engine(tmp_path, tok_dir, tok):
  """The records build into a TFDS set (Conversations), the pipeline renders them with the prompt
  generation uses, and the engine trains a tiny LM on them."""
  from vlm_jax.data import builders, pipeline, shapes_world
  from vlm_jax.train.config import default_config
  from vlm_jax.train.loop import train
  caps = [r["turns"][1]["content"] for r in shapes_world.records("caption", "train", 48, max_objects=2)]
  path = C.write_training_data(str(tmp_path / "caption_lm.jsonl"), caps, C.SHAPES_WORLD_CONCEPTS)
  b = builders.build_from_files("conversations", path, str(tmp_path / "data"))
  assert builders.skipped_counts(b) == {}
  c = default_config()
  c.model = ml_collections.ConfigDict(dict(kind="lm", **TINY_LM))
  c.total_steps = c.checkpoint_every = 8
  c.progress = False
  c.optim.lr = 3e-3
  c.data = ml_collections.ConfigDict(dict(
      sources=[dict(name=f"{b.name}/{b.builder_config.name}", split="train", weight=1.0)],
      data_dir=str(tmp_path / "data"), tokenizer=tok_dir, global_batch_size=8, seq_len=96, image_slots=0,
      truncate=True))
  batch = next(pipeline.from_config(c.data, c.model))
  records = {f"caption_lm/{r['id']}": r for r in C.training_records(caps, C.SHAPES_WORLD_CONCEPTS)}
  for ids, mask, rid in zip(batch["input_ids"], batch["loss_mask"], batch["id"]):
    start = int(np.argmax(mask))
    concepts = records[str(rid)]["conversations"][0]["value"].removeprefix(
        "Write a caption that mentions: ").removesuffix(".").split(", ")
    np.testing.assert_array_equal(ids[:start], C.prompt_ids(concepts, tok))
  summary = train(c, str(tmp_path / "run"))
  assert summary["steps"] == "0 -> 8 of 8"
  assert summary["last loss"] < summary["first loss"]
