"""The input pipeline: TFDS records -> rendered, tokenised, batched host arrays, on grain.

    from vlm_jax.data import pipeline, tokenizer
    tok, image_id = tokenizer.load_tokenizer("/tmp/tok")
    pipe = pipeline.Pipeline.from_config(config.data, tok, tokens_per_image=16, image_token_id=image_id)
    it = iter(pipe)
    batch = next(it)                 # the batch format of vlm_jax/data/schema.py
    state = it.get_state()           # JSON-serialisable; save beside the model
    it = pipe.iterator(state)        # ... continues with exactly the next batch
    it.skipped()                     # {"too_long": 3, "undecodable_image": 1, ...}
                                     # + "<reason> (build of <data set>)": what its build skipped

Stages (each source a random-access sequence of records: vlm_jax.data.sources):

  1. indices    per source: range(len) -> this host's shard [process_index::process_count]
                -> global shuffle (grain index shuffle, seeded by (seed, source name),
                reshuffled every epoch) -> repeat(num_epochs; None = forever)
  2. mixture    grain `MapDataset.mix` of the sources with the given weights, exact and
                deterministic: of the first n records, source i gives ceil(n·w_i / Σw)
                (give or take one), so weights 1:1 alternate and any window of n records
                holds n/2 of each (±1); 3:1 takes three then one. Weights are scaled so the
                smallest is 100 and cut to integers (0.3:0.7 mixes as 100:233). Exact over
                the records read: a skipped bad record is not replaced by one of its source.
  3. process    in grain's reader threads: read the record, render it (chat template and
                targets: vlm_jax.data.rendering), check it, decode and preprocess its
                images. A bad record becomes a "skip" marker with a reason, counted by
                the iterator and never batched.
  4. batch      in the iterator: rows of seq_len tokens, padded (one record per row) or
                packed (records in stream order while tokens and image slots fit).

Every element of stages 1-3 is a pure function of its position in the stream, so the
iterator's state is one integer (the position of the next record not yet in a batch)
plus the skip counts: restoring it reproduces the following batches bit for bit.

Bad records: skipped and counted by reason (`iterator.skipped()`), never trained on:
  undecodable_image     an image PIL cannot decode
  missing_image         an empty image, or a caption record without an image
  image_count_mismatch  the number of "<image>" placeholders differs from the images
  empty_target          an empty caption / answer / text turn
  too_long              longer than seq_len (with truncate=False; with truncate=True a
                        record is cut at seq_len, moved back to the start of an image's
                        token run when the cut falls inside one, and its later images
                        dropped; skipped only if no target token survives)
  too_many_images       more images than the image slots of a row
  bad_codes             image codes (schema `codes`) of another length than data.image_codes,
                        or not non-negative integers, or codes while data.image_codes is 0
  malformed_record      unknown kind or role, no turns, <image> in an assistant turn,
                        a caption without exactly one assistant turn
  unreadable_record     reading the record from its source failed
  processing_error      any other exception while processing a record (logged)
`skipped()` also reports what the build of each TFDS source skipped (vlm_jax.data.builders
writes the counts beside the data set), under "<reason> (build of <data set>)".

Nothing fits, nothing trains: a pipeline whose rows cannot hold a record with one image
(seq_len < BOS + tokens_per_image + a target token + EOS) is refused when it is built, and
`max_consecutive_skips` records skipped in a row with none batched stop the iterator with
a RuntimeError naming the reasons (instead of spinning forever through the data).

Config (`default_config()`; the `data` block of an experiment config; `from_config`):
  sources            list of {name, split, weight[, data_dir]} (vlm_jax.data.sources.Source):
                     TFDS builder names (the project's builders are registered when opened)
  data_dir           TFDS data directory (default: TFDS's own)
  tokenizer          folder of a Hugging Face tokenizer (used when none is passed in)
  global_batch_size  rows per step over all hosts; each host yields global / process_count
  seq_len            tokens per row
  image_slots        M, images per row (batch["images"] is [B, M, H, W, 3])
  image_size         square side the vision tower takes (None: from the model config)
  normalization      "clip" | "siglip" (None: from the model's vision style)
  resize_mode        "resize" | "pad" | "crop" (see vlm_jax.data.preprocess)
  packing            several records per row, with segment_ids / positions per record
  truncate           cut over-long records instead of skipping them
  seed               shuffling seed
  shuffle            global shuffle (False: records in source order)
  num_epochs         None: repeat forever; N: stop after N passes (last batch padded)
  chat_template      {user, assistant, separator, system, caption_prompt} (see rendering.py)
  tokens_per_image   image tokens per image (None: from the model config or argument);
                     0 for a contrastive model: images are inputs beside the text, whose
                     "<image>" placeholders become nothing (a caption row is BOS caption EOS)
  image_token_id     (None: the tokenizer's "<image>" id, or the model config's)
  num_threads        grain reader threads (decode + tokenise in parallel)
  prefetch           records read ahead
  max_consecutive_skips  records skipped in a row (none batched) that stop the iterator
                     with an error (None: never)
  image_codes        T, the length of the code grids of images given as codes (Synth²
                     pairs, vlm_jax.data.synthetic_pairs): batches then carry image_codes
                     int32 [B, M, T] and code_given int32 [B, M] (schema.py). 0: off, and
                     batches carry neither key; a source whose data set holds codes is then
                     refused, as is one whose codes have another length
  source             (optional) "pipeline"; the train loop's switch to synthetic batches
Given a model config (`from_config(data, model)`), image_size, tokens_per_image,
image_token_id and normalization left None are taken from its vision tower.

Multi-host: every process builds its own Pipeline (process_index / process_count default
to jax's) and yields its global_batch_size / process_count rows; its state is its own, to be
saved per process.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import zlib
from typing import Any, Mapping, Optional, Sequence, Union

import grain
import jax
import ml_collections
from ml_collections.config_dict import placeholder
import numpy as np

from vlm_jax.data import rendering, schema
from vlm_jax.data import sources as sources_lib
from vlm_jax.data.preprocess import MODES, NORMALIZATIONS, BadRecord, decode_image, preprocess_image
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.models.build import config_from_dict
from vlm_jax.models.text_to_codes import TextToCodesConfig
from vlm_jax.models.vq import VQConfig

log = logging.getLogger(__name__)

STATE_VERSION = 1
SKIP_REASONS = ("undecodable_image", "missing_image", "image_count_mismatch", "empty_target",
                "too_long", "too_many_images", "bad_codes", "malformed_record", "unreadable_record",
                "processing_error")
_MAX_SKIP_WARNINGS = 5  # per reason


# --- Elements of the processed stream ------------------------------------------


@dataclasses.dataclass
class _Example:
  index: int
  id: str
  ids: np.ndarray
  mask: np.ndarray
  images: list  # per image: float32 [S, S, 3] pixels, or None where given as codes
  codes: list = dataclasses.field(default_factory=list)  # per image: int32 [T] ([] when pixels)


@dataclasses.dataclass
class _Skip:
  index: int
  reason: str
  detail: str
  id: str
  source: str


# --- Pipeline ---------------------------------------------------------------


def default_config():
  """The `data` block with every key (see the module docstring)."""
  t = rendering.ChatTemplate()
  return ml_collections.ConfigDict(dict(
      sources=[dict(name="shapes_world", split="train", weight=1.0)],
      data_dir=placeholder(str),
      tokenizer="",
      global_batch_size=32,
      seq_len=256,
      image_slots=1,
      image_size=placeholder(int),
      normalization=placeholder(str),
      resize_mode="resize",
      packing=False,
      truncate=False,
      seed=0,
      shuffle=True,
      num_epochs=placeholder(int),
      chat_template=dataclasses.asdict(t),
      tokens_per_image=placeholder(int),
      image_token_id=placeholder(int),
      num_threads=4,
      prefetch=64,
      max_consecutive_skips=1000,
      image_codes=0,
  ))


def vision_settings(model) -> dict[str, Any]:
  """A VLM config (VLMConfig, or the `model` ConfigDict / dict of kind "vlm") ->
  {image_size, tokens_per_image, image_token_id, normalization} for the pipeline
  ({} for a model without a vision tower; no image tokens for a contrastive model)."""
  if isinstance(model, Mapping) or hasattr(model, "to_dict"):
    _, model = config_from_dict(model)
  if hasattr(model, "text") and hasattr(model, "projection_dim"):  # a two-tower contrastive model:
    # image–caption pairs, each image a separate input, no image tokens in the text
    return dict(image_size=model.vision.image_size, tokens_per_image=0, image_token_id=-1,
                normalization="siglip" if model.vision.style == "siglip" else "clip")
  vq = model if isinstance(model, VQConfig) else model.vq if isinstance(model, TextToCodesConfig) else None
  if vq is not None:  # an image tokenizer, or Synth²'s text-to-codes generator: images as inputs,
    # caption pairs as for a contrastive model (no image tokens in the text)
    return dict(image_size=vq.image_size, tokens_per_image=0, image_token_id=-1, normalization="clip")
  if not hasattr(model, "tokens_per_image"):  # a language model alone: no images
    return {}
  return dict(image_size=model.vision.image_size, tokens_per_image=model.tokens_per_image,
              image_token_id=model.image_token_id,
              normalization="siglip" if model.vision.style == "siglip" else "clip")


class Pipeline:
  """The input pipeline of one host (see the module docstring).

  Iterate it (`iter(pipe)`, or `pipe.iterator(state)` to resume) for batches of
  `pipe.batch_size` = global_batch_size / process_count rows.
  """

  def __init__(self, sources: Sequence[Union[sources_lib.Source, Mapping[str, Any]]], tokenizer, *,
               global_batch_size: int, seq_len: int, tokens_per_image: int,
               image_token_id: Optional[int] = None, image_slots: int = 1, image_size: int = 224,
               normalization: str = "clip", resize_mode: str = "resize", packing: bool = False,
               truncate: bool = False, seed: int = 0, shuffle: bool = True,
               num_epochs: Optional[int] = None,
               chat_template: Union[None, rendering.ChatTemplate, Mapping[str, str]] = None,
               num_threads: int = 4, prefetch: int = 64, data_dir: Optional[str] = None,
               max_consecutive_skips: Optional[int] = 1000, image_codes: int = 0,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    if process_index is None or process_count is None:
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                       f"process_count {process_count}")
    if normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization must be one of {tuple(NORMALIZATIONS)}, got {normalization!r}")
    if resize_mode not in MODES:
      raise ValueError(f"resize_mode must be one of {MODES}, got {resize_mode!r}")
    for name, value in (("seq_len", seq_len), ("global_batch_size", global_batch_size),
                        ("image_size", image_size)):
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(tokens_per_image, (int, np.integer)) or tokens_per_image < 0:
      raise ValueError(f"tokens_per_image must be a non-negative integer, got {tokens_per_image!r}")
    if image_slots < 0:
      raise ValueError(f"image_slots must be >= 0, got {image_slots}")
    if num_epochs is not None and num_epochs <= 0:
      raise ValueError(f"num_epochs must be None (forever) or positive, got {num_epochs}")
    if max_consecutive_skips is not None and max_consecutive_skips <= 0:
      raise ValueError(f"max_consecutive_skips must be None (no bound) or positive, got {max_consecutive_skips}")
    if not isinstance(image_codes, (int, np.integer)) or image_codes < 0:
      raise ValueError(f"image_codes must be a non-negative integer (0: off), got {image_codes!r}")

    self.sources = [s if isinstance(s, sources_lib.Source) else sources_lib.Source(**dict(s))
                    for s in sources]
    if not self.sources:
      raise ValueError("no data sources")
    labels = [s.label for s in self.sources]
    if len(set(labels)) != len(labels):
      raise ValueError(f"sources must differ by name:split, got {labels}")
    weights = [float(s.weight) for s in self.sources]
    if any(w <= 0 for w in weights):
      raise ValueError(f"source weights must be positive, got {dict(zip(labels, weights))}")

    self.tokenizer = tokenizer
    self.encoder = rendering.TextEncoder(tokenizer)
    if image_token_id is None:
      image_token_id = tokenizer.get_vocab().get(schema.IMAGE_PLACEHOLDER)
      if image_token_id is None:
        raise ValueError("image_token_id not given and the tokenizer has no '<image>' token "
                         "(use vlm_jax.data.tokenizer.load_tokenizer, which adds it)")
    self.image_token_id = int(image_token_id)
    self.tokens_per_image = int(tokens_per_image)
    self.seq_len = int(seq_len)
    self.image_slots = int(image_slots)
    if self.image_slots and self.tokens_per_image:
      # A row that cannot hold one image skips every image record: nothing would ever train.
      needed = (self.encoder.bos_id is not None) + self.tokens_per_image + 2  # + a target + EOS
      if self.seq_len < needed:
        raise ValueError(f"seq_len {self.seq_len} cannot hold a record with one image: tokens_per_image "
                         f"{self.tokens_per_image} + BOS + one target token + EOS need seq_len >= {needed}")
    self.image_size = int(image_size)
    self.normalization = normalization
    self.resize_mode = resize_mode
    self.packing = bool(packing)
    self.truncate = bool(truncate)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.num_epochs = num_epochs
    self.chat_template = rendering.ChatTemplate.make(chat_template)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.global_batch_size = int(global_batch_size)
    self.batch_size = self.global_batch_size // self.process_count
    self.read_options = grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=int(prefetch))
    self.max_consecutive_skips = max_consecutive_skips
    self.image_codes = int(image_codes)

    self.sources = [sources_lib.resolve(s, data_dir) for s in self.sources]  # each data set opened once
    self.data_sources = [sources_lib.open_source(s) for s in self.sources]
    for src in self.sources:
      self._check_codes(src)
    self.build_skipped = self._build_skipped()
    parts = []
    for k, (src, ds) in enumerate(zip(self.sources, self.data_sources)):
      idx = grain.MapDataset.range(len(ds))[self.process_index::self.process_count]
      if len(idx) == 0:
        raise ValueError(f"source {src.label} has {len(ds)} records: none for process "
                         f"{self.process_index} of {self.process_count}")
      if self.shuffle:
        idx = idx.shuffle(seed=_source_seed(self.seed, src.label))
      idx = idx.repeat(num_epochs).map(functools.partial(_tag, k))
      parts.append(idx)
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    self.dataset = mixed.map_with_index(self._process)
    self.fingerprint = json.loads(json.dumps(dict(
        sources=[[s.label, float(s.weight), len(ds)] for s, ds in zip(self.sources, self.data_sources)],
        seed=self.seed, shuffle=self.shuffle, num_epochs=num_epochs,
        process_index=self.process_index, process_count=self.process_count,
        batch_size=self.batch_size, seq_len=self.seq_len, packing=self.packing, truncate=self.truncate,
        image_slots=self.image_slots, tokens_per_image=self.tokens_per_image,
        image_token_id=self.image_token_id, chat_template=dataclasses.asdict(self.chat_template),
        # only when on: states saved before image codes existed still resume
        **({"image_codes": self.image_codes} if self.image_codes else {}))))

  @classmethod
  def from_config(cls, config, tokenizer=None, *, model=None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, **overrides) -> "Pipeline":
    """From the `data` ConfigDict (or dict; keys in the module docstring).

    tokenizer: a Hugging Face tokenizer, else `config.tokenizer` is loaded.
    model: the VLM config (or `model` block): fills image_size, tokens_per_image,
    image_token_id and normalization where the data config leaves them None.
    overrides: keyword arguments of Pipeline that win over the config.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    known = set(default_config().keys()) | {"source"}
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise ValueError(f"unknown key(s) {unknown} in the data config; known: {sorted(known)}")
    if cfg.pop("source", "pipeline") != "pipeline":
      raise ValueError(f"data.source is {config['source']!r}; this builds the 'pipeline' source")
    cfg = {**default_config().to_dict(), **cfg}
    if model is not None:
      for key, value in vision_settings(model).items():
        if cfg.get(key) is None:
          cfg[key] = value
    cfg.update(overrides)
    if tokenizer is None:
      if not cfg["tokenizer"]:
        raise ValueError("no tokenizer passed and data.tokenizer (a tokenizer folder) is empty")
      tokenizer, image_id = load_tokenizer(cfg["tokenizer"])
      if cfg.get("image_token_id") is None and cfg["image_slots"]:
        cfg["image_token_id"] = image_id
    if not cfg["image_slots"]:  # text only: records with images are skipped (too_many_images)
      cfg["tokens_per_image"] = cfg.get("tokens_per_image") or 1
      if cfg.get("image_token_id") is None and schema.IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        cfg["image_token_id"] = -1
    if cfg.get("tokens_per_image") is None:
      raise ValueError("tokens_per_image unknown: set data.tokens_per_image or pass model=")
    cfg.pop("tokenizer")
    cfg["image_size"] = cfg["image_size"] or 224
    cfg["normalization"] = cfg["normalization"] or "clip"
    return cls(cfg.pop("sources"), tokenizer, process_index=process_index, process_count=process_count, **cfg)

  def _check_codes(self, source: sources_lib.Source) -> None:
    """A data set of image codes needs data.image_codes set to its code length: refused at
    once (not record by record) when the config does not fit it."""
    features = getattr(getattr(source.builder, "info", None), "features", None)
    if features is None or "codes" not in features.keys():
      return
    length = features["codes"].shape[-1]
    if not self.image_codes:
      raise ValueError(f"source {source.label} gives its images as codes ({length} per image): "
                       f"set data.image_codes = {length}")
    if length != self.image_codes:
      raise ValueError(f"source {source.label} holds codes of {length} per image, but data.image_codes "
                       f"is {self.image_codes}")

  def _build_skipped(self) -> dict[str, int]:
    """What the builds of the sources' data sets skipped, once per data set (not per split)."""
    out: dict[str, int] = {}
    for src in self.sources:  # two splits of one data set set the same keys
      name = src.label.rsplit(":", 1)[0]
      for reason, n in sources_lib.build_skipped(src).items():
        out[f"{reason} (build of {name})"] = int(n)
    return out

  # -- per-record processing (runs in grain's reader threads) --

  def _process(self, index: int, pair: tuple[int, int]):
    k, i = pair
    label = self.sources[k].label
    try:
      raw = self.data_sources[k][i]
    except Exception as e:  # pylint: disable=broad-except
      return _Skip(index, "unreadable_record", f"{label}[{i}]: {type(e).__name__}: {e}", "", label)
    rid = ""
    try:
      rec = rendering.parse_record(raw)
      rid = rec.id
      return self._example(index, rec)
    except BadRecord as e:
      return _Skip(index, e.reason, e.detail, rid, label)
    except Exception as e:  # pylint: disable=broad-except
      log.exception("error while processing record %r (%s[%d])", rid, label, i)
      return _Skip(index, "processing_error", f"{type(e).__name__}: {e}", rid, label)

  def _example(self, index: int, rec: rendering.Record) -> _Example:
    ids, mask, n_images = rendering.render(rec, self.encoder, self.tokens_per_image, self.image_token_id,
                                           self.chat_template)
    if len(ids) > self.seq_len:
      if not self.truncate:
        raise BadRecord("too_long", f"{len(ids)} tokens > seq_len {self.seq_len}")
      if self.tokens_per_image:
        ids, mask, n_images = rendering.truncate_tokens(ids, mask, self.seq_len, self.image_token_id,
                                                        self.tokens_per_image)
      else:  # the images are not in the token stream: only the text is cut
        ids, mask = ids[:self.seq_len], mask[:self.seq_len]
    if n_images > self.image_slots:
      raise BadRecord("too_many_images", f"{n_images} images > {self.image_slots} image slots")
    if rec.codes:
      codes = [self._checked_codes(c) for c in rec.codes[:n_images]]
      return _Example(index, rec.id, ids, mask, [None] * n_images, codes)
    images = [preprocess_image(decode_image(rec.images[j]), self.image_size, self.resize_mode,
                               self.normalization) for j in range(n_images)]
    return _Example(index, rec.id, ids, mask, images)

  def _checked_codes(self, codes: np.ndarray) -> np.ndarray:
    if not self.image_codes:
      raise BadRecord("bad_codes", "an image given as codes, but data.image_codes is 0")
    if codes.shape != (self.image_codes,):
      raise BadRecord("bad_codes", f"codes of shape {list(codes.shape)}, data.image_codes is {self.image_codes}")
    if not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0:
      raise BadRecord("bad_codes", f"codes must be non-negative integers, got {codes.dtype} min {codes.min()}")
    return codes.astype(np.int32)

  # -- iteration --

  def iterator(self, state: Optional[Mapping[str, Any]] = None) -> "PipelineIterator":
    return PipelineIterator(self, state)

  def __iter__(self) -> "PipelineIterator":
    return self.iterator()

  def batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of a batch (device keys), e.g. for jax.ShapeDtypeStruct."""
    b, l, m, s = self.batch_size, self.seq_len, self.image_slots, self.image_size
    spec = {"input_ids": ((b, l), np.dtype(np.int32)), "loss_mask": ((b, l), np.dtype(np.float32)),
            "attention_mask": ((b, l), np.dtype(np.int32)), "positions": ((b, l), np.dtype(np.int32)),
            "segment_ids": ((b, l), np.dtype(np.int32)),
            "images": ((b, m, s, s, 3), np.dtype(np.float32))}
    if self.image_codes:
      spec["image_codes"] = ((b, m, self.image_codes), np.dtype(np.int32))
      spec["code_given"] = ((b, m), np.dtype(np.int32))
    return spec


def _tag(k: int, i) -> tuple[int, int]:
  return k, int(i)


def _source_seed(seed: int, label: str) -> int:
  return int(np.random.SeedSequence([seed, zlib.crc32(label.encode())]).generate_state(1)[0])


def from_config(config, model=None, *, tokenizer=None, state: Optional[Mapping[str, Any]] = None,
                process_index: Optional[int] = None, process_count: Optional[int] = None,
                **overrides) -> "PipelineIterator":
  """The iterator of `Pipeline.from_config(config, tokenizer, model=model, ...)`, resumed
  from `state` if given (what the train loop calls: `from_config(config.data, model.config,
  seed=config.seed)`)."""
  pipe = Pipeline.from_config(config, tokenizer, model=model, process_index=process_index,
                              process_count=process_count, **overrides)
  return pipe.iterator(state)


make_iterator = from_config


class PipelineIterator:
  """Yields batches (schema.py format); `get_state()` / `set_state()` resume exactly."""

  def __init__(self, pipeline: Pipeline, state: Optional[Mapping[str, Any]] = None):
    self.pipeline = pipeline
    self._it = pipeline.dataset.to_iter_dataset(pipeline.read_options).__iter__()
    self._next_index = 0      # stream position of the next element the grain iterator yields
    self._pending: Optional[_Example] = None  # read but did not fit the last batch's last row
    self._skipped: collections.Counter = collections.Counter()
    self._in_a_row: collections.Counter = collections.Counter()  # skips since the last example
    self._batches = 0
    if state is not None:
      self.set_state(state)

  # -- state --

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: restoring it (here or in a new iterator over the same
    config) yields exactly the batches this iterator would yield next."""
    position = self._pending.index if self._pending is not None else self._next_index
    return {"version": STATE_VERSION, "next_index": int(position), "batches": self._batches,
            "skipped": dict(sorted(self._skipped.items())), "fingerprint": self.pipeline.fingerprint}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r}; "
                       f"this code reads version {STATE_VERSION}")
    saved, current = state.get("fingerprint", {}), self.pipeline.fingerprint
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
      detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differ)
      raise ValueError(f"the data iterator state belongs to a different pipeline ({detail}); "
                       f"an exact resume needs the same data config, process index and count")
    self._it.set_state({"next_index": int(state["next_index"])})
    self._next_index = int(state["next_index"])
    self._pending = None
    self._skipped = collections.Counter(state.get("skipped", {}))
    self._batches = int(state.get("batches", 0))

  def skipped(self) -> dict[str, int]:
    """Records skipped so far, by reason (cumulative across restores), and those the builds
    of the sources' data sets skipped ("<reason> (build of <data set>)")."""
    return dict(sorted({**self._skipped, **self.pipeline.build_skipped}.items()))

  # -- examples --

  def _next_example(self) -> Optional[_Example]:
    if self._pending is not None:
      ex, self._pending = self._pending, None
      return ex
    while True:
      try:
        el = next(self._it)
      except StopIteration:
        return None
      if el.index != self._next_index:  # grain yields every index, in order
        raise RuntimeError(f"input stream out of order: got {el.index}, expected {self._next_index}")
      self._next_index = el.index + 1
      if isinstance(el, _Skip):
        self._count_skip(el)
        continue
      self._in_a_row.clear()
      return el

  def _count_skip(self, skip: _Skip) -> None:
    """Counts a skipped record; raises once too many in a row left nothing to batch (a config
    that fits no record would otherwise spin through the data forever)."""
    self._skipped[skip.reason] += 1
    if self._skipped[skip.reason] <= _MAX_SKIP_WARNINGS:
      log.warning("skipping record %r of %s: %s %s%s", skip.id, skip.source, skip.reason, skip.detail,
                  " (further ones of this reason are only counted)"
                  if self._skipped[skip.reason] == _MAX_SKIP_WARNINGS else "")
    self._in_a_row[skip.reason] += 1
    limit, n = self.pipeline.max_consecutive_skips, sum(self._in_a_row.values())
    if limit is not None and n >= limit:
      p = self.pipeline
      self.close()
      raise RuntimeError(
          f"{n} records in a row were skipped and none batched ({dict(self._in_a_row.most_common())}); "
          f"the last: {skip.reason} {skip.detail} ({skip.source}). Check the data and the config "
          f"(seq_len {p.seq_len}, tokens_per_image {p.tokens_per_image}, image_slots {p.image_slots}, "
          f"truncate {p.truncate}); data.max_consecutive_skips sets this bound")

  def _rows(self) -> list[list[_Example]]:
    p = self.pipeline
    rows: list[list[_Example]] = []
    if not p.packing:
      while len(rows) < p.batch_size:
        ex = self._next_example()
        if ex is None:
          break
        rows.append([ex])
      return rows
    row: list[_Example] = []
    length = n_images = 0
    while True:
      ex = self._next_example()
      if ex is None:
        break
      if row and (length + len(ex.ids) > p.seq_len or n_images + len(ex.images) > p.image_slots):
        rows.append(row)
        row, length, n_images = [], 0, 0
        if len(rows) == p.batch_size:
          self._pending = ex
          return rows
      row.append(ex)
      length += len(ex.ids)
      n_images += len(ex.images)
      if length == p.seq_len:
        rows.append(row)
        row, length, n_images = [], 0, 0
        if len(rows) == p.batch_size:
          return rows
    if row:
      rows.append(row)
    return rows

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    p = self.pipeline
    rows = self._rows()
    if not rows:
      raise StopIteration
    b, l, m, s = p.batch_size, p.seq_len, p.image_slots, p.image_size
    batch = {
        "input_ids": np.full((b, l), p.encoder.pad_id, np.int32),
        "loss_mask": np.zeros((b, l), np.float32),
        "attention_mask": np.zeros((b, l), np.int32),
        "positions": np.zeros((b, l), np.int32),
        "segment_ids": np.zeros((b, l), np.int32),
        "images": np.zeros((b, m, s, s, 3), np.float32),
    }
    if p.image_codes:
      batch["image_codes"] = np.zeros((b, m, p.image_codes), np.int32)
      batch["code_given"] = np.zeros((b, m), np.int32)
    ids = [""] * b
    for r, row in enumerate(rows):
      start = slot = 0
      for seg, ex in enumerate(row, start=1):
        n = len(ex.ids)
        batch["input_ids"][r, start:start + n] = ex.ids
        batch["loss_mask"][r, start:start + n] = ex.mask
        batch["positions"][r, start:start + n] = np.arange(n, dtype=np.int32)
        batch["segment_ids"][r, start:start + n] = seg
        for j, img in enumerate(ex.images):
          if img is None:  # given as codes
            batch["image_codes"][r, slot] = ex.codes[j]
            batch["code_given"][r, slot] = 1
          else:
            batch["images"][r, slot] = img
          slot += 1
        start += n
      batch["attention_mask"][r, :start] = 1
      ids[r] = ",".join(ex.id for ex in row)
    batch["id"] = np.asarray(ids, dtype=str)
    self._batches += 1
    return batch

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
