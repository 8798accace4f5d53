r"""Perplexity filtering on the shapes world (POINTS, METHODS §2): does it find the noise, does it help?

    python -m launch.main --config=configs/shapes/ppl_filter.py --workdir=workdirs/ppl_demo

1. a pool of `world.pool` captions, `world.corruption_rate` of them another scene's caption;
2. a scorer trained from scratch for `stages.scorer.steps` on `world.clean` clean captions
   (other scenes: seed `world.clean_seed`), which scores the pool (PPL of the caption given the
   image, no prompt: the one it was trained with); the lowest-PPL `keep_fraction` is kept;
3. precision / recall of removing the corrupted pairs, and the AUROC of PPL;
4. the same model pretrained from scratch on the filtered vs the unfiltered pool for
   `stages.pretrain.steps` each (same seed, batch, lr), then the same VQA fine-tuning
   (`stages.sft`), then VQA exact match on `eval.num` held-out test questions.
Prints one table and writes it to <workdir>/ppl_demo.json. Re-running the command skips the
finished sub-steps. `:quick=True` is the scaled-down run the tests use. The model is the one
of configs/shapes/vila.py. See vlm_jax/experiments/shapes/ppl_filter.py.
"""

import ml_collections

from configs import common


def _model():
  from configs.shapes import vila as shapes_vila
  return shapes_vila.get_config().model.copy_and_resolve_references()


def _stage(steps, lr, sources, batch):
  return ml_collections.ConfigDict(dict(steps=steps, lr=lr, groups=[(".*", 1.0)], sources=sources,
                                        global_batch_size=batch))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, quick=False)
  q = args.quick
  c = ml_collections.ConfigDict()
  c.job = "shapes_ppl_filter"
  c.seed = 0
  c.model = _model()
  c.vocab_size = 512
  c.world = ml_collections.ConfigDict(dict(
      image_size=64, seed=0, corruption_rate=0.3,
      pool=40 if q else 4000,    # the pretraining caption pool to filter
      clean=32 if q else 1000,   # the scorer's small clean caption set
      clean_seed=1,              # other scenes than the pool's
      vqa=32 if q else 4000))    # the VQA fine-tuning set
  c.keep_fraction = 0.5
  c.data_dir = ""   # default <workdir>/data
  c.tokenizer = ""  # default <workdir>/tokenizer
  # Every run trains all parameters from its start (the scorer and both pretrainings from
  # scratch, with the same seed); "captions" is the pool or its filtered half.
  batch = 8 if q else 32
  c.stages = ml_collections.ConfigDict(dict(
      scorer=_stage(2 if q else 150, 2e-3, [("clean", 1.0)], batch),
      pretrain=_stage(3 if q else 300, 2e-3, [("captions", 1.0)], batch),
      sft=_stage(2 if q else 150, 1e-3, [("vqa", 1.0)], batch)))
  c.checkpoint_every = 100
  c.seq_len = 128
  c.image_slots = 4
  c.packing = True
  c.truncate = True
  c.score = ml_collections.ConfigDict(dict(batch=8 if q else 64))
  c.eval = ml_collections.ConfigDict(dict(num=10 if q else 400, batch_size=16 if q else 64,
                                          max_new_tokens=6, tasks=["vqa"]))
  c.progress = True
  c.lock()
  return c
