"""Data: the record schema, the shapes world, TFDS builders, tokenizers, record rendering,
sources and the input pipeline."""
