"""Generation-based evaluators: VQA by question type, captioning, text-only QA.

Each record (the schema of `vlm_jax.data.schema`, e.g. a shapes-world test
record) is rendered exactly as in training and cut before its first target
token: that prefix is the prompt, and the record's answer (meta `answer`, or
the caption) the reference; a VQA record may also list its human answers
(meta `answers`), which switches its score to the official VQA accuracy.
Prompts are left-padded into batches and decoded greedily with the KV cache.
"""

import json
from typing import Callable, Iterable, Optional

import numpy as np

from vlm_jax.data import pipeline as pipeline_lib
from vlm_jax.data import rendering
from vlm_jax.data.preprocess import decode_image, preprocess_image
from vlm_jax.eval import metrics
from vlm_jax.models.generate import generate


def prompt_of(record, tokenizer, settings: dict, chat_template=None):
  """(prompt token ids, images [n, s, s, 3] float32, reference text, meta dict)."""
  rec = rendering.parse_record(record)
  ids, mask, _ = rendering.render(rec, tokenizer, settings.get("tokens_per_image", 0),
                                  settings.get("image_token_id", -1), chat_template)
  cut = int(np.argmax(mask > 0))
  meta = json.loads(rec.meta) if rec.meta else {}
  answers = [c for r, c in rec.turns if r == "assistant"]
  reference = meta.get("answer", answers[-1] if answers else "")
  size = settings.get("image_size")
  images = np.stack([preprocess_image(decode_image(im), size, "resize", settings["normalization"])
                     for im in rec.images]) if rec.images else np.zeros((0, size or 1, size or 1, 3), np.float32)
  return ids[:cut], images, str(reference), meta


class Generator:
  """Batched greedy answers for records: `Generator(model, params, tokenizer)(records) -> [str]`."""

  def __init__(self, model, params, tokenizer, *, batch_size: int = 32, max_new_tokens: int = 16,
               chat_template=None, image_slots: Optional[int] = None):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.settings = pipeline_lib.vision_settings(model.config)
    self.batch_size, self.max_new_tokens, self.chat_template = batch_size, max_new_tokens, chat_template
    self.image_slots = image_slots
    self.eos = tokenizer.eos_token_id
    self.pad = tokenizer.pad_token_id or 0

  def __call__(self, records: Iterable) -> tuple[list[str], list[str], list[dict]]:
    """Returns (predictions, references, metas)."""
    items = [prompt_of(r, self.tokenizer, self.settings, self.chat_template) for r in records]
    preds = []
    for start in range(0, len(items), self.batch_size):
      preds += self._batch(items[start:start + self.batch_size])
    return preds, [it[2] for it in items], [it[3] for it in items]

  def _batch(self, items) -> list[str]:
    n = len(items)
    b = self.batch_size  # fixed shapes: one compilation for every batch
    length = max(len(it[0]) for it in items)
    length = int(2 ** np.ceil(np.log2(max(length, 8))))  # few distinct prompt lengths
    ids = np.full((b, length), self.pad, np.int32)
    mask = np.zeros((b, length), np.int32)
    for i, (prompt, *_) in enumerate(items):
      ids[i, length - len(prompt):] = prompt
      mask[i, length - len(prompt):] = 1
    for i in range(n, b):  # padding rows: a lone BOS-like token
      ids[i, -1], mask[i, -1] = items[0][0][-1], 1
    kw = {}
    if self.settings:
      slots = self.image_slots or max(1, max(len(it[1]) for it in items))
      s = self.settings["image_size"]
      images = np.zeros((b, slots, s, s, 3), np.float32)
      for i, it in enumerate(items):
        images[i, :len(it[1])] = it[1]
      kw["images"] = images
    out = np.asarray(generate(self.model, self.params, ids, attention_mask=mask,
                              max_new_tokens=self.max_new_tokens, eos_token_id=self.eos,
                              pad_token_id=self.pad, **kw))
    texts = []
    for row in out[:n]:
      row = list(row)
      if self.eos in row:
        row = row[:row.index(self.eos)]
      texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def human_answers_of(meta: dict) -> Optional[list[str]]:
  """A record's human answers, from meta "answers" (strings or VQA-style {"answer": ...}), if 2 or more.

  None otherwise: one reference is scored by exact match, since the official
  leave-one-out rule gives a lone answer nothing to match.
  """
  answers = meta.get("answers")
  if not isinstance(answers, (list, tuple)):
    return None
  answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
  return [str(a) for a in answers] if len(answers) >= 2 else None


def evaluate_vqa(generator: Generator, records, prefix: str = "vqa") -> dict:
  """VQA scores in [0, 1], overall and per `meta.qtype`.

  Each record is scored by the metric its data supports: the official VQA
  accuracy (`metrics.vqa_accuracy`) when its meta lists human answers (the
  10 of VQA v2, see `human_answers_of`), else exact match after the official
  answer processing (`metrics.vqa_exact_match`; the shapes world, one
  reference). Keys:
    "<prefix> acc", "<prefix>/<qtype> acc": the mean of those per-record
      scores (shapes world: exact match; VQA v2: official accuracy);
    "<prefix> official acc": official accuracy over the records with human
      answers, present only when there are such records;
    "<prefix> exact match acc": exact match over the other records, present
      only when the set mixes both kinds.
  """
  preds, refs, metas = generator(records)
  if not preds:
    raise ValueError("no records to evaluate")
  types = [m.get("qtype", "all") for m in metas]
  humans = [human_answers_of(m) for m in metas]
  official = [i for i, h in enumerate(humans) if h is not None]
  exact = [i for i, h in enumerate(humans) if h is None]
  scores = np.zeros(len(preds))
  for i in official:
    scores[i] = metrics.vqa_accuracy(preds[i], humans[i])
  if exact:
    scores[exact] = [metrics.vqa_exact_match([preds[i]], [refs[i]]) for i in exact]
  out = {f"{prefix} acc": float(scores.mean())}
  if official:
    out[f"{prefix} official acc"] = float(scores[official].mean())
    if exact:
      out[f"{prefix} exact match acc"] = float(scores[exact].mean())
  if len(set(types)) > 1:
    for t in sorted(set(types), key=str):
      out[f"{prefix}/{t} acc"] = float(np.mean([v for v, u in zip(scores, types) if u == t]))
  return out


def evaluate_captions(generator: Generator, records, prefix: str = "caption") -> dict:
  preds, refs, _ = generator(records)
  refs = [[r] for r in refs]
  return {f"{prefix} CIDEr-D": metrics.cider_d(preds, refs), f"{prefix} BLEU-4": metrics.bleu4(preds, refs)}


EVALUATORS: dict[str, Callable] = {"vqa": evaluate_vqa, "region": evaluate_vqa, "text_qa": evaluate_vqa,
                                   "caption": evaluate_captions}
