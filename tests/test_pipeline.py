"""The input pipeline: rendering, batching, packing, determinism, sharding, resume, bad data.

Records go through a small TFDS builder defined here (array_record, PNG images
encoded with Pillow, so no TensorFlow runs), read back with `as_data_source`.
"""

import collections
import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vlm_jax.data import pipeline, rendering, schema
from vlm_jax.data import sources as sources_lib
from vlm_jax.data import tokenizer as tokenizers_lib
from vlm_jax.data.preprocess import CLIP_MEAN, CLIP_STD, decode_image, preprocess_image

tfds.disable_progress_bar()

TPI = 3          # tokens per image in these tests
IMAGE_ID = 511
SIZE = 8         # image side after preprocessing


class VlmJaxPipelineTestRecords(tfds.core.GeneratorBasedBuilder):
  """Stores the records it is given (plain schema dicts, images as PNG bytes)."""
  VERSION = tfds.core.Version("1.0.0")
  # TFDS 4.9.10 looks for a checksums file beside the code of a builder defined in a
  # package and fails there without the `importlib_resources` backport: there is none.
  code_path = None

  def __init__(self, records=None, **kwargs):
    self._records = records
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=schema.features())

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for r in self._records:
      yield r["id"], {**r, "images": [io.BytesIO(b) for b in r["images"]], "meta": "{}"}


def build(tmp_path, records, name="records"):
  b = VlmJaxPipelineTestRecords(records, data_dir=str(tmp_path / name), file_format="array_record")
  b.download_and_prepare()
  return b


def png(i: int, h: int = 6, w: int = 5) -> bytes:
  a = np.zeros((h, w, 3), np.uint8)
  a[...] = (i * 37 % 256, i * 91 % 256, i * 53 % 256)
  a[0, 0] = 255 - a[0, 0]
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, "PNG")
  return buf.getvalue()


def caption(i, text=None, images=None):
  return {"id": f"cap{i}", "kind": "caption", "images": [png(i)] if images is None else images,
          "turns": [{"role": "user", "content": "<image>"},
                    {"role": "assistant", "content": f"a shape number {i}" if text is None else text}]}


def vqa(i):
  return {"id": f"vqa{i}", "kind": "conversation", "images": [png(i)],
          "turns": [{"role": "user", "content": "<image>\nwhat colour is it?"},
                    {"role": "assistant", "content": "red" if i % 2 else "blue"}]}


def doc(i):
  return {"id": f"doc{i}", "kind": "interleaved", "images": [png(i), png(i + 100)],
          "turns": [{"role": "text", "content": f"first <image> then <image> end {i}"}]}


def text(i):
  return {"id": f"txt{i}", "kind": "text", "images": [],
          "turns": [{"role": "text", "content": f"a square has four corners {i}."}]}


def mixed_records(n):
  makers = (caption, vqa, doc, text)
  return [makers[i % 4](i) for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizers_lib.train_bpe(tokenizers_lib.builtin_corpus(300), 512,
                                  str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """48 records of all four kinds."""
  records = mixed_records(48)
  return build(tmp_path_factory.mktemp("mixed"), records), records


def make(builder, tok, **kw):
  args = dict(global_batch_size=4, seq_len=40, tokens_per_image=TPI, image_slots=2, image_size=SIZE,
              process_index=0, process_count=1, num_threads=2, prefetch=16, seed=0)
  args.update(kw)
  sources = args.pop("sources", None) or [sources_lib.Source(builder=builder)]
  return pipeline.Pipeline(sources, tok, **args)


def take(it, n):
  return [next(it) for _ in range(n)]


def row_ids(batches):
  return [i for b in batches for r in b["id"] for i in r.split(",") if i]


def enc(tok, s):
  return tok.encode(s, add_special_tokens=False)


# --- images -------------------------------------------------------------------


def test_preprocess_matches_transformers_processors():
  import transformers
  transformers.logging.set_verbosity_error()
  from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
  a = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
  cases = [
      (CLIPImageProcessorPil(size={"height": 24, "width": 24}, do_center_crop=False), "resize", "clip"),
      (CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}), "crop", "clip"),
      (SiglipImageProcessorPil(size={"height": 24, "width": 24}), "resize", "siglip"),
  ]
  for processor, mode, norm in cases:
    want = processor(Image.fromarray(a), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(preprocess_image(a, 24, mode, norm), want, atol=1e-5)
  # pad: LLaVA's expand2square, centred on the mean colour (which normalises to ~0).
  padded = preprocess_image(a, 50, "pad", "clip")
  np.testing.assert_allclose(padded[10:40], (a / 255.0 - CLIP_MEAN) / CLIP_STD, atol=1e-5)
  assert np.abs(padded[:10]).max() < 0.02 and np.abs(padded[40:]).max() < 0.02


# --- render -------------------------------------------------------------------


def check(ids, mask, expected):
  """expected: [(token ids, is_target)] in order."""
  want_ids = [t for toks, _ in expected for t in toks]
  want_mask = [float(target) for toks, target in expected for _ in toks]
  assert ids.dtype == np.int32 and mask.dtype == np.float32
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)


