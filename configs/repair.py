r"""Repair a pruned model (METHODS §4, RESSA's sparse cross-modality adaptation): job `repair`.

    python -m launch.main --workdir=workdirs/llava_2of4_repair --config='configs/repair.py:init=hf:/ckpt/llava-1.5-7b-hf,masks=workdirs/llava_2of4,source=llava_conversations/llava_instruct_5f2c,data_dir=/data/tfds,tokenizer=/ckpt/llava-1.5-7b-hf,export_hf=/ckpt/llava-2of4-repaired'

`init` is the DENSE model the masks were computed from (it stays frozen and is the
distillation teacher); `masks` is the prune job's workdir. SparseLoRA (rank 4 on the
vision tower, 8 on the projector and LM, α = 16, as the reference) trains on
`(1−λ)·task + λ·KL(dense ‖ sparse)` (λ = `kd`, T = `temperature`); `mode=masked` instead
fine-tunes all weights under the mask (no teacher). Writes the run (resumable) and
`<workdir>/merged`: the merged weights (exactly as sparse as the masks) as an Orbax run,
their masks and `sparsity.json`, plus a Hugging Face folder with `export_hf=<folder>`.
A rerun of a finished repair reports it and stops; `overwrite=1` moves the workdir to
`<workdir>.old[.N]` and redoes it.
"""

import ml_collections

from configs import common
from vlm_jax.train.config import default_config
from configs.prune import data_block, model_block
from vlm_jax.sparsity.repair import repair_groups, sparse_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, init="", model="", masks="", mode="sparse_lora", steps=200, lr=1e-4, batch=16,
                       alpha=16.0, rank_vision=4, rank_lm=8, kd=0.1, temperature=1.0, source="", data_dir="",
                       tokenizer="", export_hf="", overwrite=False)
  c = default_config()
  c.job = "repair"
  c.init = a.init
  c.model = model_block(a.model)
  c.total_steps = a.steps
  c.checkpoint_every = max(a.steps // 4, 1)
  c.optim.lr = a.lr
  c.optim.groups = repair_groups(a.mode)
  c.sparse = sparse_config(a.masks, a.mode, a.alpha, a.rank_vision, a.rank_lm, a.kd, a.temperature)
  c.data = data_block(a.source, a.data_dir, a.tokenizer, batch=a.batch)
  c.export_hf = a.export_hf
  c.overwrite = a.overwrite
  return c
