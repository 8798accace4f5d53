"""Synth² data: the resumable sharded writer of (caption, code grid) pairs, its TFDS data
set, and pipeline batches mixing them with real pairs (image_codes / code_given, exact ratio).
"""

import collections
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import builders, pipeline, schema
from vlm_jax.data import sources as sources_lib
from vlm_jax.data import synthetic_pairs as sp
from vlm_jax.data import tokenizer as tokenizers_lib

T, K = 4, 16      # code grid length (2x2) and codebook size
TPI = 3           # tokens per image in the pipeline
SIZE = 8          # image side after preprocessing
WORDS = ("red circle", "blue square", "green star", "small yellow heart")


def captions_for(ids):
  return [f"a {WORDS[int(i.rsplit('-', 1)[1]) % 4]} number {i.rsplit('-', 1)[1]}" for i in ids]


def codes_for(ids):
  """Codes that name their pair: row of pair n is (n, n+1, n+2, n+3) mod K."""
  n = np.asarray([int(i.rsplit("-", 1)[1]) for i in ids])
  return (n[:, None] + np.arange(T)) % K


def writer(directory, num=10, chunk_size=4, **kw):
  args = dict(num_tokens=T, codebook_size=K, fingerprint="vq-test-1")
  args.update(kw)
  return sp.SyntheticPairsWriter(str(directory), num, chunk_size, **args)


def write_chunks(w, chunks):
  for c in chunks:
    ids = w.chunk_ids(c)
    w.write(c, captions_for(ids), codes_for(ids))


def finished(directory, num=10, chunk_size=4):
  w = writer(directory, num, chunk_size)
  write_chunks(w, w.pending())
  return w


# --- storage ----------------------------------------------------------------------


def test_writer_round_trip(tmp_path):
  w = finished(tmp_path / "pairs")
  assert w.num_chunks == 3 and w.chunk_ids(2) == ["synth-8", "synth-9"]  # 10 = 4 + 4 + 2
  got = list(sp.read_pairs(str(tmp_path / "pairs")))
  ids = [f"synth-{i}" for i in range(10)]
  assert [g[0] for g in got] == ids
  assert [g[1] for g in got] == captions_for(ids)
  np.testing.assert_array_equal(np.stack([g[2] for g in got]), codes_for(ids))
  assert all(g[2].dtype == np.int32 for g in got)
  assert sp.read_meta(str(tmp_path / "pairs")) == dict(num=10, chunk_size=4, num_tokens=T, codebook_size=K,
                                                       fingerprint="vq-test-1", prefix="synth")
  assert w.pending() == []


def test_resume_after_kill_writes_each_id_once(tmp_path):
  d = tmp_path / "pairs"
  w = writer(d)
  write_chunks(w, w.pending()[:1])  # killed after the first chunk ...
  with open(d / ".chunk-000001.npz.tmpkilled", "wb") as f:  # ... in the middle of writing the second
    f.write(b"half a chunk")
  again = writer(d)
  assert again.pending() == [1, 2]
  write_chunks(again, again.pending())
  counts = collections.Counter(rid for rid, _, _ in sp.read_pairs(str(d)))
  assert counts == {f"synth-{i}": 1 for i in range(10)}
  with pytest.raises(ValueError, match="already written"):
    write_chunks(again, [0])


def test_pending_partitions_chunks_over_processes(tmp_path):
  w = writer(tmp_path / "pairs", num=10, chunk_size=2)  # 5 chunks
  p0, p1 = w.pending(0, 2), w.pending(1, 2)
  assert (p0, p1) == ([0, 2, 4], [1, 3])
  write_chunks(w, [2])
  assert w.pending(0, 2) == [0, 4] and w.pending(1, 2) == [1, 3]
  with pytest.raises(ValueError, match="process_index"):
    w.pending(2, 2)


@pytest.mark.parametrize("change", [dict(num_tokens=9), dict(codebook_size=8), dict(fingerprint="vq-other"),
                                    dict(num=11)])
