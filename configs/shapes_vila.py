r"""The main job: a tiny VLM through the three VILA stages on the shapes world, on CPU.

    python -m launch.main --config=configs/shapes_vila.py --workdir=workdirs/shapes_vila

Builds the shapes world (TFDS, in <workdir>/data) and its tokenizer, then runs
  stage 0  align      projector only        captions
  stage 1  pretrain   projector + LM        interleaved documents + captions, 1:1 by images
  stage 2  joint SFT  projector + LM + ViT  VQA + region questions + text-only QA (+ some captions)
each starting from the previous stage's checkpoint, and evaluates after every
stage (captioning, VQA by question type, region questions, text-only QA).
`--config.total_steps=N` scales all stages; `:quick=True` is the scaled-down run the
tests use. Re-running the command resumes (finished stages are skipped).

`:pretrain_tower=True` first pretrains the vision tower contrastively, as VILA
starts from a pretrained tower:
  vision   contrastive  vision + text tower  single-object captions (CLIP loss, batch 128)
then stage 0 starts the VLM from that tower (LM and projector from scratch),
stage 1 keeps it frozen (as VILA) and stage 2 trains it at a tenth of the lr.
On the shapes world it does not beat the tower trained from scratch (README).
"""

import ml_collections

from configs import common, models


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, quick=False, pretrain_tower=False)
  c = ml_collections.ConfigDict()
  c.job = "vila"
  c.seed = 0
  c.total_steps = 60 if args.quick else 3600  # split over the stages by `fraction`
  c.checkpoint_every = 200
  c.model = models.preset("tiny")
  # 64 px in 8 px patches (an 8x8 grid: a small shape spans ~10 px, enough to
  # tell a triangle from a diamond), merged 2x2 by the downsample projector
  # into the same 16 LM tokens per image as the tiny preset.
  c.model.vision.image_size = 64
  c.model.vision.patch_size = 8
  # Three stride-2 3x3 convolutions make each 8 px patch (Xiao et al. 2021): a
  # tower trained from scratch tells shapes apart far sooner than with a plain
  # linear patch embedding (shape inside a given box: 40% -> 63-75%; README).
  c.model.vision.stem = (16, 32, 64)
  c.model.projector = "downsample"
  c.world = ml_collections.ConfigDict(dict(
      image_size=64, seed=0,
      train=dict(caption=200, interleaved=100, vqa=300, region=100, text_qa=100, text_corpus=100)
      if args.quick else dict(caption=6000, interleaved=2000, vqa=12000, region=3000, text_qa=4000,
                              text_corpus=3000)))
  c.data_dir = ""  # default <workdir>/data
  c.tokenizer = ""  # default <workdir>/tokenizer
  c.vocab_size = 512

  # Batch 16 buys the steps within 15 min on 2 cores: steps helped most of what was tried (README).
  def stage(fraction, lr, groups, sources, batch=16):
    return ml_collections.ConfigDict(dict(fraction=fraction, lr=lr, groups=groups, sources=sources,
                                          global_batch_size=batch))

  # Learning rates are scaled up from VILA's (1e-3 / 5e-5 / 2e-5 for 7B) for a
  # model trained from scratch in minutes; the freezing follows METHODS §1.
  c.stages = ml_collections.ConfigDict(dict(
      stage0=stage(0.05, 3e-3, [("projector/.*", 1.0), (".*", None)], [("caption", 1.0)]),
      stage1=stage(0.35, 2e-3, [(".*", 1.0)],
                   [("interleaved", 1.0), ("caption", 2.5), ("text_corpus", 0.5)]),
      stage2=stage(0.60, 1e-3, [(".*", 1.0)],  # VILA1.5 also trains the ViT in SFT
                   [("vqa", 3.0), ("region", 1.0), ("text_qa", 1.0), ("caption", 0.5)]),
  ))
  c.stage_order = ("stage0", "stage1", "stage2")  # run order (ConfigDict keys iterate sorted)
  c.seq_len = 128
  c.image_slots = 4
  c.packing = True
  c.truncate = True  # 3-image documents can exceed seq_len: cut at an image boundary
  c.eval = ml_collections.ConfigDict(dict(
      num=16 if args.quick else 1000, batch_size=16 if args.quick else 64, max_new_tokens=24,
      tasks=["caption", "vqa", "region", "text_qa"]))
  c.progress = True
  if args.pretrain_tower:
    pretrain_tower(c, args.quick)
  c.lock()
  return c


def pretrain_tower(c: ml_collections.ConfigDict, quick: bool) -> None:
  """Adds the contrastive `vision` stage before stage 0 and the VILA freezing after it."""
  # one object per image, so that every caption names a shape
  c.world.train.caption_single = dict(task="caption", num=200 if quick else 6000, max_objects=1)
  # The image embedding: the mean and max of the patch tokens; CLIP's class token taught
  # the tower little shape, the mean alone too (README).
  c.model.vision.pool = "mean_max"
  c.total_steps = 60 if quick else 4000
  c.stages.vision = dict(
      fraction=0.15, lr=1e-3, groups=[(".*", 1.0)], sources=[("caption_single", 1.0)], global_batch_size=128,
      seq_len=24, text=dict(style="clip", vocab_size=c.vocab_size, width=64, depth=2, num_heads=4, mlp_dim=128,
                            max_len=24, act="quick_gelu", pool="last"))
  c.stages.stage0.fraction = 0.05
  c.stages.stage1.update(dict(fraction=0.30, groups=[("vision/.*", None), (".*", 1.0)]))
  c.stages.stage2.update(dict(fraction=0.50, groups=[("vision/.*", 0.1), (".*", 1.0)]))
  c.stage_order = ("vision",) + tuple(c.stage_order)
