"""TFDS builders: the shapes world, four real on-disk formats and image folders, all in the record schema.

Every builder produces `vlm_jax.data.schema.features()` (id, kind, images, turns, meta),
needs no download, writes array_record (so `builder.as_data_source()` feeds grain) and
keeps the source order (no TFDS shuffling; the input pipeline shuffles). Importing this
module registers the builders with TFDS under the names shapes_world, image_captions,
interleaved, conversations, text_corpus, image_folder; a prepared data set with an option-derived
config name reopens with `tfds.builder("shapes_world/<config name>", data_dir=...)`.

    build_shapes_world(data_dir, task, sizes={"train": n, ...}, image_size=64, seed=0, **options)
    build_from_files(kind, path, data_dir, image_root=None, data_root_only=False)  # kind: FILE_KINDS
    build_image_folder(root, data_dir, validation_fraction=0.2, test_fraction=0.2, seed=0)
    skipped_counts(builder) -> {reason: count}
    skipped_examples(builder) -> {reason: ["file:line: detail", ...]}  # the first few per reason

Both build_* helpers derive a unique config name from their inputs (options; the content
of the annotation files), call download_and_prepare (reusing a data set already prepared
under that name) and return the builder. The images a files data set read are recorded
(size and mtime, `inputs.json` beside it): when one of them changed since (an image fixed,
a missing one added), build_from_files rebuilds the data set instead of reusing it stale,
and it logs either way.

The shapes world (`ShapesWorld`): configs caption, vqa, region, interleaved, text_qa,
text_corpus, classes (10000 / 1000 / 1000 records, 64 px, seed 0); any other sizes,
image size, seed or task options (corruption_rate, qtypes, domain, ...) through
build_shapes_world. See vlm_jax.data.shapes_world.

Real formats. `path` is one file (split "train") or {split: file}; image paths are
relative to `image_root` (default: the annotation file's folder), the data root. One
record per caption / document / conversation / line. Annotation files are UTF-8; a JSONL
line that is not is a bad record (skipped, counted, its line number logged).

Image paths may be absolute or climb out of the data root ("../x.jpg"): your own
annotation files may point anywhere. For a third-party annotation file, pass
`data_root_only=True` (`launch.build_data --data_root_only`): a record with such a path is
then skipped and counted as `outside_data_root` (its file never opened). The check is on
the path as written (normalised); symlinks inside the root are followed.

  kind "captions" (`ImageCaptions`), either COCO captions JSON
      {"images": [{"id": 1, "file_name": "a.jpg"}],
       "annotations": [{"id": 10, "image_id": 1, "caption": "a dog on a sofa."}]}
    -> id "<stem>/1/10", kind "caption", turns [user "<image>", assistant caption]
  or JSONL (one object a line; "id" optional)
      {"image": "imgs/a.jpg", "caption": "a dog on a sofa."}
    -> id "<stem>/000000" (the line number) or "<stem>/<id>"

  kind "interleaved" (`Interleaved`), MMC4-style JSONL
      {"text_list": ["A dog.", "It sleeps."],
       "image_info": [{"image_name": "d.jpg", "matched_text_index": 0}]}
    -> kind "interleaved", one text turn "<image> A dog. It sleeps.": each image's
       "<image>" stands before its matched sentence; images in text order.

  kind "conversations" (`Conversations`), LLaVA JSON (a list; or JSONL of the same objects)
      [{"id": "7", "image": "coco/b.jpg",
        "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                          {"from": "gpt", "value": "A cat."}]}]
    -> kind "conversation", human -> user, gpt -> assistant. "image" may be a list
       (one "<image>" each, in order) or absent (text-only).

  kind "text" (`TextCorpus`), JSONL
      {"text": "Cats sleep a lot."}                 -> kind "text", turns [text ...]
      {"question": "2 + 2?", "answer": "4"}        -> kind "text", turns [user, assistant]

Image folders (`ImageFolder`, build_image_folder): labelled images for classification,
root/<class name>/*.jpg|png (split by seed) or root/{train,val,test}/<class name>/...
    -> one record per image: id "<split>/<path under root>", kind "caption", turns [user
       "<image>", assistant "a photo of a <class>."], meta {"label", "class_name", "file"}

Bad records are skipped, never fatal: each is logged (the first few per reason) and
counted by reason; the counts are written to `<prepared dir>/skipped.json` and returned by
`skipped_counts(builder)` (the input pipeline reports them too: `skipped()`), the first
few per reason with their file and line to `skipped_examples.json`. A split whose records
were all skipped fails the build with the counts. Reasons (SKIP_REASONS):
  missing_image          an image file that does not exist
  bad_image              an image that does not decode
  empty_caption          a caption that is empty or not a string
  empty_text             a document, text line or turn with no text
  image_count_mismatch   "<image>" placeholders != images
  bad_record             malformed JSON, a line not in UTF-8, missing or mistyped fields,
                         unknown role, an image index out of range, no assistant turn
  outside_data_root      (data_root_only) an absolute image path or one leaving the data root
"""

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
from typing import Any, Iterator, Mapping, Optional, Union

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=wrong-import-position
from etils import epath  # pylint: disable=wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position

