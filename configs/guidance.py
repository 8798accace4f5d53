r"""Contrastive region guidance (CRG, METHODS §7) on the shapes-world region tasks: job `region_guidance`.

Any VLM of the stack: our checkpoint, or a Hugging Face LLaVA folder. E.g. the main job's
stage-2 model (see configs/shapes/vila.py) with α in {0, 0.5, 1, 2}:

    python -m launch.main --workdir=workdirs/crg \
        --config='configs/guidance.py:model=shapes_vila,init=checkpoint:workdirs/shapes_vila/stage2,tokenizer=workdirs/shapes_vila/tokenizer'

    python -m launch.main --workdir=/runs/crg_llava \
        --config='configs/guidance.py:model=hf,init=hf:/models/llava-1.5-7b-hf,image_size=336'

Arguments (`:key=value,...`): model (a preset of configs/models.py, "shapes_vila", or "hf"
= from the init folder), init, tokenizer (folder; default the hf folder), alphas
("0/0.5/1/2"), tasks ("region_mc/spatial_mc/..."; default all, see
vlm_jax/guidance/jobs.py), num_validation, num_test, batch, image_size (of the rendered
scenes), mode ("pixel": boxes black before the tower, the default; "tokens": the boxes'
patch tokens replaced after it). Turning CRG on is the one key `guidance.alphas`.
"""

import ml_collections

from configs import common, models
from configs.shapes import vila as shapes_vila
from vlm_jax.guidance import jobs


def _model(name: str):
  if name == "hf":
    return None
  if name == "shapes_vila":
    return shapes_vila.get_config().model.copy_and_resolve_references()
  return models.preset(name)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, model="shapes_vila", init="scratch", tokenizer="", alphas="0/0.5/1/2",
                       tasks="/".join(jobs.TASKS), num_validation=200, num_test=500, batch=32, image_size=64,
                       mode="pixel")
  return jobs.default_config(model=_model(a.model), init=a.init, tokenizer=a.tokenizer,
                             alphas=[float(x) for x in a.alphas.split("/")], tasks=a.tasks.split("/"),
                             num_validation=a.num_validation, num_test=a.num_test, batch_size=a.batch,
                             image_size=a.image_size, mode=a.mode)