def image_runs(ids):
  runs, n = [], 0
  for t in list(ids) + [-1]:
    if t == IMAGE_ID:
      n += 1
    elif n:
      runs.append(n)
      n = 0
  return runs


def test_render_caption(tok):
  ids, mask, n = rendering.render(caption(7, "a red circle"), tok, TPI, IMAGE_ID)
  check(ids, mask, [([1], 0), ([IMAGE_ID] * TPI, 0), (enc(tok, "a red circle"), 1), ([2], 1)])
  assert n == 1 and image_runs(ids) == [TPI]
  # With a fixed prompt between the image and the caption (not a target).
  ids, mask, _ = rendering.render(caption(7, "a red circle"), tok, TPI, IMAGE_ID,
                                 {"caption_prompt": "Describe:"})
  check(ids, mask, [([1], 0), ([IMAGE_ID] * TPI, 0), (enc(tok, "Describe:"), 0),
                    (enc(tok, "a red circle"), 1), ([2], 1)])


def test_render_conversation_two_turns(tok):
  rec = {"id": "c", "kind": "conversation", "images": [png(1)],
         "turns": [{"role": "user", "content": "<image>\nwhat colour?"},
                   {"role": "assistant", "content": "red"},
                   {"role": "user", "content": "how many?"},
                   {"role": "assistant", "content": "two"}]}
  ids, mask, n = rendering.render(rec, tok, TPI, IMAGE_ID)
  check(ids, mask, [([1], 0), (enc(tok, "USER: "), 0), ([IMAGE_ID] * TPI, 0),
                    (enc(tok, "\nwhat colour?"), 0), (enc(tok, "\nASSISTANT:"), 0),
                    (enc(tok, " red"), 1), ([2], 1), (enc(tok, "\n"), 0), (enc(tok, "USER: "), 0),
                    (enc(tok, "how many?"), 0), (enc(tok, "\nASSISTANT:"), 0),
                    (enc(tok, " two"), 1), ([2], 1)])
  assert n == 1
  # The targets decode to exactly the answers and their EOS.
  assert tok.decode(ids[mask > 0]) == " red</s> two</s>"


def test_render_interleaved(tok):
  ids, mask, n = rendering.render(doc(3), tok, TPI, IMAGE_ID)
  check(ids, mask, [([1], 0), (enc(tok, "first "), 1), ([IMAGE_ID] * TPI, 0), (enc(tok, " then "), 1),
                    ([IMAGE_ID] * TPI, 0), (enc(tok, " end 3"), 1), ([2], 1)])
  assert n == 2 and image_runs(ids) == [TPI, TPI]


def test_render_text_kinds(tok):
  ids, mask, n = rendering.render(text(5), tok, TPI, IMAGE_ID)
  check(ids, mask, [([1], 0), (enc(tok, "a square has four corners 5."), 1), ([2], 1)])
  assert n == 0
  qa = {"id": "q", "kind": "text", "images": [],
        "turns": [{"role": "user", "content": "what is 2 plus 2?"}, {"role": "assistant", "content": "4"}]}
  ids, mask, _ = rendering.render(qa, tok, TPI, IMAGE_ID, {"system": "Be brief.\n"})
  check(ids, mask, [([1], 0), (enc(tok, "Be brief.\n"), 0), (enc(tok, "USER: "), 0),
                    (enc(tok, "what is 2 plus 2?"), 0), (enc(tok, "\nASSISTANT:"), 0),
                    (enc(tok, " 4"), 1), ([2], 1)])


