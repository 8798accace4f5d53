r"""The CRG demonstration (METHODS §7): the main job's stage-2 model with α in {0, 0.5, 1, 2}.

    python -m launch.main --config=configs/shapes/vila.py --workdir=workdirs/shapes_vila   # first
    python -m launch.main --config=configs/shapes/region_guidance.py --workdir=workdirs/shapes_crg

Runs the `region_guidance` job (vlm_jax/guidance/jobs.py) on the checkpoint
<base>/stage2 with <base>/tokenizer, then prints the paper's reported gains beside ours
(the change from α = 0 to α = 1, and to the α chosen on validation) and how often
guidance changes the greedy answer, per question type. Writes <workdir>/guidance.json
and <workdir>/demo.json.

Arguments: base (the main job's workdir, default workdirs/shapes_vila), stage (stage2),
quick (tiny splits: what the tests run), num_validation, num_test.
"""

import ml_collections

from configs import common
from configs.shapes import vila as shapes_vila
from vlm_jax.guidance import jobs


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, base="workdirs/shapes_vila", stage="stage2", quick=False, num_validation=200,
                       num_test=500)
  main = shapes_vila.get_config("quick=True" if a.quick else "")
  c = jobs.default_config(model=main.model.copy_and_resolve_references(), init=f"checkpoint:{a.base}/{a.stage}",
                          tokenizer=f"{a.base}/tokenizer", alphas=(0.0, 0.5, 1.0, 2.0),
                          num_validation=8 if a.quick else a.num_validation, num_test=8 if a.quick else a.num_test,
                          batch_size=8 if a.quick else 32, image_size=main.world.image_size,
                          world_seed=main.world.seed)
  with c.unlocked():
    c.job = "shapes_region_guidance"
  return c
