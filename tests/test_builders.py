"""TFDS builders: each builds from files written here and reads back through as_data_source();
bad records are skipped and counted by reason."""

import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from vlm_jax.data import builders  # noqa: E402  (after the importorskip)
from vlm_jax.data import shapes_world  # noqa: E402
from PIL import Image  # noqa: E402

tfds.disable_progress_bar()


def png(folder, name, seed, size=(12, 10)):
  """Writes a random RGB PNG; returns its pixels."""
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  path = os.path.join(folder, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path)
  return pixels


def write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f)
  return str(path)


def write_jsonl(path, lines):
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


def read(builder, split="train"):
  """All records of a split as plain Python (str, list of turn dicts, list of arrays)."""
  source = builder.as_data_source()[split]
  out = []
  for i in range(len(source)):
    r = source[i]
    turns = r["turns"]
    out.append({"id": r["id"].decode(), "kind": r["kind"].decode(), "meta": json.loads(r["meta"]),
                "images": [np.asarray(im) for im in r["images"]],
                "turns": [{"role": ro.decode(), "content": c.decode()}
                          for ro, c in zip(turns["role"], turns["content"])]})
  return out


def images_equal(got, want):
  return len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))


# --- The shapes world -------------------------------------------------------------


def test_shapes_world_reads_back_as_generated_and_is_reused(tmp_path):
  data_dir = str(tmp_path)
  b = builders.build_shapes_world(data_dir, "vqa", sizes={"train": 6, "test": 3}, image_size=32)
  assert b.info.file_format.value == "array_record"
  for split, n in (("train", 6), ("test", 3)):
    got, want = read(b, split), list(shapes_world.records("vqa", split, n, image_size=32))
    assert [g["id"] for g in got] == [w["id"] for w in want]  # source order kept
    for g, w in zip(got, want):
      assert g["kind"] == w["kind"] and g["turns"] == w["turns"] and g["meta"] == json.loads(w["meta"])
      assert images_equal(g["images"], w["images"])
  assert builders.skipped_counts(b) == {}
  again = builders.build_shapes_world(data_dir, "vqa", sizes={"train": 6, "test": 3}, image_size=32)
  assert again.builder_config.name == b.builder_config.name and again.data_dir == b.data_dir
  other = builders.build_shapes_world(data_dir, "vqa", sizes={"train": 6, "test": 3}, image_size=32,
                                      qtypes=("count",))
  assert other.builder_config.name != b.builder_config.name
  assert {r["meta"]["qtype"] for r in read(other)} == {"count"}
  # The pipeline reopens a prepared set by name.
  reopened = tfds.builder(f"shapes_world/{b.builder_config.name}", data_dir=data_dir)
  assert len(reopened.as_data_source()["train"]) == 6


def test_shapes_world_text_and_multi_image_tasks(tmp_path):
  b = builders.build_shapes_world(str(tmp_path), "interleaved", sizes={"train": 3}, image_size=32)
  for r in read(b):
    assert r["turns"][0]["content"].count("<image>") == len(r["images"]) >= 2
  b = builders.build_shapes_world(str(tmp_path), "text_qa", sizes={"train": 3})
  assert all(r["images"] == [] and r["kind"] == "text" for r in read(b))


def test_shapes_world_options_checked():
  with pytest.raises(ValueError, match="corruption_rate"):
    builders.shapes_world_config("vqa", corruption_rate=0.2)
  with pytest.raises(ValueError, match="split"):
    builders.shapes_world_config("vqa", sizes={"dev": 3})
  assert {c.name for c in builders.ShapesWorld.BUILDER_CONFIGS} == set(shapes_world.TASKS)


# --- Real formats -----------------------------------------------------------------


