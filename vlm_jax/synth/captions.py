"""Synth² step 1: a caption LM writes captions that cover a concept list, evenly.

The paper's finding is that the *diversity and balance of concepts* in the synthetic
captions matter most, so everything here is about controlling and measuring them:

    records = training_records(real_captions, concepts)    # user: "Write a caption that
    write_training_data(path, real_captions, concepts,     #   mentions: red, left of."
                        per_prompt=(1, 3))                 # (prompts as short as at generation)
    # -> builders.build_from_files("conversations", path, data_dir); train a DecoderLM on it
    sets = concept_sets(concepts, n=1000, per_prompt=(1, 3), seed=0)   # every concept +-1 as often
    synthetic = generate_captions(lm, params, tokenizer, sets, temperature=1.0, top_p=0.9)
    synthetic, dropped = drop_real_duplicates(synthetic, real_captions, dedupe=True)
    report.print_table(compare_stats(real_captions, synthetic, concepts), "captions")

The caption LM is the stack's own decoder, trained with the engine like any text run on
one LLaVA-format conversation per real caption: the prompt names the concepts that caption
mentions (in a seeded random order, so the LM does not learn an order), the answer is the
caption. Name only 1-3 of them (`per_prompt=(1, 3)`, the size of the generation prompts):
trained on prompts naming every mentioned concept, a tiny shapes-world LM followed short
prompts far less often (8 % vs 28 % of captions held every prompted concept) and copied
real captions far more (70 % vs 17 %). At generation the prompt goes through the same
rendering code (`vlm_jax.data.rendering.render`, the same chat template) and is cut where
the answer would start, so the LM sees exactly the prefix it was trained on.

A caption mentions a concept when the concept's words stand in it as whole words,
case-insensitively ("left of" in "to the left of"; "red" not in "reddish", nor "circle"
in "circles").
"""

from __future__ import annotations

import collections
import functools
import json
import math
import random
import re
from typing import Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from vlm_jax.data import rendering, shapes_world
from vlm_jax.eval import metrics
from vlm_jax.models.generate import generate

# The shapes world's concepts: what its captions name (colours, shapes, sizes, how many
# objects, the spatial relation).
SHAPES_WORLD_CONCEPTS = (shapes_world.COLOR_NAMES + shapes_world.SHAPES + shapes_world.SIZES
                         + ("two", "three", "four") + ("left of", "right of", "above", "below"))


def _normalise(text: str) -> str:
  return " ".join(text.lower().split())


def check_concepts(concept_list: Sequence[str]) -> list[str]:
  """The concept list as a list; a clear error when it is empty, holds a blank or a repeat."""
  if isinstance(concept_list, str):
    raise TypeError(f"concept_list must be a sequence of concepts, not the string {concept_list!r}")
  concepts = list(concept_list)
  if not concepts:
    raise ValueError("concept_list is empty: the caption LM needs concepts to prompt with "
                     "(e.g. synth.captions.SHAPES_WORLD_CONCEPTS)")
  seen = {}
  for c in concepts:
    if not isinstance(c, str) or not c.strip():
      raise ValueError(f"every concept must be a non-blank string, got {c!r}")
    if _normalise(c) in seen:
      raise ValueError(f"concept {c!r} repeats {seen[_normalise(c)]!r} (case and spacing ignored)")
    seen[_normalise(c)] = c
  return concepts


@functools.lru_cache(maxsize=4096)
def _pattern(concept: str) -> re.Pattern:
  words = r"\s+".join(re.escape(w) for w in concept.split())
  return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)


def concepts_in(caption: str, concept_list: Sequence[str]) -> list[str]:
  """The concepts of `concept_list` that `caption` mentions (whole words, any case), in list order."""
  return [c for c in check_concepts(concept_list) if _pattern(c).search(caption)]


# --- The caption LM's training data ---------------------------------------------


def prompt(concepts: Sequence[str]) -> str:
  """The user turn asking for a caption that mentions `concepts` (in the order given)."""
  if not concepts:
    return "Write a caption."
  return "Write a caption that mentions: " + ", ".join(concepts) + "."


def training_records(captions: Sequence[str], concept_list: Sequence[str], seed: int = 0,
                     per_prompt: Optional[tuple[int, int]] = None) -> list[dict]:
  """One LLaVA-format conversation per caption (what `builders.Conversations` reads):
  human = the prompt of the concepts the caption mentions (shuffled, seeded), gpt = the caption.

  per_prompt=(lo, hi): name only a random lo..hi of them (all when fewer), so that training
  prompts look like the short ones `concept_sets` makes for generation; None: name them all.
  """
  concept_list = check_concepts(concept_list)
  rng = random.Random(seed)
  records = []
  for i, caption in enumerate(captions):
    mentioned = concepts_in(caption, concept_list)
    rng.shuffle(mentioned)
    if per_prompt is not None:
      mentioned = mentioned[:rng.randint(*per_prompt)]
    records.append({"id": f"caption_{i:06d}",
                    "conversations": [{"from": "human", "value": prompt(mentioned)},
                                      {"from": "gpt", "value": caption}]})
  return records


