"""`make bench`: every speed claim of the README in one run, one table, one JSON file.

    .venv/bin/python benchmarks/bench.py                            # the README's scale (long)
    .venv/bin/python benchmarks/bench.py --quick                    # tiny models, a minute or two
    .venv/bin/python benchmarks/bench.py --only generate,soups --out /tmp/bench.json

Sections, each the named script's own functions at the scale below (`--quick`: tiny):
  train      benchmarks/train_step.py   the train loop's jitted step vs transformers + AdamW
  forward    benchmarks/models.py       forward tokens/s vs transformers
  generate   benchmarks/models.py       greedy decoding at batch 1, 8 and 32 vs hf.generate
  scoring    benchmarks/scoring.py      perplexity scoring samples/s vs transformers
  pruning    benchmarks/sparsity.py     Wanda calibration + pruning vs the PyTorch reference
  soups      benchmarks/soups.py        a streamed uniform soup's GB/s vs memcpy
  checkpoint benchmarks/checkpoint_read.py  Orbax and safetensors reads' GB/s vs memcpy
Each row gives vlm_jax's number, the reference's, and their ratio (> 1: vlm_jax is faster
or, for bandwidth, the share of memcpy reached). The float32 2048² jitted matmul peak is
measured at the start and the end (the higher median is printed). On a shared machine,
compare ratios (both sides of a row run interleaved in one process), not absolute numbers.
"""

import _common  # first: the environment, the repo root on sys.path

import argparse
import json
import os
import tempfile
import time

SECTIONS = ("train", "forward", "generate", "scoring", "pruning", "soups", "checkpoint")

# Each section's arguments to its script: (full scale, --quick scale).
SCALES = {
    "train": (["--sizes", "tiny,small"], ["--sizes", "tiny", "--batch", "2", "--seq", "64", "--steps", "2",
                                          "--pause", "0", "--peak-repeats", "2"]),
    "models": (["--sizes", "small", "--gen-batches", "1,8,32"],
               ["--sizes", "tiny", "--batch", "2", "--seq", "48", "--gen-batches", "1,2", "--prompt-len", "8",
                "--new-tokens", "4", "--repeats", "1", "--gen-repeats", "1"]),
    "scoring": (["--model", "small", "--records", "32", "--batch", "8", "--seq", "320", "--repeats", "2"],
                ["--model", "tiny", "--records", "8", "--batch", "8", "--repeats", "1"]),
    "pruning": (dict(hidden=512, layers=4, vocab=8000, samples=32, seq=128),
                dict(hidden=128, layers=2, vocab=512, samples=8, seq=32)),
    "soups": (["--k", "4"], ["--k", "2", "--vocab", "512", "--width", "128", "--layers", "2", "--repeats", "1"]),
    "checkpoint": ([], ["--vocab", "512", "--width", "128", "--layers", "2", "--repeats", "2"]),
}


def row(section: str, name: str, unit: str, ours: float, reference: float, ref_name: str, ratio: float,
        note: str = "") -> dict:
  return dict(section=section, row=name, unit=unit, vlm_jax=ours, reference=reference, reference_name=ref_name,
              ratio=ratio, note=note)


# --------------------------------------------------------------------------- sections


def train_rows(quick: bool) -> list[dict]:
  import train_step
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    train_step.main(_argv("train", quick) + ["--json", f.name])
    results = json.load(f)["results"]
  return [row("train", f"{r['model']} {r['batch']}", "tok/s", r["jax_tok_s"], r["torch_tok_s"],
              "transformers + AdamW", r["ratio"],
              f"MFU {100 * r['jax_mfu_xla']:.0f}%/{100 * r['torch_mfu_xla']:.0f}%, |Δloss| {r['dloss_last']:.0e}, "
              f"compile {r['compile_s']:.0f}s") for r in results]


def model_rows(quick: bool, which: set) -> list[dict]:
  import models
  no_generate = [] if "generate" in which else ["--new-tokens", "0"]
  out = models.run(models.parse_args(_argv("models", quick) + no_generate))
  rows = []
  for r in out["results"]:
    section = r["task"].split()[0]
    if section not in which:
      continue
    ref = "hf.generate" if section == "generate" else "transformers"
    rows.append(row(section, f"{r['model']} {r['task'].split(' ', 1)[1]}", "tok/s", r["jax_tok_s"],
                    r["torch_tok_s"], ref, r["ratio"], f"{r['check']}, compile {r['jax_compile_s']:.1f}s"))
  return rows


def scoring_rows(quick: bool) -> list[dict]:
  import scoring
  result = scoring.main(_argv("scoring", quick))
  by_side = {r["side"]: r for r in result["rows"]}
  ours, ref = by_side["vlm_jax model"], by_side["torch model"]
  return [row("scoring", f"{result['model']} {result['records']} records", "samples/s", ours["samples_s"],
              ref["samples_s"], "transformers", ours["samples_s"] / ref["samples_s"],
              f"PPL rel. diff {result['max_rel_ppl_diff']:.0e}")]


