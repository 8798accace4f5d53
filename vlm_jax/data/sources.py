"""Where records come from: the data sets of a mixture, each read by random access.

    from vlm_jax.data import sources
    src = sources.Source(name="shapes_world", split="train", weight=1.0)  # a TFDS builder name
    records = sources.open_source(src, data_dir)   # len(records), records[i]: a schema record
    sources.build_skipped(src, data_dir)           # {reason: n} the build of its data set skipped

A source is a TFDS data set read by random access (`builder.as_data_source(split)`, its
array_record files), named or given as a prepared builder, or any random-access sequence
of records (`data_source`). Images are left encoded: the input pipeline decodes them
itself, so that a corrupt image skips its record instead of failing the read. Opening a
source by name registers the project's builders (vlm_jax.data.builders) with TFDS first.

The builders write the counts of the records they skipped (`SKIPPED_FILE`) beside the data
set; `build_skipped` reads them, so a run's summary can report what the build dropped.
"""

import dataclasses
import json
import os
from typing import Any, Optional

SKIPPED_FILE = "skipped.json"  # {reason: count}, beside a prepared data set


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


def resolve(source: Source, data_dir: Optional[str] = None) -> Source:
  """The source with its TFDS builder opened (a named source), so that reading its records
  and its build's skip counts opens the data set once."""
  if source.data_source is not None or source.builder is not None:
    return source
  import tensorflow_datasets as tfds  # heavy (TensorFlow): only TFDS sources need it
  import vlm_jax.data.builders  # noqa: F401  registers our builders with TFDS; heavy (imports TFDS)
  builder = tfds.builder(source.name, data_dir=source.data_dir or data_dir)
  if hasattr(builder, "is_prepared") and not builder.is_prepared():
    raise FileNotFoundError(f"TFDS data set {source.name} is not prepared in {builder.data_dir}: "
                            f"build it first (builder.download_and_prepare() or `tfds build`)")
  return dataclasses.replace(source, builder=builder)


def read_beside(prepared_dir, name: str = SKIPPED_FILE) -> dict:
  """A JSON file the build wrote into a prepared data set's folder ({} when it has none)."""
  path = os.path.join(os.fspath(prepared_dir), name)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def build_skipped(source: Source, data_dir: Optional[str] = None) -> dict:
  """{reason: count} of the records the build of the source's data set skipped ({} for a
  data_source, or a data set built by other code)."""
  source = resolve(source, data_dir)
  if source.builder is None:
    return {}
  return read_beside(source.builder.data_dir)


def open_source(source: Source, data_dir: Optional[str] = None):
  """Source -> a random-access sequence of records."""
  if source.data_source is not None:
    return source.data_source
  builder = resolve(source, data_dir).builder
  formats = getattr(builder.info, "file_format", None)
  if formats is not None and "array_record" not in str(formats).lower():
    raise ValueError(f"{source.label}: prepared as {formats}; the pipeline reads by random access: "
                     f"prepare it with file_format='array_record'")
  try:
    return builder.as_data_source(split=source.split, decoders={"images": _raw_images_decoder()})
  except (KeyError, ValueError, TypeError):  # no `images` feature: decode as the builder does
    return builder.as_data_source(split=source.split)