def test_render_tfds_record_equals_plain(tok, mixed):
  builder, records = mixed
  source = builder.as_data_source(split="train")  # images decoded by TFDS to arrays
  by_id = {r["id"]: r for r in records}
  for i in range(4):
    stored = source[i]
    plain = by_id[stored["id"].decode()]
    got = rendering.render(stored, tok, TPI, IMAGE_ID)
    want = rendering.render(plain, tok, TPI, IMAGE_ID)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
    assert len(stored["images"]) == got[2]


# --- batches ------------------------------------------------------------------


def check_batch_invariants(batch, b, l, m):
  assert set(batch) == set(schema.DEVICE_KEYS) | set(schema.HOST_KEYS)
  dtypes = {"input_ids": np.int32, "loss_mask": np.float32, "attention_mask": np.int32,
            "positions": np.int32, "segment_ids": np.int32, "images": np.float32}
  for k, dt in dtypes.items():
    assert batch[k].dtype == dt, k
    assert batch[k].shape == ((b, m, SIZE, SIZE, 3) if k == "images" else (b, l)), k
  assert batch["id"].shape == (b,)
  real = batch["segment_ids"] > 0
  np.testing.assert_array_equal(batch["attention_mask"], real)
  assert not batch["loss_mask"][~real].any()
  assert not (batch["loss_mask"][batch["input_ids"] == IMAGE_ID]).any()
  for r in range(b):
    n_tokens = int((batch["input_ids"][r] == IMAGE_ID).sum())
    used = int((np.abs(batch["images"][r]).reshape(m, -1).sum(-1) > 0).sum())
    assert n_tokens == used * TPI
    assert not batch["images"][r, used:].any()


def test_padded_batches(tok, mixed):
  builder, records = mixed
  by_id = {r["id"]: r for r in records}
  it = iter(make(builder, tok))
  for batch in take(it, 3):
    check_batch_invariants(batch, 4, 40, 2)
    for r in range(4):
      ids, mask, _ = rendering.render(by_id[batch["id"][r]], tok, TPI, IMAGE_ID)
      n = len(ids)
      np.testing.assert_array_equal(batch["input_ids"][r, :n], ids)
      np.testing.assert_array_equal(batch["loss_mask"][r, :n], mask)
      np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))
      np.testing.assert_array_equal(batch["segment_ids"][r], [1] * n + [0] * (40 - n))
      assert (batch["input_ids"][r, n:] == tok.pad_token_id).all()
  assert it.skipped() == {}


def test_packed_batches(tok, mixed):
  builder, records = mixed
  by_id = {r["id"]: r for r in records}
  it = iter(make(builder, tok, packing=True, seq_len=64, image_slots=3))
  packed_rows = 0
  for batch in take(it, 4):
    check_batch_invariants(batch, 4, 64, 3)
    for r in range(4):
      ids_in_row = batch["id"][r].split(",")
      packed_rows += len(ids_in_row) > 1
      start, slot = 0, 0
      for seg, rid in enumerate(ids_in_row, start=1):
        ids, mask, n_img = rendering.render(by_id[rid], tok, TPI, IMAGE_ID)
        n = len(ids)
        np.testing.assert_array_equal(batch["input_ids"][r, start:start + n], ids)
        np.testing.assert_array_equal(batch["loss_mask"][r, start:start + n], mask)
        np.testing.assert_array_equal(batch["segment_ids"][r, start:start + n], seg)
        np.testing.assert_array_equal(batch["positions"][r, start:start + n], np.arange(n))
        for j in range(n_img):  # images of the packed records fill the slots in order
          want = preprocess_image(decode_image(by_id[rid]["images"][j]), SIZE)
          np.testing.assert_array_equal(batch["images"][r, slot], want)
          slot += 1
        start += n
      assert not batch["segment_ids"][r, start:].any()
  assert packed_rows >= 8


