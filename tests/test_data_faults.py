"""Nothing lost, nothing silently wrong: rows that fit nothing, annotation files that are not
UTF-8, records skipped at build time reaching the run summary, stale builds, data sets of bad
records only, and image paths outside the data root."""

import logging
import os
import threading

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from launch import build_data  # noqa: E402  (after the importorskip)
from vlm_jax.data import builders, pipeline  # noqa: E402
from vlm_jax.data import sources as sources_lib  # noqa: E402
from vlm_jax.data.synthetic import SyntheticBatches  # noqa: E402
from tests.test_builders import png as png_file, read, write_json, write_jsonl  # noqa: E402
from tests.test_pipeline import TPI, build, caption, make, tok  # noqa: E402,F401  (tok: a fixture)

tfds.disable_progress_bar()


def within(seconds, fn):
  """fn()'s result or exception, or a failure if it is still running after `seconds` (a loop
  that never ends must fail the test, not hang it)."""
  out = {}

  def target():
    try:
      out["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except  (handed to the test)
      out["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"still running after {seconds} s"
  if "error" in out:
    raise out["error"]
  return out["value"]


# --- 9: seq_len shorter than the image tokens ------------------------------------


def test_seq_len_that_holds_no_image_is_refused_when_built(tok, tmp_path):
  b = build(tmp_path, [caption(i) for i in range(2)])
  with pytest.raises(ValueError, match=r"seq_len 40 .*tokens_per_image 64.*>= 67"):
    make(b, tok, seq_len=40, tokens_per_image=64)
  make(b, tok, seq_len=TPI + 3)  # BOS, one image, one target, EOS: fits


def test_too_long_records_forever_stop_with_the_reason(tok, tmp_path):
  """Every record too long, repeated forever: an error naming the reason, not a spin."""
  it = iter(make(build(tmp_path, [caption(i, text="long " * 60) for i in range(3)]), tok,
                 max_consecutive_skips=50))
  with pytest.raises(RuntimeError, match=r"50 records in a row were skipped.*'too_long': 50.*seq_len 40"):
    within(60, lambda: next(it))
  assert it.skipped() == {"too_long": 50}


def test_consecutive_skips_bounded_by_default(tok, tmp_path):
  it = iter(make(build(tmp_path, [caption(i, text="long " * 60) for i in range(3)]), tok))
  with pytest.raises(RuntimeError, match="1000 records in a row"):
    within(300, lambda: next(it))


def test_scattered_skips_do_not_stop_the_pipeline(tok):
  records = [r for i in range(4) for r in (caption(i), caption(10 + i, text="long " * 60),
                                           caption(20 + i, text="long " * 60))]
  source = sources_lib.Source("in_order", data_source=records)  # a list: kept in this order
  it = iter(make(None, tok, sources=[source], num_epochs=2, shuffle=False, max_consecutive_skips=3,
                 global_batch_size=1))
  assert len(list(it)) == 8 and it.skipped() == {"too_long": 16}
  with pytest.raises(ValueError, match="max_consecutive_skips"):
    make(None, tok, sources=[sources_lib.Source("x", data_source=[caption(0)])], max_consecutive_skips=0)


def test_synthetic_batches_refuse_rows_without_targets():
  with pytest.raises(ValueError, match=r"seq_len 17 .*tokens_per_image 16.*>= 19"):
    SyntheticBatches(global_batch=2, seq_len=17, vocab_size=512, image_size=8, tokens_per_image=16,
                     image_token_id=511)
  with pytest.raises(ValueError, match=r"seq_len 1 "):
    SyntheticBatches(global_batch=2, seq_len=1, vocab_size=512)
  batch = SyntheticBatches(global_batch=2, seq_len=19, vocab_size=512, image_size=8, tokens_per_image=16,
                           image_token_id=511).batch(0)
  assert (batch["loss_mask"].sum(axis=1) == 1).all()


# --- 10: a non-UTF-8 annotation line ---------------------------------------------


def test_non_utf8_jsonl_line_is_skipped_with_its_line_number(tmp_path):
  png_file(tmp_path, "a.png", 0)
  path = tmp_path / "caps.jsonl"
  path.write_bytes(b'{"image": "a.png", "caption": "fine."}\n'
                   b'{"image": "a.png", "caption": "caf\xe9 in latin-1."}\n'
                   b'{"image": "a.png", "caption": "also fine."}\n')
  b = builders.build_from_files("captions", str(path), str(tmp_path / "data"))
  assert [r["turns"][1]["content"] for r in read(b)] == ["fine.", "also fine."]
  assert builders.skipped_counts(b) == {"bad_record": 1}
  (example,) = builders.skipped_examples(b)["bad_record"]
  assert f"{path}:1" in example and "not UTF-8" in example


def test_non_utf8_json_file_names_itself(tmp_path):
  path = tmp_path / "llava.json"
  path.write_bytes(b'[{"id": "1", "conversations": [{"from": "human", "value": "caf\xe9"}]}]')
  with pytest.raises(ValueError, match=r"llava.json: not UTF-8 at byte 62 "):
    builders.build_from_files("conversations", str(path), str(tmp_path / "data"))


# --- 7: the build's skips reach the run summary; stale builds are rebuilt ----------


def test_pipeline_reports_the_build_skips(tok, tmp_path):
  png_file(tmp_path, "a.png", 0)
  path = write_jsonl(tmp_path / "caps.jsonl", [{"image": "a.png", "caption": "a picture."},
                                               {"image": "gone.png", "caption": "lost."}])
  b = builders.build_from_files("captions", path, str(tmp_path / "data"))
  name = f"{b.name}/{b.builder_config.name}"
  it = iter(make(None, tok, sources=[sources_lib.Source(name=name, data_dir=str(tmp_path / "data"))],
                 num_epochs=1, global_batch_size=1))
  assert len(list(it)) == 1
  assert it.skipped() == {f"missing_image (build of {name})": 1}  # what train()'s summary prints
  assert it.get_state()["skipped"] == {}  # the stream's own counts stay apart


def test_build_reused_until_an_image_changes(tmp_path, caplog):
  png_file(tmp_path, "a.png", 0)
  path = write_jsonl(tmp_path / "caps.jsonl", [{"image": "a.png", "caption": "a picture."},
                                               {"image": "b.png", "caption": "another."}])
  data_dir = str(tmp_path / "data")
  first = builders.build_from_files("captions", path, data_dir)
  assert len(read(first)) == 1 and builders.skipped_counts(first) == {"missing_image": 1}
  with caplog.at_level(logging.INFO, logger="vlm_jax.data.builders"):
    again = builders.build_from_files("captions", path, data_dir)
  assert "reusing" in caplog.text and again.data_dir == first.data_dir
  b_pixels = png_file(tmp_path, "b.png", 1)  # the missing image arrives
  fixed = builders.build_from_files("captions", path, data_dir)
  got = read(fixed)
  assert len(got) == 2 and np.array_equal(got[1]["images"][0], b_pixels)
  assert builders.skipped_counts(fixed) == {} and fixed.data_dir == first.data_dir
  os.utime(tmp_path / "a.png", ns=(1, 1))  # an image touched (rewritten) is noticed too
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="vlm_jax.data.builders"):
    builders.build_from_files("captions", path, data_dir)
  assert "1 image(s) changed" in caplog.text and "rebuilding" in caplog.text


# --- 14: only bad records ------------------------------------------------------------


def test_only_bad_records_fail_with_the_skip_counts(tmp_path):
  path = write_jsonl(tmp_path / "caps.jsonl", [{"image": "gone.png", "caption": "lost."},
                                               {"image": "gone.png", "caption": " "}, "{not json"])
  with pytest.raises(ValueError, match=r"no records for split 'train'.*all 3 skipped.*'missing_image': 1"):
    builders.build_from_files("captions", path, str(tmp_path / "data"))
  coco = write_json(tmp_path / "coco.json", {"images": [], "annotations": [{"id": 1, "image_id": 5, "caption": "x"}]})
  with pytest.raises(ValueError, match=r"all 1 skipped \{'bad_record': 1\}"):
    builders.build_from_files("captions", coco, str(tmp_path / "data"))


# --- 15: image paths outside the data root -------------------------------------------


def test_data_root_only_skips_paths_leaving_the_root(tmp_path, capsys):
  root = tmp_path / "root"
  png_file(root, "in.png", 0)
  png_file(tmp_path, "out.png", 1)
  path = write_jsonl(root / "caps.jsonl", [
      {"image": "in.png", "caption": "inside."}, {"image": "../out.png", "caption": "climbs out."},
      {"image": str(tmp_path / "out.png"), "caption": "absolute."},
      {"image": "sub/../in.png", "caption": "stays inside."}])
  data_dir = str(tmp_path / "data")
  own = builders.build_from_files("captions", path, data_dir)  # your own annotations: read as written
  assert len(read(own)) == 4
  strict = builders.build_from_files("captions", path, data_dir, data_root_only=True)
  assert strict.builder_config.name != own.builder_config.name
  assert [r["turns"][1]["content"] for r in read(strict)] == ["inside.", "stays inside."]
  assert builders.skipped_counts(strict) == {"outside_data_root": 2}
  capsys.readouterr()
  name = build_data.main(["--kind=captions", f"--path={path}", f"--data_dir={data_dir}", "--data_root_only"])
  out = capsys.readouterr().out
  assert name.endswith(strict.builder_config.name) and "outside_data_root" in out and "../out.png" in out
  with pytest.raises(SystemExit):
    build_data.main(["--help"])
  assert "--data_root_only" in capsys.readouterr().out


def test_build_data_summary_shows_where_records_were_skipped(tmp_path, capsys):
  png_file(tmp_path, "a.png", 0)
  path = write_jsonl(tmp_path / "caps.jsonl", [{"image": "a.png", "caption": "ok."}, "{not json"])
  build_data.main(["--kind=captions", f"--path={path}", f"--data_dir={tmp_path / 'data'}"])
  out = capsys.readouterr().out
  assert "skipped:  {'bad_record': 1}" in out and f"bad_record: {path}:1: line 1" in out
