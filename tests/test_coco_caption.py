"""COCO caption BLEU: `bleu_scores` / `bleu` against a transcription of COCO's BleuScorer.

`CocoBleuScorer` below re-states the BLEU part of the COCO caption evaluation
code (salaniz/pycocoevalcap, bleu/bleu_scorer.py at ad63453, the same file as
tylin/coco-caption's pycocoevalcap/bleu/bleu_scorer.py): `precook`,
`cook_refs`, `cook_test` and `BleuScorer.compute_score`, kept in its shape
(defaultdicts, the running product, `bleu_list`) so it reads side by side
with the original. It is reduced to what `Bleu.compute_score` (bleu/bleu.py)
uses: `cook_refs` / `cook_test` with their default `eff=None`, then
`compute_score(option='closest')`. Captions are generated as lower-case words
joined by single spaces, so `str.split` (COCO, after its PTB tokenizer) and
our `tokenize` see the same tokens.
"""

import math
import random
from collections import defaultdict

import numpy as np
import pytest

from vlm_jax.eval import bleu, bleu4, bleu_scores

# ---------------------------------------------------------------------------
# The reference: COCO's BLEU rules, transcribed.
# ---------------------------------------------------------------------------


def precook(s, n=4):
  words = s.split()
  counts = defaultdict(int)
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      ngram = tuple(words[i:i + k])
      counts[ngram] += 1
  return (len(words), counts)


def cook_refs(refs, n=4):
  reflen = []
  maxcounts = {}
  for ref in refs:
    rl, counts = precook(ref, n)
    reflen.append(rl)
    for (ngram, count) in counts.items():
      maxcounts[ngram] = max(maxcounts.get(ngram, 0), count)
  return (reflen, maxcounts)  # eff=None: "closest" keeps the list of lengths


def cook_test(test, refs, n=4):
  reflen, refmaxcounts = refs
  testlen, counts = precook(test, n)
  result = {}
  result["reflen"] = reflen
  result["testlen"] = testlen
  result["guess"] = [max(0, testlen - k + 1) for k in range(1, n + 1)]
  result["correct"] = [0] * n
  for (ngram, count) in counts.items():
    result["correct"][len(ngram) - 1] += min(refmaxcounts.get(ngram, 0), count)
  return result


class CocoBleuScorer:
  """bleu_scorer.py's BleuScorer: `+= (test, refs)`, then `compute_score(option='closest')`."""

  def __init__(self, n=4):
    self.n = n
    self.crefs = []
    self.ctest = []

  def __iadd__(self, other):
    test, refs = other
    self.crefs.append(cook_refs(refs, self.n))
    self.ctest.append(cook_test(test, self.crefs[-1], self.n))
    return self

  def _single_reflen(self, reflens, option=None, testlen=None):
    assert option == "closest"
    return min((abs(l - testlen), l) for l in reflens)[1]

  def compute_score(self, option="closest"):
    n = self.n
    small = 1e-9
    tiny = 1e-15  ## so that if guess is 0 still return 0
    bleu_list = [[] for _ in range(n)]
    self._testlen = 0
    self._reflen = 0
    totalcomps = {"testlen": 0, "reflen": 0, "guess": [0] * n, "correct": [0] * n}
    for comps in self.ctest:
      testlen = comps["testlen"]
      self._testlen += testlen
      reflen = self._single_reflen(comps["reflen"], option, testlen)
      self._reflen += reflen
      for key in ["guess", "correct"]:
        for k in range(n):
          totalcomps[key][k] += comps[key][k]
      # append per image bleu score
      bleu = 1.
      for k in range(n):
        bleu *= (float(comps["correct"][k]) + tiny) / (float(comps["guess"][k]) + small)
        bleu_list[k].append(bleu ** (1. / (k + 1)))
      ratio = (testlen + tiny) / (reflen + small)  ## N.B.: avoid zero division
      if ratio < 1:
        for k in range(n):
          bleu_list[k][-1] *= math.exp(1 - 1 / ratio)
    totalcomps["reflen"] = self._reflen
    totalcomps["testlen"] = self._testlen
    bleus = []
    bleu = 1.
    for k in range(n):
      bleu *= float(totalcomps["correct"][k] + tiny) / (totalcomps["guess"][k] + small)
      bleus.append(bleu ** (1. / (k + 1)))
    ratio = (self._testlen + tiny) / (self._reflen + small)  ## N.B.: avoid zero division
    if ratio < 1:
      for k in range(n):
        bleus[k] *= math.exp(1 - 1 / ratio)
    return bleus, bleu_list


def coco_bleu(cands, refs, n=4):
  """COCO's (corpus scores, per-image lists) for candidate i with references refs[i]."""
  scorer = CocoBleuScorer(n=n)
  for c, r in zip(cands, refs):
    scorer += (c, r)
  return scorer.compute_score(option="closest")


# ---------------------------------------------------------------------------
# Generated caption cases.
# ---------------------------------------------------------------------------

_VOCAB = ["a", "the", "man", "dog", "red", "ball", "on", "grass", "runs", "with", "two", "big"]
_OTHER = ["zebra", "kite", "ocean", "piano", "sky", "blue"]  # never in a reference


