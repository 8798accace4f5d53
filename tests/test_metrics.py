"""Evaluation metrics and reports (vlm_jax.eval): hand-computed values on small cases."""

import json
import math
import os

import numpy as np
import pytest

from vlm_jax.eval import (
    accuracy,
    bleu,
    bleu4,
    cider_d,
    cider_d_scores,
    mean_perplexity,
    normalize_answer,
    perplexity,
    tokenize,
    vqa_exact_match,
    vqa_exact_match_by_type,
)
from vlm_jax.report import print_table, write_json

# ---------------------------------------------------------------------------
# VQA normalisation and exact match
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"),
    ("the red circle", "red circle"),
    ("Yes!", "yes"),
    ("  A   Blue\tSquare ", "blue square"),  # article, case, tab, whitespace
    ("ten", "10"),
    ("zero", "0"),
    ("2.5", "2.5"),  # a point followed by a digit stays
    ("2.", "2"),
    ("1,000", "1000"),  # comma between digits: every mark is deleted
    ("red,blue", "red blue"),  # otherwise a mark not touching a space becomes a space
    ("red, blue", "red blue"),  # ... and one touching a space is deleted
    ("red-blue", "red blue"),
    ("dont", "don't"),
    ("don't", "don't"),
    ("an apple", "apple"),
    ("is it? yes", "is it yes"),
    ("3 oclock", "3 o'clock"),  # the full official contractions table
    ("Theyll", "they'll"),
    ("yall", "y'all"),
    ("im", "im"),  # the official table's "Im" / "Ive" keys never match lower-cased words
    ("lets", "lets"),
])
def test_normalize_answer(raw, expected):
  assert normalize_answer(raw) == expected


def test_vqa_exact_match_multiple_references():
  preds = ["Two", "the cat", "blue", "Yes."]
  refs = [
      ["2", "two", "3"],  # "Two" -> "2": a match
      "a cat",  # "the cat" and "a cat" both -> "cat": a match
      ["red", "green"],  # no match
      ["no", "yes!"],  # "yes" == "yes": a match
  ]
  assert vqa_exact_match(preds, refs) == pytest.approx(3 / 4)
  assert vqa_exact_match(["x"], [["x"]]) == 1.0
  assert vqa_exact_match(["x"], [["y", "z"]]) == 0.0


def test_vqa_exact_match_by_type():
  preds = ["2", "red", "yes", "no", "3"]
  refs = ["two", "blue", "yes", "yes", ["three", "3"]]
  types = ["count", "color", "yes/no", "yes/no", "count"]
  assert vqa_exact_match_by_type(preds, refs, types) == {
      "color": 0.0, "count": 1.0, "yes/no": 0.5}


def test_vqa_length_mismatch_raises():
  with pytest.raises(ValueError):
    vqa_exact_match(["a", "b"], ["a"])
  with pytest.raises(ValueError):
    vqa_exact_match_by_type(["a"], ["a"], ["t", "u"])


# ---------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------


def test_tokenize():
  assert tokenize("A man, riding a Horse. Don't!") == ["a", "man", "riding", "a", "horse", "don't"]


def test_bleu4_identical_is_one():
  cands = ["a man riding a horse on the beach", "two dogs play in the snow"]
  refs = [[c, "something else entirely here"] for c in cands]
  assert bleu4(cands, refs) == pytest.approx(1.0)
  assert bleu(cands, refs) == pytest.approx([1.0, 1.0, 1.0, 1.0])


def test_bleu4_zero_without_4gram_overlap():
  # Every unigram, bigram and trigram matches, but no 4-gram does.
  cands = ["a b c x b c d"]
  refs = [["a b c y b c d"]]
  b1, b2, b3, b4 = bleu(cands, refs)
  assert b4 == 0.0
  assert b1 > 0 and b2 > 0 and b3 > 0
  # COCO's tiny epsilons make the same case tiny but positive.
  assert 0 < bleu(cands, refs, coco_smoothing=True)[3] < 1e-3


