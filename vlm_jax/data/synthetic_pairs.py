r"""Synthetic (caption, VQ code grid) pairs (Synth², METHODS.md §6): resumable sharded
storage, and a TFDS data set over a finished folder that the pipeline reads like any other.

    w = SyntheticPairsWriter(pairs_dir, num=10_000, chunk_size=256, num_tokens=64,
                             codebook_size=512, fingerprint=tokenizer_fingerprint)
    for c in w.pending(jax.process_index(), jax.process_count()):   # chunks not yet on disk
      w.write(c, captions, codes)    # len(w.chunk_ids(c)) captions, int32 codes [n, T] in [0, K)
    builder = build_synthetic_pairs(data_dir, pairs_dir)   # `synthetic_pairs/<name>`

Storage: chunk c holds the pairs with ids `<prefix>-<index>` for index in
[c·chunk_size, min((c+1)·chunk_size, num)), in `chunk-<c>.npz` (captions, codes), each
written to a temporary file and renamed into place: a chunk is on disk whole or not at
all, so a generation killed at any point and started again writes every id exactly once.
`meta.json` (num_tokens T, codebook_size K, the code tokenizer's fingerprint, num,
chunk_size, prefix) is written once; opening the folder again with other values is refused
(nothing overwritten), so codes of two different tokenizers never share a data set.

The data set: one record per pair, in index order, of kind "caption" (turns
[user "<image>", assistant caption]), no encoded images and one code grid in the per-image
`codes` field (schema.py), split "train". Its name derives from the folder and its files:
an unchanged folder reuses the prepared data set. The pipeline feeds it with
`data.image_codes = T` (see pipeline.py):

    data.sources = [dict(name="<real>", weight=1.0),
                    dict(name="synthetic_pairs/<name>", weight=1.0)]   # exactly half synthetic
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tempfile
from typing import Iterator, Sequence

import numpy as np

from vlm_jax.data import schema

META_FILE = "meta.json"
_META_KEYS = ("num", "chunk_size", "num_tokens", "codebook_size", "fingerprint", "prefix")


def chunk_path(directory: str, chunk: int) -> str:
  return os.path.join(directory, f"chunk-{chunk:06d}.npz")


def read_meta(directory: str) -> dict:
  """The folder's meta.json; a clear error when it has none."""
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} holds no {META_FILE}: not a synthetic pairs folder "
                            f"(write one with SyntheticPairsWriter)")
  with open(path) as f:
    return json.load(f)


