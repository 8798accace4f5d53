r"""VILA stage 1 (pre-training) on LLaVA-1.5-7B: projector + LM trained, vision tower frozen (METHODS §1).

Simulate it first (compiles the real train step for 64 virtual devices on this CPU, no weights allocated;
the per-device memory and FLOPs table answers "does it fit on a 64-chip pod?"):

    python -m launch.simulate --config=configs/llava15_7b_stage1.py --devices=64 --hbm_gib=80

Run it on a TPU pod of 64 chips (e.g. v4-128 / v5p-128; WORKDIR on a file system every worker mounts):

    TPU=my-v4-128 ZONE=us-central2-b WORKDIR=/mnt/shared/runs/llava15_7b_stage1 \
        launch/tpu_pod.sh --config=configs/llava15_7b_stage1.py:init=checkpoint:/mnt/shared/runs/llava15_7b_stage0

or on 8 GPU nodes x 8 GPUs with SLURM:

    sbatch --nodes=8 launch/slurm.sbatch --config=configs/llava15_7b_stage1.py \
        --workdir=/shared/runs/llava15_7b_stage1

The data here is synthetic (64 rows x 2048 tokens, one 336 px image = 576 image tokens per row):
swap `config.data` for the pipeline's block (MMC4 interleaved + COYO pairs, ~1:1 by images) for the
real run. `init` is where the weights come from: `scratch` (the default, for simulation and smoke
tests), `hf:<LLaVA folder>` or `checkpoint:<workdir of stage 0>` (the aligned projector).

Model: the `llava15_7b` preset (CLIP ViT-L/14-336 + LLaMA-2-7B, mlp2x_gelu projector), float32
parameters with bfloat16 compute in the vision tower, the projector and the LM; the LM's 32 layers
are scanned (one compiled layer; compile time and memory do not grow with depth) and rematerialised
(only each layer's input is kept for the backward pass). Mesh: everything fully sharded (fsdp = all
devices). Optimiser: AdamW lr 5e-5, 3% warmup, cosine to 0, weight decay 0 (VILA, METHODS §1).
"""

import ml_collections

from configs import common, models
from vlm_jax.train.config import default_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, init="scratch")
  config = default_config()
  config.init = args.init
  config.model = models.preset("llava15_7b")
  config.model.text.scan_layers = True
  config.model.text.remat = "full"
  config.model.text.dtype = "bfloat16"  # the projector follows the LM's dtype
  config.model.text.param_dtype = "float32"
  config.model.vision.dtype = "bfloat16"
  config.model.vision.param_dtype = "float32"

  config.total_steps = 10_000  # one epoch = examples / global_batch_size; set it for the data you use
  config.checkpoint_every = 500
  config.log_every = 10
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.data = ml_collections.ConfigDict(dict(source="synthetic", global_batch_size=64, seq_len=2048,
                                               images_per_row=1, repeat_first=False))
  config.optim.lr = 5e-5
  config.optim.schedule = "cosine"
  config.optim.warmup_frac = 0.03
  config.optim.weight_decay = 0.0
  config.optim.groups = [("projector/.*", 1.0), ("lm/.*", 1.0), (".*", None)]  # vision frozen
  config.lock()
  return config