def test_bleu4_hand_computed_with_brevity_penalty():
  # candidate: the cat sat on the mat          (c = 6 words)
  # reference: the cat sat on the red mat      (r = 7 words)
  # 1-grams: the x2, cat, sat, on, mat all in the ref (the x2 there too)  p1 = 6/6
  # 2-grams: the cat, cat sat, sat on, on the | the mat missing           p2 = 4/5
  # 3-grams: the cat sat, cat sat on, sat on the | on the mat missing     p3 = 3/4
  # 4-grams: the cat sat on, cat sat on the | sat on the mat missing      p4 = 2/3
  # geometric mean = (1 * 4/5 * 3/4 * 2/3)^(1/4) = 0.4^(1/4) = 0.795271
  # brevity penalty = exp(1 - r/c) = exp(1 - 7/6) = exp(-1/6) = 0.846482
  # BLEU-4 = 0.795271 * 0.846482 = 0.673182
  expected = 0.4 ** 0.25 * math.exp(-1 / 6)
  got = bleu4(["The cat sat on the mat."], [["the cat sat on the red mat"]])
  assert got == pytest.approx(expected, rel=1e-12)
  assert got == pytest.approx(0.673182, abs=1e-6)
  # BLEU-1 = p1 * BP = exp(-1/6)
  assert bleu(["the cat sat on the mat"], ["the cat sat on the red mat"])[0] == pytest.approx(
      math.exp(-1 / 6))


def test_bleu_closest_reference_length():
  cand = ["w x y z"]
  # "w x y z q" contains every n-gram of the candidate: p1..p4 = 4/4, 3/3, 2/2, 1/1.
  # Closest length: 3 and 5 are both 1 away from c = 4; the shorter (r = 3) is
  # taken, r < c, so BP = 1 and BLEU-4 = 1 (the longer would give exp(1 - 5/4)).
  assert bleu4(cand, [["w x y z q", "w x y"]]) == pytest.approx(1.0)
  assert bleu4(cand, [["w x y", "w x y z q"]]) == pytest.approx(1.0)
  # With only the 5-word reference, r = 5 > c = 4: BP = exp(1 - 5/4).
  assert bleu4(cand, [["w x y z q"]]) == pytest.approx(math.exp(1 - 5 / 4))


def test_bleu_is_corpus_level_not_mean_of_sentences():
  # Sentence 1 is perfect (4 words), sentence 2 shares no word (4 words).
  # Corpus counts: p1 = 4/8, p2 = 3/6, p3 = 2/4, p4 = 1/2 -> BLEU-4 = 0.5, no BP.
  cands = ["a b c d", "e f g h"]
  refs = [["a b c d"], ["i j k l"]]
  assert bleu4(cands, refs) == pytest.approx(0.5)


def test_bleu_clipping():
  # "the the the the" vs "the cat": the unigram "the" is clipped to 1 -> p1 = 1/4;
  # no bigram matches, so BLEU-2..4 are 0; r = 2 < c = 4: no BP.
  scores = bleu(["the the the the"], [["the cat"]])
  assert scores[0] == pytest.approx(0.25)
  assert scores[1:] == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------


def test_cider_d_identical_vs_different_hand_computed():
  # Two images, N = 2, so every n-gram weight is tf * (log 2 - log df).
  # Image 1: candidate == reference == "big red circle here".
  # Image 2: candidate "green triangle", reference "blue square": no shared n-gram.
  # Every reference n-gram occurs in one image only: df = 1, log df = 0, weight = tf * log 2.
  # Image 1, order k (k = 1..4): candidate vector == reference vector v_k, so
  #   sim_k = sum_g min(v, v) * v / (|v_k| |v_k|) = |v_k|^2 / |v_k|^2 = 1,
  # lengths are equal (delta = 0, penalty 1): score = 10 * mean(1, 1, 1, 1) / 1 ref = 10.
  # Image 2: every dot product is 0 -> score 0. Corpus CIDEr-D = (10 + 0) / 2 = 5.
  cands = ["big red circle here", "green triangle"]
  refs = [["big red circle here"], ["blue square"]]
  per_image = cider_d_scores(cands, refs)
  np.testing.assert_allclose(per_image, [10.0, 0.0], atol=1e-12)
  assert cider_d(cands, refs) == pytest.approx(5.0)
  assert per_image[0] > per_image[1]


def test_cider_d_short_sentence_orders_average():
  # Same as above with two-word sentences: only orders 1 and 2 exist, orders 3
  # and 4 have zero vectors and contribute 0, so image 1 scores
  # 10 * mean(1, 1, 0, 0) = 5 and the corpus (5 + 0) / 2 = 2.5.
  cands = ["red circle", "green triangle"]
  refs = [["red circle"], ["blue square"]]
  np.testing.assert_allclose(cider_d_scores(cands, refs), [5.0, 0.0], atol=1e-12)


