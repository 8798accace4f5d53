r"""Model soups on the shapes world (METHODS §3): ingredients fine-tuned on different instruction mixes.

    python -m launch.main --config=configs/shapes/vila.py --workdir=workdirs/shapes_vila   # the base
    python -m launch.main --config='configs/shapes/soups.py:base=workdirs/shapes_vila/stage2' \
        --workdir=workdirs/soup_demo

From the checkpoint `base` (a run dir of the main job: stage1 or stage2; the model is the one of
configs/shapes/vila.py, so it must be the current one), fine-tune one ingredient per mix in
`ingredients` (same steps, lr, batch, seed: only the data differs), then evaluate the base,
every ingredient, the uniform, maximum (top `top_p` by validation score) and greedy soups on a
held-out mix of all of them: `eval.validation` questions per mix from the validation split to
select, `eval.test` per mix from the test split for the table. Prints the table and writes
<workdir>/soup_demo.json; a re-run skips the finished sub-steps.

Arguments: base (a run dir, or "scratch": the seed's random init, what `:quick=True` uses),
tokenizer (default: the `tokenizer` folder next to the base run, as the main job lays it out),
quick. Keys: mixes (name -> task + qtypes), ingredients (which mixes, in order), general
(weight of the all-mixes data added to each ingredient's: POINTS' D ∪ d_i; 0 = specialists),
finetune.{steps, lr, global_batch_size, groups}, top_p, tie, eval.{validation, test, ...}.
See vlm_jax/experiments/shapes/soups.py.
"""

import ml_collections

from configs import common


def _model():
  from configs.shapes import vila as shapes_vila
  return shapes_vila.get_config().model.copy_and_resolve_references()


def _mix(task, *qtypes):
  return ml_collections.ConfigDict(dict(task=task, qtypes=list(qtypes)))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, quick=False, base="workdirs/shapes_vila/stage2", tokenizer="")
  q = args.quick
  c = ml_collections.ConfigDict()
  c.job = "shapes_soups"
  c.seed = 0
  c.model = _model()
  c.base = "scratch" if q and args.base == "workdirs/shapes_vila/stage2" else args.base
  c.tokenizer = args.tokenizer
  c.vocab_size = 512
  c.data_dir = ""  # default <workdir>/data
  c.world = ml_collections.ConfigDict(dict(image_size=64, seed=0, train=24 if q else 3000))  # records per mix
  c.mixes = ml_collections.ConfigDict(dict(
      count=_mix("vqa", "count"), color=_mix("vqa", "color"), shape=_mix("vqa", "shape"),
      size=_mix("vqa", "size"), spatial=_mix("vqa", "spatial"),
      region=_mix("region", "region_color", "region_shape")))
  c.ingredients = ("count", "color", "spatial", "region")
  c.general = 0.0
  c.finetune = ml_collections.ConfigDict(dict(
      steps=2 if q else 150, lr=5e-4, global_batch_size=8 if q else 32, groups=[(".*", 1.0)]))
  c.top_p = "0.5"  # the maximum soup: the best half by validation score
  c.tie = "strict"  # greedy: "strict" (>, the original soups code) or "geq" (>=, POINTS)
  c.checkpoint_every = 100
  c.seq_len = 128
  c.image_slots = 4
  c.packing = True
  c.truncate = True
  c.eval = ml_collections.ConfigDict(dict(validation=6 if q else 100, test=8 if q else 200,
                                          batch_size=16 if q else 64, max_new_tokens=6))
  c.progress = True
  c.lock()
  return c
