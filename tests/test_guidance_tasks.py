"""The region-guidance tasks of the shapes world and their evaluations: hard negatives that
differ in exactly one word, controlled errors, boxes that hold their objects, disjoint
splits; the record-level scorer against a hand-built forward pass; the job end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from vlm_jax.data import shapes_world as sw
from vlm_jax.eval import metrics
from vlm_jax.guidance import jobs, tasks
from vlm_jax.guidance.masking import black_out

S = 64
NEW_TASKS = ("spatial_boxes", "hard_negative", "refer", "generated")


def recs(task, split="train", num=30, **kw):
  return list(sw.records(task, split, num, image_size=S, **kw))


def meta(r):
  return json.loads(r["meta"])


def inside(inner, outer):
  return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


@pytest.mark.parametrize("task", NEW_TASKS)
def test_new_tasks_are_deterministic_with_disjoint_splits(task):
  a, b = recs(task, num=6), recs(task, num=6)
  assert [meta(x) for x in a] == [meta(y) for y in b]
  assert all(np.array_equal(x["images"][0], y["images"][0]) for x, y in zip(a, b))
  keys = {}
  for split in sw.SPLITS:
    ms = [meta(r) for r in recs(task, split, num=20)]
    keys[split] = {sw.scene_key(m.get("caption_objects", m["objects"]), S) for m in ms}
    assert all(sw.split_of(k) == split for k in keys[split])
  assert not keys["train"] & keys["test"] and not keys["validation"] & keys["test"]


def test_hard_negatives_differ_in_exactly_one_attribute_relation_or_object():
  counts = {c: 0 for c in sw.NEGATIVES}
  for split in ("train", "test"):
    for r in recs("hard_negative", split, num=45):
      m = meta(r)
      pos, neg = m["caption"].split(), m["negative"].split()
      assert r["turns"][-1]["content"] == m["caption"]
      assert len(pos) == len(neg)
      diff = [(p, n) for p, n in zip(pos, neg) if p != n]
      assert len(diff) == 1, (m["caption"], m["negative"])
      (p, n), = diff
      objects = m["objects"]
      if m["qtype"] == "attribute":  # a colour no object of the scene has
        assert p in sw.COLOR_NAMES and n in sw.COLOR_NAMES and n not in {o["color"] for o in objects}
      elif m["qtype"] == "object":  # a shape no object of the scene has
        p, n = p.rstrip("."), n.rstrip(".")
        assert p in sw.SHAPES and n in sw.SHAPES and n not in {o["shape"] for o in objects}
      else:
        assert {p, n} in ({"left", "right"}, {"above", "below"})
      counts[m["qtype"]] += 1
      for box, o in zip(m["boxes"], objects):
        assert any(inside(o2["box"], box) for o2 in objects)
  assert counts == {c: 30 for c in sw.NEGATIVES}  # round-robin


def test_generated_images_have_the_controlled_errors():
  rs = recs("generated", "validation", num=40, error_rate=0.3)
  ms = [meta(r) for r in rs]
  assert sum(m["misaligned"] for m in ms) == 12  # exactly round(rate * num)
  assert {m["error"] for m in ms if m["misaligned"]} == set(sw.ERRORS)
  for r, m in zip(rs, ms):
    want, drawn = m["caption_objects"], m["objects"]
    image = r["images"][0]
    for o in drawn:  # drawn as meta says
      cx, cy = o["center"]
      assert tuple(int(v) for v in image[cy, cx]) == sw.COLORS[o["color"]]
    if m["error"] is None:
      assert drawn == want
    elif m["error"] == "color_binding":
      assert [o["color"] for o in drawn] == [want[1]["color"], want[0]["color"]] and want[0]["color"] != want[1]["color"]
    elif m["error"] == "missing":
      assert len(drawn) == 1 and drawn[0] in want
    else:  # the relation of the caption is flipped in the drawing
      cap = m["caption"]
      rel = next(r for r, phrase in (("left", "to the left of"), ("right", "to the right of"),
                                     ("above", " above "), ("below", " below ")) if phrase in cap)
      a, b = (0, 1) if cap.startswith(f"a {sw._name(want[0])} ") else (1, 0)  # pylint: disable=protected-access
      assert rel in sw._relations(want[a], want[b])  # pylint: disable=protected-access
      assert rel not in sw._relations(drawn[a], drawn[b])  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="error_rate"):
    recs("generated", num=2, error_rate=1.5)


def test_refer_and_spatial_boxes_hold_their_objects():
  for r in recs("refer"):
    m = meta(r)
    objects, t = m["objects"], m["target"]
    assert len(m["candidates"]) == len(objects) >= 2
    names = [f"a {o['size']} {o['color']} {o['shape']}." for o in objects]
    assert m["expression"] == names[t] and names.count(names[t]) == 1
    for box, o in zip(m["candidates"], objects):
      assert inside(o["box"], box) and 0 <= box[0] and box[2] < S and 0 <= box[1] and box[3] < S
  for r in recs("spatial_boxes"):
    m = meta(r)
    assert m["answer"] in m["choices"] and len(m["boxes"]) == 2
    for box, k in zip(m["boxes"], m["targets"]):
      assert inside(m["objects"][k]["box"], box)


def test_helpers():
  assert metrics.auroc([3, 4], [1, 2]) == 1.0 and metrics.auroc([1], [1]) == 0.5 and metrics.auroc([0], [1, 2]) == 0.0
  assert jobs.choose_alpha([0.0, 0.5, 1.0], [0.2, 0.4, 0.4]) == 0.5
  r = recs("region", num=2, qtypes=("region_color",))[0]
  assert tasks.candidates_of(meta(r)) == list(sw.COLOR_NAMES)
  assert tasks.with_answer(r, "zzz")["turns"][-1]["content"] == "zzz"
  box = meta(r)["boxes"][0]
  masked = tasks.masked_record(r, [box])["images"][0]
  assert (masked[box[1]:box[3] + 1, box[0]:box[2] + 1] == 0).all()
  keep = np.ones(masked.shape[:2], bool)
  keep[box[1]:box[3] + 1, box[0]:box[2] + 1] = False
  np.testing.assert_array_equal(masked[keep], r["images"][0][keep])
  np.testing.assert_array_equal(black_out(r["images"][0], [box], 0), masked)


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
  from vlm_jax.data import tokenizer as tk
  from vlm_jax.models import build_model, init_params
  tok = tk.shapes_world_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=512, num_examples=300)
  model = build_model(models.preset("tiny"))
  return model, jax.jit(lambda key: init_params(model, key))(jax.random.key(0)), tok


def test_scorer_matches_a_hand_built_forward_pass(tiny_with_tokenizer):
  """The record-level scorer: α = 0 is the plain log-prob of the answer tokens, the masked
  branch the log-prob under the image with the box blacked out before preprocessing."""
  from vlm_jax.data import rendering
  from vlm_jax.data.pipeline import vision_settings
  from vlm_jax.eval.evaluate import prompt_of
  model, params, tok = tiny_with_tokenizer
  r = recs("region", "test", num=1)[0]
  m = meta(r)
  scorer = tasks.Scorer(model, params, tok, batch_size=4)
  got = scorer.score([tasks.Item(r, "red", m["boxes"]), tasks.Item(r, "blue", m["boxes"])], alphas=(0.0, 2.0))
  settings = vision_settings(model.config)
  for k, answer in enumerate(("red", "blue")):
    rec = tasks.with_answer(r, answer)
    ids, mask, _ = rendering.render(rec, tok, settings["tokens_per_image"], settings["image_token_id"])
    for key, source in (("plain", rec), ("masked", tasks.masked_record(rec, m["boxes"]))):
      images = prompt_of(source, tok, settings)[1]
      logits = model.apply({"params": params}, jnp.asarray(ids[None]), images=jnp.asarray(images[None])).logits[0]
      logp = np.asarray(jax.nn.log_softmax(logits[:-1], -1))
      want = (logp[np.arange(len(ids) - 1), ids[1:]] * mask[1:]).sum()
      np.testing.assert_allclose(got[key][k], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["guided"][0, k], got["plain"][k], rtol=1e-6)
  assert np.all(np.abs(got["plain"] - got["masked"]) > 1e-4)


@pytest.mark.slow
def test_region_guidance_job_on_the_quick_main_job(tmp_path):
  """The config-file job end to end on a (quick) main-job checkpoint: every task, every α;
  its α = 0 answers are plain greedy decoding's (evaluate.Generator)."""
  from launch.main import JOBS
  from configs.shapes import region_guidance, vila
  from vlm_jax.data.tokenizer import load_tokenizer
  from vlm_jax.eval.evaluate import Generator
  base = os.environ.get("CRG_TEST_BASE") or str(tmp_path / "vila")
  if not os.path.isdir(os.path.join(base, "stage2")):
    JOBS["shapes_vila"](vila.get_config("quick=True"), base)
  config = region_guidance.get_config(f"base={base},quick=True")
  out = jobs.evaluate(config, str(tmp_path / "crg"))
  assert set(out["tasks"]) == set(jobs.TASKS)
  for r in out["tasks"].values():
    assert len(r["test"]) == 4 and all(0.0 <= v <= 1.0 for v in r["test"])
    assert r["alpha"] in out["alphas"]
  assert os.path.isfile(tmp_path / "crg" / "guidance.json")
  # α = 0 answers == plain greedy decoding
  from vlm_jax.train.init_from import load_model
  from vlm_jax.parallel import mesh as mesh_lib
  model, params, _ = load_model(config, mesh_lib.make_mesh(dict(config.mesh)), [tuple(r) for r in config.rules])
  tok, _ = load_tokenizer(config.tokenizer)
  records = recs("region", "test", num=8)
  plain, _, _ = Generator(model, params, tok, batch_size=8, max_new_tokens=8, image_slots=1)(records)
  guided = tasks.answers(model, params, tok, records, (0.0,), batch_size=8, max_new_tokens=8)
  assert guided["texts"][0.0] == plain