def test_cider_d_hand_computed_clipping_idf_and_length_penalty():
  # Image 1: candidate "red circle red circle", reference "red circle".
  # Image 2: candidate "x",                     reference "red square".
  # N = 2, L = log 2. df: red = 2 (both references), circle = square = 1,
  # "red circle" = "red square" = 1; n-grams of no reference have df 0 -> log max(1, 0) = 0.
  # Weights tf * (L - log df):
  #   reference 1: red 1*(L - L) = 0, circle L;  bigram "red circle" L
  #   candidate 1: red 2*0 = 0, circle 2L;       bigrams "red circle" 2L, "circle red" L
  # order 1: dot = min(0,0)*0 + min(2L, L)*L = L^2; |c| = 2L, |r| = L -> sim_1 = 1/2
  # order 2: dot = min(2L, L)*L + min(L, 0)*0 = L^2; |c| = sqrt(4+1) L, |r| = L -> sim_2 = 1/sqrt(5)
  # orders 3, 4: the reference has none -> 0
  # length (COCO counts bigrams): candidate 3, reference 1, delta = 2
  #   penalty = exp(-2^2 / (2 * 6^2)) = exp(-1/18)
  # score_1 = 10 * (1/2 + 1/sqrt(5) + 0 + 0) / 4 * exp(-1/18)
  #         = 2.5 * 0.947214 * 0.945959 = 2.240064
  # Image 2 shares nothing: 0.
  expected = 2.5 * (0.5 + 1 / math.sqrt(5)) * math.exp(-1 / 18)
  per_image = cider_d_scores(["red circle red circle", "x"], [["red circle"], ["red square"]])
  np.testing.assert_allclose(per_image, [expected, 0.0], rtol=1e-12)
  assert per_image[0] == pytest.approx(2.240064, abs=1e-6)


def test_cider_d_multiple_references_are_averaged():
  # Image 1 with references A (identical to the candidate) and B (disjoint):
  # sum over refs = 10-scale score 10 for A plus 0 for B, divided by 2 refs = 5.
  cands = ["big red circle here", "small blue square there"]
  refs = [["big red circle here", "tiny green dot"], ["small blue square there"]]
  np.testing.assert_allclose(cider_d_scores(cands, refs), [5.0, 10.0], atol=1e-12)


def test_cider_d_symmetries():
  cands = ["a red circle on the left", "two blue squares", "a green triangle above a square"]
  refs = [
      ["a red circle at the left", "red circle left side"],
      ["two blue squares", "a pair of blue squares"],
      ["green triangle over a square", "a triangle above the square"],
  ]
  base = cider_d_scores(cands, refs)
  assert np.all(base >= 0)
  # Permuting the images permutes the per-image scores; the corpus mean is unchanged.
  perm = [2, 0, 1]
  permuted = cider_d_scores([cands[i] for i in perm], [refs[i] for i in perm])
  np.testing.assert_allclose(permuted, base[perm], rtol=1e-12)
  # The order of an image's references does not matter.
  np.testing.assert_allclose(cider_d_scores(cands, [r[::-1] for r in refs]), base, rtol=1e-12)
  # Renaming the vocabulary consistently does not matter either.
  rename = lambda s: " ".join("w" + w for w in tokenize(s))  # noqa: E731
  renamed = cider_d_scores([rename(c) for c in cands], [[rename(x) for x in r] for r in refs])
  np.testing.assert_allclose(renamed, base, rtol=1e-12)
  # Mirrored roles: swapping which image gets the exact caption mirrors the scores.
  a = cider_d_scores(["p q r s", "t u"], [["p q r s"], ["v w"]])
  b = cider_d_scores(["t u", "v w x y"], [["p q"], ["v w x y"]])
  np.testing.assert_allclose(a, b[::-1], atol=1e-12)
  # A single-image corpus has log N = 0, so every weight and the score are 0.
  assert cider_d(["a red circle"], [["a red circle"]]) == 0.0


# ---------------------------------------------------------------------------
# accuracy / perplexity
# ---------------------------------------------------------------------------


def test_accuracy():
  assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == pytest.approx(0.75)
  assert accuracy(np.array(["a", "b"]), np.array(["a", "c"])) == pytest.approx(0.5)
  logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
  assert accuracy(logits, [1, 0, 0]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError):
    accuracy([1, 2], [1, 2, 3])


