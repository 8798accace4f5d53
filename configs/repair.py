r"""Repair a pruned model (METHODS §4, RESSA's sparse cross-modality adaptation): job `repair`.

    python -m launch.main --workdir=workdirs/llava_2of4_repair --config='configs/repair.py:init=hf:/ckpt/llava-1.5-7b-hf,masks=workdirs/llava_2of4,source=llava_conversations/llava_instruct_5f2c,data_dir=/data/tfds,tokenizer=/ckpt/llava-1.5-7b-hf,export_hf=/ckpt/llava-2of4-repaired'

`init` is the DENSE model the masks were computed from (it stays frozen and is the
distillation teacher); `masks` is the prune job's workdir. SparseLoRA (rank 4 on the
vision tower, 8 on the projector and LM, α = 16, as the reference) trains on
`(1−λ)·task + λ·KL(dense ‖ sparse)` (λ = `kd`, T = `temperature`); `mode=masked` instead
fine-tunes all weights under the mask (no teacher). Writes the run (resumable) and
`<workdir>/merged`: the merged weights (exactly as sparse as the masks) as an Orbax run,
their masks and `sparsity.json`, plus a Hugging Face folder with `export_hf=<folder>`.
"""

import ml_collections

from configs import common
from vlm_jax.train.config import default_config
from configs.prune import data_block, model_block


def sparse_block(masks: str, mode: str = "sparse_lora", alpha: float = 16.0, rank_vision: int = 4,
                 rank_lm: int = 8, kd: float = 0.1, temperature: float = 1.0) -> ml_collections.ConfigDict:
  if mode not in ("sparse_lora", "masked"):
    raise ValueError(f"repair mode must be 'sparse_lora' or 'masked', got {mode!r}")
  lora = mode == "sparse_lora"
  return ml_collections.ConfigDict(dict(
      masks=masks, lora_alpha=alpha if lora else 0.0,
      lora_ranks=[("vision/.*", rank_vision), ("(projector|lm)/.*", rank_lm), (".*", rank_lm)],
      kd_weight=kd if lora else 0.0, kd_temperature=temperature))


def repair_groups(mode: str) -> list:
  return [("lora/.*", 1.0), (".*", None)] if mode == "sparse_lora" else [(".*", 1.0)]


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, init="", model="", masks="", mode="sparse_lora", steps=200, lr=1e-4, batch=16,
                       alpha=16.0, rank_vision=4, rank_lm=8, kd=0.1, temperature=1.0, source="", data_dir="",
                       tokenizer="", export_hf="")
  c = default_config()
  c.job = "repair"
  c.init = a.init
  c.model = model_block(a.model)
  c.total_steps = a.steps
  c.checkpoint_every = max(a.steps // 4, 1)
  c.optim.lr = a.lr
  c.optim.groups = repair_groups(a.mode)
  c.sparse = sparse_block(a.masks, a.mode, a.alpha, a.rank_vision, a.rank_lm, a.kd, a.temperature)
  c.data = data_block(a.source, a.data_dir, a.tokenizer, batch=a.batch)
  c.export_hf = a.export_hf
  return c
