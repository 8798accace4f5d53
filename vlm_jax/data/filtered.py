r"""A subset of a data set, by record id, as a new TFDS data set (array_record).

    build_filtered(source, kept_ids, data_dir) -> the builder of `filtered_records/<name>`

The kept records are copied byte for byte from the source (images stay encoded as they
were; a set of image code grids keeps its `codes`), in source order, so the pipeline reads
the subset like any other source:

    data.sources = [dict(name="filtered_records/<name>", split="train")]
    data.data_dir = "<data_dir>"

`<name>` (`filtered_config_name`) is a digest of the source and the ids: the same selection
gets the same name, and an already prepared one is reused. Perplexity filtering
(`vlm_jax.curation.jobs.filter_data`) writes its kept records this way.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from typing import Iterable, Mapping, Optional

import numpy as np

from vlm_jax.data import schema
from vlm_jax.data.rendering import parse_record
from vlm_jax.data.sources import Source, open_source, resolve

log = logging.getLogger(__name__)


def record_text(record) -> str:
  """The target text of a record: its caption / answers (" | "-joined) or its text turns."""
  rec = parse_record(record)
  parts = [c for r, c in rec.turns if r == "assistant"] or [c for r, c in rec.turns if r == "text"]
  return " | ".join(p.strip() for p in parts)


def as_source(source, data_dir: Optional[str] = None) -> Source:
  """A pipeline Source from a Source or a {name, split[, data_dir]} dict; `data_dir` fills a missing one."""
  src = source if isinstance(source, Source) else Source(**dict(source))
  return src if src.data_dir or not data_dir else dataclasses.replace(src, data_dir=data_dir)


def _raw_id(raw) -> str:
  rid = raw["id"] if isinstance(raw, Mapping) else raw.id
  if isinstance(rid, np.ndarray):
    rid = rid.item()
  return rid.decode("utf-8") if isinstance(rid, bytes) else str(rid)


def _schema_dict(record, num_codes: int = 0) -> dict:
  """A record (as the pipeline reads it, images still encoded) as TFDS encodes it; with its
  code grids when the data set has the `codes` field (`num_codes` ids per image)."""
  rec = parse_record(record)
  out = {"id": rec.id, "kind": rec.kind, "images": [bytes(im) for im in rec.images],
         "turns": [{"role": r, "content": c} for r, c in rec.turns], "meta": rec.meta}
  if num_codes:
    out["codes"] = [np.asarray(c, np.int32) for c in rec.codes]
  return out


def code_length(source) -> int:
  """T, the ids per image of a TFDS data set's `codes` field (0: its records carry no codes)."""
  features = resolve(as_source(source)).builder.info.features
  return int(features["codes"].feature.shape[0]) if "codes" in features else 0


