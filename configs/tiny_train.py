"""A tiny VLM trained on synthetic batches: the engine's smoke test and benchmark.

    python -m launch.main --config=configs/tiny_train.py --workdir=/tmp/tiny
    python -m launch.main --config=configs/tiny_train.py:model=small --workdir=/tmp/small --config.total_steps=5
"""

import ml_collections

from configs import common, models
from vlm_jax.train.config import default_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, model="tiny")
  config = default_config()
  config.model = models.preset(args.model)
  config.total_steps = 20
  config.checkpoint_every = 10
  config.data = ml_collections.ConfigDict(dict(source="synthetic", global_batch_size=8, seq_len=48,
                                               images_per_row=1, repeat_first=False))
  config.optim.lr = 1e-3
  config.optim.groups = [(".*", 1.0)]
  config.lock()
  return config
