"""Checkpoint read bandwidth: `read_params` (as `Checkpointer` saves today, into new or reused
arrays, and of an older zstd checkpoint), Orbax restore (with and without compression, with
fewer concurrent reads) and HF safetensors (memory-mapped), next to a memory copy of the same
bytes measured in the same run.

    .venv/bin/python benchmarks/checkpoint_read.py                 # ~200 MB float32 tree
    .venv/bin/python benchmarks/checkpoint_read.py --layers 16 --width 512 --repeats 5
    .venv/bin/python benchmarks/checkpoint_read.py --json /tmp/ckpt_read.json

The tree has a LLaMA-style `DecoderLM`'s parameters filled with random normal float32
(random mantissas barely compress, nor do trained weights: zstd buys little space and
costs a decompression pass). Each format is written once into a temporary directory and
read `--repeats` times from the page cache (not the disk: what soups and evaluation meet
right after training, and the part of a read the stack controls). Rows:
  memcpy                 NumPy `copyto` of the same bytes, one array per leaf, into
                         preallocated arrays (the ceiling of any read into new arrays)
  memcpy (new arrays)    `np.array(copy)` of every leaf: allocation and page faults included,
                         what every reader below also pays
  orbax ... read_params  `vlm_jax.train.checkpoint.read_params`, checksums verified: how soups,
                         pruning and evaluation read a run's parameters. "As saved today":
                         `params` raw (no zstd, no OCDBT), each array's file read straight
                         into its array, its CRC32C taken from the bytes just read; "into
                         reused arrays": `out=` the previous read's arrays, as a soup streams
                         its ingredients; "no checksum": the same item in a step without
                         checksums (the read alone); "zstd checkpoint": one written as the
                         stack did before (Orbax defaults: zstd, OCDBT), read through TensorStore
  orbax ... restore      the restore alone (no checksum pass), PyTreeCheckpointHandler options
                         as named; `concurrent_gb` is Orbax's `restore_concurrent_gb`
  checksum pass          `verify_checksums` of the params item alone (CRC32C, what new steps
                         record: the ceiling of any read that checks every byte)
  TensorStore into ...   the item's arrays (opened once, untimed) read by TensorStore
                         straight into arrays allocated once: the format's ceiling
                         without Orbax's per-read work and without new arrays
  safetensors            `safe_open(...).get_tensor` of every tensor (memory map, then a copy)
  safetensors mmap view  `np.frombuffer` views of one `mmap` of the file, each leaf copied out
  add into a float32 sum what a streamed soup does with an ingredient's bytes: `np.add` into
                         float32 sums it holds, from arrays in memory or straight from the
                         mmap views (no new arrays: no allocation, no page faults)
GB/s is the tree's bytes / median seconds; "% memcpy" divides by the first row.
"""

import _common  # first: the environment, the repo root on sys.path

import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax loads: reading is host work

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from vlm_jax.interop.safetensors_io import TensorReader, write_tensors
from vlm_jax.models import DecoderLM, LMConfig, count_params
from vlm_jax.models.params import abstract_params
from vlm_jax.train import checkpoint

DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64}


def parse_args(argv=None):
  p = _common.parser(__doc__)
  p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the LM tree (default 32000)")
  p.add_argument("--width", type=int, default=512, help="embedding width (default 512)")
  p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8: ~50M parameters, 0.2 GB)")
  p.add_argument("--mlp", type=int, default=2048, help="MLP width (default 2048)")
  p.add_argument("--repeats", type=int, default=3, help="timed reads of each format (median; default 3)")
  p.add_argument("--dir", default="", help="where to write the checkpoints (default: a temporary dir, removed)")
  p.add_argument("--json", default="", help="also write the results here")
  return p.parse_args(argv)


def random_tree(args) -> dict:
  """Random float32 parameters with the shapes of a DecoderLM (host NumPy arrays)."""
  config = LMConfig(vocab_size=args.vocab, embed_dim=args.width, num_layers=args.layers,
                    num_heads=args.width // 64, num_kv_heads=args.width // 64, head_dim=64,
                    mlp_dim=args.mlp, tie_embeddings=True)
  r = np.random.default_rng(0)
  return jax.tree.map(lambda a: r.standard_normal(a.shape, dtype=np.float32), abstract_params(DecoderLM(config)))


# --------------------------------------------------------------------------- Orbax


