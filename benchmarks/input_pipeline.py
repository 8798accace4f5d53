"""Input-pipeline throughput: TFDS records -> decoded, preprocessed, tokenised batches.

    .venv/bin/python benchmarks/input_pipeline.py                  # 224 px, padded + packed, 1/2/4 threads
    .venv/bin/python benchmarks/input_pipeline.py --threads 2 --batches 10 --packing off
    .venv/bin/python benchmarks/input_pipeline.py --builder shapes_world --data-dir DIR   # a prepared builder
    .venv/bin/python benchmarks/input_pipeline.py --json /tmp/pipeline.json

Data: by default a TFDS builder defined here stores `--records` shapes-world records
(`vlm_jax.data.shapes_world.records`: captions, VQA, region questions, interleaved
documents of 2-3 images, text QA, mixed evenly) rendered at `--stored-size` px (default
`--image-size`, 224) as PNG,
in array_record; `--builder NAME` reads an already prepared TFDS builder instead. The
tokenizer is the shapes world's byte-level BPE (vocab 512, trained in a few seconds).

Each configuration runs the full pipeline (`vlm_jax.data.pipeline.Pipeline`: grain
index shuffle and mixture, record read, PNG decode, bicubic resize + normalisation,
rendering and tokenisation, padding or packing into rows, batch assembly) for
`--warmup` batches, then times `--batches` batches. Reported per configuration:
  examples/s   records placed in batches per second
  tokens/s     real (non-padding) tokens per second
  fill         real tokens / (rows x seq_len)
  ms/batch     wall time per batch
A single-thread breakdown (ms per image for decode + preprocess, ms per record for
rendering) is printed first. Timings depend on the machine's load: the notes in
/work/shared/ENV-NOTES.md describe a 2-core machine shared with other jobs.
"""

import _common  # first: the environment, the repo root on sys.path

import io
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np

TASKS = ("caption", "vqa", "region", "interleaved", "text_qa")


def parse_args(argv=None):
  p = _common.parser(__doc__)
  p.add_argument("--image-size", type=int, default=224, help="side of the preprocessed images")
  p.add_argument("--stored-size", type=int, default=0,
                 help="side of the stored images (default: --image-size; another size adds a bicubic resize)")
  p.add_argument("--records", type=int, default=400, help="records to generate (default builder)")
  p.add_argument("--builder", default="", help="benchmark this prepared TFDS builder (name) instead")
  p.add_argument("--split", default="train")
  p.add_argument("--data-dir", default="", help="TFDS data dir (default: a temporary one)")
  p.add_argument("--batch", type=int, default=16, help="rows per batch")
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--tokens-per-image", type=int, default=196, help="196: a ViT-/16 at 224 px")
  p.add_argument("--image-slots", type=int, default=3)
  p.add_argument("--packing", choices=("both", "on", "off"), default="both")
  p.add_argument("--threads", default="1,2,4", help="comma-separated grain reader thread counts")
  p.add_argument("--resize-mode", default="resize", choices=("resize", "pad", "crop"))
  p.add_argument("--normalization", default="clip", choices=("clip", "siglip"))
  p.add_argument("--batches", type=int, default=12, help="timed batches per configuration")
  p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
  p.add_argument("--json", default="", help="also write the results here")
  return p.parse_args(argv)


# --- data ---------------------------------------------------------------------------


def _png(a: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, "PNG")
  return buf.getvalue()


def shapes_records(n: int, image_size: int):
  from vlm_jax.data import shapes_world
  per = -(-n // len(TASKS))
  streams = [shapes_world.records(t, "train", per, seed=0, image_size=image_size) for t in TASKS]
  out = []
  for i in range(per):
    for s in streams:
      if len(out) < n:
        out.append(next(s))
  return out


def make_builder(records, data_dir: str):
  import tensorflow_datasets as tfds
  from vlm_jax.data import schema

  class ShapesWorldBench(tfds.core.GeneratorBasedBuilder):
    """The given shapes-world records, images stored as PNG."""
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look for beside this script

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=schema.features())

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for r in records:
        yield r["id"], {**r, "images": [io.BytesIO(_png(np.asarray(a))) for a in r["images"]]}

  b = ShapesWorldBench(data_dir=data_dir, file_format="array_record")
  b.download_and_prepare()
  return b


# --- measurement ----------------------------------------------------------------------


def breakdown(source, tok, args):
  """Single-thread costs: image decode + preprocess, rendering + tokenisation."""
  from vlm_jax.data import rendering
  from vlm_jax.data.preprocess import decode_image, preprocess_image

  enc = rendering.TextEncoder(tok)
  recs = [rendering.parse_record(source[i]) for i in range(min(len(source), 100))]
  images = [im for r in recs for im in r.images][:60]
  t = time.perf_counter()
  decoded = [decode_image(im) for im in images]
  t_decode = (time.perf_counter() - t) / max(1, len(images))
  t = time.perf_counter()
  for im in decoded:
    preprocess_image(im, args.image_size, args.resize_mode, args.normalization)
  t_pre = (time.perf_counter() - t) / max(1, len(images))
  t = time.perf_counter()
  lengths = []
  for r in recs:
    ids, _, _ = rendering.render(r, enc, args.tokens_per_image, tok.convert_tokens_to_ids("<image>"))
    lengths.append(len(ids))
  t_render = (time.perf_counter() - t) / len(recs)
  t = time.perf_counter()
  for i in range(len(recs)):
    source[i]
  t_read = (time.perf_counter() - t) / len(recs)
  return {"read_ms_per_record": 1e3 * t_read, "decode_ms_per_image": 1e3 * t_decode,
          "preprocess_ms_per_image": 1e3 * t_pre, "render_ms_per_record": 1e3 * t_render,
          "mean_tokens_per_record": float(np.mean(lengths)),
          "mean_images_per_record": len([im for r in recs for im in r.images]) / len(recs),
          "source_image_shape": list(decoded[0].shape) if decoded else None}