def pruning_rows(quick: bool) -> list[dict]:
  import sparsity
  settings = argparse.Namespace(**SCALES["pruning"][quick], batch=8, steps=5)
  with tempfile.TemporaryDirectory() as folder:
    sparsity.llama(settings).save_pretrained(folder)
    results = sparsity.bench_pruning(settings, folder)
  return [row("pruning", f"wanda {r['wanda']}, LLaMA {settings.layers}x{settings.hidden}", "s",
              r["vlm_jax warm s"], r["torch reference s"], "PyTorch reference", r["speed-up (warm)"],
              f"cold {r['vlm_jax cold s']:.1f}s, masks differ {r['mask entries differing']}") for r in results]


def soup_rows(quick: bool) -> list[dict]:
  import soups
  result = soups.measure(soups.parse_args(_argv("soups", quick)))
  copy = result["rows"][0]
  return [row("soups", r["measure"], "GB/s", r["GB/s"], copy["GB/s"], "memcpy", r["of_memcpy"])
          for r in result["rows"][1:]]


def checkpoint_rows(quick: bool) -> list[dict]:
  import checkpoint_read
  result = checkpoint_read.measure(checkpoint_read.parse_args(_argv("checkpoint", quick)))
  copy = result["rows"][0]
  return [row("checkpoint", r["measure"], "GB/s", r["GB/s"], copy["GB/s"], "memcpy", r["of_memcpy"],
              f"{result['gb']:.2f} GB") for r in result["rows"][1:]]


def _argv(section: str, quick: bool) -> list[str]:
  return list(SCALES[section][quick])


# --------------------------------------------------------------------------- driver


def table(rows: list[dict]) -> str:
  body = [[r["section"], r["row"], r["reference_name"], f"{_num(r['vlm_jax'])} {r['unit']}",
           f"{_num(r['reference'])} {r['unit']}", _ratio(r), r["note"]] for r in rows]
  return _common.text_table(["section", "row", "against", "vlm_jax", "reference", "ratio", "notes"], body, left=3)


def _ratio(r: dict) -> str:
  """A share of memcpy as a percentage, a speed ratio as a factor."""
  return f"{100 * r['ratio']:.0f}%" if r["reference_name"] == "memcpy" else f"{r['ratio']:.2f}x"


def _num(x: float) -> str:
  return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def parse_args(argv=None):
  p = _common.parser(__doc__)
  p.add_argument("--quick", action="store_true", help="tiny models and few repeats: a smoke run")
  p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
  p.add_argument("--out", default=os.path.join(_common.ROOT, "benchmarks", "results.json"),
                 help="where the JSON goes (default benchmarks/results.json)")
  args = p.parse_args(argv)
  args.only = [s for s in args.only.split(",") if s]
  unknown = sorted(set(args.only) - set(SECTIONS))
  if unknown or not args.only:
    p.error(f"unknown section(s) {unknown} in --only; choose from {', '.join(SECTIONS)}")
  return args


def run(args) -> dict:
  import jax  # after _common: the scripts' environment is set
  which, rows, seconds = set(args.only), [], {}
  matmul = _common.jax_matmul()
  repeats = 3 if args.quick else 10
  peaks = [_common.matmul_peak(matmul, repeats=repeats)]
  print(f"peak float32 matmul 2048² (jitted JAX, median of {repeats}): {peaks[0] / 1e9:.0f} GFLOP/s", flush=True)
  steps = [("train", train_rows), ("scoring", scoring_rows), ("pruning", pruning_rows), ("soups", soup_rows),
           ("checkpoint", checkpoint_rows)]
  if which & {"forward", "generate"}:
    steps.insert(1, ("forward/generate", lambda quick: model_rows(quick, which)))
  for name, fn in steps:
    if name in which or name == "forward/generate":
      print(f"\n=== {name}", flush=True)
      start = time.perf_counter()
      rows.extend(fn(args.quick))
      seconds[name] = time.perf_counter() - start
  peaks.append(_common.matmul_peak(matmul, repeats=repeats))
  info = dict(_common.machine_info(jax), peak_flops=max(peaks), peaks=peaks, load_avg_end=os.getloadavg()[0])
  return dict(quick=args.quick, sections=args.only, info=info, seconds=seconds, rows=rows)


def main(argv=None):
  args = parse_args(argv)
  result = run(args)
  info = result["info"]
  print()
  print(table(result["rows"]))
  print(f"\nfloat32, CPU; peak float32 matmul 2048² (jitted JAX, median; higher of start and end): "
        f"{info['peak_flops'] / 1e9:.0f} GFLOP/s; {_common.describe(info)}; 1-min load average at the end "
        f"{info['load_avg_end']:.1f}. ratio: vlm_jax ÷ reference for rates (> 1: faster), reference ÷ vlm_jax "
        f"for seconds; for GB/s, the share of memcpy. Section seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()) + ".")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
