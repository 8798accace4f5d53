"""Records -> region-guided evaluations: multiple choice, alignment, region re-ranking, answers.

Every record is rendered exactly as in training (`vlm_jax.data.rendering`, the prompt of
`vlm_jax.eval.evaluate.prompt_of`); its contrast image is the record's own image with the
boxes of meta "boxes" blacked out in its pixels before preprocessing (pixel masking, see
`masking`). One doubled forward pass scores every α of a sweep at once.

    Scorer(model, params, tokenizer).score(items, alphas)   teacher-forced guided log-probs
    multiple_choice   region / spatial_boxes: the answer among candidates (meta "choices",
                      or the colour / shape names), argmax of the guided score
    hard_negatives    hard_negative: the true caption scored above its one-word negative
    alignment_auroc   generated: AUROC of the guided caption score against the known errors
    refer             refer: the candidate box whose masking lowers the expression most
    answers           region / spatial_boxes: guided greedy answers, exact match, and how
                      often guidance changes the plain answer
"""

import dataclasses
import json
from typing import Optional, Sequence

import numpy as np

from vlm_jax.data import pipeline as pipeline_lib
from vlm_jax.data import rendering, shapes_world
from vlm_jax.data.preprocess import decode_image
from vlm_jax.eval import metrics
from vlm_jax.eval.evaluate import prompt_of
from vlm_jax.guidance import decode, masking


def meta_of(record) -> dict:
  meta = record["meta"] if isinstance(record, dict) else record.meta
  return json.loads(meta) if meta else {}


def with_answer(record, text: str) -> dict:
  """A copy of a schema record whose last assistant turn says `text`."""
  rec = rendering.parse_record(record)
  turns = [(r, c) for r, c in rec.turns]
  last = max(i for i, (r, _) in enumerate(turns) if r == "assistant")
  turns[last] = ("assistant", text)
  return {"id": rec.id, "kind": rec.kind, "images": rec.images, "meta": rec.meta,
          "turns": [{"role": r, "content": c} for r, c in turns]}


def masked_record(record, boxes: Sequence) -> dict:
  """A copy of a record with `boxes` (of its first image, in its pixels) blacked out."""
  rec = rendering.parse_record(record)
  images = [decode_image(im) for im in rec.images]
  images[0] = masking.black_out(images[0], boxes, 0)
  return {"id": rec.id, "kind": rec.kind, "images": images, "meta": rec.meta,
          "turns": [{"role": r, "content": c} for r, c in rec.turns]}


@dataclasses.dataclass
class Item:
  """One row to score: a record, the continuation replacing its answer, and its boxes."""
  record: object
  text: Optional[str]
  boxes: Sequence


class Scorer:
  """Teacher-forced guided scores of records, in fixed-shape batches (one compilation per length)."""

  def __init__(self, model, params, tokenizer, *, batch_size: int = 32, chat_template=None,
               mode: str = "pixel"):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.settings = pipeline_lib.vision_settings(model.config)
    self.batch_size, self.chat_template, self.mode = batch_size, chat_template, mode
    self.pad = tokenizer.pad_token_id or 0

  def _images(self, record) -> np.ndarray:
    return prompt_of(record, self.tokenizer, self.settings, self.chat_template)[1]

  def _row(self, item: Item):
    record = item.record if item.text is None else with_answer(item.record, item.text)
    ids, mask, _ = rendering.render(record, self.tokenizer, self.settings["tokens_per_image"],
                                    self.settings["image_token_id"], self.chat_template)
    return ids, mask > 0, self._images(record), self._images(masked_record(record, item.boxes))

  def score(self, items: Sequence[Item], alphas: Sequence[float]) -> dict:
    """{"guided": [len(alphas), n], "plain": [n], "masked": [n]} summed log-probs of the targets."""
    out = {"guided": [], "plain": [], "masked": []}
    for start in range(0, len(items), self.batch_size):
      rows = [self._row(it) for it in items[start:start + self.batch_size]]
      n, b = len(rows), self.batch_size
      length = int(2 ** np.ceil(np.log2(max(8, max(len(r[0]) for r in rows)))))
      slots = max(1, max(len(r[2]) for r in rows))
      s = self.settings["image_size"]
      ids = np.full((b, length), self.pad, np.int32)
      att = np.zeros((b, length), np.int32)
      target = np.zeros((b, length), np.int32)
      images = np.zeros((b, slots, s, s, 3), np.float32)
      masked = np.zeros_like(images)
      for i in range(b):  # padding rows repeat the first one
        r_ids, r_target, r_im, r_masked = rows[i if i < n else 0]
        ids[i, :len(r_ids)], att[i, :len(r_ids)], target[i, :len(r_ids)] = r_ids, 1, r_target
        images[i, :len(r_im)], masked[i, :len(r_masked)] = r_im, r_masked
      got = decode.guided_score(self.model, self.params, ids, target, images=images, masked_images=masked,
                                alphas=alphas, attention_mask=att)
      out["guided"].append(got["guided"][:, :n])
      out["plain"].append(got["plain"][:n])
      out["masked"].append(got["masked"][:n])
    return {"guided": np.concatenate(out["guided"], axis=1), "plain": np.concatenate(out["plain"]),
            "masked": np.concatenate(out["masked"])}