def num_chunks(meta: dict) -> int:
  return -(-meta["num"] // meta["chunk_size"])


def missing_chunks(directory: str) -> list[int]:
  """The chunks of the folder not yet on disk."""
  meta = read_meta(directory)
  return [c for c in range(num_chunks(meta)) if not os.path.exists(chunk_path(directory, c))]


def _atomic_write(path: str, write) -> None:
  """write(file object) into a temporary file beside `path`, then renamed onto it."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + os.path.basename(path) + ".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


class SyntheticPairsWriter:
  """Writes the pairs of one folder chunk by chunk (see the module docstring).

  fingerprint: a string naming the code tokenizer (e.g. a digest of its weights):
  codes from another tokenizer mean other images, so a folder keeps one.
  """

  def __init__(self, directory: str, num: int, chunk_size: int, num_tokens: int, codebook_size: int,
               fingerprint: str, prefix: str = "synth"):
    for name, value in (("num", num), ("chunk_size", chunk_size), ("num_tokens", num_tokens),
                        ("codebook_size", codebook_size)):
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(fingerprint, str) or not fingerprint:
      raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.]+", prefix):
      raise ValueError(f"prefix must be letters, digits, '_' or '.', got {prefix!r}")
    self.directory = os.fspath(directory)
    self.meta = dict(num=int(num), chunk_size=int(chunk_size), num_tokens=int(num_tokens),
                     codebook_size=int(codebook_size), fingerprint=fingerprint, prefix=prefix)
    os.makedirs(self.directory, exist_ok=True)
    if not os.path.exists(os.path.join(self.directory, META_FILE)):
      _atomic_write(os.path.join(self.directory, META_FILE),
                    lambda f: f.write(json.dumps(self.meta, indent=1, sort_keys=True).encode()))
    saved = read_meta(self.directory)  # another process may have written it first: the same check
    differ = [k for k in _META_KEYS if saved.get(k) != self.meta[k]]
    if differ:
      detail = "; ".join(f"{k}: on disk {saved.get(k)!r}, now {self.meta[k]!r}" for k in differ)
      raise ValueError(f"{self.directory} holds synthetic pairs of another generation ({detail}); "
                       f"use another folder (nothing was overwritten)")

  @property
  def num_chunks(self) -> int:
    return num_chunks(self.meta)

  def chunk_ids(self, chunk: int) -> list[str]:
    """The ids chunk `chunk` holds, in order."""
    m = self.meta
    start = chunk * m["chunk_size"]
    return [f"{m['prefix']}-{i}" for i in range(start, min(start + m["chunk_size"], m["num"]))]

  def pending(self, process_index: int = 0, process_count: int = 1) -> list[int]:
    """The chunks of this process (c % process_count == process_index) not yet on disk."""
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return [c for c in range(process_index, self.num_chunks, process_count)
            if not os.path.exists(chunk_path(self.directory, c))]

  def write(self, chunk: int, captions: Sequence[str], codes) -> None:
    """Writes chunk `chunk` whole (temporary file, then rename); refuses one already on disk."""
    if not 0 <= chunk < self.num_chunks:
      raise ValueError(f"chunk {chunk} not in [0, {self.num_chunks})")
    path = chunk_path(self.directory, chunk)
    if os.path.exists(path):
      raise ValueError(f"chunk {chunk} is already written ({path}); write only pending() chunks")
    n, t, k = len(self.chunk_ids(chunk)), self.meta["num_tokens"], self.meta["codebook_size"]
    captions = list(captions)
    if len(captions) != n:
      raise ValueError(f"chunk {chunk} holds {n} pairs, got {len(captions)} captions")
    for i, caption in enumerate(captions):
      if not isinstance(caption, str) or not caption.strip() or schema.IMAGE_PLACEHOLDER in caption:
        raise ValueError(f"caption {i} of chunk {chunk} must be non-empty text without "
                         f"{schema.IMAGE_PLACEHOLDER!r}, got {caption!r:.80}")
    codes = np.asarray(codes)
    if codes.shape != (n, t):
      raise ValueError(f"chunk {chunk}: codes must have shape [{n}, num_tokens {t}], got {list(codes.shape)}")
    if not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f"chunk {chunk}: codes must be integers, got {codes.dtype}")
    bad = np.flatnonzero(((codes < 0) | (codes >= k)).any(axis=1))
    if bad.size:
      raise ValueError(f"chunk {chunk}: codes outside [0, codebook_size {k}) in {bad.size} pair(s), "
                       f"e.g. pair {bad[0]}: min {codes[bad[0]].min()}, max {codes[bad[0]].max()}")
    _atomic_write(path, lambda f: np.savez(f, captions=np.asarray(captions, dtype=str),
                                           codes=codes.astype(np.int32)))


def finished_meta(directory: str) -> dict:
  """The meta of a finished folder; a clear error naming how many chunks are missing."""
  meta = read_meta(directory)
  missing = missing_chunks(directory)
  if missing:
    raise ValueError(f"{directory}: {len(missing)} of {num_chunks(meta)} chunks missing "
                     f"(e.g. chunk {missing[0]}): finish generating it first")
  return meta


def read_pairs(directory: str) -> Iterator[tuple[str, str, np.ndarray]]:
  """(id, caption, codes int32 [T]) of every pair of a finished folder, in index order."""
  meta = finished_meta(directory)
  for c in range(num_chunks(meta)):
    with np.load(chunk_path(directory, c)) as data:
      captions, codes = data["captions"], data["codes"]
    start = c * meta["chunk_size"]
    for j, (caption, code) in enumerate(zip(captions, codes)):
      yield f"{meta['prefix']}-{start + j}", str(caption), code


def config_name(directory: str) -> str:
  """`<folder slug>_<digest of the folder, its meta and its chunk files>`: an unchanged
  folder keeps its name (its prepared data set is reused), a regenerated one gets another."""
  directory = os.path.abspath(directory)
  meta = read_meta(directory)
  digest = hashlib.blake2b(json.dumps([directory, meta], sort_keys=True).encode(), digest_size=5)
  for c in range(num_chunks(meta)):
    path = chunk_path(directory, c)
    if os.path.exists(path):
      st = os.stat(path)
      digest.update(f"{c}:{st.st_size}:{st.st_mtime_ns};".encode())
  slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(directory).lower()).strip("_")[:40] or "pairs"
  return f"{slug}_{digest.hexdigest()}"


@functools.cache
def _builder_classes():
  """(SyntheticPairsConfig, SyntheticPairs), defined on first use: TFDS is heavy to import.

  A prepared `synthetic_pairs/<name>` reopens from its files with `tfds.builder` (or a
  pipeline source of that name) even in a process that never defined the class.
  """
  import tensorflow_datasets as tfds  # heavy (TensorFlow): only building the data set needs it
  from etils import epath  # TFDS's path type, needed only with TFDS
  from vlm_jax.data import builders  # imports tensorflow_datasets at its top

  @dataclasses.dataclass(eq=False)
  class SyntheticPairsConfig(tfds.core.BuilderConfig):
    """The finished folder of pairs and its code length T."""
    pairs_dir: str = ""
    num_tokens: int = 0

  class SyntheticPairs(builders.Builder):
    """Synthetic (caption, code grid) pairs: caption records whose image is given as codes."""

    code_path = epath.Path(__file__)

    def _info(self):
      cfg = self.builder_config
      return tfds.core.DatasetInfo(builder=self, description=cfg.description if cfg else self.__doc__,
                                   features=schema.features(num_codes=cfg.num_tokens if cfg else 0),
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      cfg = self.builder_config
      if not cfg or not getattr(cfg, "pairs_dir", ""):
        raise ValueError(f"{self.name}: no folder of pairs; use build_synthetic_pairs(data_dir, pairs_dir)")
      return {"train": self._generate_examples(cfg.pairs_dir)}

    def _generate_examples(self, pairs_dir):
      for rid, caption, codes in read_pairs(pairs_dir):
        yield rid, {"id": rid, "kind": "caption", "images": [], "codes": [codes],
                    "turns": [{"role": "user", "content": schema.IMAGE_PLACEHOLDER},
                              {"role": "assistant", "content": caption}],
                    "meta": json.dumps({"synthetic": True, "index": int(rid.rsplit("-", 1)[1])})}

  return SyntheticPairsConfig, SyntheticPairs


def build_synthetic_pairs(data_dir: str, pairs_dir: str):
  """Prepares (or reuses) `synthetic_pairs/<config_name(pairs_dir)>` in `data_dir` from a
  finished folder of pairs; returns its builder. An unfinished folder is refused, naming
  how many chunks are missing."""
  meta = finished_meta(pairs_dir)
  SyntheticPairsConfig, SyntheticPairs = _builder_classes()  # pylint: disable=invalid-name
  config = SyntheticPairsConfig(
      name=config_name(pairs_dir), version=SyntheticPairs.VERSION,
      description=f"{meta['num']} synthetic pairs (T={meta['num_tokens']}, K={meta['codebook_size']}, "
                  f"tokenizer {meta['fingerprint']}) from {os.path.abspath(pairs_dir)}",
      pairs_dir=os.path.abspath(pairs_dir), num_tokens=meta["num_tokens"])
  builder = SyntheticPairs(config=config, data_dir=data_dir)
  builder.download_and_prepare()
  return builder