def test_same_seed_same_batches_other_seed_other_order(tok, mixed):
  builder, _ = mixed
  a = take(iter(make(builder, tok, seed=1)), 4)
  b = take(iter(make(builder, tok, seed=1)), 4)
  c = take(iter(make(builder, tok, seed=2)), 4)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert row_ids(a) != row_ids(c)


def test_epochs_are_reshuffled(tok, mixed):
  builder, records = mixed
  ids = row_ids(list(make(builder, tok, num_epochs=2, global_batch_size=8)))
  first, second = ids[:48], ids[48:]
  assert sorted(first) == sorted(second) == sorted(r["id"] for r in records)
  assert first != second
  unshuffled = row_ids(list(make(builder, tok, num_epochs=1, global_batch_size=8, shuffle=False)))
  source = builder.as_data_source(split="train")
  assert unshuffled == [source[i]["id"].decode() for i in range(48)]


def test_host_sharding_disjoint_and_complete(tok, mixed):
  builder, records = mixed
  seen = []
  for p in (0, 1):
    pipe = make(builder, tok, num_epochs=1, global_batch_size=8, process_index=p, process_count=2)
    assert pipe.batch_size == 4
    batches = list(pipe)
    assert all(b["input_ids"].shape == (4, 40) for b in batches)
    seen.append(row_ids(batches))
  assert len(seen[0]) == len(seen[1]) == 24
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == {r["id"] for r in records}
  with pytest.raises(ValueError, match="not divisible"):
    make(builder, tok, global_batch_size=5, process_index=0, process_count=2)


