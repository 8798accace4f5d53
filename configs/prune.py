r"""Prune a model with explicit masks (METHODS §4, RESSA): job `prune`.

    # A Hugging Face LLaVA folder, Wanda 2:4 on the vision tower and the LM, calibrated
    # on 128 rows of a data set prepared by launch.build_data (its printed name):
    python -m launch.main --workdir=workdirs/llava_2of4 --config='configs/prune.py:init=hf:/ckpt/llava-1.5-7b-hf,pattern=2:4,source=llava_conversations/llava_instruct_5f2c,data_dir=/data/tfds,tokenizer=/ckpt/llava-1.5-7b-hf'

    # The main job's VLM at 50% unstructured, LM only:
    python -m launch.main --workdir=workdirs/pruned --config='configs/prune.py:model=shapes_vila,init=checkpoint:workdirs/shapes_vila/stage2,vision=0,source=shapes_world/vqa_64px_s0_44a1bb6533,data_dir=workdirs/shapes_vila/data,tokenizer=workdirs/shapes_vila/tokenizer'

Writes into <workdir>: the pruned parameters as an Orbax run (`init=checkpoint:<workdir>`
evaluates or trains them), `masks/` with `mask_paths.json` (what `configs/repair.py` takes),
`sparsity.json`, and a Hugging Face folder (zeros kept) with `export_hf=<folder>`.

Arguments: method (magnitude | wanda | sparsegpt), pattern (row | matrix | variant | N:M;
empty, the default: the method's reference rule, `sparsity.DEFAULT_PATTERN`: magnitude
`matrix`, wanda `row`, sparsegpt its per-block rule; `variant` is Wanda's variant, the
reference's --use_variant, Wanda only), vision, projector, lm (per-tower ratios), rows
(calibration rows), model (a preset name, or `shapes_vila` for the main job's model;
empty for `init=hf:` where the folder says), overwrite (redo a finished prune: its
workdir moves to `<workdir>.old[.N]`; without it a rerun only reports the finished output).
Method, pattern, ratios and the calibration data are checked before the model loads;
Wanda and SparseGPT take the tokenizer of the `init=hf:` folder when `tokenizer` is empty.
Per-layer overrides: `--config.prune.overrides="(('lm/layers_0/.*', 0.3),)"`.
"""

import ml_collections

from configs import common, models
from vlm_jax.train.config import default_config


def model_block(name: str):
  """The model config: a preset, the main job's, or None (read from the Hugging Face folder)."""
  if not name:
    return None
  if name == "shapes_vila":
    from configs.shapes import vila as shapes_vila
    return shapes_vila.get_config().model
  return models.preset(name)


def prune_block(method="wanda", pattern="", vision=0.5, projector=0.0, lm=0.5) -> ml_collections.ConfigDict:
  """`pattern=""`: the method's reference rule (`sparsity.prune` with pattern None)."""
  return ml_collections.ConfigDict(dict(
      method=method, pattern=pattern, ratios=dict(vision=vision, projector=projector, lm=lm),
      overrides=[], include=[]))


def data_block(source: str, data_dir: str, tokenizer: str, batch: int = 16, seq_len: int = 128,
               image_slots: int = 4) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source="pipeline", sources=[dict(name=source, split="train", weight=1.0)], data_dir=data_dir,
      tokenizer=tokenizer, global_batch_size=batch, seq_len=seq_len, image_slots=image_slots, packing=False,
      truncate=True))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, init="", model="", method="wanda", pattern="", vision=0.5, projector=0.0,
                       lm=0.5, rows=128, source="", data_dir="", tokenizer="", export_hf="", overwrite=False)
  c = default_config()
  c.job = "prune"
  c.init = a.init
  c.model = model_block(a.model)
  c.prune = prune_block(a.method, a.pattern, a.vision, a.projector, a.lm)
  c.calibration = ml_collections.ConfigDict(dict(rows=a.rows))
  c.data = data_block(a.source, a.data_dir, a.tokenizer)
  c.export_hf = a.export_hf
  c.overwrite = a.overwrite
  return c
