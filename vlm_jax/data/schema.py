"""The one record schema every data set is stored in, and the batch the models eat.

Record (a TFDS example; every builder, real formats and the shapes world alike):

    id      str        unique, stable example id (curation keys scores by it)
    kind    str        "caption" | "interleaved" | "conversation" | "text"
    images  [n] image  0..n encoded images (PNG/JPEG), in the order the text refers to them
    codes   [n] int32 [T]  (optional; only data sets of image codes have it) the images
                       given as VQ code grids instead (T = grid², ids in [0, K)), in the
                       order the text refers to them; a record holds images or codes,
                       never both (synthetic Synth² pairs: vlm_jax.data.synthetic_pairs)
    turns   [k] {role, content}
                       role "user" / "assistant": a conversation turn (assistant turns are targets)
                       role "text": free text, every token a target (interleaved documents, corpora)
                       "<image>" inside content marks where image i (in order) stands
    meta    str        JSON for evaluation and analysis, never shown to the model
                       (shapes world: task, question type, answer, label, domain,
                       corrupted flag, boxes)

How each kind is rendered:
    caption        turns = [user "<image>", assistant caption]: the caption is the target
    interleaved    turns = [text "... <image> ... <image> ..."]
    conversation   turns = alternating user / assistant, "<image>" in user turns
    text           turns = [text "..."] or a user / assistant exchange (text-only QA)

Batch (host NumPy arrays; the train step reads these keys):

    input_ids      int32   [B, L]  image placeholders already expanded to tokens_per_image tokens
    loss_mask      float32 [B, L]  1 where token t is a target, predicted from tokens < t
    attention_mask int32   [B, L]  1 for real tokens
    positions      int32   [B, L]  RoPE positions (restart per packed segment)
    segment_ids    int32   [B, L]  packed-sequence id, 0 for padding (1 for every real token when unpacked)
    images         float32 [B, M, H, W, 3]  normalised; M image slots per row, unused slots zero
    image_codes    int32   [B, M, T]  (only with data.image_codes = T) a slot's code grid, zero
                           where its image is given as pixels or the slot is unused
    code_given     int32   [B, M]  (only with data.image_codes = T) 1 where the slot's codes are
                           given (its `images` slot stays zero), 0 where its pixels are encoded
    id             str     [B]     (host only, never sent to devices)
"""

import numpy as np

KINDS = ("caption", "interleaved", "conversation", "text")
ROLES = ("user", "assistant", "text")
IMAGE_PLACEHOLDER = "<image>"

DEVICE_KEYS = ("input_ids", "loss_mask", "attention_mask", "positions", "segment_ids", "images")
CODE_KEYS = ("image_codes", "code_given")  # device keys only batches of data.image_codes > 0 carry
HOST_KEYS = ("id",)


def features(num_codes: int = 0):
  """The TFDS FeaturesDict of a record (imported lazily: TF is heavy); with the `codes`
  field of `num_codes` (T) ids per image when num_codes > 0."""
  import tensorflow_datasets as tfds  # heavy (TensorFlow): only building TFDS features needs it
  fields = {
      "id": tfds.features.Text(),
      "kind": tfds.features.Text(),
      "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
      "turns": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
      "meta": tfds.features.Text(),
  }
  if num_codes:
    fields["codes"] = tfds.features.Sequence(tfds.features.Tensor(shape=(num_codes,), dtype=np.int32))
  return tfds.features.FeaturesDict(fields)


def device_batch(batch: dict) -> dict:
  """The arrays of a batch that go to the accelerator (the image codes keys when present)."""
  return {k: np.asarray(batch[k]) for k in DEVICE_KEYS + CODE_KEYS if k in batch}
