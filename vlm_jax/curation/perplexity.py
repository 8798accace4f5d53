r"""The perplexity of a record and the selection by it (METHODS §2; POINTS, arXiv 2409.04828, Sec. 3.2).

Score every record of a data set with an off-the-shelf VLM, then keep the records the
model finds most predictable:

    PPL(s) = exp( -(1/N) Σ_{i=1..N} log P(w_i | w_<i, image, prompt) )

over the N target tokens of the record (the pipeline's `loss_mask`: a caption with its
end token, or the answer span(s) of a conversation with their end tokens), conditioned
on the image(s) and a fixed prompt (`chat_template.caption_prompt`, by default
"please generate a caption for this image.", placed after the image and never a target).
Sort ascending and keep the lowest `keep_fraction` (POINTS keeps 0.2: 1M of 5M), or every
record with PPL <= `threshold`.

    token_nll(logits, batch, logprob_dtype="float32") -> (nll [B, L-1], weights [B, L-1])
    record_nll(logits, batch, logprob_dtype="float32") -> (nll_sum [B], tokens [B])
    make_score_fn(model, logprob_dtype) -> (params, batch) -> {"nll_sum", "tokens"}
    read_scores(path) -> [{"id", "ppl", "nll", "tokens"}, ...]
    select(scores, keep_fraction=None, threshold=None) -> (kept records, threshold used)
    filter_scores(path, keep_fraction=None, threshold=None) -> set of kept ids
    ppl_histogram(ppls, bins, threshold) -> text

Precision. `logprob_dtype="float32"` (the default, the correct computation of METHODS §2):
log-probabilities in float32 from the model's logits (the log-softmax, the gather and the
per-record sums). `logprob_dtype="points_reference"` reproduces the official POINTS filter
instead (WePOINTS/WePOINTS, scripts/pretrain_filtering_with_ppl.py; `token_nll` gives the
rule line by line): softmax in float32, then each target token's probability rounded to
bfloat16 before the log. That rounding is its flaw: a bfloat16 probability keeps 8
significant bits, so every log-prob is off by up to 2^-9 ~ 0.002, which reorders records
whose PPLs are close. The model's own compute dtype (`model.text.dtype`) is the config's
business: the reference ran its model in float16; for float32 scores end to end keep it
float32.

Which tokens. The reference scores the caption and the end-of-turn token `<|im_end|>` after
it, not the "\n" that follows (its slices `[-valid_len-1:-2]` / `[-valid_len:-1]`, with
valid_len = caption tokens + 2). A caption row of the pipeline marks the same span in
either mode: the caption and the tokenizer's EOS, with nothing after it
(`vlm_jax.data.rendering`); with a chat model's tokenizer EOS is its end-of-turn token
(Qwen2-VL-Instruct: `<|im_end|>`). The context before the caption is the data config's
(chat template, prompt), not this mode's: the reference wraps the image and the prompt in
Qwen2-VL's chat turns, system message included.

Selection is deterministic: ties in PPL are broken by id, and a NaN PPL sorts last.

Next: `scoring` runs this over a whole data set (resumable, sharded); `jobs` holds the
config-file jobs `score` and `filter`.
"""

from __future__ import annotations

import collections
import fractions
import functools
import json
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.train.step import forward, token_losses

DEFAULT_PROMPT = "please generate a caption for this image."
LOGPROB_DTYPES = ("float32", "points_reference")


def check_logprob_dtype(logprob_dtype: str) -> str:
  """`logprob_dtype`, if it is one of LOGPROB_DTYPES (a typo must not silently pick one)."""
  if logprob_dtype == "bfloat16":
    raise ValueError('logprob_dtype "bfloat16" (a log-softmax of bfloat16 logits) was not the POINTS '
                     'rule and is gone: "points_reference" reproduces the official filter, "float32" '
                     'is the correct computation')
  if logprob_dtype not in LOGPROB_DTYPES:
    raise ValueError(f"logprob_dtype must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")
  return logprob_dtype


def ppl_of(nll: float) -> float:
  """exp(nll) without OverflowError (inf past float64's range)."""
  return math.exp(nll) if nll < 709.0 else float("inf")


# --- Per-record negative log-likelihood (pure, jittable) ----------------------------------


def token_nll(logits, batch: Mapping[str, Any], logprob_dtype: str = "float32"):
  """-log P(token t | tokens < t) and the weight `loss_mask[t]`, float32 [B, L-1] each (t >= 1).

  "float32": the log-softmax in float32, as the training loss (`train.step.token_losses`).
  "points_reference": the official POINTS filter, WePOINTS/WePOINTS
  scripts/pretrain_filtering_with_ppl.py (`Qwen2VL.get_output_info` and `_calc_ppl`,
  commit 50bdb87, unchanged since), whose steps are, in order:
    p = F.softmax(logits.float(), dim=-1)          # softmax over the vocabulary in float32
    p = torch.gather(p, -1, target).to(bfloat16)   # the picked probability rounded to bfloat16
    ppl = exp(-mean(log(torch.tensor(p))))         # back to float32: log, mean, exp
  Here p = exp(x_t - max x) / sum exp(x - max x) in float32, rounded to bfloat16 (to
  nearest even), and nll = -log(p) in float32; `record_nll` sums, the caller divides.
  """
  if check_logprob_dtype(logprob_dtype) == "float32":
    ce, _, weights = token_losses(logits, batch)
    return ce, weights
  x = logits[:, :-1].astype(jnp.float32)
  e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  targets = batch["input_ids"][:, 1:]
  p = jnp.take_along_axis(e, targets[..., None], axis=-1)[..., 0] / jnp.sum(e, axis=-1)
  # Rounded to bfloat16 in place: XLA:GPU may drop a float32 -> bfloat16 -> float32 convert
  # pair under jit (openxla/xla#41605); reduce_precision is the op it keeps for this.
  ce = -jnp.log(jax.lax.reduce_precision(p, exponent_bits=8, mantissa_bits=7))
  return ce, batch["loss_mask"][:, 1:].astype(jnp.float32)