from vlm_jax.data import schema
from vlm_jax.data import shapes_world
from vlm_jax.data.sources import SKIPPED_FILE, read_beside


def _hide_gpus_from_tf():
  """TF only reads data here: keep it off the accelerators (JAX owns them)."""
  try:
    import tensorflow as tf  # heavy, and only this tweak needs it (TFDS loads TF lazily)
    tf.config.set_visible_devices([], "GPU")
  except (ImportError, RuntimeError, ValueError):  # already initialised, or no TF: nothing to do
    pass


_hide_gpus_from_tf()

log = logging.getLogger(__name__)

SKIP_REASONS = ("missing_image", "bad_image", "empty_caption", "empty_text", "image_count_mismatch",
                "bad_record", "outside_data_root")
EXAMPLES_FILE = "skipped_examples.json"  # {reason: ["where: detail", ...]}, the first few each
INPUTS_FILE = "inputs.json"  # {image path: [size, mtime_ns] or None (missing)}, what a build read
_LOGGED_PER_REASON = 5
VERSION = tfds.core.Version("1.0.0")


class _Skip(Exception):
  """A bad record: raised while converting one, caught and counted by the builder."""

  def __init__(self, reason: str, detail: str = ""):
    assert reason in SKIP_REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _load_image(path: str) -> bytes:
  """Encoded image bytes (the file's own when RGB JPEG / PNG, else RGB PNG); _Skip when bad."""
  if not os.path.isfile(path):
    raise _Skip("missing_image", path)
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.format in ("JPEG", "PNG") and im.mode == "RGB":
        return data
      return _png(np.asarray(im.convert("RGB")))
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    raise _Skip("bad_image", f"{path}: {e}") from None


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The base of every builder in the record schema: array_record, source order, skip accounting."""

  VERSION = VERSION
  # TFDS works this out through importlib_resources, which is not installed here; no
  # checksums.tsv sits beside this file, so no download URLs are registered.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)
    self._skips = collections.Counter()
    self._examples = collections.defaultdict(list)
    self._inputs = {}

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(builder=self, description=(cfg.description if cfg else None) or self.__doc__,
                                 features=schema.features(), disable_shuffling=True)

  def _download_and_prepare(self, dl_manager, download_config=None):
    self._skips, self._examples, self._inputs = collections.Counter(), collections.defaultdict(list), {}
    super()._download_and_prepare(dl_manager, download_config)
    counts = {r: self._skips[r] for r in SKIP_REASONS if self._skips[r]}
    # self.data_dir is the temporary folder here: the files move in with the data set.
    for name, obj in ((SKIPPED_FILE, counts), (EXAMPLES_FILE, self._examples), (INPUTS_FILE, self._inputs)):
      with open(os.path.join(os.fspath(self.data_dir), name), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    if counts:
      log.warning("%s: skipped %d bad record(s): %s", self.info.full_name, sum(counts.values()), counts)

  def _skip(self, skip: _Skip, where: str) -> None:
    self._skips[skip.reason] += 1
    if self._skips[skip.reason] <= _LOGGED_PER_REASON:
      self._examples[skip.reason].append(f"{where}: {skip.detail}")
      log.warning("%s: skipping %s (%s): %s", self.name, where, skip.reason, skip.detail)

  def _nonempty(self, split: str, source: str, examples: Iterator[tuple[str, dict]]):
    """The examples of a split; a clear error with the skip counts when there are none
    (TFDS would only say "No examples were yielded")."""
    before = collections.Counter(self._skips)
    n = 0
    for n, example in enumerate(examples, start=1):
      yield example
    if not n:
      skipped = dict(self._skips - before)
      raise ValueError(f"{self.name}: no records for split {split!r} from {source}: "
                       + (f"all {sum(skipped.values())} skipped {skipped} (see the warnings above)"
                          if skipped else "it holds none"))

  def _convert_all(self, items: Iterator[tuple[str, Any]], convert) -> Iterator[tuple[str, dict]]:
    """(where, raw item) -> convert(raw) -> (key, record); bad ones skipped and counted."""
    for where, raw in items:
      try:
        record = convert(raw)
      except _Skip as s:
        self._skip(s, where)
        continue
      yield record["id"], record


# --- The shapes world -------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
  """One shapes-world task with its split sizes, image size, seed and task options."""
  task: str = "caption"
  sizes: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"train": 10_000, "validation": 1_000, "test": 1_000})
  image_size: int = 64
  seed: int = 0
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _canonical_options(task: str, options: Mapping[str, Any]) -> dict:
  """The task's options with defaults filled in (so equal data sets get equal names)."""
  full = shapes_world._options(task, dict(options))  # pylint: disable=protected-access  (validates)
  out = {k: full[k] for k in shapes_world._OPTIONS[task]}  # pylint: disable=protected-access
  return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def shapes_world_config(task: str, sizes: Optional[Mapping[str, int]] = None, image_size: int = 64,
                        seed: int = 0, name: Optional[str] = None, **options) -> ShapesWorldConfig:
  """A config whose name derives from everything that determines the data."""
  sizes = dict(sizes or {"train": 10_000, "validation": 1_000, "test": 1_000})
  bad = sorted(set(sizes) - set(shapes_world.SPLITS))
  if bad:
    raise ValueError(f"unknown split(s) {bad}; the shapes world has {shapes_world.SPLITS}")
  options = _canonical_options(task, options)
  spec = {"task": task, "sizes": sizes, "image_size": image_size, "seed": seed, "options": options}
  digest = hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=5).hexdigest()
  return ShapesWorldConfig(name=name or f"{task}_{image_size}px_s{seed}_{digest}", version=VERSION,
                           description="shapes world " + json.dumps(spec, sort_keys=True), task=task,
                           sizes=sizes, image_size=image_size, seed=seed, options=options)


