"""A run's input batches from its `config.data` block: the pipeline over real records, or
synthetic batches (benchmarks, simulations and smoke tests).

    config.data.source = "pipeline"   # default: `pipeline.from_config` (sources, tokenizer, packing, ...)
    config.data.source = "synthetic"  # global_batch_size, seq_len, images_per_row, repeat_first
"""

import jax

from vlm_jax.data import pipeline
from vlm_jax.data.synthetic import SyntheticBatches


def make_data(config, model):
  """The iterator of host batches (`get_state` / `set_state` resume it) for `model`'s inputs."""
  data = config.data
  if data.get("source", "pipeline") == "synthetic":
    c = model.config
    vision = getattr(c, "vision", None)
    return SyntheticBatches(
        global_batch=data.global_batch_size, seq_len=data.seq_len,
        vocab_size=getattr(c, "text", c).vocab_size, seed=config.seed,
        image_size=vision.image_size if vision else 0,
        tokens_per_image=c.tokens_per_image if vision else 0,
        image_token_id=c.image_token_id if vision else -1,
        images_per_row=data.get("images_per_row", 1), repeat_first=data.get("repeat_first", False),
        process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.from_config(data, model.config, seed=config.seed)