def _sentence(rng, lo, hi, vocab=_VOCAB):
  return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))


def _case(rng):
  """One image: (prediction, references), drawn from the shapes the brief lists."""
  refs = [_sentence(rng, 1, 14) for _ in range(rng.randint(1, 5))]
  kind = rng.randrange(9)
  if kind == 0:  # full overlap: the prediction is one of the references
    pred = rng.choice(refs)
  elif kind == 1:  # no overlap at all
    pred = _sentence(rng, 1, 12, _OTHER)
  elif kind == 2:  # shorter than every reference: a prefix of the shortest
    refs = [_sentence(rng, 5, 14) for _ in range(rng.randint(1, 5))]
    shortest = min(refs, key=lambda r: len(r.split())).split()
    pred = " ".join(shortest[:rng.randint(1, len(shortest) - 1)])
  elif kind == 3:  # several references of clearly different lengths
    refs = [_sentence(rng, length, length) for length in rng.sample(range(1, 20), rng.randint(2, 5))]
    pred = _sentence(rng, 1, 20)
  elif kind == 4:  # a span of a reference, plus noise words
    words = rng.choice(refs).split()
    i = rng.randrange(len(words))
    pred = " ".join(words[i:rng.randint(i + 1, len(words))] + [rng.choice(_OTHER)] * rng.randint(0, 3))
  elif kind == 5:  # repeated words: clipping
    pred = " ".join([rng.choice(_VOCAB)] * rng.randint(1, 8))
  elif kind == 6:  # tiny predictions: orders with no n-gram at all (guess 0)
    pred = _sentence(rng, 1, 3)
  elif kind == 7:  # a reference shuffled: all unigrams, few longer matches
    words = rng.choice(refs).split()
    rng.shuffle(words)
    pred = " ".join(words)
  else:  # anything
    pred = _sentence(rng, 1, 16)
  return pred, refs


def _corpus(seed, size):
  rng = random.Random(seed)
  cases = [_case(rng) for _ in range(size)]
  return [p for p, _ in cases], [r for _, r in cases]


@pytest.mark.parametrize("seed", range(20))
def test_per_image_bleu_matches_coco(seed):
  cands, refs = _corpus(seed, 60)
  _, coco_list = coco_bleu(cands, refs)
  ours = bleu_scores(cands, refs)
  assert ours.shape == (4, len(cands))
  np.testing.assert_allclose(ours, np.array(coco_list), rtol=1e-12, atol=1e-12)
  # Same float steps as COCO, so in fact bit for bit.
  assert ours.tolist() == coco_list


@pytest.mark.parametrize("max_n", [1, 2, 3, 5])
def test_per_image_bleu_matches_coco_other_orders(max_n):
  cands, refs = _corpus(100 + max_n, 80)
  _, coco_list = coco_bleu(cands, refs, n=max_n)
  ours = bleu_scores(cands, refs, max_n)
  assert ours.shape == (max_n, len(cands))
  np.testing.assert_allclose(ours, np.array(coco_list), rtol=1e-12, atol=1e-12)
  # A candidate's BLEU-k does not depend on the highest order asked for.
  np.testing.assert_array_equal(ours[:min(max_n, 4)], bleu_scores(cands, refs)[:min(max_n, 4)])


@pytest.mark.parametrize("seed", range(20))
def test_corpus_bleu_matches_coco(seed):
  cands, refs = _corpus(seed, 60)
  coco_score, _ = coco_bleu(cands, refs)
  smoothed = bleu(cands, refs, coco_smoothing=True)
  np.testing.assert_allclose(smoothed, coco_score, rtol=1e-12, atol=1e-12)
  assert smoothed == coco_score  # bit for bit
  # The default (unsmoothed) corpus BLEU differs from COCO only by the
  # smoothing terms (~1e-9 / n-gram count relative) when every order matches.
  np.testing.assert_allclose(bleu(cands, refs), coco_score, rtol=1e-9, atol=0)
  assert bleu4(cands, refs) == bleu(cands, refs)[3]


def test_single_image_corpus_is_its_per_image_score():
  for seed in range(50):
    cands, refs = _corpus(1000 + seed, 1)
    assert bleu_scores(cands, refs)[:, 0].tolist() == bleu(cands, refs, coco_smoothing=True)


def test_edge_cases_match_coco():
  # Empty predictions / references (what the PTB tokenizer leaves of "..."),
  # a missing order, equal lengths, ties in the closest length.
  cands = ["", "a", "", "a b c d", "w x y z", "w x y z", "the the the"]
  refs = [["a b"], [""], [""], ["a b c d"], ["w x y z q", "w x y"], ["w x y", "w x y z q"], ["the cat"]]
  coco_score, coco_list = coco_bleu(cands, refs)
  assert bleu_scores(cands, refs).tolist() == coco_list
  assert bleu(cands, refs, coco_smoothing=True) == coco_score


# ---------------------------------------------------------------------------
# Hand-computed per-image scores.
# ---------------------------------------------------------------------------


