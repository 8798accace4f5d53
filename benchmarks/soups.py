"""Model-soup throughput: GB of parameters averaged per second, next to memory-copy bandwidth.

    .venv/bin/python benchmarks/soups.py                      # k=4 ingredients of ~110M float32 parameters
    .venv/bin/python benchmarks/soups.py --k 8 --repeats 3
    .venv/bin/python benchmarks/soups.py --dtype bfloat16 --json /tmp/soups.json

The ingredients have the parameter tree of a LLaMA-style `vlm_jax.models.DecoderLM`
(vocab 32000, width 768, 12 layers, MLP 2048, tied embeddings: ~110M parameters,
~0.44 GB in float32), filled with random numbers and written as Orbax checkpoints by
`vlm_jax.train.checkpoint.Checkpointer` (items params / train / data, as a training
run writes them; `params` raw, without zstd) in a temporary directory. Measured, in the same run:
  memcpy            NumPy `copyto` of one model-sized float32 array into another
                    (bytes copied per second; the copy reads and writes each byte once)
  read              `read_params(..., out=...)` of each ingredient into one set of host
                    arrays, checksums verified: the soup's own reads
  add (in memory)   `vlm_jax.soups.uniform_soup` of ingredients already in memory: the float32
                    adds and the final division only
  uniform soup      `vlm_jax.soups.uniform_soup` of the checkpoint paths: read one
                    ingredient into the arrays of the one before, add it into the float32
                    sum; the real workload
  ... zstd          the same soup of the same trees saved as the stack did before (Orbax
                    defaults: zstd, OCDBT; checksums): what older checkpoints read at
GB/s is (k x the model's stored bytes) / seconds, i.e. GB of parameters averaged per second
(for memcpy: bytes copied per second); "% memcpy" divides it by the memcpy row. The checkpoints were just written, so they are read
from the page cache, not the disk. Timings are the median of `--repeats`; on a shared
2-core machine expect +-20% (see /work/shared/ENV-NOTES.md).
"""

import _common  # first: the environment, the repo root on sys.path

import logging
import os
import shutil
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax loads: a soup is host work

import jax
import ml_dtypes
import numpy as np

from vlm_jax import report, soups
from vlm_jax.models import DecoderLM, LMConfig, count_params
from vlm_jax.models.params import abstract_params
from vlm_jax.train.checkpoint import Checkpointer, read_params

from checkpoint_read import save_old_default