def write_training_data(path: str, captions: Sequence[str], concept_list: Sequence[str], seed: int = 0,
                        per_prompt: Optional[tuple[int, int]] = None) -> str:
  """Writes `training_records` as JSONL for `builders.build_from_files("conversations", path, ...)`."""
  records = training_records(captions, concept_list, seed, per_prompt)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return path


# --- Balanced prompts and sampling ------------------------------------------------


def concept_sets(concept_list: Sequence[str], n: int, per_prompt: tuple[int, int] = (1, 3),
                 seed: int = 0) -> list[list[str]]:
  """n concept sets of per_prompt[0]..per_prompt[1] concepts each (sizes uniform, seeded; the
  upper bound capped at the list's length), no repeat within a set, every concept used
  equally often (+-1) over the n sets.

  Concepts are dealt from successive shuffled permutations of the list. A set that straddles
  two permutations and would draw a concept it already holds takes the next one of the same
  permutation instead (a swap inside it), so what has been dealt is always whole permutations
  plus part of one: counts differ by at most one.
  """
  concepts = check_concepts(concept_list)
  lo, hi = per_prompt
  if n < 0 or not 1 <= lo <= hi:
    raise ValueError(f"need n >= 0 and 1 <= per_prompt[0] <= per_prompt[1], got n={n}, per_prompt={per_prompt}")
  if lo > len(concepts):
    raise ValueError(f"per_prompt asks for at least {lo} concepts a set, but the list has {len(concepts)}")
  hi = min(hi, len(concepts))
  rng = random.Random(seed)
  deck, pos = [], 0
  sets = []
  for _ in range(n):
    chosen = []
    for _ in range(rng.randint(lo, hi)):
      if pos == len(deck):
        deck, pos = rng.sample(concepts, len(concepts)), 0
      # Exists: the rest of this permutation holds more concepts than the set already has.
      j = next(j for j in range(pos, len(deck)) if deck[j] not in chosen)
      deck[pos], deck[j] = deck[j], deck[pos]
      chosen.append(deck[pos])
      pos += 1
    sets.append(chosen)
  return sets


def prompt_ids(concepts: Sequence[str], tokenizer, chat_template=None) -> np.ndarray:
  """The tokens the caption LM was trained to continue for `concepts`: the training record
  rendered by the pipeline's own `rendering.render`, cut where the answer starts."""
  record = {"kind": "conversation", "turns": [{"role": "user", "content": prompt(concepts)},
                                              {"role": "assistant", "content": "-"}]}
  ids, mask, _ = rendering.render(record, tokenizer, tokens_per_image=0, image_token_id=-1,
                                  chat_template=chat_template)
  return ids[:int(np.argmax(mask))]