def test_per_image_bleu_hand_computed():
  # Image 1: "a b c x b c d" vs "a b c y b c d" (both 7 words).
  #   1-grams: a, b x2, c x2, d match, x not            p1 = 6/7
  #   2-grams: ab, bc x2, cd match; cx, xb not          p2 = 4/6
  #   3-grams: abc, bcd match; bcx, cxb, xbc not        p3 = 2/5
  #   4-grams: abcx, bcxb, cxbc, xbcd: none             p4 = (0 + 1e-15) / (4 + 1e-9)
  #   BLEU-1 = 6/7, BLEU-2 = (6/7 * 4/6)^(1/2) = (4/7)^(1/2), BLEU-3 = (8/35)^(1/3),
  #   BLEU-4 = (8/35 * 1e-15 / 4)^(1/4) = (2e-15 / 35)^(1/4) = 8.6944e-5
  #   ratio = (7 + 1e-15) / (7 + 1e-9) is just under 1: BP = exp(-1e-9 / 7), 1 to 1e-10.
  # Image 2: "a b" vs "a b c d" (shorter than the reference).
  #   p1 = 2/2, p2 = 1/1; no 3- or 4-gram in the prediction (guess 0):
  #   p3 = p4 = 1e-15 / 1e-9 = 1e-6.
  #   Before BP: 1, 1, (1e-6)^(1/3) = 1e-2, (1e-12)^(1/4) = 1e-3.
  #   BP = exp(1 - 4/2) = exp(-1)  ->  e^-1, e^-1, 1e-2 e^-1, 1e-3 e^-1.
  # Image 3: "" vs "x y": p_k = 1e-15 / 1e-9, ratio = 1e-15 / (2 + 1e-9) -> BP = exp(-2e15) = 0.
  cands = ["a b c x b c d", "a b", ""]
  refs = [["a b c y b c d"], ["a b c d"], ["x y"]]
  got = bleu_scores(cands, refs)
  e = math.exp(-1)
  expected = np.array([
      [6 / 7, math.sqrt(4 / 7), (8 / 35) ** (1 / 3), (2e-15 / 35) ** 0.25],
      [e, e, 1e-2 * e, 1e-3 * e],
      [0.0, 0.0, 0.0, 0.0],
  ]).T
  # The 1e-9 added to each n-gram count moves every score by ~1e-9 (relative).
  np.testing.assert_allclose(got, expected, rtol=1e-8, atol=0)
  assert got[3, 0] == pytest.approx(8.6944e-5, rel=1e-4)
  # Unsmoothed sentence BLEU: exact zeros for the missing orders, no BP at equal lengths.
  plain = bleu_scores(cands, refs, coco_smoothing=False)
  np.testing.assert_allclose(plain[:, 0], [6 / 7, math.sqrt(4 / 7), (8 / 35) ** (1 / 3), 0.0],
                             rtol=1e-15, atol=0)
  np.testing.assert_allclose(plain[:, 1], [e, e, 0.0, 0.0], rtol=1e-15, atol=0)
  assert plain[:, 2].tolist() == [0.0] * 4


def test_per_image_mean_is_not_corpus_bleu():
  # "a b c d" is perfect; "a b x y" (vs "a b c d") matches a, b and "a b" only.
  # Corpus counts: p1 = 6/8, p2 = 4/6, p3 = 2/4, p4 = 1/2, no BP:
  #   BLEU-4 = (1/8)^(1/4) = 0.594604.
  # Per image: BLEU-4 = 1 and (2/4 * 1/3 * 1e-15/2 * 1e-15/1)^(1/4) ~ 2e-8: mean ~ 0.5.
  cands = ["a b c d", "a b x y"]
  refs = [["a b c d"], ["a b c d"]]
  per_image = bleu_scores(cands, refs)
  assert per_image[3, 0] == pytest.approx(1.0)
  assert per_image[3, 1] == pytest.approx((1e-30 / 12) ** 0.25, rel=1e-6)
  assert bleu4(cands, refs) == pytest.approx(0.125 ** 0.25, rel=1e-12)
  assert per_image[3].mean() == pytest.approx(0.5, abs=1e-7)


def test_per_image_bleu_order_and_reference_invariance():
  cands, refs = _corpus(7, 40)
  base = bleu_scores(cands, refs)
  perm = list(range(len(cands)))[::-1]
  np.testing.assert_array_equal(bleu_scores([cands[i] for i in perm], [refs[i] for i in perm]),
                                base[:, perm])
  np.testing.assert_array_equal(bleu_scores(cands, [r[::-1] for r in refs]), base)
  # Punctuation and case go through `tokenize`, as for `bleu`.
  loud = [c.upper() + "." for c in cands]
  np.testing.assert_array_equal(bleu_scores(loud, refs), base)


def test_per_image_bleu_bad_inputs_raise():
  with pytest.raises(ValueError):
    bleu_scores(["a", "b"], [["a"]])
  with pytest.raises(ValueError):
    bleu_scores(["a"], [[]])
  with pytest.raises(ValueError):
    bleu_scores([], [])