def record_nll(logits, batch: Mapping[str, Any], logprob_dtype: str = "float32"):
  """Per-row summed NLL of the target tokens and their number, both float32 [B].

  Token t is predicted from tokens < t and counts where `loss_mask[t]` is 1 (as in
  training); `token_nll` gives each mode's rule. A non-target position never reaches the
  sum (a probability that underflows to 0 there gives inf, which must not become NaN).
  """
  ce, weights = token_nll(logits, batch, logprob_dtype)
  return jnp.sum(jnp.where(weights > 0, ce, 0.0) * weights, axis=-1), jnp.sum(weights, axis=-1)


@functools.lru_cache(maxsize=16)
def make_score_fn(model, logprob_dtype: str = "float32") -> Callable:
  """`(params, batch) -> {"nll_sum": [B], "tokens": [B]}` for `model` (VLM or DecoderLM).

  Cached per (model, dtype): jitting the same function again reuses JAX's compilation.
  """
  check_logprob_dtype(logprob_dtype)

  def score_fn(params, batch):
    nll_sum, tokens = record_nll(forward(model, params, batch), batch, logprob_dtype)
    return {"nll_sum": nll_sum, "tokens": tokens}

  return score_fn


# --- Selection -----------------------------------------------------------------------------


def read_scores(path: str) -> list[dict]:
  """The records of a scores JSONL file ({"id", "ppl", "nll", "tokens"} each)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def ranked(scores: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """`scores` lowest PPL first, ties by id, NaN last: the order every selection uses."""

  def key(s):
    ppl = float(s["ppl"])
    return (ppl if not math.isnan(ppl) else math.inf, str(s["id"]))

  return sorted(scores, key=key)


def keep_count(keep_fraction: float, n: int) -> int:
  """floor(keep_fraction x n), at least 1 (0 when n is 0); exact for decimal fractions (0.29 x 100 = 29)."""
  f = float(keep_fraction)
  if not 0.0 < f <= 1.0:
    raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
  if n == 0:
    return 0
  return max(1, math.floor(fractions.Fraction(repr(f)) * n))


def select(scores: Sequence[Mapping[str, Any]], keep_fraction: Optional[float] = None,
           threshold: Optional[float] = None) -> tuple[list[Mapping[str, Any]], Optional[float]]:
  """The kept records, lowest PPL first (ties by id), and the PPL threshold that keeps them.

  Exactly one of keep_fraction (keep floor(fraction x n), at least 1) and threshold
  (keep PPL <= threshold). A NaN PPL sorts last and is never kept by a threshold.
  """
  if (keep_fraction is None) == (threshold is None):
    raise ValueError("give exactly one of keep_fraction and threshold")
  ids = [s["id"] for s in scores]
  if len(set(ids)) != len(ids):
    dupes = sorted(i for i, c in collections.Counter(ids).items() if c > 1)[:5]
    raise ValueError(f"the scores hold duplicate ids {dupes}: a scores file must hold each id once")
  ordered = ranked(scores)
  if keep_fraction is not None:
    kept = ordered[:keep_count(keep_fraction, len(ordered))]
    return kept, (float(kept[-1]["ppl"]) if kept else None)
  threshold = float(threshold)
  return [s for s in ordered if float(s["ppl"]) <= threshold], threshold


def filter_scores(scores_path: str, keep_fraction: Optional[float] = None,
                  threshold: Optional[float] = None) -> set:
  """The ids kept from a scores JSONL file: the lowest-PPL `keep_fraction` (round down, at
  least 1) or those with PPL <= `threshold`; ties broken by id."""
  kept, _ = select(read_scores(scores_path), keep_fraction, threshold)
  return {s["id"] for s in kept}


def ppl_histogram(ppls: Iterable[float], bins: int = 20, width: int = 40,
                  threshold: Optional[float] = None) -> str:
  """A text histogram of PPL values; log-spaced bins when they span a factor of 10 or more.

  With `threshold`, the last column says which bins are kept ("kept") or cut ("part").
  """
  values = np.asarray(list(ppls), np.float64)
  bad = int(np.sum(~np.isfinite(values)))
  values = values[np.isfinite(values)]
  if not len(values):
    return f"(no finite PPL values; {bad} non-finite)"
  lo, hi = float(values.min()), float(values.max())
  log_bins = lo > 0 and hi / lo >= 10
  if hi == lo:
    edges = np.asarray([lo, hi])
  elif log_bins:
    edges = np.geomspace(lo, hi, bins + 1)
  else:
    edges = np.linspace(lo, hi, bins + 1)
  counts, edges = np.histogram(values, bins=edges) if hi > lo else (np.asarray([len(values)]), edges)
  top = max(int(counts.max()), 1)
  lines = [f"PPL histogram: {len(values)} records, {'log-spaced' if log_bins else 'linear'} bins"
           + (f", kept: PPL <= {threshold:.4g}" if threshold is not None else "")]
  for a, b, c in zip(edges[:-1], edges[1:], counts):
    mark = ""
    if threshold is not None:
      mark = "kept" if b <= threshold else ("part" if a <= threshold else "")
    bar = "#" * int(round(width * c / top)) if c else ""
    lines.append(f"  {a:>10.4g} - {b:<10.4g} {bar:<{width}} {int(c):>8d}  {mark}".rstrip())
  if bad:
    lines.append(f"  {'non-finite':>23} {'':<{width}} {bad:>8d}")
  return "\n".join(lines)