def save_orbax(path: str, tree, compression: bool = True, ocdbt: bool = True, zarr3: bool = False) -> None:
  """The tree as one PyTree item at `path` with the given storage options."""
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3, use_compression=compression)
  with ocp.Checkpointer(handler) as ckpt:
    ckpt.save(path, args=ocp.args.PyTreeSave(tree))


def save_old_default(workdir: str, tree) -> str:
  """The tree as the stack saved `params` before (Orbax defaults: zstd, OCDBT) in a step with
  its checksums, as `Checkpointer` seals one; returns the params item."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=checkpoint.ITEMS,
                                  options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True))
  manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(tree),
                                          train=ocp.args.StandardSave({"step": np.int32(1)}), data=ocp.args.JsonSave({})))
  manager.wait_until_finished()
  manager.close()
  checkpoint.write_checksums(os.path.join(workdir, "checkpoints", "1"))
  return os.path.join(workdir, "checkpoints", "1", "params")


def restore_orbax(path: str, concurrent_gb=None):
  """What `read_params` restores (host NumPy arrays, stored dtypes), without its checksum pass."""
  handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=concurrent_gb)
  with ocp.Checkpointer(handler) as ckpt:
    metadata = handler.metadata(epath.Path(path)).tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return ckpt.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def open_arrays(path: str) -> dict:
  """{name: opened TensorStore} of an OCDBT params item: the arrays Orbax restores, bypassing it."""
  with open(os.path.join(path, "_METADATA")) as f:
    tree = json.load(f)["tree_metadata"]
  context = ts.Context({"file_io_concurrency": {"limit": 128}})
  names = [".".join(k["key"] for k in v["key_metadata"]) for v in tree.values()]
  return {name: ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{path}/", "path": name}},
                        context=context, read=True).result() for name in names}


def read_into(stores: dict, buffers: dict) -> None:
  """Every array read by TensorStore into its preallocated buffer (all reads in flight at once)."""
  pending = [ts.array(buffers[name], copy=False, write=True).write(store) for name, store in stores.items()]
  for p in pending:
    p.result()


# --------------------------------------------------------------------------- safetensors


def flat(tree) -> dict:
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0])
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in zip(paths, leaves)}


def read_safetensors(folder: str) -> dict:
  reader = TensorReader(folder)
  return {name: reader.read(name) for name in reader.names}


def read_mmap_views(file: str, use=lambda name, view: np.array(view)) -> dict:
  """{name: `use(name, view)`} of every tensor's `np.frombuffer` view of one read-only mmap of
  the file (by default a copy; `use` must keep no reference to the view)."""
  with open(file, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  base, out = 8 + n, {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = np.dtype(DTYPES[info["dtype"]])
    start, end = info["data_offsets"]
    view = np.frombuffer(m, dtype, (end - start) // dtype.itemsize, base + start).reshape(info["shape"])
    out[name] = use(name, view)
    del view
  m.close()
  return out


# --------------------------------------------------------------------------- measure


def measure(args) -> dict:
  tree = random_tree(args)
  leaves = jax.tree.leaves(tree)
  n = count_params(tree)
  gb = sum(x.nbytes for x in leaves) / 1e9
  root = args.dir or tempfile.mkdtemp(prefix="ckpt_read_")
  info = _common.machine_info(jax)
  print(f"{n / 1e6:.1f}M float32 parameters ({gb:.3f} GB, {len(leaves)} arrays) in {root}; "
        f"{_common.describe(info)} | 1-min load average {os.getloadavg()[0]:.2f}", flush=True)
  try:
    # Writes: the stack's own (Checkpointer), then each storage variant.
    start = time.perf_counter()
    checkpoint.save_params(os.path.join(root, "stack"), tree, step=1)
    stack_item = checkpoint.params_item_dir(os.path.join(root, "stack"))
    old_item = save_old_default(os.path.join(root, "old"), tree)
    unchecked_item = os.path.join(root, "unchecked", "params")  # the same item in a step without checksums
    shutil.copytree(stack_item, unchecked_item)
    variants = {"zstd, ocdbt (Orbax default)": dict(compression=True),
                "no compression, ocdbt": dict(compression=False)}
    paths = {}
    for i, (name, kw) in enumerate(variants.items()):
      paths[name] = os.path.join(root, f"orbax_{i}")
      save_orbax(paths[name], tree, **kw)
    st = os.path.join(root, "safetensors")
    write_tensors(st, flat(tree).items(), max_shard_bytes=1 << 40)
    print(f"wrote {3 + len(variants)} checkpoints in {time.perf_counter() - start:.1f} s", flush=True)

    dst = [np.empty_like(x) for x in leaves]
    step_dir = os.path.dirname(stack_item)
    reused = checkpoint.read_params(stack_item)
    timed = {
        "memcpy (copyto, preallocated)": lambda: [np.copyto(d, x) for d, x in zip(dst, leaves)],
        "memcpy (new arrays)": lambda: [np.array(x) for x in leaves],
        "orbax as saved today, read_params": lambda: checkpoint.read_params(stack_item),
        "orbax as saved today, read_params into reused arrays": lambda: checkpoint.read_params(stack_item, out=reused),
        "orbax as saved today, read_params into reused arrays, no checksum": (
            lambda: checkpoint.read_params(unchecked_item, out=reused)),
        "orbax as saved today, restore only": lambda: restore_orbax(stack_item),
        "checksum pass (verify_checksums, CRC32C)": lambda: checkpoint.verify_checksums(step_dir, under="params"),
        "orbax zstd checkpoint (the old default), read_params": lambda: checkpoint.read_params(old_item),
    }
    for name, path in paths.items():
      timed[f"orbax {name}, restore"] = lambda path=path: restore_orbax(path)
    nc = paths["no compression, ocdbt"]
    timed["orbax no compression, ocdbt, restore, concurrent_gb=1"] = lambda: restore_orbax(nc, concurrent_gb=1)
    buffers = {name: np.empty(store.shape, store.dtype.numpy_dtype) for name, store in open_arrays(nc).items()}
    for name, path in (("zstd, ocdbt (the old default)", paths["zstd, ocdbt (Orbax default)"]),
                       ("no compression, ocdbt", nc)):
      timed[f"orbax {name}, TensorStore into preallocated arrays"] = (
          lambda stores=open_arrays(path): read_into(stores, buffers))
    timed["safetensors (safe_open, get_tensor)"] = lambda: read_safetensors(st)
    file = os.path.join(st, "model.safetensors")
    timed["safetensors mmap view, copied out"] = lambda: read_mmap_views(file)
    # What a streamed soup does with the bytes: add them into float32 sums it already holds.
    sums = {name: np.zeros_like(x) for name, x in flat(tree).items()}
    in_memory = flat(tree)
    timed["add into a float32 sum, in memory"] = lambda: [np.add(sums[k], x, out=sums[k]) for k, x in in_memory.items()]
    timed["add into a float32 sum, from safetensors mmap"] = lambda: read_mmap_views(
        file, use=lambda name, view: _none(np.add(sums[name], view, out=sums[name])))

    logging.getLogger("absl").setLevel(logging.ERROR)
    names = list(timed)
    # Each read's result is dropped at once, as a streamed soup drops an ingredient once added:
    # the allocator then sees what soups make it see (results kept alive would force fresh pages).
    times, _ = _common.run_timed([lambda fn=timed[k]: _none(fn()) for k in names], args.repeats, warmup=1)
    rows = []
    copy_s = float(np.median(times[0][1:]))
    for name, t in zip(names, times):
      s = float(np.median(t[1:]))
      rows.append({"measure": name, "seconds": s, "GB/s": gb / s, "of_memcpy": copy_s / s})
    for check in (restore_orbax(nc), checkpoint.read_params(stack_item, out=reused), checkpoint.read_params(old_item)):
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(check), leaves)), "a read differs"
    sizes = {name: _du(path) / 1e9 for name, path in [("stack (today)", stack_item), ("stack (old default)", old_item),
                                                      *paths.items()]}
    return dict(params=n, gb=gb, rows=rows, stored_gb=sizes, info=info, load_avg=os.getloadavg()[0])
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)


def _none(_) -> None:
  """Drops a result (the reference to it, so its memory goes back at once)."""


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def table(result: dict) -> str:
  body = [[r["measure"], f"{r['seconds']:.3f}", f"{r['GB/s']:.2f}", f"{100 * r['of_memcpy']:.0f}%"]
          for r in result["rows"]]
  return _common.text_table(["read", "s (median)", "GB/s", "% memcpy"], body, left=1)


def main(argv=None):
  args = parse_args(argv)
  result = measure(args)
  print()
  print(table(result))
  print(f"\n{result['gb']:.3f} GB per read, from the page cache; stored sizes (GB): "
        + ", ".join(f"{k} {v:.3f}" for k, v in result["stored_gb"].items())
        + f"; 1-min load average at the end {result['load_avg']:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(settings=vars(args), **result), f, indent=1)
    print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
