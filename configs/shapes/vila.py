r"""The main job: a tiny VLM through the VILA recipe on the shapes world, on CPU.

    python -m launch.main --config=configs/shapes/vila.py --workdir=workdirs/shapes_vila

Builds the shapes world (TFDS, in <workdir>/data) and its tokenizer. VILA starts from a
pretrained vision tower and a pretrained LLM, so the job first pretrains both here:
  vision   contrastive  vision + text tower  single-object captions (CLIP loss, batch 128)
  lm       text         LM                   text corpus + text-only QA
then runs the three VILA stages, each starting from the previous stage's checkpoint:
  stage0   align        projector            captions
  stage1   pretrain     projector + LM       interleaved documents + captions, 1:1 by images
  stage2   joint SFT    + tower at lr x 0.3  VQA + region questions + text-only QA (+ some captions)
and evaluates after every VLM stage (captioning, VQA by question type, region questions,
text-only QA). The tower is frozen in stage 1, as VILA's is.
`--config.total_steps=N` scales all stages; `:quick=True` is the scaled-down run the
tests use. Re-running the command resumes (finished stages are skipped).

`:pretrain=False` drops the two pretraining stages: the VLM starts from random weights and
its tower trains in stages 1 and 2 at the full lr (the README compares both).
"""

import ml_collections

from configs import common, models

# Steps of each stage; `total_steps` is their sum, and each stage gets its share of it.
STEPS = dict(vision=1000, lm=400, stage0=200, stage1=1200, stage2=2400)


def stage(lr, groups, sources, batch=16, **extra) -> ml_collections.ConfigDict:
  """One stage: lr, freezing groups [(regex, lr multiplier | None)], sources [(task, weight)]."""
  return ml_collections.ConfigDict(dict(lr=lr, groups=groups, sources=sources, global_batch_size=batch, **extra))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, quick=False, pretrain=True)
  c = ml_collections.ConfigDict()
  c.job = "shapes_vila"
  c.seed = 0
  c.checkpoint_every = 200
  c.model = models.preset("tiny")
  # 64 px in 16 px patches: a 4x4 grid, the 16 LM tokens per image of the tiny preset.
  # Four stride-2 3x3 convolutions make each patch (the "early convolutions" of Xiao et
  # al. 2021): the tower learns shape far sooner than with a linear patch embedding.
  c.model.vision.image_size = 64
  c.model.vision.patch_size = 16
  c.model.vision.stem = (16, 32, 64, 128)
  c.world = ml_collections.ConfigDict(dict(
      image_size=64, seed=0,
      train=dict(caption=200, interleaved=100, vqa=300, region=100, text_qa=100, text_corpus=100)
      if args.quick else dict(caption=6000, interleaved=2000, vqa=12000, region=3000, text_qa=4000,
                              text_corpus=3000)))
  c.data_dir = ""  # default <workdir>/data
  c.tokenizer = ""  # default <workdir>/tokenizer
  c.vocab_size = 512

  # Learning rates are scaled up from VILA's (1e-3 / 5e-5 / 2e-5 for 7B) for a model
  # trained from scratch in minutes; the freezing follows METHODS §1.
  c.stages = ml_collections.ConfigDict(dict(
      stage0=stage(3e-3, [("projector/.*", 1.0), (".*", None)], [("caption", 1.0)]),
      stage1=stage(2e-3, [("vision/.*", None), (".*", 1.0)],
                   [("interleaved", 1.0), ("caption", 2.5), ("text_corpus", 0.5)]),
      # VILA1.5 also trains the tower in SFT; at lr x 0.3 it keeps what it learned on every
      # seed tried, and learns to read shapes inside region boxes (README)
      stage2=stage(1e-3, [("vision/.*", 0.3), (".*", 1.0)],
                   [("vqa", 3.0), ("region", 1.0), ("text_qa", 1.0), ("caption", 0.5)]),
  ))
  c.stage_order = ("stage0", "stage1", "stage2")  # run order (ConfigDict keys iterate sorted)
  if args.pretrain:
    pretrain_towers(c, args.quick)
  else:  # a random tower trains in stages 1 and 2 at the full lr
    for name in ("stage1", "stage2"):
      c.stages[name].groups = [(".*", 1.0)]
  total = sum(STEPS[name] for name in c.stage_order)
  for name in c.stage_order:
    c.stages[name].fraction = STEPS[name] / total
  c.total_steps = 60 if args.quick else total
  c.seq_len = 128
  c.image_slots = 4
  c.packing = True
  c.truncate = True  # 3-image documents can exceed seq_len: cut at an image boundary
  c.eval = ml_collections.ConfigDict(dict(
      num=16 if args.quick else 1000, batch_size=16 if args.quick else 64, max_new_tokens=24,
      tasks=["caption", "vqa", "region", "text_qa"]))
  c.progress = True
  c.lock()
  return c


def pretrain_towers(c: ml_collections.ConfigDict, quick: bool) -> None:
  """Adds the `vision` (contrastive) and `lm` (text-only) stages before stage 0."""
  # one object per image, so that every caption names a shape
  c.world.train.caption_single = dict(task="caption", num=200 if quick else 6000, max_objects=1)
  # The image embedding: the mean and max of the patch tokens. CLIP's class token taught
  # the tower little shape, the mean alone too (README).
  c.model.vision.pool = "mean_max"
  c.stages.vision = stage(
      3e-3, [(".*", 1.0)], [("caption_single", 1.0)], batch=128, seq_len=24,
      text=dict(style="clip", vocab_size=c.vocab_size, width=64, depth=2, num_heads=4, mlp_dim=128,
                max_len=24, act="quick_gelu", pool="last"))
  # The VLM itself, with only its LM trained, on rows without images.
  c.stages.lm = stage(2e-3, [("lm/.*", 1.0), (".*", None)], [("text_corpus", 1.0), ("text_qa", 1.0)])
  c.stage_order = ("vision", "lm") + tuple(c.stage_order)