def parse_args(argv=None):
  p = _common.parser(__doc__)
  p.add_argument("--k", type=int, default=4, help="number of ingredients (default 4)")
  p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the LM tree (default 32000)")
  p.add_argument("--width", type=int, default=768, help="embedding width (default 768)")
  p.add_argument("--layers", type=int, default=12, help="decoder layers (default 12)")
  p.add_argument("--mlp", type=int, default=2048, help="MLP width (default 2048)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="stored dtype of the ingredients (the soup is float32 either way)")
  p.add_argument("--repeats", type=int, default=2, help="timed repetitions of each measure (median)")
  p.add_argument("--dir", default="", help="where to write the checkpoints (default: a temporary dir, removed)")
  p.add_argument("--json", default="", help="also write the results here")
  return p.parse_args(argv)


def model_tree(args):
  """Random parameters with the shapes of a DecoderLM (host NumPy arrays)."""
  config = LMConfig(vocab_size=args.vocab, embed_dim=args.width, num_layers=args.layers,
                    num_heads=args.width // 64, num_kv_heads=args.width // 64, head_dim=64,
                    mlp_dim=args.mlp, tie_embeddings=True)
  abstract = abstract_params(DecoderLM(config))
  dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
  def make(seed):
    r = np.random.default_rng([seed, 1])
    return jax.tree.map(lambda a: r.standard_normal(a.shape, dtype=np.float32).astype(dtype, copy=False),
                        abstract)
  return make, abstract


def measure(args) -> dict:
  """The rows of the table (each with GB, seconds, GB/s and of_memcpy) and the run's settings."""
  logging.basicConfig(level=logging.WARNING)
  for noisy in ("absl", "orbax", "vlm_jax.soups"):
    logging.getLogger(noisy).setLevel(logging.ERROR)

  make, abstract = model_tree(args)
  n = count_params(abstract)
  itemsize = 2 if args.dtype == "bfloat16" else 4
  model_gb = n * itemsize / 1e9
  root = args.dir or tempfile.mkdtemp(prefix="soup_bench_")
  print(f"{args.k} ingredients of {n / 1e6:.1f}M {args.dtype} parameters ({model_gb:.3f} GB each) in {root}; "
        f"{_common.describe(_common.machine_info(jax))}", flush=True)
  try:
    # --- Ingredients as Orbax checkpoints: the stack's (Checkpointer), and as it saved them before.
    start = time.perf_counter()
    paths, old = [], []
    for i in range(args.k):
      tree = make(i)
      ckpt = Checkpointer(os.path.join(root, f"ft_{i}", "checkpoints"), keep=1, asynchronous=False)
      ckpt.save(1, tree, {"step": np.asarray(1, np.int32)}, {})
      ckpt.close()
      paths.append(os.path.join(root, f"ft_{i}"))
      old.append(os.path.join(root, f"old_{i}"))
      save_old_default(old[-1], tree)
      del tree
    write_s = time.perf_counter() - start
    print(f"wrote {2 * args.k} checkpoints in {write_s:.1f} s", flush=True)

    # --- Memory-copy bandwidth on a model-sized array.
    src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages first
    copy_s = _common.median_time(lambda: np.copyto(dst, src), max(3, args.repeats))
    copy_gb = src.nbytes / 1e9
    del src, dst

    # --- The soup.
    buffers = read_params(paths[0])
    read_s = _common.median_time(lambda: [read_params(p, out=buffers) for p in paths], args.repeats)
    del buffers
    in_memory = [soups.load(p, dtype=None) for p in paths]
    add_s = _common.median_time(lambda: soups.uniform_soup(in_memory), args.repeats)
    del in_memory
    soup_s = _common.median_time(lambda: soups.uniform_soup(paths), args.repeats)
    old_s = _common.median_time(lambda: soups.uniform_soup(old), args.repeats)

    total_gb = args.k * model_gb
    rows = [
        {"measure": "memcpy (NumPy copyto)", "GB": copy_gb, "seconds": copy_s},
        {"measure": f"read {args.k} checkpoints into one set of arrays", "GB": total_gb, "seconds": read_s},
        {"measure": f"add {args.k} (in memory, float32)", "GB": total_gb, "seconds": add_s},
        {"measure": f"uniform soup of {args.k} (streaming from Orbax)", "GB": total_gb, "seconds": soup_s},
        {"measure": f"uniform soup of {args.k}, zstd checkpoints (the old default)", "GB": total_gb,
         "seconds": old_s},
    ]
    for r in rows:
      r["GB/s"] = r["GB"] / r["seconds"]
      r["of_memcpy"] = r["GB/s"] / rows[0]["GB/s"]
    return {"k": args.k, "params": n, "dtype": args.dtype, "rows": rows, "write_seconds": write_s,
            "jax": jax.__version__, "load_avg": os.getloadavg()[0]}
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)


def main(argv=None):
  args = parse_args(argv)
  result = measure(args)
  rows = result["rows"]
  report.print_table([{"measure": r["measure"], "GB": r["GB"], "seconds": r["seconds"], "GB/s": r["GB/s"],
                       "% memcpy": 100 * r["of_memcpy"]} for r in rows],
                     f"Soup throughput: {args.k} x {result['params'] / 1e6:.1f}M {args.dtype} parameters "
                     f"(median of {args.repeats})")
  copy, read, soup, old = rows[0], rows[1], rows[3], rows[4]
  print(f"reads {read['GB/s']:.2f} GB/s next to memcpy {copy['GB/s']:.2f} GB/s in the same run: "
        f"{100 * read['of_memcpy']:.0f}% (the uniform soup {100 * soup['of_memcpy']:.0f}%, of zstd checkpoints "
        f"{100 * old['of_memcpy']:.0f}%); 1-min load average {result['load_avg']:.2f}")
  if args.json:
    report.write_json(args.json, result)
  return result

if __name__ == "__main__":
  main()
