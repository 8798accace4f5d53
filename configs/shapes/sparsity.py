r"""Prune and repair the main job's VLM on the shapes world (METHODS §4, RESSA): job `shapes_sparsity`.

    python -m launch.main --config=configs/shapes/vila.py --workdir=workdirs/shapes_vila   # the dense VLM
    python -m launch.main --config=configs/shapes/sparsity.py --workdir=workdirs/shapes_sparsity

Settings: Wanda at 50% unstructured, 2:4 and 70% unstructured, each with equal vision/LM
ratios and with the LM only (projector dense). Each is evaluated after pruning and after
repair (SparseLoRA r=4 vision / 8 LM, α=16, λ=0.1, T=1, distilled from the dense model,
then merged). Prints the table, writes sparsity_demo.json and accuracy_vs_sparsity.png.
`:quick=True` is the scaled-down run of the tests (from a random model).
"""

import ml_collections

from configs import common
from configs.shapes import vila as shapes_vila


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, main_workdir="workdirs/shapes_vila", base="")
  c = ml_collections.ConfigDict()
  c.job = "shapes_sparsity"
  c.main = shapes_vila.get_config("quick=True" if a.quick else "")
  with c.main.unlocked():
    c.main.eval.tasks = ["vqa", "region"]
    c.main.eval.num = 16 if a.quick else 300
    c.main.progress = not a.quick
  c.main_workdir = a.main_workdir
  c.base = a.base or ("scratch" if a.quick else f"{a.main_workdir}/stage2")
  c.method = "wanda"
  c.sources = [("vqa", 3.0), ("region", 1.0), ("text_qa", 1.0), ("caption", 0.5)]  # stage 2's mix
  c.batch = 8 if a.quick else 32
  c.calibration_rows = 16 if a.quick else 128
  c.repair_steps = 4 if a.quick else 200
  c.repair_lr = 2e-3
  c.lora_alpha = 16.0
  c.rank_vision = 4
  c.rank_lm = 8
  c.kd_weight = 0.1

  def setting(name, pattern, ratio, lm_only):
    return dict(name=name, pattern=pattern, allocation="LM only" if lm_only else "vision+LM",
                ratios=dict(vision=0.0 if lm_only else ratio, projector=0.0, lm=ratio))

  c.settings = [setting("unstructured50_vl", "row", 0.5, False)] if a.quick else [
      setting(f"{tag}_{'lm' if lm_only else 'vl'}", pattern, ratio, lm_only)
      for tag, pattern, ratio in (("unstructured50", "row", 0.5), ("2of4", "2:4", 0.5), ("unstructured70", "row", 0.7))
      for lm_only in (False, True)]
  c.lock()
  return c
