"""Reading and writing Hugging Face safetensors folders with NumPy (no torch).

Handles single files and sharded folders (`model.safetensors.index.json`);
every failure names the file it came from.
"""

import json
import os
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLES = (".bin", ".pt", ".pth", ".ckpt")  # torch.save files: unpickling them can run arbitrary code


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as asked: names the file or tensor at fault."""


def read_json(path: str) -> dict:
  """A JSON file of a checkpoint folder; a broken one is a CheckpointError naming it."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e})") from None


class TensorReader:
  """Lazy access to the tensors of a folder: `names`, `shape(name)`, `read(name)`."""

  def __init__(self, folder: str):
    if not os.path.isdir(folder):
      raise CheckpointError(f"no checkpoint folder at {folder!r}")
    index_path = os.path.join(folder, INDEX)
    if os.path.exists(index_path):
      weight_map = read_json(index_path).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} has no \"weight_map\" (not a safetensors index?)")
    elif os.path.exists(os.path.join(folder, SINGLE)):
      weight_map = None
    else:
      pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLES))
      why = (f" ({', '.join(pickles[:3])}: no safetensors; pickle files are not loaded; convert with "
             f"transformers' save_pretrained(folder, safe_serialization=True))" if pickles else "")
      raise CheckpointError(f"{folder!r} holds neither {SINGLE} nor {INDEX}{why}")
    self._files: dict[str, object] = {}
    self._where: dict[str, str] = {}
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
    for name in files:
      path = os.path.join(folder, name)
      if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path!r} named in {INDEX} is missing")
      try:
        handle = safe_open(path, framework="np")
      except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path!r} (truncated or not a safetensors file): {e}") from e
      self._files[path] = handle
      for key in handle.keys():
        self._where[key] = path

  @property
  def names(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._files[self._where[name]].get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    path = self._where[name]
    try:
      return self._files[path].get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"cannot read tensor {name!r} from {path!r} (truncated file?): {e}") from e


def write_tensors(folder: str, tensors: Iterator[tuple[str, np.ndarray]],
                  max_shard_bytes: int = 4 << 30) -> None:
  """Writes `(name, array)` pairs, sharding into several files past `max_shard_bytes`."""
  os.makedirs(folder, exist_ok=True)
  shards, current, size = [], {}, 0
  for name, array in tensors:
    array = np.asarray(array, order="C")  # (ascontiguousarray would turn a scalar 1-d)
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = array
    size += array.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(folder, SINGLE), metadata={"format": "pt"})
    return
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
    for name, array in shard.items():
      weight_map[name] = fname
      total += array.nbytes
  with open(os.path.join(folder, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
