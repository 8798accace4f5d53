"""`models.metrics.argmax_equals`: the train step's, MaskGIT's and the few-shot search's accuracy."""

import numpy as np

from vlm_jax.models.metrics import argmax_equals


def test_argmax_equals_breaks_ties_as_argmax():
  r = np.random.default_rng(0)
  logits = r.integers(0, 3, size=(500, 6)).astype(np.float32)  # many ties
  y = r.integers(0, 6, size=500)
  np.testing.assert_array_equal(np.asarray(argmax_equals(logits, y)), np.argmax(logits, -1) == y)


def test_argmax_equals_on_batch_by_length_logits():
  """The train step's [B, L, vocab] logits against [B, L] targets."""
  r = np.random.default_rng(1)
  logits = r.integers(0, 4, size=(3, 7, 9)).astype(np.float32)
  y = r.integers(0, 9, size=(3, 7))
  np.testing.assert_array_equal(np.asarray(argmax_equals(logits, y)), np.argmax(logits, -1) == y)
