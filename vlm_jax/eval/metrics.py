"""Evaluation metrics: VQA accuracy and exact match, BLEU, CIDEr-D, accuracy, perplexity.

Pure NumPy / Python; nothing here needs JAX (JAX arrays are accepted wherever
NumPy arrays are, through `np.asarray`).

`vqa_accuracy` is the official VQA accuracy (the VQA API's vqaEval.py, rule for
rule); `vqa_exact_match` is plain exact match after the same answer processing,
for data with one right answer per question. BLEU and CIDEr-D follow Papineni
et al. (2002) and Vedantam et al. (2015) with the conventions of the COCO
caption evaluation code (see each function).
Captions are tokenised by `tokenize` (lower case, words of letters / digits
with inner apostrophes; punctuation dropped) instead of the Stanford PTB
tokenizer the COCO tools run, so scores on real data can differ slightly from
published COCO numbers; on the same token sequences they agree.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence, Union

import numpy as np

Reference = Union[str, Sequence[str]]

# ---------------------------------------------------------------------------
# VQA: the official answer processing, official accuracy and exact match.
#
# Source of every table and rule below: the VQA API, GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py (commit a013f00, "Fixed
# processing answers bug", 2021): VQAEval.evaluate, processPunctuation,
# processDigitArticle. That script is Python 2; where Python 3 would read it
# differently (regex digit classes), we keep the Python 2 meaning.
# ---------------------------------------------------------------------------

# The official `punct` list, handled one mark at a time in this order. "." is
# not in it (it has its own rule, `_VQA_PERIOD_STRIP`) and neither is "'"
# (kept, so contractions survive).
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!")
# Official `commaStrip` r"(\d)(\,)(\d)": a comma between digits ("1,000") anywhere
# in the answer switches every mark to deletion. Python 2's `\d` (no re.UNICODE
# flag) is ASCII [0-9], hence the explicit class.
_VQA_COMMA_BETWEEN_DIGITS = re.compile(r"[0-9],[0-9]")
# Official `periodStrip` r"(?!<=\d)(\.)(?!\d)": its first group is a mistyped
# look-behind, a look-ahead for "<=digit" that cannot hold where a "." stands,
# so it removes every "." not followed by a digit ("2.5" keeps its point, "2."
# loses it). The script passes re.UNICODE (= 32) where `sub` takes its `count`,
# so at most the first 32 such periods go; we keep that limit.
_VQA_PERIOD_STRIP = re.compile(r"\.(?![0-9])")
_VQA_PERIOD_STRIP_COUNT = 32
# Official `manualMap` and `articles`.
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The official `contractions` table, less the entries that can never fire:
# words are lower-cased before the look-up, so its capitalised keys "Id've",
# "I'dve", "Im", "Ive" never match ("im", "ive" stay as they are), and
# "let's" / "she's" map to themselves ("lets" is therefore left alone too).
# Kept verbatim otherwise, including the reversed "somebody'd" -> "somebodyd".
_VQA_CONTRACTIONS = {
    "'ow'sat": "'ow's'at", "'ows'at": "'ow's'at", "aint": "ain't", "arent": "aren't",
    "cant": "can't", "couldn'tve": "couldn't've", "couldnt": "couldn't",
    "couldnt've": "couldn't've", "couldve": "could've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadn'tve": "hadn't've", "hadnt": "hadn't", "hadnt've": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "he'dve": "he'd've", "hed": "he'd", "hed've": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't",
    "it'dve": "it'd've", "itd": "it'd", "itd've": "it'd've", "itll": "it'll", "maam": "ma'am",
    "mightn'tve": "mightn't've", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "shant": "shan't", "she'dve": "she'd've", "shed've": "she'd've", "shouldn'tve": "shouldn't've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldve": "should've",
    "somebody'd": "somebodyd", "somebody'dve": "somebody'd've", "somebodyd've": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someone'dve": "someone'd've",
    "someoned": "someone'd", "someoned've": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "something'dve": "something'd've", "somethingd": "something'd",
    "somethingd've": "something'd've", "somethingll": "something'll", "thats": "that's",
    "there'dve": "there'd've", "thered": "there'd", "thered've": "there'd've",
    "therere": "there're", "theres": "there's", "they'dve": "they'd've", "theyd": "they'd",
    "theyd've": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "we'dve": "we'd've", "wed've": "we'd've",
    "werent": "weren't", "weve": "we've", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "who'dve": "who'd've", "whod": "who'd",
    "whod've": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldn'tve": "wouldn't've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldve": "would've",
    "y'all'dve": "y'all'd've", "y'alld've": "y'all'd've", "y'allll": "y'all'll", "yall": "y'all",
    "yall'd've": "y'all'd've", "yall'll": "y'all'll", "you'dve": "you'd've", "youd": "you'd",
    "youd've": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def _vqa_clean_whitespace(s: str) -> str:
  """The official first step for every answer: newlines/tabs to spaces, then strip."""
  return str(s).replace("\n", " ").replace("\t", " ").strip()


def _vqa_process_punctuation(text: str) -> str:
  """Official `processPunctuation`: marks deleted or spaced out, then periods stripped.

  Each mark is deleted when the *original* text has it touching a space or has
  a comma between digits, and replaced by a space otherwise ("red-blue" ->
  "red blue", "red - blue" -> "red  blue", "1,000" -> "1000").
  """
  out = text
  delete_all = _VQA_COMMA_BETWEEN_DIGITS.search(text) is not None
  for p in _VQA_PUNCT:
    if delete_all or (p + " " in text) or (" " + p in text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _VQA_PERIOD_STRIP.sub("", out, count=_VQA_PERIOD_STRIP_COUNT)


def _vqa_process_digit_article(text: str) -> str:
  """Official `processDigitArticle`: lower case, number words to digits, articles out, contractions."""
  words = []
  for word in text.lower().split():
    word = _NUMBER_WORDS.get(word, word)
    if word not in _ARTICLES:
      words.append(_VQA_CONTRACTIONS.get(word, word))
  return " ".join(words)


def normalize_answer(s: str) -> str:
  """The official VQA answer processing, applied unconditionally (used by exact match).

  Whitespace cleanup, then `processPunctuation`, then `processDigitArticle`,
  with the official tables. Note the official *accuracy* (`vqa_accuracy`)
  runs the last two steps only when the human answers disagree; this
  function always runs them, which is what exact match wants.

  >>> normalize_answer("Two."), normalize_answer("the red circle"), normalize_answer("3 oclock")
  ('2', 'red circle', "3 o'clock")
  """
  return _vqa_process_digit_article(_vqa_process_punctuation(_vqa_clean_whitespace(s)))


def _as_reference_list(ref: Reference) -> list[str]:
  if isinstance(ref, str):
    return [ref]
  refs = list(ref)
  if not all(isinstance(r, str) for r in refs):
    raise TypeError(f"a reference must be a string or a sequence of strings, got {ref!r}")
  return refs


def _check_lengths(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
  if len(a) != len(b):
    raise ValueError(f"{name_a} and {name_b} differ in length: {len(a)} vs {len(b)}")
  if len(a) == 0:
    raise ValueError(f"{name_a} is empty")


def _by_type(scores: Sequence[float], types: Sequence[str]) -> dict[str, float]:
  if len(types) != len(scores):
    raise ValueError(f"types has {len(types)} entries, predictions {len(scores)}")
  groups: dict[str, list[float]] = {}
  for t, v in zip(types, scores):
    groups.setdefault(t, []).append(v)
  return {t: float(np.mean(groups[t])) for t in sorted(groups, key=str)}


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
  """Official VQA accuracy of one answer (VQAEval.evaluate), in [0, 1].

  `human_answers`: the question's human answers (10 in VQA v1/v2). All
  answers are whitespace-cleaned; only if the human answers then differ
  (as raw strings, case included) are the prediction and every human answer
  run through the punctuation and digit/article processing, otherwise they
  are compared as they are (so "Yes" scores 0 against ten "yes"). The score
  averages, over the leave-one-out subsets (human i left out),
  min(#other humans equal to the prediction / 3, 1): with 10 answers, 1, 2,
  3, >=4 matching humans give 0.3, 0.6, 0.9, 1.0.

  One human answer cannot score under this rule (its subset is empty), so
  fewer than two raise; score one-reference data with `vqa_exact_match`.
  """
  if isinstance(human_answers, str):
    raise TypeError("human_answers must be a sequence of answer strings, not one string")
  humans = [_vqa_clean_whitespace(a) for a in human_answers]
  if len(humans) < 2:
    raise ValueError(f"vqa_accuracy needs at least 2 human answers, got {len(humans)}; "
                     "use vqa_exact_match for one reference")
  pred = _vqa_clean_whitespace(prediction)
  if len(set(humans)) > 1:
    humans = [_vqa_process_digit_article(_vqa_process_punctuation(a)) for a in humans]
    pred = _vqa_process_digit_article(_vqa_process_punctuation(pred))
  matches = [a == pred for a in humans]
  total = sum(matches)
  # Same order of float operations as the official script, so scores agree bit for bit.
  per_subset = [min(1.0, float(total - m) / 3) for m in matches]
  return float(sum(per_subset)) / len(per_subset)


def _vqa_accuracies(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> list[float]:
  _check_lengths("predictions", predictions, "human_answers", human_answers)
  return [vqa_accuracy(p, h) for p, h in zip(predictions, human_answers)]


def mean_vqa_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
  """Official VQA accuracy of a set (the script's "overall"), as a fraction in [0, 1].

  The script reports round(100 * this, 2); `human_answers[i]` lists question
  i's human answers.
  """
  return float(np.mean(_vqa_accuracies(predictions, human_answers)))


def vqa_accuracy_by_type(predictions: Sequence[str], human_answers: Sequence[Sequence[str]],
                         types: Sequence[str]) -> dict[str, float]:
  """`mean_vqa_accuracy` within each type: {type: fraction in [0, 1]}, keys sorted.

  Pass question types for the script's "perQuestionType", answer types for
  its "perAnswerType".
  """
  return _by_type(_vqa_accuracies(predictions, human_answers), types)


def _vqa_matches(predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
  _check_lengths("predictions", predictions, "references", references)
  matches = []
  for pred, ref in zip(predictions, references):
    accepted = {normalize_answer(r) for r in _as_reference_list(ref)}
    matches.append(float(normalize_answer(pred) in accepted))
  return matches


def vqa_exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
  """Fraction (in [0, 1]) of predictions equal, after `normalize_answer`, to a reference.

  For data with one right answer per question (the shapes world). Each
  reference is one acceptable answer (a string) or several (a sequence; any
  one counts). Not the official VQA accuracy (`vqa_accuracy`), which weighs
  how many of the human answers agree.
  """
  return float(np.mean(_vqa_matches(predictions, references)))


def vqa_exact_match_by_type(preds: Sequence[str], refs: Sequence[Reference],
                            types: Sequence[str]) -> dict[str, float]:
  """`vqa_exact_match` within each question type: {type: fraction in [0, 1]}, keys sorted."""
  return _by_type(_vqa_matches(preds, refs), types)


# ---------------------------------------------------------------------------
# Caption metrics.
# ---------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(s: str) -> list[str]:
  """Lower-case words: runs of letters/digits, inner apostrophes kept ("don't"); punctuation dropped."""
  return _WORD.findall(str(s).lower())


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
  """Counts of every k-gram, k = 1..n, keyed by the tuple of its tokens."""
  counts: Counter = Counter()
  for k in range(1, n + 1):
    for i in range(len(tokens) - k + 1):
      counts[tuple(tokens[i:i + k])] += 1
  return counts


def _prepare(candidates: Sequence[str], references_list: Sequence[Reference]):
  _check_lengths("candidates", candidates, "references_list", references_list)
  cands = [tokenize(c) for c in candidates]
  refs = []
  for i, r in enumerate(references_list):
    r = _as_reference_list(r)
    if not r:
      raise ValueError(f"candidate {i} has no reference")
    refs.append([tokenize(x) for x in r])
  return cands, refs


# COCO's BLEU smoothing (pycocoevalcap, bleu/bleu_scorer.py, BleuScorer.compute_score):
# `tiny` is added to every clipped-match count and to the candidate length,
# `small` to every candidate n-gram count and to the reference length.
_COCO_TINY = 1e-15
_COCO_SMALL = 1e-9


def _bleu_counts(cand: Sequence[str], cand_refs: Sequence[Sequence[str]], max_n: int):
  """One candidate's BLEU statistics, as COCO's `cook_refs` + `cook_test` + "closest" give them.

  Returns (clipped matches per order, candidate n-grams per order, candidate
  length, reference length closest to it; ties go to the shorter reference).
  """
  c = len(cand)
  ref_len = min((len(r) for r in cand_refs), key=lambda length: (abs(length - c), length))
  max_ref: Counter = Counter()
  for r in cand_refs:
    max_ref |= _ngram_counts(r, max_n)  # elementwise max over the references
  correct = np.zeros(max_n)
  for gram, count in _ngram_counts(cand, max_n).items():
    correct[len(gram) - 1] += min(count, max_ref[gram])
  guess = np.array([max(0, c - k + 1) for k in range(1, max_n + 1)], dtype=np.float64)
  return correct, guess, c, ref_len


def _bleu_from_counts(correct, guess, cand_len, ref_len, tiny: float, small: float) -> list[float]:
  """BLEU-1..n from match / n-gram counts and lengths, in COCO's order of operations.

  A running product of (correct_k + tiny) / (guess_k + small), its k-th root,
  then the brevity penalty exp(1 - 1/ratio) when ratio = (c + tiny) / (r + small)
  < 1; the same float steps as COCO, so smoothed scores agree bit for bit.
  Unsmoothed, a zero count makes that order and all higher ones exactly 0.
  """
  scores = []
  product = 1.0
  for k in range(len(correct)):
    numerator, denominator = float(correct[k]) + tiny, float(guess[k]) + small
    if numerator > 0 and denominator > 0:
      product *= numerator / denominator
    else:
      product = 0.0
    scores.append(product ** (1.0 / (k + 1)))
  ratio = (cand_len + tiny) / (ref_len + small) if ref_len + small > 0 else 1.0
  if ratio < 1.0:
    bp = math.exp(1.0 - 1.0 / ratio) if ratio > 0 else 0.0
    scores = [s * bp for s in scores]
  return scores


def bleu(candidates: Sequence[str], references_list: Sequence[Reference], max_n: int = 4,
         *, coco_smoothing: bool = False) -> list[float]:
  """Corpus BLEU-1..BLEU-`max_n` (Papineni et al. 2002), as COCO's `Bleu` computes them.

  Clipped n-gram matches and candidate n-gram counts are summed over the
  corpus; BLEU-n = (prod_{k<=n} p_k)^(1/n) * BP with p_k = matches_k / count_k,
  BP = exp(1 - r/c) when c < r (else 1), c the total candidate length and r the
  sum over candidates of the reference length closest to the candidate's
  ("closest"; ties go to the shorter reference).

  `coco_smoothing=True` adds COCO's 1e-15 / 1e-9 to every numerator /
  denominator (so a missing n-gram order gives a tiny positive score instead
  of exactly 0), for digit-level agreement with that code. Per-image scores:
  `bleu_scores`.
  """
  cands, refs = _prepare(candidates, references_list)
  correct = np.zeros(max_n)
  guess = np.zeros(max_n)
  cand_len = 0
  ref_len = 0
  for cand, cand_refs in zip(cands, refs):
    item_correct, item_guess, c, r = _bleu_counts(cand, cand_refs, max_n)
    correct += item_correct
    guess += item_guess
    cand_len += c
    ref_len += r
  tiny, small = (_COCO_TINY, _COCO_SMALL) if coco_smoothing else (0.0, 0.0)
  return _bleu_from_counts(correct, guess, cand_len, ref_len, tiny, small)


def bleu_scores(candidates: Sequence[str], references_list: Sequence[Reference], max_n: int = 4,
                *, coco_smoothing: bool = True) -> np.ndarray:
  """Per-candidate BLEU-1..BLEU-`max_n`, COCO's per-image list: float64 [max_n, N].

  Row k-1 holds every candidate's own BLEU-k (`bleu`'s formula on that
  candidate's counts alone, its closest reference length for r), as the
  `bleu_list` that pycocoevalcap's BleuScorer.compute_score
  (bleu/bleu_scorer.py) returns next to the corpus score. One caption often
  has no matching 4-gram, which would make its BLEU-4 exactly 0, so COCO
  smooths each sentence: 1e-15 added to every match count and to the
  candidate length, 1e-9 to every n-gram count and to the reference length.
  That is the default here; `coco_smoothing=False` gives plain sentence BLEU.
  The mean of a row is not the corpus BLEU (`bleu` pools counts first).
  """
  cands, refs = _prepare(candidates, references_list)
  tiny, small = (_COCO_TINY, _COCO_SMALL) if coco_smoothing else (0.0, 0.0)
  scores = [_bleu_from_counts(*_bleu_counts(cand, cand_refs, max_n), tiny, small)
            for cand, cand_refs in zip(cands, refs)]
  return np.array(scores, dtype=np.float64).reshape(len(cands), max_n).T.copy()


def bleu4(candidates: Sequence[str], references_list: Sequence[Reference]) -> float:
  """Corpus BLEU-4 in [0, 1]; see `bleu`. `references_list[i]`: reference(s) of candidate i."""
  return bleu(candidates, references_list, 4)[3]


def _cider_vector(counts: Counter, df: Mapping, log_num_docs: float, n: int):
  """TF-IDF vectors (one dict per n-gram order), their norms and COCO's length."""
  vec = [dict() for _ in range(n)]
  norm = np.zeros(n)
  for gram, tf in counts.items():
    k = len(gram) - 1
    weight = tf * (log_num_docs - math.log(max(1.0, df.get(gram, 0))))
    vec[k][gram] = weight
    norm[k] += weight * weight
  # The COCO code adds term frequencies where the 0-based order index is 1, so
  # its "length" is the number of bigrams (len - 1, or 0); the length penalty
  # only sees differences, equal to word-length differences for >= 1 word each.
  length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
  return vec, np.sqrt(norm), length


def cider_d_scores(candidates: Sequence[str], references_list: Sequence[Reference], *,
                   n: int = 4, sigma: float = 6.0) -> np.ndarray:
  """Per-candidate CIDEr-D (Vedantam et al. 2015), as COCO's `CiderD` computes it.

  Document frequency df(g) = number of items whose references contain n-gram g
  (counted over this corpus's references). Every sentence becomes, for each
  order k = 1..n, the vector tf(g) * (log N - log max(1, df(g))), N the number
  of items. For candidate c and reference r,
      sim_k = sum_g min(c_g, r_g) * r_g / (|c_k| |r_k|)   (0 if a norm is 0)
  multiplied by exp(-delta^2 / (2 sigma^2)), delta the length difference. The
  item's score is 10 * mean_k (sum_r sim_k / #refs).
  """
  cands, refs = _prepare(candidates, references_list)
  cand_counts = [_ngram_counts(c, n) for c in cands]
  ref_counts = [[_ngram_counts(r, n) for r in item] for item in refs]
  df: Counter = Counter()
  for item in ref_counts:
    df.update(set().union(*(set(r) for r in item)))
  log_num_docs = math.log(float(len(cands)))
  scores = np.zeros(len(cands))
  for i, (cc, item) in enumerate(zip(cand_counts, ref_counts)):
    c_vec, c_norm, c_len = _cider_vector(cc, df, log_num_docs, n)
    total = np.zeros(n)
    for rc in item:
      r_vec, r_norm, r_len = _cider_vector(rc, df, log_num_docs, n)
      penalty = math.exp(-float(c_len - r_len) ** 2 / (2.0 * sigma ** 2))
      for k in range(n):
        dot = sum(min(w, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, w in c_vec[k].items())
        if c_norm[k] != 0 and r_norm[k] != 0:
          dot /= c_norm[k] * r_norm[k]
        total[k] += dot * penalty
    scores[i] = 10.0 * float(np.mean(total)) / len(item)
  return scores


def cider_d(candidates: Sequence[str], references_list: Sequence[Reference], *,
            n: int = 4, sigma: float = 6.0) -> float:
  """Corpus CIDEr-D: the mean of `cider_d_scores` (0 for a one-item corpus: log N = 0)."""
  return float(np.mean(cider_d_scores(candidates, references_list, n=n, sigma=sigma)))


# ---------------------------------------------------------------------------
# Classification and language-model metrics.
# ---------------------------------------------------------------------------

def accuracy(predictions, labels) -> float:
  """Fraction of predictions equal to their label.

  `predictions` may be class ids / strings shaped like `labels`, or scores
  with one more trailing axis (logits [..., C]), which are argmax-ed first.
  """
  preds = np.asarray(predictions)
  labels = np.asarray(labels)
  if preds.ndim == labels.ndim + 1:
    preds = preds.argmax(axis=-1)
  if preds.shape != labels.shape:
    raise ValueError(f"predictions {preds.shape} and labels {labels.shape} do not match")
  if preds.size == 0:
    raise ValueError("no predictions")
  return float(np.mean(preds == labels))


def _logprobs_and_mask(token_logprobs, mask):
  lp = np.asarray(token_logprobs, dtype=np.float64)
  if lp.ndim == 1:
    lp = lp[None]
  if lp.ndim != 2:
    raise ValueError(f"token_logprobs must be [N, L] (or [L]), got shape {lp.shape}")
  m = np.ones_like(lp) if mask is None else np.asarray(mask, dtype=np.float64).reshape(lp.shape)
  return lp, m


def perplexity(token_logprobs, mask=None) -> np.ndarray:
  """Per-sample perplexity exp(-mean of log p over the masked tokens): [N] float64.

  `token_logprobs`: natural-log probabilities of the target tokens, [N, L]
  (or [L], one sample); `mask`: same shape, 1 where a token counts (default:
  all). A sample with no counted token gets NaN.
  """
  lp, m = _logprobs_and_mask(token_logprobs, mask)
  count = m.sum(axis=1)
  nll = -(np.where(m > 0, lp, 0.0) * m).sum(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(count > 0, np.exp(nll / np.where(count > 0, count, 1.0)), np.nan)


def mean_perplexity(token_logprobs, mask=None, *, token_weighted: bool = False) -> float:
  """Mean of the per-sample perplexities (samples without tokens skipped).

  `token_weighted=True` gives the corpus perplexity instead: exp of the mean
  negative log-likelihood over all counted tokens of all samples.
  """
  if token_weighted:
    lp, m = _logprobs_and_mask(token_logprobs, mask)
    count = m.sum()
    if count <= 0:
      return float("nan")
    return float(np.exp(-(np.where(m > 0, lp, 0.0) * m).sum() / count))
  per_sample = perplexity(token_logprobs, mask)
  per_sample = per_sample[~np.isnan(per_sample)]
  return float(per_sample.mean()) if per_sample.size else float("nan")


def auroc(positive, negative) -> float:
  """P(a positive's score > a negative's), ties counted half (Mann-Whitney U / n+ n-)."""
  pos, neg = np.asarray(positive, np.float64), np.sort(np.asarray(negative, np.float64))
  if not len(pos) or not len(neg):
    return float("nan")
  below, at_or_below = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
  return float((below + 0.5 * (at_or_below - below)).sum() / (len(pos) * len(neg)))
