"""Orbax checkpoints: parameters, the rest of the train state, and the data iterator.

Three items per step: `params` (alone, so a later stage or an export can read
just them), `train` (step, optimiser state, RNG) and `data` (the input
iterator's JSON state, so a resumed run sees exactly the next batch).
`params` is stored raw: no zstd, no OCDBT, so each array (each shard, when sharded)
is one file of its bytes, which `read_params` reads straight into host arrays. Float
weights barely compress (8% on random mantissas), and soups, evaluation and pruning
read `params` many times, where decompression held reads to 5-8% of memory-copy
bandwidth. `train` keeps Orbax's defaults (zstd, OCDBT): it is twice the size and
read once, on resume. Older checkpoints (zstd `params`) read as before.
A checkpoint that cannot be read (its write was cut off, a file truncated) is
moved aside to `<step>.corrupt` with one line of warning, and the newest readable one
is used; the run then saves that step again. A checkpoint whose parameter shapes
differ from the model's is not torn but another run's: that is an error
(`CheckpointMismatch`), never a silent fresh start over someone's workdir.

Bit rot: once a step is written, `checksums.json` in its directory records the CRC32C of
every file (a hardware CRC, 2-3x faster than zlib's CRC32 here, which bound verified reads;
steps written before record zlib's CRC32 and are checked with it); every read (resume,
`init=checkpoint:`, soups and pruning via `read_params`) verifies the files it reads first,
so flipped bytes of the same size are caught (`CheckpointCorrupt`) instead of restoring
silently wrong values.

A full disk: before each save the free space is checked against what the save will write
(the newest step's size, else the trees' raw size, +10%), on every process; too little is
one `CheckpointWriteFailed` naming the step, the free space and the intact steps, before a
byte is written. A write that fails anyway (the disk filled meanwhile; a quota; a file-size
limit) raises the same error, its partial directory removed (the space goes back) and Orbax's
own log records of it dropped; TensorStore may still print tracebacks of its callbacks then,
which cannot be silenced from Python. The earlier checkpoints are untouched either way.
"""

import errno
import glob
import json
import logging
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import google_crc32c
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import traverse_util

from vlm_jax.parallel.distributed import any_process

log = logging.getLogger(__name__)

ITEMS = ("params", "train", "data")
CHECKSUMS = "checksums.json"


class CheckpointCorrupt(ValueError):
  """A checkpoint file's bytes differ from what was written (its checksum in checksums.json)."""


# A recorded checksum names its algorithm: "crc32c:<hex>"; a bare "<hex>" is zlib's CRC32
# (steps written before CRC32C).
_CRC32C = "crc32c:"


class _Checksum:
  """The running checksum of one file, in the algorithm its recorded value names."""

  def __init__(self, written: str = _CRC32C):
    self.castagnoli = written.startswith(_CRC32C)
    self.value = 0

  def update(self, piece) -> None:
    """`piece`: bytes, or a uint8 array (checksummed in place)."""
    if self.castagnoli:
      self.value = google_crc32c.extend(self.value, _read_only(piece))
    else:
      self.value = zlib.crc32(piece, self.value)

  def hex(self) -> str:
    return f"{_CRC32C if self.castagnoli else ''}{self.value:08x}"


def _read_only(piece):
  """The C extension takes read-only buffers only: bytes as they are, an array through a view
  marked read-only (no copy: `bytes(piece)` copied every piece before its CRC)."""
  if isinstance(piece, bytes):
    return piece
  view = piece.view()
  view.flags.writeable = False
  return view


def _checksum(path: str, written: str = _CRC32C) -> str:
  crc = _Checksum(written)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      crc.update(chunk)
  return crc.hex()


def _files(step_dir: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, f), step_dir) for root, _, files in os.walk(step_dir)
                for f in files if f != CHECKSUMS)


