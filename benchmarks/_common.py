"""What the benchmark scripts share: a quiet, offline environment and the repo root on
sys.path (set once, on import), and the timing, peak-FLOPs, machine and table helpers.

Each script imports it first (`import _common`: a script's own folder is on sys.path),
so the environment is in place before jax, TF or transformers read it. It imports
nothing heavy itself: `--help` stays fast, and a script may still set JAX's
environment after importing it (soups.py pins JAX_PLATFORMS).
"""

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Sequence

# No TF / transformers chatter or progress bars in the tables, no network, and no
# tokenizer threads competing with the measured ones; a variable already set wins.
for _name, _value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_OFFLINE", "1"),
                      ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TF_CPP_MIN_LOG_LEVEL", "3"),
                      ("TOKENIZERS_PARALLELISM", "false")):
  os.environ.setdefault(_name, _value)
warnings.filterwarnings("ignore")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # vlm_jax, configs and tests import without installing anything
  sys.path.insert(0, ROOT)

from launch.local import hugepage_env  # noqa: E402  (the root is on sys.path just above)

# A benchmark script run as a program restarts once under glibc's hugepage malloc (glibc reads
# GLIBC_TUNABLES only at start-up), as the launcher runs jobs; both sides of a comparison get it.
# `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` measures with small pages. Importing (tests) restarts nothing.
if os.path.dirname(os.path.abspath(sys.argv[0])) == os.path.dirname(os.path.abspath(__file__)) and \
    "hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], hugepage_env(os.environ))


def parser(doc: str) -> argparse.ArgumentParser:
  """A parser whose --help shows the script's docstring: its first paragraph, then all of it."""
  return argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  """(result, wall seconds) of one call of `fn`, which waits for its own result."""
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def run_timed(fns: Sequence[Callable[[], Any]], repeats: int, warmup: int = 0, pause: float = 0.0,
              order: str = "interleave", budget_s: float = float("inf")) -> tuple[list[list[float]], list[Any]]:
  """(wall seconds of every call, warm-up calls first; last result) of each of `fns`,
  each called `warmup` + `repeats` times. A function waits for its own result.

  `interleave` calls a, b, a, b, ... so that a load change on this shared machine hits
  every side alike (`blocks`: all calls of a, then of b). `pause` s of sleep before each
  call lets a runtime's spin-waiting threads settle before the next call starts. After
  `budget_s` s of timed calls no new round starts (one always runs): a loaded machine
  then makes the run less precise, not longer.
  """
  if order not in ("interleave", "blocks"):
    raise ValueError(f"order must be 'interleave' or 'blocks', got {order!r}")
  times, last = [[] for _ in fns], [None] * len(fns)
  groups = [range(len(fns))] if order == "interleave" else [[i] for i in range(len(fns))]
  for group in groups:
    for r in range(warmup + repeats):
      if r == warmup:
        start = time.perf_counter()
      elif r > warmup and time.perf_counter() - start > budget_s:
        break
      for i in group:
        if pause:
          time.sleep(pause)
        last[i], dt = timed(fns[i])
        times[i].append(dt)
  return times, last


def timed_pair(fn_a, fn_b, repeats: int, budget_s: float = float("inf")) -> list[tuple]:
  """Of each function: (first-call s, median s of the timed calls, last result, timed calls),
  the first calls untimed by the median (compilation), the timed ones interleaved a, b, a, b, ..."""
  times, last = run_timed((fn_a, fn_b), repeats, warmup=1, budget_s=budget_s)
  return [(t[0], statistics.median(t[1:]), out, len(t) - 1) for t, out in zip(times, last)]


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> float:
  """Median wall seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
  times, _ = run_timed([fn], repeats, warmup)
  return statistics.median(times[0][warmup:])


def jax_matmul(n: int = 2048) -> Callable[[], Any]:
  """One jitted float32 n x n JAX matmul, waited on: the usual MFU denominator."""
  import jax  # here, so that importing this module leaves jax's environment open
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  return lambda: mm(a, b).block_until_ready()


def matmul_peak(matmul: Callable[[], Any], n: int = 2048, repeats: int = 10,
                stat: Callable[[list[float]], float] = statistics.median) -> float:
  """FLOP/s of `matmul` (one n x n x n product): `stat` of `repeats` timed calls after one
  untimed. `min` gives the fastest run, which on a shared machine measures the hardware
  rather than the load; the median is steadier."""
  times, _ = run_timed([matmul], repeats, warmup=1)
  return 2.0 * n ** 3 / stat(times[0][1:])


# --------------------------------------------------------------------------- machine


def machine_info(*libraries) -> dict:
  """Versions of the given modules (torch's thread count with torch), CPUs, Python and
  XLA_FLAGS: what a result depends on, for the printed header and the JSON."""
  info = {lib.__name__: lib.__version__ for lib in libraries}
  for lib in libraries:
    if lib.__name__ == "torch":
      info["torch_threads"] = lib.get_num_threads()
  info.update(cpu_count=os.cpu_count(), machine=platform.machine(),
              processor=platform.processor() or platform.machine(), python=platform.python_version(),
              xla_flags=os.environ.get("XLA_FLAGS", ""), malloc=malloc_pages())
  return info


def malloc_pages() -> str:
  """Which pages glibc's malloc uses: `hugepages (THP madvise)` when GLIBC_TUNABLES asks for them
  and the kernel grants them, else `4 KiB pages` with the reason."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      thp = f.read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    thp = "unknown"
  if "glibc.malloc.hugetlb=0" in tunables or "hugetlb" not in tunables:
    return f"4 KiB pages (GLIBC_TUNABLES={tunables!r}, THP {thp})"
  if thp == "never" or platform.libc_ver()[0] != "glibc":
    return f"4 KiB pages (THP {thp}, libc {platform.libc_ver()[0] or 'unknown'})"
  return f"hugepages (GLIBC_TUNABLES={tunables!r}, THP {thp})"


def describe(info: dict) -> str:
  """One line of `machine_info`: `jax 0.10.2 | torch 2.13.0 (2 threads) | 2 CPUs (x86_64) | XLA_FLAGS=''`."""
  parts = [f"{name} {info[name]}" + (f" ({info['torch_threads']} threads)" if name == "torch" else "")
           for name in ("jax", "torch", "transformers") if name in info]
  parts.append(f"{info['cpu_count']} CPUs ({info['processor']})")
  if "jax" in info:
    parts.append(f"XLA_FLAGS={info['xla_flags']!r}")
  if "malloc" in info:
    parts.append(f"malloc: {info['malloc']}")
  return " | ".join(parts)


# --------------------------------------------------------------------------- tables


def fmt_params(n: int) -> str:
  return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def text_table(head: Sequence[str], body: Sequence[Sequence[str]], left: int = 3) -> str:
  """Cells padded to their column's widest: the first `left` columns (names) left-aligned,
  the rest (numbers) right-aligned."""
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
  line = lambda cells: "  ".join(c.ljust(w) if i < left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)])