def generate_captions(model, params, tokenizer, sets: Sequence[Sequence[str]], *, temperature: float = 1.0,
                      top_p: float = 0.9, max_new_tokens: int = 32, batch_size: int = 64, seed: int = 0,
                      progress: bool = True, chat_template=None) -> list[str]:
  """One caption per concept set, sampled from the caption LM (`model`: a DecoderLM).

  Prompts are left-padded to the longest one and the last batch is filled up with copies,
  so decoding compiles once. The same seed (and batch_size) gives the same captions.
  `chat_template`: the one the LM was trained with (`config.data.chat_template`).
  """
  if not sets:
    return []
  encoder = rendering.TextEncoder(tokenizer)
  prompts = [prompt_ids(s, encoder, chat_template) for s in sets]
  width = max(len(p) for p in prompts)
  rows = -(-len(prompts) // batch_size) * batch_size
  ids = np.full((rows, width), encoder.pad_id, np.int32)
  mask = np.zeros((rows, width), np.int32)
  for i in range(rows):
    p = prompts[i] if i < len(prompts) else prompts[0]
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  key = jax.random.key(seed)
  captions = []
  for b in tqdm(range(rows // batch_size), desc="captions", disable=not progress, dynamic_ncols=True):
    rows_b = slice(b * batch_size, (b + 1) * batch_size)
    new = generate(model, params, ids[rows_b], attention_mask=mask[rows_b], max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, rng=jax.random.fold_in(key, b),
                   eos_token_id=encoder.eos_id, pad_token_id=encoder.pad_id)
    captions.extend(_decode(row, tokenizer, encoder.eos_id) for row in np.asarray(new))
  return captions[:len(prompts)]


def _decode(tokens: np.ndarray, tokenizer, eos_id: int) -> str:
  tokens = tokens.tolist()
  if eos_id in tokens:
    tokens = tokens[:tokens.index(eos_id)]
  return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def drop_real_duplicates(generated: Sequence[str], real: Sequence[str], dedupe: bool = False) -> tuple[list[str], int]:
  """(generated captions that copy no real one, how many were dropped); equal after lower-casing
  and collapsing whitespace. `dedupe`: also keep only the first of equal generated captions."""
  seen = {_normalise(c) for c in real}
  kept = []
  for caption in generated:
    key = _normalise(caption)
    if key in seen:
      continue
    if dedupe:
      seen.add(key)
    kept.append(caption)
  return kept, len(generated) - len(kept)


# --- Diversity and balance ----------------------------------------------------------


def distinct_n(captions: Sequence[str], n: int) -> float:
  """Unique n-grams / all n-grams over the set (words as `eval.metrics.tokenize` splits them)."""
  grams = [tuple(w[i:i + n]) for w in map(metrics.tokenize, captions) for i in range(len(w) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(captions: Sequence[str], max_captions: int = 200, seed: int = 0) -> float:
  """Mean sentence BLEU-4 (`eval.metrics.bleu_scores`, COCO smoothing) of each caption against
  all the others as references, over a seeded sample of at most `max_captions` (the cost is
  quadratic). High = the captions repeat each other. NaN for fewer than two captions."""
  if len(captions) < 2:
    return float("nan")
  picked = sorted(random.Random(seed).sample(range(len(captions)), min(max_captions, len(captions))))
  sample = [captions[i] for i in picked]
  others = [sample[:i] + sample[i + 1:] for i in range(len(sample))]
  return float(np.mean(metrics.bleu_scores(sample, others, 4)[3]))


def concept_counts(captions: Sequence[str], concept_list: Sequence[str]) -> dict[str, int]:
  """{concept: number of captions that mention it}, in list order."""
  counts = collections.Counter(c for caption in captions for c in concepts_in(caption, concept_list))
  return {c: counts[c] for c in check_concepts(concept_list)}


def balance(counts: Sequence[int]) -> tuple[float, float]:
  """(entropy of the count distribution / log(number of concepts), max / min count):
  (1, 1) when perfectly even; entropy 0 when nothing is mentioned, ratio inf when a concept is
  never mentioned. One concept is perfectly even."""
  c = np.asarray(counts, np.float64)
  if c.sum() == 0:
    return 0.0, float("inf")
  p = c[c > 0] / c.sum()
  entropy = float(-(p * np.log(p)).sum() / math.log(len(c))) if len(c) > 1 else 1.0
  return entropy, float(c.max() / c.min()) if c.min() > 0 else float("inf")


def caption_stats(captions: Sequence[str], concept_list: Sequence[str], *, bleu_sample: int = 200,
                  seed: int = 0) -> dict[str, float]:
  """Diversity (distinct-1/2/3, self-BLEU-4, unique fraction, mean length in words) and concept
  coverage / balance (over per-caption mentions) of a caption set."""
  if not captions:
    raise ValueError("caption_stats needs at least one caption")
  counts = list(concept_counts(captions, concept_list).values())
  entropy, ratio = balance(counts)
  return {
      "captions": len(captions),
      "distinct-1": distinct_n(captions, 1),
      "distinct-2": distinct_n(captions, 2),
      "distinct-3": distinct_n(captions, 3),
      "self-BLEU-4": self_bleu(captions, bleu_sample, seed),
      "unique captions": len({_normalise(c) for c in captions}) / len(captions),
      "mean length (words)": float(np.mean([len(metrics.tokenize(c)) for c in captions])),
      "concept coverage": sum(1 for k in counts if k) / len(counts),
      "concept balance (norm. entropy)": entropy,
      "concept max/min count": ratio,
  }


def compare_stats(real: Sequence[str], synthetic: Sequence[str], concept_list: Sequence[str],
                  **kwargs) -> list[dict]:
  """`caption_stats` of both sets side by side: rows {statistic, real, synthetic} for
  `report.print_table`."""
  a = caption_stats(real, concept_list, **kwargs)
  b = caption_stats(synthetic, concept_list, **kwargs)
  return [{"statistic": k, "real": a[k], "synthetic": b[k]} for k in a]


__all__: Sequence[str] = (
    "SHAPES_WORLD_CONCEPTS", "check_concepts", "concepts_in", "prompt", "training_records",
    "write_training_data", "concept_sets", "prompt_ids", "generate_captions", "drop_real_duplicates",
    "distinct_n", "self_bleu", "concept_counts", "balance", "caption_stats", "compare_stats")
