"""Where records come from: the data sets of a mixture, each read by random access.

    from vlm_jax.data import sources
    src = sources.Source(name="shapes_world", split="train", weight=1.0)  # a TFDS builder name
    records = sources.open_source(src, data_dir)   # len(records), records[i]: a schema record

A source is a TFDS data set read by random access (`builder.as_data_source(split)`, its
array_record files), named or given as a prepared builder, or any random-access sequence
of records (`data_source`). Images are left encoded: the input pipeline decodes them
itself, so that a corrupt image skips its record instead of failing the read. Opening a
source by name registers the project's builders (vlm_jax.data.builders) with TFDS first.
"""

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class Source:
  """One data set of the mixture.

  name: a TFDS builder name (`tfds.builder(name, data_dir=...)`), or a label when
  `builder` or `data_source` is given (`builder` may also be given as a name). builder: a TFDS builder object, already
  prepared (array_record). data_source: any random-access sequence of records
  (`len` and `[i]`), e.g. `builder.as_data_source()[split]`.
  """
  name: str = ""
  split: str = "train"
  weight: float = 1.0
  data_dir: Optional[str] = None
  builder: Any = None
  data_source: Any = None

  def __post_init__(self):
    if isinstance(self.builder, str):  # config files may say builder: NAME
      if self.name and self.name != self.builder:
        raise ValueError(f"source gives both name {self.name!r} and builder {self.builder!r}")
      object.__setattr__(self, "name", self.builder)
      object.__setattr__(self, "builder", None)
    if not self.name and self.builder is None and self.data_source is None:
      raise ValueError("a source needs a name (TFDS builder), a builder or a data_source")

  @property
  def label(self) -> str:
    name = self.name or (getattr(self.builder, "name", "") if self.builder is not None else "") or "source"
    return f"{name}:{self.split}"


def _raw_images_decoder():
  """A TFDS decoder leaving images encoded: the pipeline decodes them itself, so that a
  corrupt image skips its record instead of failing the read."""
  import tensorflow_datasets as tfds  # heavy (TensorFlow): only TFDS sources need it

  class RawImages(tfds.decode.Decoder):
    def decode_example(self, serialized):
      return serialized

    def decode_example_np(self, serialized):
      return serialized

    def decode_batch_example(self, serialized):
      return serialized

    def decode_batch_example_np(self, serialized):
      return list(serialized)

  return RawImages()


def open_source(source: Source, data_dir: Optional[str] = None):
  """Source -> a random-access sequence of records."""
  if source.data_source is not None:
    return source.data_source
  builder = source.builder
  if builder is None:
    import tensorflow_datasets as tfds  # heavy (TensorFlow): only TFDS sources need it
    import vlm_jax.data.builders  # noqa: F401  registers our builders with TFDS; heavy (imports TFDS)
    builder = tfds.builder(source.name, data_dir=source.data_dir or data_dir)
    if hasattr(builder, "is_prepared") and not builder.is_prepared():
      raise FileNotFoundError(f"TFDS data set {source.name} is not prepared in {builder.data_dir}: "
                              f"build it first (builder.download_and_prepare() or `tfds build`)")
  formats = getattr(builder.info, "file_format", None)
  if formats is not None and "array_record" not in str(formats).lower():
    raise ValueError(f"{source.label}: prepared as {formats}; the pipeline reads by random access: "
                     f"prepare it with file_format='array_record'")
  try:
    return builder.as_data_source(split=source.split, decoders={"images": _raw_images_decoder()})
  except (KeyError, ValueError, TypeError):  # no `images` feature: decode as the builder does
    return builder.as_data_source(split=source.split)