def write_checksums(step_dir: str) -> None:
  """Records the CRC32C of every file of a finished step (process 0; the write is atomic)."""
  sums = {name: _checksum(os.path.join(step_dir, name)) for name in _files(step_dir)}
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(sums, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify_checksums(step_dir: str, under: str = "") -> None:
  """Raises CheckpointCorrupt naming the first file (below `under`) whose bytes changed or
  that is missing; a step without checksums (older, or still being written) passes."""
  _check_files({os.path.join(step_dir, name): crc for name, crc in _recorded_checksums(step_dir, under).items()})


def _check_files(sums: dict) -> None:
  """Raises CheckpointCorrupt at the first of `sums` ({path: checksum}) that is missing or changed."""
  for file, crc in sorted(sums.items()):
    if not os.path.exists(file):
      raise CheckpointCorrupt(f"{file} is missing (it was written with the checkpoint)")
    _check_crc(file, _checksum(file, crc), crc)


def _recorded_checksums(step_dir: str, under: str = "") -> dict:
  """{file name relative to the step: checksum} of the files below `under`; {} without checksums."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {name: crc for name, crc in json.load(f).items() if name.startswith(under)}


def _check_crc(file: str, got: str, written: str) -> None:
  if got != written:
    raise CheckpointCorrupt(f"{file} has changed since it was written (checksum {got}, "
                            f"written {written}): bit rot or an overwrite")


class CheckpointWriteFailed(OSError):
  """A checkpoint could not be written; the earlier ones are intact (see the module docstring)."""


_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How an out-of-space write reads once TensorStore has turned it into a ValueError.
_OUT_OF_SPACE_TEXT = ("RESOURCE_EXHAUSTED", "No space left", "Disk quota exceeded", "File too large")


def is_out_of_space(e: BaseException) -> bool:
  """Whether `e` (or an exception it was raised from) is a write that ran out of space."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _OUT_OF_SPACE_ERRNOS:
      return True
    if any(text in str(e) for text in _OUT_OF_SPACE_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


class _QuietOrbax(logging.Filter):
  """Drops Orbax's own log records of an out-of-space write (one per background thread, each
  with a traceback): the Checkpointer reports that failure once, as CheckpointWriteFailed. And
  its warning on every save that `params` (written without OCDBT, on purpose) has no OCDBT to merge."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "Skipping merge of OCDBT checkpoints" in record.getMessage():
      return False
    if record.levelno < logging.ERROR or not ("orbax" in record.pathname or record.name == "asyncio"):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not (any(text in record.getMessage() for text in _OUT_OF_SPACE_TEXT)
                or (exc is not None and is_out_of_space(exc)))


def _quiet_orbax() -> None:
  for name in ("absl", "asyncio"):  # Orbax logs through absl; asyncio reports its failed write tasks
    logger = logging.getLogger(name)
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
      logger.addFilter(_QuietOrbax())


def _bytes_under(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _size(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class CheckpointMismatch(ValueError):
  """The checkpoint holds another model's parameters (names or shapes differ)."""


def stored_shapes(step_dir: str) -> Optional[dict]:
  """{parameter path: shape} of a step's `params` item from its metadata; None when unreadable."""
  try:
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / "params").tree
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(tree, sep="/").items()}
  except Exception:  # noqa: BLE001 — unreadable metadata is a torn checkpoint, told by the caller
    return None


def first_difference(stored: dict, abstract: Any, partial: bool = False) -> Optional[str]:
  """The first parameter whose presence or shape differs between `stored` shapes and `abstract`
  (with `partial`, only the parameters `abstract` asks for), as a sentence; None when they agree."""
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  names = sorted(want) if partial else sorted(set(stored) | set(want))
  for name in names:
    if stored.get(name) != want.get(name):
      return (f"parameter {name!r} is {stored.get(name, 'missing')} there and "
              f"{want.get(name, 'absent')} in this config")
  return None


def set_aside(step_dir: str, reason: Exception) -> str:
  """Renames an unreadable step directory to `<step>.corrupt[.N]` (process 0); returns the new path."""
  target, n = f"{step_dir}.corrupt", 1
  while os.path.exists(target):
    target, n = f"{step_dir}.corrupt.{n}", n + 1
  if jax.process_index() == 0:
    os.rename(step_dir, target)
  log.warning("checkpoint %s is unreadable (%s: %s); moved to %s, using an older one",
              step_dir, type(reason).__name__, str(reason).splitlines()[0][:200] if str(reason) else "", target)
  return target