def test_coco_captions(tmp_path):
  a, b = png(tmp_path, "imgs/a.png", 0), png(tmp_path, "imgs/b.png", 1)
  path = write_json(tmp_path / "captions_train.json", {
      "images": [{"id": 1, "file_name": "imgs/a.png"}, {"id": 2, "file_name": "imgs/b.png"}],
      "annotations": [{"id": 10, "image_id": 1, "caption": "a cat."}, {"id": 11, "image_id": 2, "caption": "a dog."},
                      {"id": 12, "image_id": 1, "caption": "a sleeping cat."}]})
  got = read(builders.build_from_files("captions", path, str(tmp_path / "data")))
  assert [r["id"] for r in got] == ["captions_train/1/10", "captions_train/1/12", "captions_train/2/11"]
  assert [r["turns"][1]["content"] for r in got] == ["a cat.", "a sleeping cat.", "a dog."]
  assert all(r["kind"] == "caption" and r["turns"][0] == {"role": "user", "content": "<image>"} for r in got)
  assert images_equal([r["images"][0] for r in got], [a, a, b])


def test_jsonl_captions_with_image_root_and_splits(tmp_path):
  pixels = [png(tmp_path, f"pics/{i}.png", i) for i in range(3)]
  train = write_jsonl(tmp_path / "train.jsonl", [{"image": f"{i}.png", "caption": f"picture {i}."} for i in range(2)])
  val = write_jsonl(tmp_path / "val.jsonl", [{"image": "2.png", "caption": "picture 2.", "id": "x"}])
  b = builders.build_from_files("captions", {"train": train, "validation": val}, str(tmp_path / "data"),
                                image_root=str(tmp_path / "pics"))
  got = read(b)
  assert [r["id"] for r in got] == ["train/000000", "train/000001"]
  assert [r["turns"][1]["content"] for r in got] == ["picture 0.", "picture 1."]
  assert images_equal([r["images"][0] for r in got], pixels[:2])
  (v,) = read(b, "validation")
  assert v["id"] == "val/x" and images_equal(v["images"], pixels[2:])


def test_interleaved_mmc4(tmp_path):
  p = [png(tmp_path, f"d/{i}.png", i) for i in range(3)]
  path = write_jsonl(tmp_path / "docs.jsonl", [
      {"text_list": ["A cat.", "It sleeps.", "A dog barks."],
       "image_info": [{"image_name": "d/2.png", "matched_text_index": 2},
                      {"image_name": "d/0.png", "matched_text_index": 0}]},
      {"text_list": ["Only text here."], "image_info": []},
      {"text_list": ["Two pictures.", "End."],
       "image_info": [{"image_name": "d/0.png", "matched_text_index": 1},
                      {"image_name": "d/1.png", "matched_text_index": 1}]},
  ])
  got = read(builders.build_from_files("interleaved", path, str(tmp_path / "data")))
  assert [r["turns"] for r in got] == [
      [{"role": "text", "content": "<image> A cat. It sleeps. <image> A dog barks."}],
      [{"role": "text", "content": "Only text here."}],
      [{"role": "text", "content": "Two pictures. <image> <image> End."}]]
  assert [r["kind"] for r in got] == ["interleaved"] * 3
  assert images_equal(got[0]["images"], [p[0], p[2]]) and got[1]["images"] == []
  assert images_equal(got[2]["images"], [p[0], p[1]])


