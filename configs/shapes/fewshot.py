r"""Few-shot adaptation on the shapes world (METHODS §5, issue 17 item 6): job `shapes_fewshot`.

    python -m launch.main --config=configs/shapes/fewshot.py --workdir=workdirs/shapes_fewshot
    python -m launch.main --config=configs/shapes/fewshot.py:quick=True --workdir=/tmp/shapes_fewshot_quick

1. trains the main job's two-tower model (its `vision` stage: the 64 px tower with the
   convolutional stem + a 2-layer text tower, CLIP loss on single-object captions) in
   <workdir>/vision, through the engine (a re-run resumes / skips it);
2. extracts the features of the 24 single-object classes once (<workdir>/features.npz):
   train pool, validation, test, and the test scenes in the outline / palette / noise renderings;
3. zero-shot, Tip-Adapter, Tip-Adapter-F, DualAdapter, DualAdapter-F at `shots` × `seeds`;
   then with `noise` of the shots mislabelled, DualAdapter with and without label refinement;
4. prints the tables, writes <workdir>/shapes_fewshot.json and <workdir>/accuracy_vs_shots.png.
Arguments: quick, vision_steps, shots, seeds, noise, views, epochs, views_per_epoch.
"""

import ml_collections

from configs import common
from configs import fewshot as fewshot_config
from configs.shapes import vila


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, vision_steps=1000, shots="1;2;4;8;16", seeds="0;1;2", noise=0.2,
                       views=10, epochs=20, views_per_epoch=1)
  q = a.quick
  c = ml_collections.ConfigDict()
  c.job = "shapes_fewshot"
  v = vila.get_config("quick=True" if q else "")
  with v.unlocked():
    # only the vision stage's data: single-object captions
    v.world.train = ml_collections.ConfigDict({"caption_single": v.world.train.caption_single.to_dict()})
  c.vila = v
  c.vision_steps = 20 if q else a.vision_steps
  f = fewshot_config.get_config(
      f"shots={'1;2' if q else a.shots},seeds={'0' if q else a.seeds},views={2 if q else a.views},"
      f"epochs={2 if q else a.epochs},views_per_epoch={a.views_per_epoch},methods=zero_shot;tip;tip_f;dual;dual_f")
  with f.unlocked():
    f.data.train = 24 * 12 if q else 24 * 40
    f.data.validation = 96 if q else 480
    f.data.test = 96 if q else 960
    # Wider than Tip-Adapter's CLIP ranges (α ≤ 5, β ≤ 7): this model's text logits are far
    # more spread out than CLIP's, and with those ranges Tip-Adapter's α sat at the edge (5.0) in
    # most fits (README). Geometric spacing; the same grid for every method.
    f.grid.alpha, f.grid.beta, f.grid.geometric = [0.1, 100.0, 25], [0.1, 30.0, 20], ["alpha", "beta"]
  c.fewshot = f
  c.noise = a.noise  # the noisy-shots rows: this fraction of the shots mislabelled
  c.noise_methods = ["tip", "dual", "dual_norefine", "dual_f", "dual_f_norefine"]
  c.lock()
  return c