def test_reopening_with_other_meta_is_refused(tmp_path, change):
  d = tmp_path / "pairs"
  write_chunks(writer(d), [0])
  before = {p: (d / p).read_bytes() for p in os.listdir(d)}
  key = next(iter(change))
  with pytest.raises(ValueError, match=f"{key}: on disk .* now .*nothing was overwritten"):
    writer(d, **change)
  assert {p: (d / p).read_bytes() for p in os.listdir(d)} == before


def test_bad_chunks_are_refused(tmp_path):
  w = writer(tmp_path / "pairs")
  ids = w.chunk_ids(0)
  codes = codes_for(ids)
  codes[2, 1] = K  # one past the codebook
  with pytest.raises(ValueError, match=r"outside \[0, codebook_size 16\) in 1 pair\(s\), e.g. pair 2"):
    w.write(0, captions_for(ids), codes)
  with pytest.raises(ValueError, match=r"shape \[4, num_tokens 4\], got \[4, 5\]"):
    w.write(0, captions_for(ids), np.zeros((4, 5), np.int32))
  with pytest.raises(ValueError, match="4 pairs, got 3 captions"):
    w.write(0, captions_for(ids)[:3], codes_for(ids))
  with pytest.raises(ValueError, match="caption 1 of chunk 0"):
    w.write(0, ["a", "", "b", "c"], codes_for(ids))
  with pytest.raises(ValueError, match="integers"):
    w.write(0, captions_for(ids), codes_for(ids) + 0.5)
  assert w.pending() == [0, 1, 2]  # nothing written


def test_incomplete_directory_is_refused(tmp_path):
  w = writer(tmp_path / "pairs")
  write_chunks(w, [1])
  with pytest.raises(ValueError, match="2 of 3 chunks missing"):
    sp.build_synthetic_pairs(str(tmp_path / "data"), str(tmp_path / "pairs"))
  with pytest.raises(FileNotFoundError, match="meta.json"):
    sp.build_synthetic_pairs(str(tmp_path / "data"), str(tmp_path / "nothing"))


# --- data set and pipeline ------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizers_lib.train_bpe(tokenizers_lib.builtin_corpus(300), 512,
                                  str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
  """(real shapes-world captions, synthetic pairs, data_dir)."""
  root = tmp_path_factory.mktemp("synth")
  data_dir = str(root / "data")
  real = builders.build_shapes_world(data_dir, "caption", sizes={"train": 12}, image_size=16, max_objects=1)
  finished(root / "pairs", num=10, chunk_size=4)
  synth = sp.build_synthetic_pairs(data_dir, str(root / "pairs"))
  return real, synth, data_dir


def make(tok, sources, **kw):
  args = dict(global_batch_size=4, seq_len=48, tokens_per_image=TPI, image_slots=1, image_size=SIZE,
              process_index=0, process_count=1, num_threads=2, prefetch=16, seed=0, image_codes=T)
  args.update(kw)
  return pipeline.Pipeline(sources, tok, **args)


def mixed_sources(real, synth, w_real=1.0, w_synth=1.0):
  return [sources_lib.Source("real", builder=real, weight=w_real),
          sources_lib.Source("synth", builder=synth, weight=w_synth)]


def test_data_set_records(sets):
  _, synth, data_dir = sets
  src = sources_lib.open_source(sources_lib.Source(builder=synth))
  assert len(src) == 10
  rec = src[7]
  assert rec["id"] == b"synth-7" and rec["kind"] == b"caption" and len(rec["images"]) == 0
  np.testing.assert_array_equal(rec["codes"], codes_for(["synth-7"]))
  assert [t.decode() for t in rec["turns"]["content"]] == ["<image>", captions_for(["synth-7"])[0]]
  # Reopened by name, as a config's data.sources would name it.
  named = sources_lib.Source(name=f"synthetic_pairs/{synth.builder_config.name}")
  assert len(sources_lib.open_source(named, data_dir)) == 10
  assert sp.build_synthetic_pairs(data_dir, synth.builder_config.pairs_dir).data_dir == synth.data_dir  # reused