class ShapesWorld(Builder):
  """The procedural shapes world (vlm_jax.data.shapes_world) as a TFDS data set."""

  BUILDER_CONFIGS = [shapes_world_config(t, name=t) for t in shapes_world.TASKS]

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    return {split: self._generate_examples(split, n) for split, n in cfg.sizes.items()}

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.options.items()}
    for r in shapes_world.records(cfg.task, split, num, seed=cfg.seed, image_size=cfg.image_size, **options):
      yield r["id"], {**r, "images": [_png(im) for im in r["images"]]}


def build_shapes_world(data_dir: str, task: str, sizes: Optional[Mapping[str, int]] = None,
                       image_size: int = 64, seed: int = 0, **options) -> ShapesWorld:
  """Prepares (or reuses) one shapes-world data set and returns its builder."""
  builder = ShapesWorld(config=shapes_world_config(task, sizes, image_size, seed, **options), data_dir=data_dir)
  builder.download_and_prepare()
  return builder


# --- Real formats -------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class FilesConfig(tfds.core.BuilderConfig):
  """Source files per split, and the folder image paths are relative to."""
  paths: Mapping[str, str] = dataclasses.field(default_factory=dict)
  image_root: Optional[str] = None
  data_root_only: bool = False


class _FilesBuilder(Builder, skip_registration=True):
  """A builder over local files (config: FilesConfig)."""

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not cfg or not getattr(cfg, "paths", None):
      raise ValueError(f"{self.name}: no source files; use build_from_files(kind, path, data_dir)")
    return {split: self._nonempty(split, path, self._generate_examples(path)) for split, path in cfg.paths.items()}

  def _image_root(self, path: str) -> str:
    return self.builder_config.image_root or os.path.dirname(os.path.abspath(path))

  def _stem(self, path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]

  def _image(self, root: str, name: str) -> bytes:
    """One image's bytes, its size and mtime recorded (a later build_from_files sees it changed)."""
    path = os.path.normpath(os.path.join(root, name))
    if self.builder_config.data_root_only and (os.path.isabs(name) or not _inside(path, root)):
      raise _Skip("outside_data_root", f"{name!r} is not under the data root {root} (data_root_only)")
    self._inputs[path] = _file_stat(path)
    return _load_image(path)

  def _images(self, root: str, names) -> list:
    return [self._image(root, n) for n in names]