@functools.cache
def _filtered_classes():
  """(FilteredConfig, FilteredRecords), defined on first use: TFDS is heavy to import.

  A prepared `filtered_records/<name>` reopens from its files with `tfds.builder` (or a
  pipeline source of that name) even in a process that never defined the class.
  """
  import tensorflow_datasets as tfds  # heavy (TensorFlow): only building a subset needs it
  from etils import epath  # TFDS's path type, needed only with TFDS
  from vlm_jax.data import builders  # imports tensorflow_datasets at its top

  @dataclasses.dataclass(eq=False)
  class FilteredConfig(tfds.core.BuilderConfig):
    """The source data set, the file of kept ids (one a line) and the source's code length."""
    source: str = ""
    split: str = "train"
    source_data_dir: Optional[str] = None
    ids_path: str = ""
    num_codes: int = 0

  class FilteredRecords(builders.Builder):
    """The kept records of a source data set, in source order, copied unchanged (images stay
    encoded as they were)."""

    code_path = epath.Path(__file__)

    def __init__(self, *, watch: Iterable[str] = (), **kwargs):
      super().__init__(**kwargs)
      self.watch = set(watch)
      self.watched: dict[str, str] = {}  # id -> target text, for records in `watch` (seen while copying)
      self.missing = 0

    def _info(self):
      cfg = self.builder_config
      return tfds.core.DatasetInfo(builder=self, description=cfg.description if cfg else self.__doc__,
                                   features=schema.features(num_codes=getattr(cfg, "num_codes", 0)),
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      cfg = self.builder_config
      if not cfg or not getattr(cfg, "ids_path", ""):
        raise ValueError(f"{self.name}: no source; use vlm_jax.data.filtered.build_filtered")
      return {cfg.split: self._generate_examples()}

    def _generate_examples(self):
      cfg = self.builder_config
      with open(cfg.ids_path, encoding="utf-8") as f:
        wanted = {line.rstrip("\n") for line in f if line.strip()}
      src = open_source(Source(name=cfg.source, split=cfg.split, data_dir=cfg.source_data_dir))
      found = set()
      for i in range(len(src)):
        raw = src[i]
        rid = _raw_id(raw)
        if rid in self.watch:
          self.watched[rid] = record_text(raw)
        if rid not in wanted or rid in found:
          continue
        found.add(rid)
        yield rid, _schema_dict(raw, cfg.num_codes)
      self.missing = len(wanted - found)
      if self.missing:
        log.warning("%d kept id(s) are not in %s:%s (e.g. %s)", self.missing, cfg.source, cfg.split,
                    sorted(wanted - found)[:3])

  return FilteredConfig, FilteredRecords


def filtered_config_name(source, kept_ids: Iterable[str]) -> str:
  """`<source slug>_keep<n>_<digest of source and ids>`: equal selections share a name."""
  src = as_source(source)
  ids = sorted(set(kept_ids))
  digest = hashlib.blake2b(digest_size=5)
  digest.update(json.dumps([src.name, src.split, src.data_dir and os.path.abspath(src.data_dir)]).encode())
  for rid in ids:
    digest.update(rid.encode("utf-8") + b"\n")
  slug = re.sub(r"[^a-z0-9]+", "_", src.name.lower()).strip("_")[:40]
  return f"{slug}_keep{len(ids)}_{digest.hexdigest()}"


def build_filtered(source, kept_ids: Iterable[str], data_dir: str, *, ids_path: Optional[str] = None,
                   source_data_dir: Optional[str] = None, watch: Iterable[str] = ()):
  """Prepares (or reuses) `filtered_records/<name>` in `data_dir`: the records of `source`
  ({name, split[, data_dir]} or a pipeline Source naming a TFDS data set) whose id is in
  `kept_ids`, in source order, every field kept (`codes` too). Returns the builder
  (`builder.watched`: the target texts of the `watch` ids met while copying; empty when the
  data set was already prepared)."""
  src = as_source(source, source_data_dir)
  if not src.name:
    raise ValueError("build_filtered copies from a TFDS data set: the source needs a name")
  ids = sorted(set(kept_ids))
  name = filtered_config_name(src, ids)
  ids_path = ids_path or os.path.join(data_dir, f"{name}.ids.txt")
  os.makedirs(os.path.dirname(os.path.abspath(ids_path)), exist_ok=True)
  with open(ids_path, "w", encoding="utf-8") as f:
    f.writelines(rid + "\n" for rid in ids)
  FilteredConfig, FilteredRecords = _filtered_classes()  # pylint: disable=invalid-name
  config = FilteredConfig(name=name, version=FilteredRecords.VERSION,
                          description=f"{len(ids)} records of {src.label} kept by filtering",
                          source=src.name, split=src.split,
                          source_data_dir=src.data_dir and os.path.abspath(src.data_dir),
                          ids_path=os.path.abspath(ids_path), num_codes=code_length(src))
  builder = FilteredRecords(config=config, data_dir=data_dir, watch=watch)
  builder.download_and_prepare()
  return builder


def texts_by_id(source, ids: set) -> dict[str, str]:
  """The target texts (`record_text`) of `ids`, scanning the source until all are found."""
  src = open_source(as_source(source))
  out = {}
  for i in range(len(src)):
    if len(out) == len(ids):
      break
    raw = src[i]
    rid = _raw_id(raw)
    if rid in ids:
      out[rid] = record_text(raw)
  return out