def run_config(sources, tok, args, packing: bool, threads: int):
  from vlm_jax.data import pipeline
  pipe = pipeline.Pipeline(
      sources, tok, global_batch_size=args.batch, seq_len=args.seq_len,
      tokens_per_image=args.tokens_per_image, image_slots=args.image_slots, image_size=args.image_size,
      normalization=args.normalization, resize_mode=args.resize_mode, packing=packing,
      num_threads=threads, prefetch=max(16, 4 * args.batch), process_index=0, process_count=1)
  it = iter(pipe)
  for _ in range(args.warmup):
    next(it)
  examples = tokens = 0
  t = time.perf_counter()
  for _ in range(args.batches):
    b = next(it)
    examples += sum(len(i.split(",")) for i in b["id"] if i)
    tokens += int(b["attention_mask"].sum())
  dt = time.perf_counter() - t
  it.close()
  return {"packing": packing, "threads": threads, "examples_per_s": examples / dt,
          "tokens_per_s": tokens / dt, "fill": tokens / (args.batches * args.batch * args.seq_len),
          "ms_per_batch": 1e3 * dt / args.batches, "examples_per_batch": examples / args.batches,
          "skipped": it.skipped()}


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.ERROR)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  work = tempfile.mkdtemp(prefix="pipeline_bench_")
  try:
    return _run(args, work)
  finally:
    shutil.rmtree(work, ignore_errors=True)  # the generated data and tokenizer (not --data-dir's)


def _run(args, work):
  from vlm_jax.data import sources
  from vlm_jax.data import tokenizer as tokenizers_lib

  data_dir = args.data_dir or os.path.join(work, "tfds")
  t = time.perf_counter()
  if args.builder:
    source = sources.Source(args.builder, split=args.split, data_dir=data_dir)
    what = f"TFDS builder {args.builder}:{args.split}"
  else:
    stored = args.stored_size or args.image_size
    records = shapes_records(args.records, stored)
    builder = make_builder(records, os.path.join(data_dir, f"px{stored}"))
    source = sources.Source("shapes_world_bench", split="train", builder=builder)
    what = f"{args.records} shapes-world records ({', '.join(TASKS)}) stored at {stored} px, PNG"
  t_data = time.perf_counter() - t
  t = time.perf_counter()
  tok = tokenizers_lib.shapes_world_tokenizer(os.path.join(work, "tokenizer"), vocab_size=512,
                                              num_examples=600)
  t_tok = time.perf_counter() - t

  print(f"data: {what} (prepared in {t_data:.1f} s); tokenizer: shapes-world BPE 512 ({t_tok:.1f} s)")
  print(f"batch {args.batch} x seq_len {args.seq_len}, {args.image_slots} image slots, "
        f"{args.tokens_per_image} tokens/image, {args.resize_mode} + {args.normalization}, "
        f"{args.warmup} warm-up + {args.batches} timed batches; {_common.describe(_common.machine_info())}")
  raw = sources.open_source(source, data_dir)
  bd = breakdown(raw, tok, args)
  print(f"single thread: read {bd['read_ms_per_record']:.2f} ms/record, decode "
        f"{bd['decode_ms_per_image']:.2f} ms/image ({bd['source_image_shape']}), preprocess to "
        f"{args.image_size} px {bd['preprocess_ms_per_image']:.2f} ms/image, render + tokenise "
        f"{bd['render_ms_per_record']:.3f} ms/record; {bd['mean_tokens_per_record']:.0f} tokens and "
        f"{bd['mean_images_per_record']:.2f} images per record")

  packings = {"both": (False, True), "on": (True,), "off": (False,)}[args.packing]
  threads = [int(x) for x in args.threads.split(",") if x.strip()]
  results = []
  header = f"{'packing':>8} {'threads':>7} {'examples/s':>11} {'tokens/s':>10} {'fill':>6} {'ms/batch':>9} {'ex/batch':>9}"
  print()
  print(header)
  print("-" * len(header))
  for packing in packings:
    for n in threads:
      r = run_config([source], tok, args, packing, n)
      results.append(r)
      print(f"{'on' if packing else 'off':>8} {n:>7} {r['examples_per_s']:>11.1f} {r['tokens_per_s']:>10.0f} "
            f"{r['fill']:>6.1%} {r['ms_per_batch']:>9.1f} {r['examples_per_batch']:>9.1f}"
            + (f"  skipped {r['skipped']}" if r["skipped"] else ""), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "breakdown": bd, "results": results}, f, indent=1)
  return results


if __name__ == "__main__":
  main()
