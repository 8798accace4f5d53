"""Generation-based evaluators: prompts cut before the answer, batched greedy decoding, scoring."""

import jax
import numpy as np
import pytest

from configs import models as presets
from vlm_jax.data import shapes_world
from vlm_jax.data.tokenizer import train_bpe
from vlm_jax.eval import evaluate as ev
from vlm_jax.models import build_model, init_params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  texts = [t["content"] for task in ("caption", "vqa", "text_qa")
           for r in shapes_world.records(task, "train", 200, image_size=32) for t in r["turns"]]
  tok = train_bpe(texts, 512, str(tmp_path_factory.mktemp("tok")))
  model = build_model(presets.get_config("tiny"))
  return model, init_params(model, jax.random.key(0)), tok


def test_prompt_stops_where_the_answer_starts(setup):
  model, _, tok = setup
  rec = next(shapes_world.records("vqa", "test", 1, image_size=32))
  ids, images, reference, meta = ev.prompt_of(rec, tok, ev.pipeline_lib.vision_settings(model.config))
  text = tok.decode([i for i in ids if i != model.config.image_token_id])
  assert text.rstrip().endswith("ASSISTANT:")
  assert reference == meta["answer"] and reference
  assert images.shape == (1, 32, 32, 3)
  assert int((ids == model.config.image_token_id).sum()) == model.config.tokens_per_image


def test_generator_batches_and_scores(setup, monkeypatch):
  model, params, tok = setup
  records = list(shapes_world.records("vqa", "test", 10, image_size=32))
  gen = ev.Generator(model, params, tok, batch_size=4, max_new_tokens=4, image_slots=1)
  preds, refs, metas = gen(records)
  assert len(preds) == len(refs) == 10 and all(isinstance(p, str) for p in preds)
  # An oracle that answers correctly for even records scores exactly one half.
  monkeypatch.setattr(ev.Generator, "__call__",
                      lambda self, recs: ([m["answer"] if i % 2 == 0 else "wrong" for i, m in enumerate(metas)],
                                          refs, metas))
  scores = ev.evaluate_vqa(gen, records)
  assert scores["vqa acc"] == pytest.approx(0.5)
  assert {k for k in scores if k.startswith("vqa/")} == {f"vqa/{m['qtype']} acc" for m in metas}


def _fixed_generator(preds, refs, metas):
  return lambda records: (preds, refs, metas)


def test_evaluate_vqa_scores_human_answers_officially():
  # VQA v2 style: 10 human answers in meta "answers" (strings or {"answer": ...} dicts) -> official accuracy.
  metas = [{"qtype": "yes/no", "answers": ["yes"] * 3 + ["no"] * 7},
           {"qtype": "number", "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8}]
  scores = ev.evaluate_vqa(_fixed_generator(["Yes", "two"], ["yes", "3"], metas), None)
  assert scores["vqa acc"] == pytest.approx((0.9 + 0.6) / 2)
  assert scores["vqa official acc"] == scores["vqa acc"]
  assert scores["vqa/yes/no acc"] == pytest.approx(0.9) and scores["vqa/number acc"] == pytest.approx(0.6)
  assert "vqa exact match acc" not in scores


def test_evaluate_vqa_mixed_records_report_both_metrics():
  metas = [{"qtype": "color", "answer": "red"},  # shapes world: one reference -> exact match
           {"qtype": "color", "answers": ["red"] * 2 + ["blue"] * 8},
           {"qtype": "color", "answers": ["green"]}]  # a single human answer is one reference too
  scores = ev.evaluate_vqa(_fixed_generator(["Red", "red", "green"], ["red", "blue", "green"], metas), None)
  assert scores["vqa exact match acc"] == 1.0
  assert scores["vqa official acc"] == pytest.approx(0.6)
  assert scores["vqa acc"] == pytest.approx((1.0 + 0.6 + 1.0) / 3)
  assert not any(k.startswith("vqa/") for k in scores)  # one question type: no breakdown
  assert ev.human_answers_of({"answers": ["x"]}) is None and ev.human_answers_of({}) is None
