"""Data: the record schema, the shapes world, TFDS builders, tokenizers and the input pipeline."""