def _item_handlers() -> dict:
  """How each item is written: `params` without compression (see the module docstring)."""
  return {"params": ocp.PyTreeCheckpointHandler(use_compression=False, use_ocdbt=False),
          "train": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def _restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
  """Restores the `params` item onto `abstract`'s shapes, dtypes and shardings."""
  return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    self.options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                                create=True)
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=_item_handlers(), options=self.options)
    self.in_flight: Optional[int] = None  # the step being written asynchronously
    self.failed = False
    _quiet_orbax()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, params: Any, train: Any, data_state: dict, force: bool = False) -> None:
    """Saves `step` (asynchronously when configured); an error when Orbax declines (a save that
    silently did nothing loses work). The previous step is sealed with its checksums first.
    A write that fails raises CheckpointWriteFailed (now, or at the next save or close)."""
    self.wait()
    need, free = self._expected_bytes(params, train), shutil.disk_usage(self.directory).free
    if any_process(free < need):
      raise self._write_failed(step, why=f"not enough space on the disk of every process: a checkpoint of "
                                         f"this run takes about {_size(need)}")
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.PyTreeSave(params), train=ocp.args.StandardSave(train),
          data=ocp.args.JsonSave(data_state)), force=force)
    except Exception as e:  # noqa: BLE001 — reported once, with what is intact
      raise self._write_failed(step, e) from e
    if not saved:
      raise RuntimeError(f"Orbax did not save step {step} in {self.directory} (steps there: {self.steps()})")
    self.in_flight = step
    if not self.options.enable_async_checkpointing:
      self.wait()

  def _expected_bytes(self, params: Any, train: Any) -> int:
    """What the next save will write, with a 10% margin: the newest step on disk (the same run's
    trees, compressed alike), else the trees' raw size."""
    steps = self.steps()
    if steps:
      size = _bytes_under(os.path.join(self.directory, str(steps[-1])))
    else:
      size = sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves((params, train)))
    return int(1.1 * size)

  def _write_failed(self, step: int, e: Optional[Exception] = None, why: str = "") -> CheckpointWriteFailed:
    """The one error of a failed save; its partial directory is removed to give the space back."""
    self.failed = True
    if jax.process_index() == 0:
      for partial in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(partial, ignore_errors=True)
    intact = [s for s in self.steps() if s != step]
    free = shutil.disk_usage(self.directory).free
    why = why or ("the disk is full" if is_out_of_space(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    resume = (f"running the same command again resumes from step {intact[-1]}" if intact
              else "no earlier checkpoint exists, so running it again starts from step 0")
    return CheckpointWriteFailed(
        f"cannot write checkpoint step {step} to {self.directory}: {why} ({_size(free)} free now). "
        f"Intact checkpoints: {intact or 'none'}. Free some space (or lower "
        f"config.checkpoint.keep); {resume}.")

  def wait(self) -> None:
    """Waits for the writes in flight, then records the checksums of the finished steps."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 — an asynchronous write failed: reported once
      raise self._write_failed(self.in_flight, e) from e
    self.in_flight = None
    if jax.process_index() == 0:
      for step in self.steps():
        step_dir = os.path.join(self.directory, str(step))
        if not os.path.exists(os.path.join(step_dir, CHECKSUMS)):
          write_checksums(step_dir)

  def restore_latest(self, abstract_params: Any, abstract_train: Any) -> Optional[tuple[int, Any, Any, dict]]:
    """(step, params, train, data_state) of the newest readable checkpoint, or None.

    The abstract trees carry the target shardings: restoring onto another mesh works.
    Unreadable steps are set aside; another model's checkpoint raises CheckpointMismatch.
    """
    for step in reversed(self.steps()):
      step_dir = os.path.join(self.directory, str(step))
      shapes = stored_shapes(step_dir)
      difference = shapes is not None and first_difference(shapes, abstract_params)
      if difference:
        raise CheckpointMismatch(f"{self.directory} holds checkpoints of another run: {difference}")
      try:
        verify_checksums(step_dir)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=_restore_args(abstract_params), train=ocp.args.StandardRestore(abstract_train),
            data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 — any unreadable checkpoint is set aside, loudly
        set_aside(step_dir, e)
        self.manager.reload()
        continue
      return step, restored.params, restored.train, dict(restored.data)
    return None

  def move_all_aside(self) -> str:
    """Renames the whole checkpoint directory to `<dir>.old[.N]` and starts an empty one; returns the new name."""
    self.manager.close()
    target, n = f"{self.directory}.old", 1
    while os.path.exists(target):
      target, n = f"{self.directory}.old.{n}", n + 1
    if jax.process_index() == 0:
      os.rename(self.directory, target)
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=_item_handlers(), options=self.options)
    return target

  def close(self) -> None:
    """Waits for the writes in flight; after a failed write (already raised) only releases Orbax."""
    if not self.failed:
      self.wait()
    try:
      self.manager.close()
    except Exception:  # noqa: BLE001 — the failure was raised once already
      if not self.failed:
        raise


def restore_params(directory: str, abstract_params: Any, step: Optional[int] = None, partial: bool = False) -> Any:
  """Only the parameters of a run's checkpoint: how a stage starts from the last.

  The newest readable step unless `step` names one (an unreadable newer step is skipped
  with one line of warning; it stays where it is: it is another run's workdir).
  partial: restore just the subtrees `abstract_params` names (e.g. {"vision": ...}
  from a two-tower checkpoint); the checkpoint may hold more.
  A checkpoint of another model is a CheckpointMismatch naming the first differing parameter.
  """
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  manager = ocp.CheckpointManager(directory, item_names=ITEMS)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {directory!r}")
    for s in ([step] if step is not None else reversed(steps)):
      shapes = stored_shapes(os.path.join(directory, str(s)))
      difference = shapes is not None and first_difference(shapes, abstract_params, partial)
      if difference:
        raise CheckpointMismatch(f"the checkpoint {directory}/{s} does not fit this model "
                                 f"(a checkpoint of another model?): {difference}")
      try:
        verify_checksums(os.path.join(directory, str(s)), under="params")
        params = manager.restore(s, args=ocp.args.Composite(params=_params_args(abstract_params, partial))).params
      except Exception as e:  # noqa: BLE001 — an unreadable step: say so in one line, try the one before
        if step is not None or s == steps[0]:
          raise ValueError(f"the checkpoint {directory}/{s} is unreadable ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
        log.warning("checkpoint %s/%d is unreadable (%s); using an older one", directory, s, type(e).__name__)
        continue
      if partial:  # Orbax leaves what it did not find abstract, and does not check shapes
        _check_restored(params, abstract_params, f"{directory}/{s}")
      return params
  finally:
    manager.close()


def _params_args(abstract_params: Any, partial: bool):
  if partial:
    return ocp.args.PyTreeRestore(abstract_params, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params))
  return ocp.args.StandardRestore(abstract_params)


def _check_restored(params: Any, abstract_params: Any, source: str) -> None:
  missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"the checkpoint {source} has no parameter {missing[0]} (a checkpoint of another model?)")
  check_same_shapes(params, abstract_params, f"the checkpoint {source}")


def check_same_shapes(params, abstract, source: str) -> None:
  """Raises a ValueError naming the first parameter `params` lacks, adds or shapes otherwise than `abstract`."""
  got = traverse_util.flatten_dict(params, sep="/")
  want = traverse_util.flatten_dict(abstract, sep="/")
  for name in sorted(set(got) | set(want)):
    if name not in got or name not in want or got[name].shape != want[name].shape:
      raise ValueError(f"{source} does not fit config.model: parameter {name!r} is "
                       f"{got[name].shape if name in got else 'missing'} there and "
                       f"{want[name].shape if name in want else 'absent'} in the config")


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with shardings: what Orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def params_item_dir(path: str, step: Optional[int] = None) -> str:
  """The `params` item directory under a run dir, a manager dir, a step dir or the item dir itself.

  The latest step unless `step` names one; errors name the path and the steps there.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no such directory {path!r}")
  if os.path.isdir(os.path.join(path, "checkpoints")):  # a run's workdir
    path = os.path.join(path, "checkpoints")
  if os.path.exists(os.path.join(path, "_METADATA")) or os.path.exists(os.path.join(path, "manifest.ocdbt")):
    if step is not None:
      raise ValueError(f"{path!r} is a single checkpoint item; it has no steps")
    return path  # a params item dir itself
  if os.path.isdir(os.path.join(path, "params")) and step is None:
    return os.path.join(path, "params")  # one step dir
  manager = ocp.CheckpointManager(path, item_names=ITEMS)
  try:
    steps = sorted(manager.all_steps())
  finally:
    manager.close()
  if not steps:
    raise FileNotFoundError(f"no Orbax checkpoint in {path!r}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no step {step} in {path!r} (steps: {steps})")
  item = os.path.join(path, str(step), "params")
  if not os.path.isdir(item):
    raise FileNotFoundError(f"checkpoint {path}/{step} has no 'params' item")
  return item


def read_params(path: str, step: Optional[int] = None, out: Any = None) -> Any:
  """The `params` item (see `params_item_dir`) as host NumPy arrays in their stored dtypes.

  No abstract tree needed: what averages or inspects checkpoints of any model reads this.
  Every file of the item is checked against its checksum (inside a step). An array stored raw in
  one file (how `Checkpointer` writes `params`) is read straight into its host array, its checksum
  taken from the bytes just read (one pass over the file); others (older, zstd checkpoints)
  go through TensorStore while a thread checks their files. `out`: a tree returned by an earlier
  `read_params` of the same model (same parameters, shapes and dtypes), read into in place and
  returned, so a stream of checkpoints (a soup's ingredients) allocates one model once; a
  checkpoint that does not fit it is a CheckpointMismatch before a byte is read (after any
  other error, its values are undefined).
  """
  item = params_item_dir(path, step)
  in_step = os.path.basename(item) == "params"  # inside a step: its checksums cover the item
  sums = _recorded_checksums(os.path.dirname(item), "params") if in_step else {}
  try:
    return _read_item(item, out, {os.path.join(os.path.dirname(item), name): crc for name, crc in sums.items()})
  except (CheckpointMismatch, CheckpointCorrupt):
    raise
  except Exception as e:  # noqa: BLE001 — name the checkpoint, keep the cause
    if in_step:
      verify_checksums(os.path.dirname(item), "params")  # changed bytes explain a failed read best
    raise ValueError(f"cannot read the Orbax checkpoint {item!r} ({type(e).__name__}: {e}); "
                     f"pick another step") from e


_ARRAY_TYPES = ("np.ndarray", "jax.Array")
_DICT_KEY = 2  # Orbax's key_type of a dict key (1: a sequence index)
_PIECE = 1 << 20  # bytes read, then checksummed while they are still in the cache


def _read_item(item: str, out: Any, sums: dict) -> Any:
  """The arrays of a `params` item into `out`'s leaves or new arrays, checked against `sums`
  ({file: checksum}); items with other leaves (Python scalars) or containers (lists) go through
  Orbax's own restore."""
  with open(os.path.join(item, "_METADATA")) as f:
    stored = json.load(f)
  entries = list(stored["tree_metadata"].values())
  if not all(e["value_metadata"]["value_type"] in _ARRAY_TYPES and not e["value_metadata"]["skip_deserialize"]
             and all(k["key_type"] == _DICT_KEY for k in e["key_metadata"]) for e in entries):
    with ThreadPoolExecutor(1) as pool:
      check = pool.submit(_check_files, sums)
      tree = _restore_with_orbax(item)
      check.result()
    return _into(out, tree, item)
  keys = [tuple(str(k["key"]) for k in e["key_metadata"]) for e in entries]
  context = ts.Context({"file_io_concurrency": {"limit": 128}})
  stores = [ts.open(_spec(item, ".".join(key), stored), context=context, read=True) for key in keys]
  stores = {"/".join(key): s.result() for key, s in zip(keys, stores)}
  buffers = _buffers(out, {p: (tuple(s.shape), np.dtype(s.dtype.numpy_dtype)) for p, s in stores.items()}, item)
  raw = {p: _raw_file(s) for p, s in stores.items()}
  raw = {p: file for p, file in raw.items() if file and os.path.getsize(file) == buffers[p].nbytes}
  with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as checksums:
    # the files TensorStore reads are checked meanwhile
    check = pool.submit(_check_files, {f: crc for f, crc in sums.items() if f not in raw.values()})
    for p, file in raw.items():
      _read_raw(file, buffers[p], sums.get(file), checksums)
    _read_windowed([(s, buffers[p]) for p, s in stores.items() if p not in raw])
    check.result()
  return traverse_util.unflatten_dict({key: buffers["/".join(key)] for key in keys})


def _raw_file(store: ts.TensorStore) -> Optional[str]:
  """The one file holding `store`'s array as raw C-order bytes (zarr v2, no codec, one
  chunk, little-endian), or None."""
  spec = store.spec().to_json()
  meta, kvstore = spec["metadata"], spec["kvstore"]
  if (kvstore["driver"] != "file" or spec["driver"] != "zarr" or meta.get("compressor") or meta.get("filters")
      or meta.get("order", "C") != "C" or list(meta["chunks"]) != list(meta["shape"])
      or str(meta["dtype"]).startswith(">")):
    return None
  key = meta.get("dimension_separator", ".").join("0" * len(meta["shape"])) or "0"
  file = os.path.join(kvstore["path"], key)
  return file if os.path.isfile(file) else None


def _read_raw(file: str, array: np.ndarray, crc: Optional[str], pool: ThreadPoolExecutor) -> None:
  """`file`'s bytes into `array` in pieces, each checksummed on `pool`'s thread while the
  next is read (the kernel's copy runs without the GIL, so the two overlap)."""
  view = array.reshape(-1).view(np.uint8)
  got, pending = _Checksum(crc or ""), None
  with open(file, "rb", buffering=0) as f:
    for start in range(0, len(view), _PIECE):
      piece = view[start:start + _PIECE]
      if f.readinto(piece) != len(piece):
        raise CheckpointCorrupt(f"{file} is shorter than when it was written")
      if crc is not None:
        if pending is not None:
          pending.result()  # in order: one piece at a time
        pending = pool.submit(got.update, piece)
  if pending is not None:
    pending.result()
    _check_crc(file, got.hex(), crc)


# TensorStore reads into buffers of its own, which its threads' malloc arenas keep: this many
# bytes in flight bound that transient memory well below a model (~2 models for a soup).
READ_WINDOW_BYTES = 64 << 20


def _read_windowed(reads: list) -> None:
  """Each (store, array): the store read into the array by TensorStore, with at most
  READ_WINDOW_BYTES (or one array) in flight."""
  pending, in_flight = [], 0
  for store, array in reads:
    while pending and in_flight + array.nbytes > READ_WINDOW_BYTES:
      done, size = pending.pop(0)
      done.result()
      in_flight -= size
    pending.append((ts.array(array, copy=False, write=True).write(store), array.nbytes))
    in_flight += array.nbytes
  for done, _ in pending:
    done.result()


def _spec(item: str, name: str, stored: dict) -> dict:
  driver = "zarr3" if stored.get("use_zarr3") else "zarr"
  if stored.get("use_ocdbt", True):
    return {"driver": driver, "kvstore": {"driver": "ocdbt", "base": f"file://{item}/", "path": name}}
  return {"driver": driver, "kvstore": {"driver": "file", "path": os.path.join(item, name, "")}}


def _buffers(out: Any, found: dict, item: str) -> dict:
  """{path: host array to read into}: `out`'s leaves when they fit `found` exactly, else new ones."""
  if out is None:
    return {p: np.empty(shape, dtype) for p, (shape, dtype) in found.items()}
  mine = traverse_util.flatten_dict(out, sep="/")
  for name in sorted(set(found) | set(mine)):
    have = mine.get(name)
    have = None if have is None else (tuple(have.shape), np.dtype(have.dtype))
    if have != found.get(name):
      there = "missing" if name not in found else f"{found[name][0]} {np.dtype(found[name][1]).name}"
      here = "absent" if have is None else f"{have[0]} {have[1].name}"
      raise CheckpointMismatch(f"the checkpoint {item} does not fit `out` (a checkpoint of another model?): "
                               f"parameter {name!r} is {there} there and {here} in `out`")
  for name, x in mine.items():
    if not (isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable):
      raise ValueError(f"`out` must hold writable, C-contiguous NumPy arrays (what read_params returns); "
                       f"parameter {name!r} is a {type(x).__name__}")
  return mine


def _into(out: Any, tree: Any, item: str) -> Any:
  """`tree` (read by Orbax) copied into `out` when given (the same checks as a direct read)."""
  if out is None:
    return tree
  flat = traverse_util.flatten_dict(tree, sep="/")
  buffers = _buffers(out, {p: (tuple(np.shape(x)), np.asarray(x).dtype) for p, x in flat.items()}, item)
  for p, x in flat.items():
    np.copyto(buffers[p], x)
  return out


def _restore_with_orbax(item: str) -> Any:
  handler = ocp.PyTreeCheckpointHandler()
  checkpointer = ocp.Checkpointer(handler)
  try:
    metadata = handler.metadata(epath.Path(item)).tree  # the handler's own: no step-metadata warning
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    checkpointer.close()


def save_params(directory: str, params: Any, step: int = 0) -> None:
  """Parameters alone as a training run's checkpoint `<directory>/checkpoints/<step>`.

  Items `params`, `train` (`{"step": step}`) and `data` (`{}`), so `restore_params(directory, ...)`
  and `init="checkpoint:<directory>"` start from it like from a run.
  """
  ckpt = Checkpointer(os.path.join(directory, "checkpoints"), keep=1, asynchronous=False)
  try:
    ckpt.save(step, params, {"step": np.asarray(step, np.int32)}, {}, force=True)
  finally:
    ckpt.close()  # waits for the write
