"""The shapes world generator: deterministic, disjoint splits, and every answer true of the pixels."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from vlm_jax.data import shapes_world as sw

S = 32  # image size of these tests


def recs(task, split="train", num=20, **kw):
  kw.setdefault("image_size", S)
  return list(sw.records(task, split, num, **kw))


def meta(r):
  return json.loads(r["meta"])


def pixel(image, obj):
  cx, cy = obj["center"]
  return tuple(int(v) for v in image[cy, cx])


def matching(phrase, objects):
  """Objects a referring phrase ('the large red shape') fits."""
  words = phrase.split()[1:]
  out = []
  for o in objects:
    if all(w == "shape" or w in (o["size"], o["color"], o["shape"]) for w in words):
      out.append(o)
  return out


def same(a, b):
  return (a["id"], a["kind"], a["turns"], a["meta"]) == (b["id"], b["kind"], b["turns"], b["meta"]) and \
      len(a["images"]) == len(b["images"]) and all(np.array_equal(x, y) for x, y in zip(a["images"], b["images"]))


# --- Determinism and splits --------------------------------------------------------


@pytest.mark.parametrize("task", sw.TASKS)
def test_same_seed_same_records_other_seed_other_records(task):
  a, b, c = recs(task, num=6), recs(task, num=6), recs(task, num=6, seed=1)
  assert all(same(x, y) for x, y in zip(a, b))
  assert [x["id"] for x in a] == [f"shapes/{task}/train/{i:06d}" for i in range(6)]
  assert any(x["turns"] != y["turns"] or x["meta"] != y["meta"] for x, y in zip(a, c))


def test_record_schema():
  for task in sw.TASKS:
    r = recs(task, num=1)[0]
    assert set(r) == {"id", "kind", "images", "turns", "meta"}
    assert r["kind"] in ("caption", "interleaved", "conversation", "text")
    for im in r["images"]:
      assert im.dtype == np.uint8 and im.shape == (S, S, 3)
    assert all(set(t) == {"role", "content"} and t["role"] in ("user", "assistant", "text") for t in r["turns"])
    text = " ".join(t["content"] for t in r["turns"])
    assert text.count("<image>") == len(r["images"])
    m = meta(r)
    assert m["task"] == task and m["corrupted"] is False


@pytest.mark.parametrize("task", ["caption", "vqa", "classes"])
def test_splits_are_disjoint(task):
  keys = {}
  for split in sw.SPLITS:
    rs = recs(task, split, num=40)
    keys[split] = {sw.scene_key(meta(r)["objects"], S) for r in rs}
    assert all(sw.split_of(k) == split for k in keys[split])
  assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
  assert not keys["validation"] & keys["test"]
  a, b = recs(task, "train", num=3), recs(task, "test", num=3)
  assert all(not np.array_equal(x["images"][0], y["images"][0]) for x, y in zip(a, b))


def test_text_qa_splits_share_no_question():
  questions = {s: {meta(r)["question"] for r in recs("text_qa", s, num=60)} for s in ("train", "test")}
  assert not questions["train"] & questions["test"]


def test_options_are_checked():
  with pytest.raises(ValueError, match="bogus"):
    recs("vqa", bogus=1)
  with pytest.raises(ValueError, match="corruption_rate"):
    recs("vqa", corruption_rate=0.1)
  with pytest.raises(ValueError, match="weird"):
    recs("vqa", qtypes=("count", "weird"))
  with pytest.raises(ValueError, match="split"):
    recs("vqa", "dev")


def test_generator_does_not_import_tensorflow():
  code = "import sys, vlm_jax.data.shapes_world as w; next(w.records('vqa', 'train', 1)); " \
         "sys.exit('tensorflow' in sys.modules)"
  assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- Scenes and rendering ------------------------------------------------------------


def test_objects_rendered_in_their_colours_without_overlap():
  pad = sw.box_pad(S)
  for r in recs("caption", num=30):
    objects = meta(r)["objects"]
    assert 1 <= len(objects) <= 4
    for k, o in enumerate(objects):
      assert pixel(r["images"][0], o) == sw.COLORS[o["color"]]
      x0, y0, x1, y1 = o["box"]
      assert x1 - x0 + 1 == sw.object_sizes(S)[o["size"]]
      assert x0 - pad >= 0 and y0 - pad >= 0 and x1 + pad < S and y1 + pad < S
      for p in objects[k + 1:]:
        a, b = o["box"], p["box"]
        assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]  # disjoint


def test_antialias_off_is_exact_colours_only():
  r = recs("caption", num=1, antialias=False)[0]
  palette = {tuple(c) for c in sw.COLORS.values()} | {sw.BACKGROUND}
  assert {tuple(int(v) for v in p) for p in r["images"][0].reshape(-1, 3)} <= palette


# --- Captions ------------------------------------------------------------------------


def test_captions_name_every_object_and_one_relation():
  for r in recs("caption", num=30):
    m, caption = meta(r), r["turns"][1]["content"]
    assert r["turns"][0] == {"role": "user", "content": "<image>"} and r["turns"][1]["role"] == "assistant"
    assert caption == m["caption"]
    for o in m["objects"]:
      assert f"{o['size']} {o['color']} {o['shape']}" in caption
    rel = re.findall(r"to the left of|to the right of|above|below", caption)
    assert len(rel) == (1 if len(m["objects"]) > 1 else 0)


def test_caption_relation_is_true():
  for r in recs("caption", num=40, min_objects=2, max_objects=2):
    objects, caption = meta(r)["objects"], r["turns"][1]["content"]
    a, rel, b = re.search(r"a (\w+ \w+ \w+) (to the left of|to the right of|above|below) (?:a|another) "
                          r"(\w+ \w+ \w+)\.", caption).groups()
    oa = [o for o in objects if f"{o['size']} {o['color']} {o['shape']}" == a][0]
    ob = [o for o in objects if f"{o['size']} {o['color']} {o['shape']}" == b and o is not oa][0]
    ok = {"to the left of": oa["box"][2] < ob["box"][0], "to the right of": ob["box"][2] < oa["box"][0],
          "above": oa["box"][3] < ob["box"][1], "below": ob["box"][3] < oa["box"][1]}
    assert ok[rel], (caption, objects)


@pytest.mark.parametrize("rate,num", [(0.25, 40), (0.3, 50), (0.0, 10), (1.0, 7)])
def test_corruption_rate_is_exact_and_flagged(rate, num):
  rs = recs("caption", num=num, corruption_rate=rate)
  flags = [meta(r)["corrupted"] for r in rs]
  assert sum(flags) == round(rate * num)
  clean = recs("caption", num=num)
  for r, c, flag in zip(rs, clean, flags):
    m = meta(r)
    assert np.array_equal(r["images"][0], c["images"][0])  # same scene, only the caption changes
    if flag:
      names = sorted(f"{o['size']} {o['color']} {o['shape']}" for o in m["objects"])
      other = sorted(f"{o['size']} {o['color']} {o['shape']}" for o in m["caption_objects"])
      assert names != other and r["turns"][1]["content"] == m["caption"]
    else:
      assert r["turns"] == c["turns"]


# --- VQA ---------------------------------------------------------------------------


def test_vqa_balanced_and_restricted():
  rs = recs("vqa", num=20)
  counts = {q: sum(meta(r)["qtype"] == q for r in rs) for q in sw.VQA_QTYPES}
  assert counts == {q: 4 for q in sw.VQA_QTYPES}
  rs = recs("vqa", num=6, qtypes=("color", "count"))
  assert {meta(r)["qtype"] for r in rs} == {"color", "count"}


def test_vqa_answers_are_true_of_the_image():
  for r in recs("vqa", num=100):
    m, image = meta(r), r["images"][0]
    objects, q, a = m["objects"], m["question"], m["answer"]
    assert r["turns"] == [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]
    assert len(a.split()) == 1
    if m["qtype"] == "count":
      word = re.match(r"how many (\w+)", q).group(1)
      expected = (len(objects) if word in ("shapes", "objects")
                  else sum(o["color"] == word or o["shape"] + "s" == word for o in objects))
      assert a == str(expected), q
    elif m["qtype"] in ("color", "shape", "size"):
      (t,) = m["targets"]
      phrase = "the " + q.rsplit("the ", 1)[1].removesuffix("?").removesuffix(" small or large")
      assert matching(phrase, objects) == [objects[t]], q  # the referent is unique
      assert a == objects[t][m["qtype"]]
      if m["qtype"] == "color":
        assert pixel(image, objects[t]) == sw.COLORS[a]
    else:
      i, j = m["targets"]
      bi, bj = objects[i]["box"], objects[j]["box"]
      truth = {"left": bi[2] < bj[0], "right": bj[2] < bi[0], "above": bi[3] < bj[1], "below": bj[3] < bi[1]}
      if a in truth:
        assert truth[a], q
      else:
        asked = re.search(r"(to the left of|to the right of|above|below)", q).group(1)
        key = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}[asked]
        assert a == ("yes" if truth[key] else "no"), q


# --- Regions -------------------------------------------------------------------------


def test_region_box_holds_its_object_and_answer():
  for r in recs("region", num=30):
    m, image = meta(r), r["images"][0]
    (box,), o = m["boxes"], m["objects"][m["target"]]
    x0, y0, x1, y1 = box
    ox0, oy0, ox1, oy1 = o["box"]
    assert x0 < ox0 and y0 < oy0 and ox1 < x1 and oy1 < y1
    assert "[{}, {}, {}, {}]".format(*box) in r["turns"][0]["content"]
    for k, p in enumerate(m["objects"]):  # no other object reaches into the box
      if k != m["target"]:
        px0, py0, px1, py1 = p["box"]
        assert px1 < x0 or x1 < px0 or py1 < y0 or y1 < py0
    assert (image[y0, x0:x1 + 1] == 255).all() and (image[y0:y1 + 1, x1] == 255).all()  # the outline
    want = o["color"] if m["qtype"] == "region_color" else o["shape"]
    assert m["answer"] == want == r["turns"][1]["content"]
    assert pixel(image, o) == sw.COLORS[o["color"]]
  assert {meta(r)["qtype"] for r in recs("region", num=4)} == set(sw.REGION_QTYPES)


def test_mask_boxes():
  r = recs("region", num=1)[0]
  image, boxes = r["images"][0], meta(r)["boxes"]
  masked = sw.mask_boxes(image, boxes)
  x0, y0, x1, y1 = boxes[0]
  assert (masked[y0:y1 + 1, x0:x1 + 1] == 0).all()
  outside = np.ones(image.shape[:2], bool)
  outside[y0:y1 + 1, x0:x1 + 1] = False
  assert np.array_equal(masked[outside], image[outside])
  assert not (image[y0:y1 + 1, x0:x1 + 1] == 0).all()  # the input is untouched


# --- Interleaved, text, classes ----------------------------------------------------


def test_interleaved_placeholders_match_images():
  for r in recs("interleaved", num=12):
    m, (turn,) = meta(r), r["turns"]
    assert turn["role"] == "text" and turn["content"].startswith("<image> ")
    assert turn["content"].count("<image>") == len(r["images"]) == m["num_images"] in (2, 3)
    sentences = turn["content"].split("<image>")[1:]
    for sentence, scene in zip(sentences, m["scenes"]):
      for o in scene:
        assert f"{o['size']} {o['color']} {o['shape']}" in sentence


def test_text_qa_answers():
  rs = recs("text_qa", num=80)
  assert {meta(r)["family"] for r in rs} == set(sw.TEXT_FAMILIES)
  for r in rs:
    m = meta(r)
    assert r["kind"] == "text" and not r["images"] and m["qtype"] == "text_qa"
    assert r["turns"] == [{"role": "user", "content": m["question"]}, {"role": "assistant", "content": m["answer"]}]
    q, a = m["question"], m["answer"]
    if mt := re.fullmatch(r"what is (\d) (plus|minus) (\d)\?", q):
      x, op, y = mt.groups()
      assert int(a) == (int(x) + int(y) if op == "plus" else int(x) - int(y))
    if m["family"] == "sides":
      shape = re.search(r"\b(circle|square|triangle|diamond)\b", q).group(1)
      assert a == {"circle": "0", "square": "4", "triangle": "3", "diamond": "4"}[shape]
    if mt := re.search(r"mix(?:ing)? (\w+) and (\w+)|^(\w+) and (\w+) make", q):
      pair = frozenset(c for c in mt.groups() if c)
      assert a == {frozenset(("red", "yellow")): "orange", frozenset(("blue", "yellow")): "green",
                   frozenset(("red", "blue")): "purple"}[pair]
  only = recs("text_qa", num=5, families=("arithmetic",))
  assert {meta(r)["family"] for r in only} == {"arithmetic"}


def test_text_corpus():
  for r in recs("text_corpus", num=5):
    assert r["kind"] == "text" and not r["images"] and len(r["turns"]) == 1
    assert r["turns"][0]["role"] == "text" and r["turns"][0]["content"].endswith(".")


def test_classes_labels_and_domains():
  rs = recs("classes", num=150)
  labels = [meta(r)["label"] for r in rs]
  assert set(labels) == set(range(24)) and len(sw.CLASS_NAMES) == 24
  for r in rs[:20]:
    m = meta(r)
    (o,) = m["objects"]
    assert m["class_name"] == sw.CLASS_NAMES[m["label"]] == f"{o['color']} {o['shape']}"
    assert r["turns"][1]["content"] == f"a photo of a {m['class_name']}."
    assert pixel(r["images"][0], o) == sw.COLORS[o["color"]]
  by_domain = {d: recs("classes", num=4, domain=d) for d in sw.DOMAINS}
  for i in range(4):
    metas = [meta(by_domain[d][i]) for d in sw.DOMAINS]
    assert all(m["objects"] == metas[0]["objects"] for m in metas)  # the same scene ...
    images = [by_domain[d][i]["images"][0] for d in sw.DOMAINS]
    for a in range(4):
      for b in range(a + 1, 4):
        assert not np.array_equal(images[a], images[b])  # ... rendered differently
    o = metas[0]["objects"][0]
    assert pixel(images[2], o) == sw.SHIFTED_COLORS[o["color"]]
  with pytest.raises(ValueError, match="domain"):
    recs("classes", num=1, domain="sketch")
