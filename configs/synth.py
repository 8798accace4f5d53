r"""Synth² (METHODS §6): a small real caption set + a concept list -> real + synthetic pairs -> a VLM.

    python -m launch.main --config=configs/synth.py:real=captions:/data/captions.jsonl,tokenizer=/data/tok \
        --workdir=workdirs/synth --config.concepts='("dog","cat","red","on","under")'

`real`: the real pairs, either a TFDS name prepared under `data_dir`, or
`captions:<jsonl>` (the image-caption file format of vlm_jax.data.builders: one
{"image": path, "caption": text} per line, images beside it). `tokenizer`: a Hugging
Face tokenizer folder (the caption LM, the generator and the VLM share it). Without
`real`, the job runs on the shapes world's caption set (built in <workdir>/data) with the
shapes-world concept list, so the command runs as is on a fresh machine.

The job trains the image tokenizer, the caption LM and the text-to-codes generator on the
real pairs (or reuses finished runs: `--config.image_tokenizer.reuse=<workdir>`, same for
caption_lm and generator), writes `generate.num` synthetic pairs, and trains the VLM on
real : synthetic = 1 : `vlm.synthetic_weight`. The model sizes below fit 64 px images and
a 2-core CPU; see vlm_jax/synth/jobs.py for what each part is and configs/shapes/synth.py
for the demonstration that compares real-only with real + synthetic.
"""

import ml_collections

from configs import common, models
from vlm_jax.synth import jobs
from vlm_jax.synth.captions import SHAPES_WORLD_CONCEPTS

IMAGE_SIZE = 64


def vq_block() -> dict:
  """64 px -> an 8x8 grid of codes from 128 (three stride-2 stages)."""
  return dict(image_size=IMAGE_SIZE, channels=(32, 64, 128), codebook_size=128, code_dim=16, beta=0.25,
              act="silu", dtype="float32", param_dtype="float32", normalized=True)


def caption_lm_block(vocab_size: int) -> dict:
  return dict(kind="lm", vocab_size=vocab_size, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=32, mlp_dim=256, max_position=256)


def generator_block(vocab_size: int) -> dict:
  vq = vq_block()
  return dict(kind="text_to_codes", vq=vq, generator=dict(
      codebook_size=vq["codebook_size"], num_tokens=(IMAGE_SIZE // 8) ** 2, text_vocab_size=vocab_size,
      max_text_len=64, width=128, depth=3, num_heads=4, mlp_dim=256, cond_dropout=0.1))


def vlm_block() -> ml_collections.ConfigDict:
  """The tiny preset's LM and projector; the ViT replaced by the tokenizer + a 2-block code encoder."""
  m = models.preset("tiny")
  m.vision.image_size = IMAGE_SIZE
  m.vision.patch_size = 16
  m.vision_input = "vq"
  m.vq = vq_block()
  m.code_layers = 2
  return m


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, real="", tokenizer="", vocab_size=512, quick=False)
  q = args.quick
  c = jobs.default_config()
  c.real = args.real
  c.tokenizer = args.tokenizer
  c.concepts = list(SHAPES_WORLD_CONCEPTS)
  c.shapes_world_pairs = 8 if q else 400  # only without `real`: how many shapes-world pairs are real
  c.image_tokenizer.model = ml_collections.ConfigDict(dict(kind="vq", vq=vq_block()))
  c.image_tokenizer.update(dict(steps=2 if q else 400, lr=2e-3, batch=8 if q else 32))
  c.caption_lm.model = ml_collections.ConfigDict(caption_lm_block(args.vocab_size))
  c.caption_lm.update(dict(steps=2 if q else 500, lr=3e-3, batch=8 if q else 32))
  c.generator.model = ml_collections.ConfigDict(generator_block(args.vocab_size))
  c.generator.update(dict(steps=2 if q else 600, lr=1e-3, batch=8 if q else 32))
  # classifier-free guidance: without it the small generator's grids are mostly canvas with stray
  # blobs (77% background codes vs 56% with s=3 on the demonstration's captions; see README)
  c.generate.update(dict(num=6 if q else 2000, chunk_size=4 if q else 256, batch_size=4 if q else 64,
                         code_steps=12, code_temperature=0.5, guidance_scale=3.0))
  c.vlm.model = vlm_block()
  c.vlm.update(dict(steps=2 if q else 400, lr=2e-3, batch=8 if q else 16))
  c.checkpoint_every = 200
  c.seq_len = 128
  c.lock()
  return c