def _inside(path: str, root: str) -> bool:
  root = os.path.abspath(root)
  return os.path.commonpath([os.path.abspath(path), root]) == root


def _file_stat(path: str) -> Optional[list]:
  """[size, mtime_ns] of a file, None when it does not exist."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return [st.st_size, st.st_mtime_ns]


def _load_json(path: str):
  """A whole JSON file; a non-UTF-8 one fails with its name and byte offset."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 at byte {e.start} ({e.reason}); re-encode it as UTF-8") from None


def _jsonl(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed object or a _Skip) per non-blank line; a line that is not UTF-8
  or not JSON is a _Skip (a bad record), the rest of the file still read."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield n, _Skip("bad_record", f"line {n}: not UTF-8 at byte {e.start} of the line ({e.reason})")
        continue
      if not line.strip():
        continue
      try:
        yield n, json.loads(line)
      except json.JSONDecodeError as e:
        yield n, _Skip("bad_record", f"line {n}: {e}")


def _require(cond: bool, detail: str, reason: str = "bad_record"):
  if not cond:
    raise _Skip(reason, detail)


def _text(value) -> str:
  return value.strip() if isinstance(value, str) else ""


def _meta(**kw) -> str:
  return json.dumps(kw, sort_keys=True)


def _raise_if_skip(obj):
  if isinstance(obj, _Skip):
    raise obj
  return obj


class ImageCaptions(_FilesBuilder):
  """Image-caption pairs from COCO-captions JSON or {"image", "caption"} JSONL."""

  def _generate_examples(self, path: str):
    stem, root = self._stem(path), self._image_root(path)
    if path.endswith(".jsonl"):
      yield from self._convert_all(((f"{path}:{n}", (n, obj)) for n, obj in _jsonl(path)),
                                   lambda item: self._from_line(stem, root, *item))
      return
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
      raise ValueError(f"{path}: expected COCO captions JSON ({{'images': [...], 'annotations': [...]}}) "
                       f"or a .jsonl file")
    files = {im.get("id"): im.get("file_name") for im in data.get("images", []) if isinstance(im, dict)}
    by_image = collections.defaultdict(list)  # each image is read once for all its captions
    for k, ann in enumerate(data["annotations"]):
      by_image[ann.get("image_id") if isinstance(ann, dict) else None].append((k, ann))
    for image_id, anns in by_image.items():
      try:
        _require(image_id in files and isinstance(files[image_id], str), f"image_id {image_id!r} not in images")
        image = self._image(root, files[image_id])
      except _Skip as s:
        for k, _ in anns:
          self._skip(s, f"{path}: annotation {k}")
        continue
      for k, ann in anns:
        caption = _text(ann.get("caption"))
        if not caption:
          self._skip(_Skip("empty_caption", f"annotation {k}"), f"{path}: annotation {k}")
          continue
        rid = f"{stem}/{image_id}/{ann.get('id', k)}"
        yield rid, {"id": rid, "kind": "caption", "images": [image],
                    "turns": [{"role": "user", "content": schema.IMAGE_PLACEHOLDER},
                              {"role": "assistant", "content": caption}],
                    "meta": _meta(source=os.path.basename(path), image_id=image_id, file_name=files[image_id])}

  def _from_line(self, stem, root, n, obj):
    obj = _raise_if_skip(obj)
    _require(isinstance(obj, dict) and isinstance(obj.get("image"), str), f"line {n}: needs 'image' (str)")
    caption = _text(obj.get("caption"))
    _require(bool(caption), f"line {n}", "empty_caption")
    image = self._image(root, obj["image"])
    rid = f"{stem}/{obj['id']}" if "id" in obj else f"{stem}/{n:06d}"
    return {"id": rid, "kind": "caption", "images": [image],
            "turns": [{"role": "user", "content": schema.IMAGE_PLACEHOLDER},
                      {"role": "assistant", "content": caption}],
            "meta": _meta(source=stem, line=n, image=obj["image"])}


