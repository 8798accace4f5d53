"""A deterministic synthetic batch source with resumable state.

Batch i is a pure function of (seed, i), so any process can produce its own
rows of any global batch: used by engine tests, benchmarks and the memory
simulator, where real data would only add noise.
"""

import numpy as np


class SyntheticBatches:
  """Iterator of batches in the `vlm_jax.data.schema` format.

  Each row: BOS, then `images_per_row` image-token runs, then text; the text
  after the first image is the target. For an LM (`tokens_per_image=0`) all
  tokens after the first are targets.
  """

  def __init__(self, *, global_batch: int, seq_len: int, vocab_size: int, seed: int = 0,
               image_size: int = 0, tokens_per_image: int = 0, image_token_id: int = -1,
               images_per_row: int = 1, process_index: int = 0, process_count: int = 1,
               repeat_first: bool = False):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
    self.global_batch, self.seq_len, self.vocab = global_batch, seq_len, vocab_size
    self.seed, self.image_size, self.tpi, self.image_token = seed, image_size, tokens_per_image, image_token_id
    self.slots = images_per_row if tokens_per_image else 0
    # BOS, the image runs, the first text token, then targets: shorter rows train on nothing.
    needed = self.slots * tokens_per_image + 3 if self.slots else 2
    if seq_len < needed:
      raise ValueError(f"seq_len {seq_len} leaves no target token: BOS + images_per_row {self.slots} x "
                       f"tokens_per_image {tokens_per_image} + 2 text tokens need seq_len >= {needed}")
    self.rows = slice(process_index * global_batch // process_count,
                      (process_index + 1) * global_batch // process_count)
    self.repeat_first = repeat_first
    self.index = 0

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])

  def skipped(self) -> dict:
    return {}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self.batch(0 if self.repeat_first else self.index)
    self.index += 1
    return batch

  def batch(self, i: int) -> dict:
    rng = np.random.default_rng([self.seed, i])
    b, l = self.global_batch, self.seq_len
    ids = rng.integers(1, min(self.vocab, self.image_token if self.image_token > 0 else self.vocab), (b, l))
    loss_mask = np.ones((b, l), np.float32)
    loss_mask[:, 0] = 0
    if self.slots:
      for s in range(self.slots):
        start = 1 + s * self.tpi
        ids[:, start:start + self.tpi] = self.image_token
      loss_mask[:, :1 + self.slots * self.tpi + 1] = 0
    batch = {
        "input_ids": ids.astype(np.int32), "loss_mask": loss_mask,
        "attention_mask": np.ones((b, l), np.int32),
        "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
        "segment_ids": np.ones((b, l), np.int32),
        "id": np.asarray([f"synthetic/{i}/{r}" for r in range(b)]),
    }
    if self.slots:
      batch["images"] = rng.standard_normal((b, self.slots, self.image_size, self.image_size, 3)).astype(np.float32)
    return {k: v[self.rows] for k, v in batch.items()}