def candidates_of(meta: dict) -> list[str]:
  """The answers a multiple-choice record chooses among."""
  if "choices" in meta:
    return list(meta["choices"])
  if meta.get("qtype") == "region_color":
    return list(shapes_world.COLOR_NAMES)
  if meta.get("qtype") == "region_shape":
    return list(shapes_world.SHAPES)
  raise ValueError(f"no answer candidates for a record of qtype {meta.get('qtype')!r}")


def _by_type(values: np.ndarray, types: Sequence[str], prefix: str) -> dict:
  out = {}
  for t in sorted(set(types)):
    keep = np.asarray([u == t for u in types])
    out[f"{prefix}/{t}"] = float(values[..., keep].mean(-1)) if values.ndim == 1 else values[..., keep].mean(-1)
  return out


def multiple_choice(scorer: Scorer, records, alphas: Sequence[float]) -> dict:
  """{"acc": [len(alphas)], "acc/<qtype>": [...], "pred": [len(alphas), n] candidate index}."""
  items, spans, truth, types = [], [], [], []
  for r in records:
    meta = meta_of(r)
    cands = candidates_of(meta)
    spans.append((len(items), len(items) + len(cands)))
    truth.append(cands.index(meta["answer"]))
    types.append(meta.get("qtype", "all"))
    items += [Item(r, c, meta["boxes"]) for c in cands]
  guided = scorer.score(items, alphas)["guided"]
  pred = np.stack([[int(np.argmax(g[a:b])) for a, b in spans] for g in guided])
  correct = (pred == np.asarray(truth)[None]).astype(np.float64)
  out = {"acc": correct.mean(-1), "pred": pred, "truth": truth, "qtypes": types}
  out.update(_by_type(correct, types, "acc"))
  return out


def hard_negatives(scorer: Scorer, records, alphas: Sequence[float]) -> dict:
  """The true caption against its negative (meta "negative"), both contrasted with the
  boxes of the caption's objects masked. {"acc": [len(alphas)], "acc/<category>": ...}."""
  items, types = [], []
  for r in records:
    meta = meta_of(r)
    items += [Item(r, meta["caption"], meta["boxes"]), Item(r, meta["negative"], meta["boxes"])]
    types.append(meta["qtype"])
  guided = scorer.score(items, alphas)["guided"]
  correct = (guided[:, 0::2] > guided[:, 1::2]).astype(np.float64)
  return {"acc": correct.mean(-1), **_by_type(correct, types, "acc")}


def alignment_auroc(scorer: Scorer, records, alphas: Sequence[float]) -> dict:
  """How well the guided caption score separates aligned from misaligned images:
  AUROC of the score (aligned = positive) over all records and per error type."""
  items, bad, errors = [], [], []
  for r in records:
    meta = meta_of(r)
    items.append(Item(r, meta["caption"], meta["boxes"]))
    bad.append(bool(meta["misaligned"]))
    errors.append(meta["error"])
  guided = scorer.score(items, alphas)["guided"]
  bad = np.asarray(bad)
  out = {"auroc": np.asarray([metrics.auroc(g[~bad], g[bad]) for g in guided])}
  for e in sorted({e for e in errors if e}):
    sel = np.asarray([x == e for x in errors])
    out[f"auroc/{e}"] = np.asarray([metrics.auroc(g[~bad], g[sel]) for g in guided])
  return out


