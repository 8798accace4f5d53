"""Evaluation metrics: VQA exact match, BLEU-4, CIDEr-D, accuracy and perplexity.

Pure NumPy / Python; nothing here needs JAX (JAX arrays are accepted wherever
NumPy arrays are, through `np.asarray`).

VQA answers are normalised as the official VQA evaluation script (vqaEval.py)
does; BLEU and CIDEr-D follow Papineni et al. (2002) and Vedantam et al. (2015)
with the conventions of the COCO caption evaluation code (see each function).
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
# VQA answer normalisation (official vqaEval.py rules).
# ---------------------------------------------------------------------------

# Punctuation the official script handles one character at a time ("." and
# "'" are not in it: "." has its own rule below, "'" is kept for contractions).
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!")
# A comma between digits ("1,000"): its presence switches every punctuation mark
# to deletion rather than replacement by a space, as in the official script.
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is r"(?!<=\d)(\.)(?!\d)"; its first group is a (buggy)
# look-ahead that always succeeds, so it removes every "." not followed by a
# digit: "2.5" keeps its point, "two." and "2." lose theirs. Same behaviour here.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# A subset of the official table: the apostrophe-less spelling maps to the usual one.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't",
    "couldve": "could've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "im": "i'm",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "lets": "let's",
    "shes": "she's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't",
    "youre": "you're", "youve": "you've",
}


def normalize_answer(s: str) -> str:
  """Normalise a VQA answer as the official VQAv2 evaluation does.

  In order: newlines/tabs become spaces; each punctuation mark in the official
  list is deleted when it touches a space (or when the answer has a comma
  between digits, "1,000" -> "1000") and replaced by a space otherwise
  ("red-blue" -> "red blue"); a "." not followed by a digit is deleted ("2.5"
  stays); then, word by word in lower case, number words "none"/"zero".."ten"
  become digits, the articles a/an/the are dropped and apostrophe-less
  contractions get their apostrophe ("dont" -> "don't"); whitespace collapses.

  >>> normalize_answer("Two."), normalize_answer("the red circle"), normalize_answer("Yes!")
  ('2', 'red circle', 'yes')
  """
  text = str(s).replace("\n", " ").replace("\t", " ").strip()
  out = text
  delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
  for p in _VQA_PUNCT:
    # The official script tests the *original* text for each mark, then edits the running copy.
    if delete_all or (p + " " in text) or (" " + p in text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  out = _PERIOD_STRIP.sub("", out)
  words = []
  for word in out.lower().split():
    word = _NUMBER_WORDS.get(word, word)
    if word not in _ARTICLES:
      words.append(_CONTRACTIONS.get(word, word))
  return " ".join(words)


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


def _vqa_matches(predictions: Sequence[str], references: Sequence[Reference]) -> list[bool]:
  _check_lengths("predictions", predictions, "references", references)
  matches = []
  for pred, ref in zip(predictions, references):
    accepted = {normalize_answer(r) for r in _as_reference_list(ref)}
    matches.append(normalize_answer(pred) in accepted)
  return matches


def vqa_exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
  """Fraction (in [0, 1]) of predictions equal, after `normalize_answer`, to a reference.

  Each reference is one acceptable answer (a string) or several (a sequence of
  strings; any one of them counts). This is exact match, not the VQAv2
  "min(#humans / 3, 1)" consensus accuracy.
  """
  return float(np.mean(_vqa_matches(predictions, references)))


def vqa_accuracy_by_type(preds: Sequence[str], refs: Sequence[Reference],
                         types: Sequence[str]) -> dict[str, float]:
  """`vqa_exact_match` within each question type: {type: fraction in [0, 1]}, keys sorted."""
  matches = _vqa_matches(preds, refs)
  if len(types) != len(matches):
    raise ValueError(f"types has {len(types)} entries, predictions {len(matches)}")
  by_type: dict[str, list[bool]] = {}
  for t, m in zip(types, matches):
    by_type.setdefault(t, []).append(m)
  return {t: float(np.mean(by_type[t])) for t in sorted(by_type, key=str)}


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
  of exactly 0), for digit-level agreement with that code.
  """
  cands, refs = _prepare(candidates, references_list)
  correct = np.zeros(max_n)
  guess = np.zeros(max_n)
  cand_len = 0
  ref_len = 0
  for cand, cand_refs in zip(cands, refs):
    c = len(cand)
    cand_len += c
    ref_len += min((len(r) for r in cand_refs), key=lambda length: (abs(length - c), length))
    max_ref: Counter = Counter()
    for r in cand_refs:
      max_ref |= _ngram_counts(r, max_n)  # elementwise max over the references
    for gram, count in _ngram_counts(cand, max_n).items():
      correct[len(gram) - 1] += min(count, max_ref[gram])
    for k in range(1, max_n + 1):
      guess[k - 1] += max(0, c - k + 1)
  tiny, small = (1e-15, 1e-9) if coco_smoothing else (0.0, 0.0)
  scores = []
  log_product = 0.0
  for k in range(max_n):
    numerator, denominator = correct[k] + tiny, guess[k] + small
    if numerator <= 0 or denominator <= 0 or log_product == -math.inf:
      log_product = -math.inf
    else:
      log_product += math.log(numerator / denominator)
    scores.append(math.exp(log_product / (k + 1)) if log_product > -math.inf else 0.0)
  ratio = (cand_len + tiny) / (ref_len + small) if ref_len + small > 0 else 1.0
  if ratio < 1.0:
    bp = math.exp(1.0 - 1.0 / ratio) if ratio > 0 else 0.0
    scores = [s * bp for s in scores]
  return scores


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