@pytest.mark.parametrize("vocab", [2, 7, 32000])
def test_perplexity_uniform_equals_vocab_size(vocab):
  lp = np.full((3, 5), -math.log(vocab))
  np.testing.assert_allclose(perplexity(lp), [vocab] * 3, rtol=1e-10)
  assert mean_perplexity(lp) == pytest.approx(vocab, rel=1e-10)
  assert mean_perplexity(lp, token_weighted=True) == pytest.approx(vocab, rel=1e-10)


def test_perplexity_mask():
  # Row 0: masked tokens are log(1/4); the unmasked ones (mask 0) are -inf and ignored.
  # Row 1: log p = log 1 and log 1/4 over two counted tokens -> exp(log 4 / 2) = 2.
  # Row 2: no counted token -> NaN, skipped by mean_perplexity.
  q = math.log(0.25)
  lp = np.array([[q, q, -np.inf], [0.0, q, 5.0], [q, q, q]])
  mask = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
  ppl = perplexity(lp, mask)
  np.testing.assert_allclose(ppl[:2], [4.0, 2.0], rtol=1e-12)
  assert np.isnan(ppl[2])
  assert mean_perplexity(lp, mask) == pytest.approx(3.0)
  # Token-weighted: NLL total 3 * log 4 over 4 tokens -> 4^(3/4).
  assert mean_perplexity(lp, mask, token_weighted=True) == pytest.approx(4 ** 0.75)
  # A single sample [L] is one row.
  np.testing.assert_allclose(perplexity([q, q]), [4.0])


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def test_print_table_alignment_and_formats(capsys):
  rows = [
      {"model": "tiny", "vqa acc": 0.834, "bleu4": 0.23456, "top1 %": 0.5, "steps": 1200},
      {"model": "bigger-model", "vqa acc": 0.9, "bleu4": 12.3456, "top1 %": 1.0, "steps": 7},
  ]
  text = print_table(rows, "Results")
  assert capsys.readouterr().out == text + "\n"
  lines = text.split("\n")
  assert lines[0] == "Results"
  assert set(lines[1]) == {"="}
  header, rule, row1, row2 = lines[2:]
  assert header.split() == ["model", "vqa", "acc", "bleu4", "top1", "%", "steps"]
  assert row1.split() == ["tiny", "83.4%", "0.2346", "50.0%", "1200"]
  assert row2.split() == ["bigger-model", "90.0%", "12.35", "100.0%", "7"]
  # Every row has the same width, and every column ends (numbers, right-aligned)
  # or starts (text, left-aligned) at the same offset in every line.
  assert len(header) == len(rule) == len(row1) == len(row2)
  for name in ["vqa acc", "bleu4", "top1 %", "steps"]:
    end = header.index(name) + len(name)
    for line in (row1, row2):
      assert line[end - 1] != " " and (end == len(line) or line[end] == " ")
  assert row1.index("tiny") == row2.index("bigger-model") == header.index("model") == 0
  assert rule.split() == ["-" * len("bigger-model"), "-" * 7, "-" * 6, "-" * 6, "-" * 5]


def test_print_table_columns_and_missing(capsys):
  rows = [{"a": 1, "b": "x"}, {"a": 2.5}]
  text = print_table(rows, "T", columns=["b", "a"])
  capsys.readouterr()
  lines = text.split("\n")
  assert lines[2].split() == ["b", "a"]
  assert lines[3].split() == ["-", "-----"]
  assert lines[4].split() == ["x", "1"]
  assert lines[5].split() == ["-", "2.500"]


def test_write_json_round_trip(tmp_path):
  path = tmp_path / "deep" / "er" / "results.json"
  obj = {"bleu4": 0.25, "per_type": {"count": 1.0}, "n": np.int64(3), "scores": np.array([1.5, 2.0]),
         "names": ["a", "b"]}
  assert write_json(path, obj) == path
  with open(path) as f:
    loaded = json.load(f)
  assert loaded == {"bleu4": 0.25, "per_type": {"count": 1.0}, "n": 3, "scores": [1.5, 2.0],
                    "names": ["a", "b"]}
  # Overwrite in place; no temporary files are left behind.
  write_json(path, {"x": 1})
  with open(path) as f:
    assert json.load(f) == {"x": 1}
  assert os.listdir(path.parent) == ["results.json"]


def test_write_json_failure_leaves_old_file(tmp_path):
  path = tmp_path / "r.json"
  write_json(path, {"ok": True})
  with pytest.raises(TypeError):
    write_json(path, {"bad": object()})
  with open(path) as f:
    assert json.load(f) == {"ok": True}
  assert os.listdir(tmp_path) == ["r.json"]