def interleaved_text(text_list, matched) -> str:
  """Sentences joined by spaces, each image's "<image>" before its matched sentence (MMC4)."""
  counts = collections.Counter(matched)
  pieces = []
  for i, sentence in enumerate(text_list):
    words = [schema.IMAGE_PLACEHOLDER] * counts[i] + ([sentence.strip()] if sentence.strip() else [])
    if words:
      pieces.append(" ".join(words))
  return " ".join(pieces)


class Interleaved(_FilesBuilder):
  """Interleaved image-text documents from MMC4-style JSONL."""

  def _generate_examples(self, path: str):
    stem, root = self._stem(path), self._image_root(path)
    yield from self._convert_all(((f"{path}:{n}", (n, obj)) for n, obj in _jsonl(path)),
                                 lambda item: self._convert(stem, root, *item))

  def _convert(self, stem, root, n, doc):
    doc = _raise_if_skip(doc)
    _require(isinstance(doc, dict) and isinstance(doc.get("text_list"), list)
             and all(isinstance(s, str) for s in doc["text_list"]), f"line {n}: needs 'text_list' (strings)")
    infos = doc.get("image_info") or []
    _require(isinstance(infos, list) and all(
        isinstance(i, dict) and isinstance(i.get("image_name"), str)
        and isinstance(i.get("matched_text_index"), int)
        and 0 <= i["matched_text_index"] < len(doc["text_list"]) for i in infos),
             f"line {n}: image_info needs image_name and an in-range matched_text_index")
    _require(any(s.strip() for s in doc["text_list"]), f"line {n}", "empty_text")
    infos = sorted(infos, key=lambda i: i["matched_text_index"])  # stable: text order
    text = interleaved_text(doc["text_list"], [i["matched_text_index"] for i in infos])
    _require(text.count(schema.IMAGE_PLACEHOLDER) == len(infos),
             f"line {n}: {text.count(schema.IMAGE_PLACEHOLDER)} placeholders, {len(infos)} images",
             "image_count_mismatch")
    images = self._images(root, [i["image_name"] for i in infos])
    rid = f"{stem}/{doc['id']}" if "id" in doc else f"{stem}/{n:06d}"
    return {"id": rid, "kind": "interleaved", "images": images, "turns": [{"role": "text", "content": text}],
            "meta": _meta(source=stem, line=n, images=[i["image_name"] for i in infos])}