def refer(scorer: Scorer, records, alphas: Sequence[float]) -> dict:
  """Region re-ranking: for each candidate box, the expression's guided score with that box
  masked in the contrast branch; the best-scoring box is the answer (ties share the credit,
  so α = 0, where every box scores alike, is chance). Also "drop_acc": ranking by
  log p(expr | I) − log p(expr | I, box masked), the limit of large α."""
  items, spans, targets = [], [], []
  for r in records:
    meta = meta_of(r)
    spans.append((len(items), len(items) + len(meta["candidates"])))
    targets.append(meta["target"])
    items += [Item(r, meta["expression"], [box]) for box in meta["candidates"]]
  scores = scorer.score(items, alphas)
  drop = scores["plain"] - scores["masked"]

  def credit(values, span, target):
    v = values[span[0]:span[1]]
    best = np.flatnonzero(v >= v.max() - 1e-6)
    return float(target in best) / len(best)

  acc = np.asarray([[credit(g, s, t) for s, t in zip(spans, targets)] for g in scores["guided"]]).mean(-1)
  drop_acc = float(np.mean([credit(drop, s, t) for s, t in zip(spans, targets)]))
  chance = float(np.mean([1.0 / (b - a) for a, b in spans]))
  return {"acc": acc, "drop_acc": drop_acc, "chance": chance}


def answers(model, params, tokenizer, records, alphas: Sequence[float], *, batch_size: int = 32,
            max_new_tokens: int = 8, chat_template=None) -> dict:
  """Guided greedy answers per α: exact match ("acc" [len(alphas)]), and the share of answers
  that differ from plain decoding's ("changed"; α = 0 is decoded too when not in `alphas`)."""
  settings = pipeline_lib.vision_settings(model.config)
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
  prompts = [prompt_of(r, tokenizer, settings, chat_template) for r in records]
  masked = [prompt_of(masked_record(r, meta_of(r)["boxes"]), tokenizer, settings, chat_template)[1]
            for r in records]
  alphas = [float(a) for a in alphas]
  runs = sorted(set(alphas) | {0.0})  # α = 0 always runs: "changed" compares with it
  texts = {a: [] for a in runs}
  for start in range(0, len(prompts), batch_size):
    chunk, chunk_masked = prompts[start:start + batch_size], masked[start:start + batch_size]
    n, b = len(chunk), batch_size
    length = int(2 ** np.ceil(np.log2(max(8, max(len(p[0]) for p in chunk)))))
    s = settings["image_size"]
    ids = np.full((b, length), pad, np.int32)
    att = np.zeros((b, length), np.int32)
    images = np.zeros((b, 1, s, s, 3), np.float32)
    masked_images = np.zeros_like(images)
    for i in range(b):
      p, m = (chunk[i], chunk_masked[i]) if i < n else (chunk[0], chunk_masked[0])
      ids[i, length - len(p[0]):], att[i, length - len(p[0]):] = p[0], 1
      images[i, :len(p[1])], masked_images[i, :len(m)] = p[1], m
    for a in runs:
      out = np.asarray(decode.guided_generate(model, params, ids, images=images, masked_images=masked_images,
                                              alpha=a, attention_mask=att, max_new_tokens=max_new_tokens,
                                              eos_token_id=eos, pad_token_id=pad))
      for row in out[:n]:
        row = list(row)
        row = row[:row.index(eos)] if eos in row else row
        texts[a].append(tokenizer.decode(row, skip_special_tokens=True).strip())
  refs = [p[2] for p in prompts]
  types = [p[3].get("qtype", "all") for p in prompts]
  base = texts[0.0]
  out = {"texts": texts, "qtypes": types}
  acc, changed = [], []
  for a in alphas:
    right = np.asarray([metrics.vqa_exact_match([p], [r]) for p, r in zip(texts[a], refs)])
    diff = np.asarray([p != q for p, q in zip(texts[a], base)], np.float64)
    acc.append(right)
    changed.append(diff)
  acc, changed = np.stack(acc), np.stack(changed)
  out["acc"], out["changed"] = acc.mean(-1), changed.mean(-1)
  out.update(_by_type(acc, types, "acc"))
  out.update(_by_type(changed, types, "changed"))
  return out