def test_batches_mix_real_images_and_codes(tok, sets):
  real, synth, _ = sets
  pipe = make(tok, mixed_sources(real, synth))
  spec = pipe.batch_spec()
  assert spec["image_codes"] == ((4, 1, T), np.dtype(np.int32)) and spec["code_given"] == ((4, 1), np.dtype(np.int32))
  it = iter(pipe)
  by_id = dict(zip((f"synth-{i}" for i in range(10)), codes_for([f"synth-{i}" for i in range(10)])))
  for _ in range(6):
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in schema.device_batch(batch).items()} == spec
    assert batch["code_given"].sum() == 2  # weights 1:1: exactly half of every batch
    for r, rid in enumerate(batch["id"]):
      if rid.startswith("synth-"):
        assert batch["code_given"][r, 0] == 1
        np.testing.assert_array_equal(batch["image_codes"][r, 0], by_id[rid])
        assert not batch["images"][r].any()
        n = int(rid.split("-")[1])
        caption = captions_for([rid])[0]
        want = [tok.bos_token_id] + [tok.convert_tokens_to_ids("<image>")] * TPI \
            + tok.encode(caption, add_special_tokens=False) + [tok.eos_token_id]
        np.testing.assert_array_equal(batch["input_ids"][r, :len(want)], want)
        assert batch["loss_mask"][r].sum() == len(want) - 1 - TPI, n
      else:
        assert batch["code_given"][r, 0] == 0 and not batch["image_codes"][r].any()
        assert batch["images"][r, 0].std() > 0  # a real, preprocessed image


@pytest.mark.parametrize("weights,per_batch", [((1.0, 1.0), 4), ((3.0, 1.0), 2), ((1.0, 3.0), 6)])
def test_mixture_ratio_is_exact(tok, sets, weights, per_batch):
  """Every window of 8 records (a batch) holds exactly 8·w_synth/Σw synthetic ones."""
  real, synth, _ = sets
  it = iter(make(tok, mixed_sources(real, synth, *weights), global_batch_size=8))
  counts = [int(next(it)["code_given"].sum()) for _ in range(8)]
  assert counts == [per_batch] * 8


def test_resume_with_codes(tok, sets):
  real, synth, _ = sets
  it = iter(make(tok, mixed_sources(real, synth)))
  [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  assert state["fingerprint"]["image_codes"] == T
  expected = [next(it) for _ in range(2)]
  resumed = make(tok, mixed_sources(real, synth)).iterator(state)
  for x in expected:
    y = next(resumed)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_off_by_default_and_config_mismatch_refused(tok, sets):
  real, synth, _ = sets
  batch = next(iter(make(tok, [sources_lib.Source(builder=real)], image_codes=0)))
  assert set(batch) == {"input_ids", "loss_mask", "attention_mask", "positions", "segment_ids", "images", "id"}
  assert "image_codes" not in make(tok, [sources_lib.Source(builder=real)], image_codes=0).batch_spec()
  assert pipeline.default_config().image_codes == 0
  with pytest.raises(ValueError, match="set data.image_codes = 4"):
    make(tok, mixed_sources(real, synth), image_codes=0)
  with pytest.raises(ValueError, match="codes of 4 per image, but data.image_codes is 9"):
    make(tok, mixed_sources(real, synth), image_codes=9)


def png() -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def test_bad_code_records_are_skipped_and_counted(tok):
  def record(i, codes):
    return {"id": f"p{i}", "kind": "caption", "images": [], "codes": [codes], "meta": "{}",
            "turns": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": f"a red star {i}"}]}
  records = [record(i, np.arange(T, dtype=np.int32) + i) for i in range(5)]
  records += [record(5, np.arange(T + 1, dtype=np.int32)), record(6, -np.ones(T, np.int32)),
              {**record(7, np.arange(T, dtype=np.int32)), "images": [png()]}]  # pixels and codes
  it = iter(make(tok, [sources_lib.Source("plain", data_source=records)], num_epochs=1, shuffle=False))
  batches = list(it)
  assert [i for b in batches for i in b["id"] if i] == [f"p{i}" for i in range(5)]
  assert it.skipped() == {"bad_codes": 2, "malformed_record": 1}
  np.testing.assert_array_equal(batches[1]["image_codes"][0, 0], np.arange(T) + 4)
  assert batches[1]["code_given"].tolist() == [[1], [0], [0], [0]]  # unused rows: nothing given