_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class Conversations(_FilesBuilder):
  """Multi-turn (visual) conversations from LLaVA JSON (or JSONL)."""

  def _generate_examples(self, path: str):
    stem, root = self._stem(path), self._image_root(path)
    if path.endswith(".jsonl"):
      items = ((f"{path}:{n}", (n, obj)) for n, obj in _jsonl(path))
    else:
      data = _load_json(path)
      if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA samples")
      items = ((f"{path}[{n}]", (n, obj)) for n, obj in enumerate(data))
    yield from self._convert_all(items, lambda item: self._convert(stem, root, *item))

  def _convert(self, stem, root, n, sample):
    sample = _raise_if_skip(sample)
    _require(isinstance(sample, dict) and isinstance(sample.get("conversations"), list)
             and sample["conversations"], f"sample {n}: needs a non-empty 'conversations' list")
    names = sample.get("image")
    names = [] if names is None else [names] if isinstance(names, str) else names
    _require(isinstance(names, list) and all(isinstance(x, str) for x in names), f"sample {n}: bad 'image'")
    turns = []
    for t in sample["conversations"]:
      _require(isinstance(t, dict) and t.get("from") in _LLAVA_ROLES and isinstance(t.get("value"), str),
               f"sample {n}: turn {t!r:.80}")
      _require(bool(t["value"].strip()), f"sample {n}: empty turn", "empty_text")
      turns.append({"role": _LLAVA_ROLES[t["from"]], "content": t["value"]})
    _require(any(t["role"] == "assistant" for t in turns), f"sample {n}: no assistant turn")
    placeholders = sum(t["content"].count(schema.IMAGE_PLACEHOLDER) for t in turns)
    _require(placeholders == len(names), f"sample {n}: {placeholders} placeholders, {len(names)} images",
             "image_count_mismatch")
    images = self._images(root, names)
    rid = f"{stem}/{sample.get('id', n)}"
    return {"id": rid, "kind": "conversation", "images": images, "turns": turns,
            "meta": _meta(source=stem, index=n, images=names)}


class TextCorpus(_FilesBuilder):
  """Text-only records from JSONL: {"text"} documents or {"question", "answer"} pairs."""

  def _generate_examples(self, path: str):
    stem = self._stem(path)
    yield from self._convert_all(((f"{path}:{n}", (n, obj)) for n, obj in _jsonl(path)),
                                 lambda item: self._convert(stem, *item))

  def _convert(self, stem, n, obj):
    obj = _raise_if_skip(obj)
    _require(isinstance(obj, dict) and ("text" in obj or ("question" in obj and "answer" in obj)),
             f"line {n}: needs 'text' or 'question' and 'answer'")
    rid = f"{stem}/{obj['id']}" if "id" in obj else f"{stem}/{n:06d}"
    if "text" in obj:
      text = _text(obj["text"])
      _require(bool(text), f"line {n}", "empty_text")
      turns, meta = [{"role": "text", "content": text}], _meta(source=stem, line=n)
    else:
      q, a = _text(obj["question"]), _text(obj["answer"])
      _require(bool(q and a), f"line {n}: empty question or answer", "empty_text")
      turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
      meta = _meta(source=stem, line=n, answer=a)
    return {"id": rid, "kind": "text", "images": [], "turns": turns, "meta": meta}


FILE_KINDS = {"captions": ImageCaptions, "interleaved": Interleaved, "conversations": Conversations,
              "text": TextCorpus}


def files_config(kind: str, path: Union[str, Mapping[str, str]], image_root: Optional[str] = None,
                 data_root_only: bool = False) -> FilesConfig:
  """A config named after the first file's stem and a digest of the files' contents."""
  if kind not in FILE_KINDS:
    raise ValueError(f"unknown kind {kind!r}; known: {sorted(FILE_KINDS)}")
  paths = {"train": path} if isinstance(path, (str, os.PathLike)) else dict(path)
  paths = {split: os.path.abspath(os.fspath(p)) for split, p in paths.items()}
  digest = hashlib.blake2b(digest_size=5)
  spec = [kind, sorted(paths.items()), image_root and os.path.abspath(image_root)]
  digest.update(json.dumps(spec + [True] if data_root_only else spec).encode())  # old names unchanged
  for _, p in sorted(paths.items()):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"{kind} source {p} does not exist")
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(next(iter(paths.values()))).lower()).strip("_")
  return FilesConfig(name=f"{stem}_{digest.hexdigest()}", version=VERSION,
                     description=f"{kind} from {json.dumps(paths)}", paths=paths,
                     image_root=image_root and os.path.abspath(image_root), data_root_only=bool(data_root_only))