def test_llava_conversations(tmp_path):
  a, b = png(tmp_path, "a.png", 0), png(tmp_path, "b.png", 1)
  samples = [
      {"id": "v1", "image": "a.png", "conversations": [
          {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."},
          {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
      {"id": "t1", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
      {"id": "m1", "image": ["a.png", "b.png"], "conversations": [
          {"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "No."}]},
  ]
  got = read(builders.build_from_files("conversations", write_json(tmp_path / "llava.json", samples),
                                       str(tmp_path / "data")))
  assert [r["id"] for r in got] == ["llava/v1", "llava/t1", "llava/m1"]
  roles = {"human": "user", "gpt": "assistant"}
  for r, s in zip(got, samples):
    assert r["kind"] == "conversation"
    assert r["turns"] == [{"role": roles[t["from"]], "content": t["value"]} for t in s["conversations"]]
  assert images_equal(got[0]["images"], [a]) and got[1]["images"] == []
  assert images_equal(got[2]["images"], [a, b])


def test_text_corpus(tmp_path):
  path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "Cats sleep a lot."}, {"question": "2 + 2?", "answer": "4"}])
  got = read(builders.build_from_files("text", path, str(tmp_path / "data")))
  assert [r["turns"] for r in got] == [
      [{"role": "text", "content": "Cats sleep a lot."}],
      [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]]
  assert all(r["kind"] == "text" and r["images"] == [] for r in got)
  assert got[1]["meta"]["answer"] == "4"


def test_unknown_kind():
  with pytest.raises(ValueError, match="kind"):
    builders.build_from_files("video", "x.json", "/tmp/unused")


# --- Bad records: skipped, counted, reported -----------------------------------------


def build_captions_with(tmp_path, bad_line):
  good = png(tmp_path, "good.png", 0)
  path = write_jsonl(tmp_path / "caps.jsonl", [{"image": "good.png", "caption": "fine."}, bad_line,
                                               {"image": "good.png", "caption": "also fine."}])
  b = builders.build_from_files("captions", path, str(tmp_path / "data"))
  got = read(b)
  assert [r["turns"][1]["content"] for r in got] == ["fine.", "also fine."]
  assert images_equal([r["images"][0] for r in got], [good, good])
  with open(os.path.join(b.data_dir, "skipped.json")) as f:
    assert json.load(f) == builders.skipped_counts(b)
  return builders.skipped_counts(b)


def test_skips_corrupt_image_bytes(tmp_path):
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  assert build_captions_with(tmp_path, {"image": "broken.png", "caption": "x."}) == {"bad_image": 1}


def test_skips_missing_image(tmp_path):
  assert build_captions_with(tmp_path, {"image": "nowhere.png", "caption": "x."}) == {"missing_image": 1}


def test_skips_empty_caption(tmp_path):
  assert build_captions_with(tmp_path, {"image": "good.png", "caption": "  "}) == {"empty_caption": 1}


def test_skips_image_count_mismatch(tmp_path):
  png(tmp_path, "a.png", 0)
  samples = [
      {"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                       {"from": "gpt", "value": "Noise."}]},
      {"id": "two", "image": "a.png", "conversations": [{"from": "human", "value": "<image> <image> What?"},
                                                        {"from": "gpt", "value": "Noise."}]},
  ]
  b = builders.build_from_files("conversations", write_json(tmp_path / "conv.json", samples), str(tmp_path / "data"))
  assert [r["id"] for r in read(b)] == ["conv/ok"]
  assert builders.skipped_counts(b) == {"image_count_mismatch": 1}


def test_skips_malformed_lines(tmp_path):
  path = write_jsonl(tmp_path / "t.jsonl", ["{not json", {"text": ""}, {"other": 1}, {"text": "kept."}])
  b = builders.build_from_files("text", path, str(tmp_path / "data"))
  assert [r["turns"][0]["content"] for r in read(b)] == ["kept."]
  assert builders.skipped_counts(b) == {"bad_record": 2, "empty_text": 1}


def test_build_data_command_prepares_a_source_the_pipeline_reads(tmp_path, capsys):
  import json as json_lib
  from PIL import Image as PILImage
  from launch import build_data
  from vlm_jax.data import sources
  PILImage.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
  with open(tmp_path / "train.jsonl", "w") as f:
    f.write(json_lib.dumps({"image": "a.png", "caption": "a red square."}) + "\n")
    f.write(json_lib.dumps({"image": "missing.png", "caption": "gone."}) + "\n")
  name = build_data.main(["--kind=captions", f"--path={tmp_path / 'train.jsonl'}",
                          f"--data_dir={tmp_path / 'tfds'}"])
  out = capsys.readouterr().out
  assert name in out and "{'train': 1}" in out and "missing_image" in out
  source = sources.open_source(sources.Source(name=name, split="train"), data_dir=str(tmp_path / "tfds"))
  assert len(source) == 1