@pytest.mark.parametrize("packing", [False, True])
def test_exact_resume(tok, mixed, packing):
  builder, _ = mixed
  kw = dict(packing=packing, seq_len=64 if packing else 40, image_slots=3)
  it = iter(make(builder, tok, **kw))
  take(it, 5)
  state = json.dumps(it.get_state())
  expected = take(it, 3)
  resumed = make(builder, tok, num_threads=1, **kw).iterator(json.loads(state))  # threads: no effect
  for x, y in zip(expected, take(resumed, 3)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # The same iterator can also be rewound.
  it.set_state(json.loads(state))
  np.testing.assert_array_equal(next(it)["input_ids"], expected[0]["input_ids"])
  # A state of another pipeline is refused, naming what differs.
  with pytest.raises(ValueError, match="seed"):
    make(builder, tok, seed=5, **kw).iterator(json.loads(state))


def test_mixture_weights(tok, tmp_path):
  pairs = build(tmp_path, [caption(i) for i in range(30)], "pairs")
  docs = build(tmp_path, [doc(i) for i in range(20)], "docs")
  texts = build(tmp_path, [text(i) for i in range(10)], "texts")
  sources = [sources_lib.Source("pairs", builder=pairs, weight=1.0),
             sources_lib.Source("interleaved", builder=docs, weight=1.0),
             sources_lib.Source("text", builder=texts, weight=0.5)]
  ids = row_ids(take(iter(make(None, tok, sources=sources, global_batch_size=10)), 40))
  counts = collections.Counter(i[:3] for i in ids)
  total = sum(counts.values())
  assert total == 400
  for prefix, want in (("cap", 0.4), ("doc", 0.4), ("txt", 0.2)):
    assert abs(counts[prefix] / total - want) < 0.02, counts


def test_from_config_with_model_preset(tok, mixed, tmp_path):
  builder, _ = mixed
  from configs import models
  cfg = pipeline.default_config()
  cfg.sources = [dict(name="vlm_jax_pipeline_test_records", split="train", weight=1.0)]
  cfg.data_dir = os.path.dirname(os.path.dirname(builder.data_dir))  # .../NAME/VERSION
  cfg.global_batch_size = 2
  cfg.seq_len = 64
  cfg.image_slots = 2
  cfg.num_threads = 1
  tok.save_pretrained(str(tmp_path / "tok"))
  cfg.tokenizer = str(tmp_path / "tok")
  it = pipeline.from_config(cfg, models.preset("tiny"), seed=3, process_index=0, process_count=1)
  batch = next(it)
  assert batch["images"].shape == (2, 2, 32, 32, 3)  # the tiny preset's tower: 32 px
  runs = [r for row in batch["input_ids"] for r in image_runs(row)]
  assert runs and all(r % 16 == 0 for r in runs)  # 16 tokens per image
  assert it.get_state()["fingerprint"]["seed"] == 3
  cfg2 = pipeline.default_config().to_dict()
  cfg2["bogus"] = 1
  with pytest.raises(ValueError, match="bogus"):
    pipeline.Pipeline.from_config(cfg2, tok, tokens_per_image=1)


# --- bad data: skipped (never batched) and counted, one reason each --------------


def run_with_bad(tmp_path, tok, bad, reason, n_good=6, **kw):
  records = [caption(i) for i in range(n_good)] + [bad]
  it = iter(make(build(tmp_path, records), tok, num_epochs=1, **kw))
  batches = list(it)
  ids = row_ids(batches)
  assert sorted(ids) == sorted(r["id"] for r in records[:n_good])
  assert bad["id"] not in ids
  assert it.skipped() == {reason: 1}
  assert it.get_state()["skipped"] == {reason: 1}
  return batches


def test_skip_undecodable_image(tok, tmp_path):
  run_with_bad(tmp_path, tok, caption(99, images=[b"\x89PNG\r\n\x1a\n this is not a png"]),
               "undecodable_image")


def test_skip_missing_image(tok, tmp_path):
  run_with_bad(tmp_path, tok, caption(99, images=[]), "missing_image")


def test_skip_image_count_mismatch(tok, tmp_path):
  bad = vqa(99)
  bad["images"] = [png(1), png(2)]  # one <image>, two images
  run_with_bad(tmp_path, tok, bad, "image_count_mismatch")


def test_skip_empty_caption(tok, tmp_path):
  run_with_bad(tmp_path, tok, caption(99, text="  "), "empty_target")


def test_skip_empty_answer(tok, tmp_path):
  bad = vqa(99)
  bad["turns"][1]["content"] = ""
  run_with_bad(tmp_path, tok, bad, "empty_target")


def test_skip_too_long(tok, tmp_path):
  run_with_bad(tmp_path, tok, caption(99, text="long " * 60), "too_long")


def test_skip_too_many_images(tok, tmp_path):
  run_with_bad(tmp_path, tok, doc(99), "too_many_images", image_slots=1)


def test_skip_malformed(tok, tmp_path):
  bad = caption(99)
  bad["kind"] = "poem"
  run_with_bad(tmp_path, tok, bad, "malformed_record")


def test_truncate_never_cuts_an_image_run(tok, tmp_path):
  long_doc = {"id": "long", "kind": "interleaved", "images": [png(1), png(2)],
              "turns": [{"role": "text", "content": "ab <image> cd <image> " + "word " * 40}]}
  full, _, _ = rendering.render(long_doc, tok, TPI, IMAGE_ID)
  second = int(np.flatnonzero(full == IMAGE_ID)[TPI])  # where image 2's run starts
  seq_len = second + 2                                 # a cut inside image 2's run
  it = iter(make(build(tmp_path, [long_doc]), tok, num_epochs=1, truncate=True, seq_len=seq_len,
                 global_batch_size=1))
  batch = next(it)
  assert it.skipped() == {}
  n = int(batch["segment_ids"][0].sum())
  assert n == second  # cut back to the start of image 2's run
  np.testing.assert_array_equal(batch["input_ids"][0, :n], full[:n])
  assert (batch["input_ids"][0] == IMAGE_ID).sum() == TPI
  assert batch["images"][0, 0].any() and not batch["images"][0, 1].any()  # image 2 dropped
  # Without truncation it is skipped.
  it = iter(make(build(tmp_path, [long_doc], "again"), tok, num_epochs=1, seq_len=seq_len,
                 global_batch_size=1))
  assert list(it) == [] and it.skipped() == {"too_long": 1}