def build_from_files(kind: str, path: Union[str, Mapping[str, str]], data_dir: str,
                     image_root: Optional[str] = None, data_root_only: bool = False) -> tfds.core.DatasetBuilder:
  """Prepares (or reuses) a data set from local files of one format (FILE_KINDS); returns its builder.

  A data set prepared earlier from the same annotation files is reused unless an image it
  read changed since (then it is rebuilt: a fixed image must not stay skipped).
  data_root_only: skip (count as `outside_data_root`) records whose image paths are absolute
  or leave the data root (image_root, else the annotation file's folder): for third-party
  annotation files.
  """
  config = files_config(kind, path, image_root, data_root_only)  # checks kind
  return _prepare_or_reuse(lambda: FILE_KINDS[kind](config=config, data_dir=data_dir), "same annotation files")


def _prepare_or_reuse(make_builder, same: str) -> tfds.core.DatasetBuilder:
  """make_builder(), prepared: reused when prepared already and no image it read changed since,
  else (re)built."""
  builder = make_builder()
  if builder.is_prepared():
    changed = _changed_inputs(builder.data_dir)
    if not changed:
      log.info("%s: reusing the data set prepared in %s (%s, images unchanged); "
               "delete that folder to rebuild it", builder.info.full_name, builder.data_dir, same)
      return builder
    log.warning("%s: %d image(s) changed since it was prepared (e.g. %s): rebuilding %s",
                builder.info.full_name, len(changed), changed[0], builder.data_dir)
    shutil.rmtree(os.fspath(builder.data_dir))
    builder = make_builder()
  builder.download_and_prepare()
  return builder


def _changed_inputs(prepared_dir) -> list:
  """The image files whose size or mtime (or existence) differs from what the build read."""
  inputs = read_beside(prepared_dir, INPUTS_FILE)  # {} when built before inputs were recorded
  return [p for p, stat in inputs.items() if _file_stat(p) != stat]


def skipped_counts(builder: tfds.core.DatasetBuilder) -> dict:
  """{reason: count} of the records skipped while preparing `builder` ({} when none)."""
  return read_beside(builder.data_dir)


def skipped_examples(builder: tfds.core.DatasetBuilder) -> dict:
  """{reason: ["where: detail", ...]}: the first few records skipped per reason, with their
  file and line (or annotation / sample index)."""
  return read_beside(builder.data_dir, EXAMPLES_FILE)


# --- Image folders: labelled images for classification -------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """An image folder's class names and, per split, its images (path relative to root, label)."""
  root: str = ""
  class_names: tuple = ()
  files: Mapping[str, tuple] = dataclasses.field(default_factory=dict, repr=False)  # split -> ((path, label),)


def _class_files(folder: str) -> dict:
  """{class name: sorted image file names} of folder/<class>/*; an empty class folder is an error."""
  classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
  if not classes:
    raise ValueError(f"image folder {folder!r} has no class sub-folders (expected {folder}/<class name>/*.jpg|png)")
  out = {}
  for c in classes:
    names = sorted(f for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
      raise ValueError(f"class folder {os.path.join(folder, c)!r} is empty: it has no .jpg / .png image")
    out[c] = names
  return out


def _split_by_seed(root: str, files: dict, validation_fraction: float, test_fraction: float, seed: int) -> dict:
  """{split: {class: file names}}: each class's files shuffled by `seed`, cut into validation / test / train."""
  if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1):
    raise ValueError(f"validation_fraction {validation_fraction} and test_fraction {test_fraction} must be in "
                     f"[0, 1) and sum below 1")
  rng = np.random.default_rng([seed, 7])
  parts = {"train": {}, "validation": {}, "test": {}}
  for c, names in files.items():
    order = [names[i] for i in rng.permutation(len(names))]
    n_val, n_test = int(round(validation_fraction * len(order))), int(round(test_fraction * len(order)))
    if len(order) - n_val - n_test < 1 or (validation_fraction > 0 and n_val < 1):
      raise ValueError(f"class {c!r} of {root!r} has {len(names)} image(s): too few to split into train / validation"
                       f" / test ({validation_fraction:.0%} / {test_fraction:.0%}); add images or use split folders "
                       f"({root}/train/<class>/..., {root}/val/<class>/...)")
    parts["validation"][c], parts["test"][c] = order[:n_val], order[n_val:n_val + n_test]
    parts["train"][c] = order[n_val + n_test:]
  return {s: p for s, p in parts.items() if any(p.values())}


