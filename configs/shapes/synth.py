r"""Synth² on the shapes world (METHODS §6): do synthetic pairs help when real ones are scarce?

    python -m launch.main --config=configs/shapes/synth.py --workdir=workdirs/synth_demo

For each real fraction of a caption pool (`fractions` of `world.pool` pairs, scenes of one or
two objects) the `synth` job's parts (configs/synth.py: image tokenizer, caption LM,
text-to-codes generator) train on those real pairs only and write `synth.generate.num`
synthetic pairs; the code-reading VLM then trains from scratch on real only vs real +
synthetic (1 : 1) for `synth.vlm.steps` steps, per seed of `seeds`; real only on the whole
pool is the upper reference. Captioning CIDEr-D / BLEU-4 on `eval.num` test images; then
each VLM gets the same VQA fine-tuning (`vqa.steps` steps of `vqa.batch` on `vqa.train`
real VQA pairs) and VQA exact match on `vqa.num` test questions; the cost of synthesis in
embedding vs pixel space, one table, a plot. The VLM's step budget is one flag, e.g.
`--config.synth.vlm.steps=1600` (`--config.vqa.steps` for the VQA fine-tuning); a changed
config needs a new workdir. `:quick=True` is the scaled-down run the tests use. See
vlm_jax/experiments/shapes/synth.py.
"""

import ml_collections

from configs import common
from configs import synth as synth_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, quick=False, seeds=3)
  q = args.quick
  c = ml_collections.ConfigDict()
  c.job = "shapes_synth"
  c.seed = 0
  c.seeds = list(range(1 if q else args.seeds))
  c.vocab_size = 512
  c.world = ml_collections.ConfigDict(dict(image_size=synth_config.IMAGE_SIZE, seed=0, max_objects=2,
                                           pool=160 if q else 4000))
  c.fractions = [0.05] if q else [0.05, 0.1]
  c.data_dir = ""  # default <workdir>/data
  c.synth = synth_config.get_config("quick=True" if q else "")
  with c.synth.unlocked():
    c.synth.generate.num = 16 if q else 2000
    c.synth.generate.max_new_tokens = 56
    c.synth.seq_len = 160
  c.cost_pairs = 8 if q else 256
  c.checkpoint_every = 200
  c.progress = True
  c.eval = ml_collections.ConfigDict(dict(num=8 if q else 200, batch_size=8 if q else 64, max_new_tokens=56))
  # The same VQA fine-tuning for every captioning VLM (only its starting weights differ), then
  # exact match on `num` held-out questions (shapes-world VQA: one answer per question).
  c.vqa = ml_collections.ConfigDict(dict(train=16 if q else 2000, steps=2 if q else 200, lr=1e-3,
                                         batch=8 if q else 16, num=8 if q else 200, max_new_tokens=6))
  c.lock()
  return c