def image_folder_config(root: str, validation_fraction: float = 0.2, test_fraction: float = 0.2,
                        seed: int = 0) -> ImageFolderConfig:
  """The splits of an image folder (layouts: `build_image_folder`), named after the folder and a
  digest of the assignment (a file added or a split changed is another data set)."""
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist")
  subdirs = set(os.listdir(root))
  found = {split: next((d for d in names if d in subdirs), None) for split, names in SPLIT_DIRS.items()}
  if found["train"]:
    if not found["validation"]:
      raise ValueError(f"{root!r} has a train/ folder but no validation/ (or val/) folder")
    dirs = {s: d for s, d in found.items() if d}
    per_split = {s: _class_files(os.path.join(root, d)) for s, d in dirs.items()}
    class_names = tuple(per_split["train"])
    for s, files in per_split.items():
      if tuple(files) != class_names:
        raise ValueError(f"the class names of {s!r} differ from train's: "
                         f"{sorted(set(files) ^ set(class_names))[:5]} are in only one of them")
  else:
    files = _class_files(root)
    class_names = tuple(files)
    dirs = {s: "" for s in SPLIT_DIRS}
    per_split = _split_by_seed(root, files, validation_fraction, test_fraction, seed)
  assignment = {s: tuple((os.path.join(dirs[s], c, name), label) for label, c in enumerate(class_names)
                         for name in per_split[s][c]) for s in per_split}
  spec = {"root": root, "class_names": list(class_names), "files": assignment}
  digest = hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=5).hexdigest()
  stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_") or "images"
  return ImageFolderConfig(name=f"{stem}_{digest}", version=VERSION,
                           description=f"image folder {root}: {len(class_names)} classes, splits "
                                       + json.dumps({s: len(f) for s, f in assignment.items()}),
                           root=root, class_names=class_names, files=assignment)


class ImageFolder(Builder):
  """Labelled images, one record per image: kind "caption", the caption "a photo of a <class>."
  (as the shapes world's `classes` task), meta {"label", "class_name", "file"}."""

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not cfg or not getattr(cfg, "files", None):
      raise ValueError(f"{self.name}: no image folder; use build_image_folder(root, data_dir)")
    return {split: self._nonempty(split, cfg.root, self._generate_examples(split, files))
            for split, files in cfg.files.items()}

  def _generate_examples(self, split: str, files):
    root = self.builder_config.root
    yield from self._convert_all(((os.path.join(root, rel), (rel, label)) for rel, label in files),
                                 lambda item: self._convert(split, *item))

  def _convert(self, split: str, rel: str, label: int) -> dict:
    path = os.path.join(self.builder_config.root, rel)
    self._inputs[path] = _file_stat(path)
    name = self.builder_config.class_names[label]
    return {"id": f"{split}/{rel}", "kind": "caption", "images": [_load_image(path)],
            "turns": [{"role": "user", "content": schema.IMAGE_PLACEHOLDER},
                      {"role": "assistant", "content": f"a photo of a {name.replace('_', ' ')}."}],
            "meta": _meta(label=label, class_name=name, file=rel)}


def build_image_folder(root: str, data_dir: Optional[str] = None, validation_fraction: float = 0.2,
                       test_fraction: float = 0.2, seed: int = 0) -> ImageFolder:
  """Prepares (or reuses) an image folder as a data set; returns its builder (class names:
  `builder.builder_config.class_names`, a record's label in its meta).

  Layouts:
    root/<class>/*.jpg|png         each class's images cut by `seed` into validation / test
                                   fractions, the rest train
    root/train/<class>/*           explicit splits (validation may be named val/; test/ optional);
    root/validation/<class>/*      every split with the same class names
  An empty class folder, split folders with different classes, or a class too small to split
  is an error; an unreadable image is skipped and counted (`skipped_counts`: bad_image).
  data_dir: where TFDS keeps prepared data sets (None: its default, ~/tensorflow_datasets).
  """
  config = image_folder_config(root, validation_fraction, test_fraction, seed)
  return _prepare_or_reuse(lambda: ImageFolder(config=config, data_dir=data_dir), "same image files")
