"""Train-step throughput and MFU: vlm_jax (the train loop's jitted step) vs transformers (PyTorch), float32, CPU.

    .venv/bin/python benchmarks/train_step.py                          # tiny + small, 8 x 256 tokens
    .venv/bin/python benchmarks/train_step.py --sizes small --batch 16 --steps 3
    .venv/bin/python benchmarks/train_step.py --json /tmp/train_step.json

For each VLM preset of configs/models.py (`tiny`, `small`), in one process:

- JAX: the step the train loop runs (`vlm_jax.train.setup.step_setup`: forward,
  next-token loss, backward, global-norm clipping at 1.0, AdamW, state donated)
  on one CPU device, compiled ahead of time, on a synthetic batch of `--batch`
  rows x `--seq` tokens with one image per row (its image tokens count in `--seq`).
- PyTorch: `LlavaForConditionalGeneration` loaded from `vlm_jax.to_hf` of the
  same initial parameters (identical weights), on the same batch (image tokens
  and loss mask turned into `labels`): forward with the loss, backward,
  `clip_grad_norm_(1.0)`, `torch.optim.AdamW`, `zero_grad`.
Both train every parameter at the same constant learning rate, float32, with
no weight decay; the losses of the first and last steps are compared.

Timing: per side, `--warmup` steps are excluded (the JAX compile is timed
apart), then `--steps` steps are timed and the median reported, JAX waited on
with `block_until_ready`. By default the timed steps alternate JAX, PyTorch,
JAX, ... (a load change on this shared machine then hits both sides), with a
`--pause` before each step so that neither runtime's spin-waiting threads are
still running when the other starts; `--order blocks` runs one side, then the other.

Allocation: run as a program, the script restarts under glibc's hugepage malloc
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, as `launch.local` runs jobs; both sides get it;
set `glibc.malloc.hugetlb=0` to measure with 4 KiB pages) and the header prints which is active.

MFU = model FLOPs per second / peak. The peak is the median of `--peak-repeats`
jitted float32 2048 x 2048 JAX matmuls, measured at the start and the end of
the run (the higher median is used). Model FLOPs two ways: XLA's cost analysis
of the compiled step (everything: attention, vision tower, optimiser; with
`--remat` also the recomputation), and the analytic 6 N tokens (N = all
parameters, tokens = batch x seq). Both MFU columns use the same FLOPs for both
sides, so they compare like with like.
"""

import _common  # first: the environment, the repo root on sys.path

import json
import os
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import vlm_jax
from configs import models
from vlm_jax.train.config import default_config
from vlm_jax.data import schema
from vlm_jax.data.synthetic import SyntheticBatches
from vlm_jax.models.params import count_params
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.init_from import initial_params
from vlm_jax.train.setup import step_setup
from vlm_jax.train.step import TrainState


# --------------------------------------------------------------------------- set-up


def train_config(size: str, args):
  """A train config for preset `size`: float32, every parameter trained, constant lr, no decay."""
  c = default_config()
  c.model = models.preset(size)
  c.model.text.update(dict(dtype="float32", param_dtype="float32", scan_layers=args.scan,
                           remat="full" if args.remat else "none"))
  c.model.vision.update(dict(dtype="float32", param_dtype="float32"))
  c.total_steps = 1_000_000
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  c.data = dict(source="synthetic", global_batch_size=args.batch, seq_len=args.seq, images_per_row=1)
  c.optim.update(dict(lr=args.lr, schedule="constant", warmup_frac=0.0, warmup_steps=0, weight_decay=0.0,
                      clip_norm=1.0, groups=[(".*", 1.0)]))
  return c


def torch_batch(batch: dict) -> dict:
  ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
  labels = ids.clone()
  labels[torch.from_numpy(batch["loss_mask"]) == 0] = -100  # HF shifts labels itself, as loss_mask means
  pixels = torch.from_numpy(np.ascontiguousarray(batch["images"][:, 0].transpose(0, 3, 1, 2)))
  return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.from_numpy(batch["attention_mask"]),
              labels=labels)


# --------------------------------------------------------------------------- one preset


def bench(size: str, args, folder: str) -> dict:
  config = train_config(size, args)
  s = step_setup(config, jax.devices()[:1])
  model = s.model
  if config.data.seq_len <= model.config.tokens_per_image + 2:
    raise SystemExit(f"--seq {args.seq} leaves no text after {size}'s {model.config.tokens_per_image} image tokens")
  params = initial_params("scratch", model, s.abstract_params, s.param_shardings, seed=0)
  n_params = count_params(params)
  trainable, _ = optim_lib.split(params, s.labels)
  opt_state = jax.jit(s.tx.init, out_shardings=s.shardings.opt_state)(trainable)
  state = jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, opt_state,
                                    jax.random.key_data(jax.random.key(0))), s.shardings)

  # Same weights on the PyTorch side.
  vlm_jax.to_hf(model, params, folder)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).train()
  hf_opt = torch.optim.AdamW(hf.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  del params, trainable, opt_state

  c = model.config
  host = SyntheticBatches(global_batch=args.batch, seq_len=args.seq, vocab_size=c.text.vocab_size, seed=0,
                          image_size=c.vision.image_size, tokens_per_image=c.tokens_per_image,
                          image_token_id=c.image_token_id, images_per_row=1).batch(0)
  jbatch = jax.device_put(schema.device_batch(host), s.batch_sharding)
  tbatch = torch_batch(host)

  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    t0 = time.perf_counter()
    compiled = s.step.lower(state, jbatch).compile()
    compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  xla_flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  if args.scan:  # XLA counts a loop body once: count every layer from unscanned 1- and 2-layer copies
    from launch.simulate import extrapolated_flops
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      xla_flops = extrapolated_flops(config)

  losses = ([], [])

  def jax_step():
    nonlocal state
    state, metrics = compiled(state, jbatch)
    jax.block_until_ready((state, metrics))
    losses[0].append(float(metrics["loss"]))

  def torch_step():
    loss = hf(**tbatch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    hf_opt.step()
    hf_opt.zero_grad(set_to_none=True)
    losses[1].append(float(loss.detach()))

  # Warm-up, then the timed steps: alternating sides (`interleave`, so that a load change on this
  # shared machine hits both) or all of one side, then all of the other (`blocks`). Before each
  # step the process sleeps `--pause` s, so that neither side starts while the other's thread
  # pool is still spin-waiting (both runtimes spin for a while after a step).
  all_times, _ = _common.run_timed((jax_step, torch_step), args.steps, args.warmup, args.pause, args.order)
  times = tuple(t[args.warmup:] for t in all_times)
  del hf, hf_opt, state

  tokens = args.batch * args.seq
  j_s, t_s = statistics.median(times[0]), statistics.median(times[1])
  row = dict(model=size, params=n_params, batch=f"{args.batch}x{args.seq}", tokens=tokens,
             image_tokens=c.tokens_per_image, jax_s=j_s, torch_s=t_s, jax_times=times[0], torch_times=times[1],
             jax_tok_s=tokens / j_s, torch_tok_s=tokens / t_s, ratio=t_s / j_s, compile_s=compile_s,
             xla_flops=xla_flops, flops_6nd=6.0 * n_params * tokens, jax_losses=losses[0],
             torch_losses=losses[1], dloss_first=abs(losses[0][0] - losses[1][0]),
             dloss_last=abs(losses[0][-1] - losses[1][-1]))
  print(f"  {size}: jax {row['jax_tok_s']:,.0f} tok/s ({j_s * 1e3:.0f} ms/step), torch {row['torch_tok_s']:,.0f} "
        f"tok/s ({t_s * 1e3:.0f} ms/step), ratio {row['ratio']:.2f}x; loss first {losses[0][0]:.4f}/"
        f"{losses[1][0]:.4f}, last {losses[0][-1]:.4f}/{losses[1][-1]:.4f}; compile {compile_s:.1f}s", flush=True)
  return row


# --------------------------------------------------------------------------- table


def table(rows: list[dict]) -> str:
  head = ["model", "params", "batch", "vlm_jax tok/s", "torch tok/s", "ratio", "MFU xla jax/torch",
          "MFU 6ND jax/torch", "|Δloss| 1st/last", "compile s"]
  body = [[r["model"], _common.fmt_params(r["params"]), r["batch"], f"{r['jax_tok_s']:,.0f}",
           f"{r['torch_tok_s']:,.0f}", f"{r['ratio']:.2f}x",
           f"{100 * r['jax_mfu_xla']:.1f}%/{100 * r['torch_mfu_xla']:.1f}%",
           f"{100 * r['jax_mfu_6nd']:.1f}%/{100 * r['torch_mfu_6nd']:.1f}%",
           f"{r['dloss_first']:.0e}/{r['dloss_last']:.0e}", f"{r['compile_s']:.1f}"] for r in rows]
  return _common.text_table(head, body)


def main(argv=None):
  p = _common.parser(__doc__)
  p.add_argument("--sizes", default="tiny,small", help="comma-separated VLM presets of configs/models.py")
  p.add_argument("--batch", type=int, default=8, help="rows per batch (default 8)")
  p.add_argument("--seq", type=int, default=256, help="tokens per row, image tokens included (default 256)")
  p.add_argument("--steps", type=int, default=5, help="timed steps per side; the median is reported (default 5)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (default 1)")
  p.add_argument("--order", choices=("interleave", "blocks"), default="interleave",
                 help="timed steps alternate JAX, PyTorch, ... (default) or run all of one side first")
  p.add_argument("--pause", type=float, default=0.5,
                 help="seconds to sleep before each step, so the other runtime's spinning threads settle")
  p.add_argument("--lr", type=float, default=1e-4, help="constant learning rate of both sides (default 1e-4)")
  p.add_argument("--remat", action="store_true", help="rematerialise the LM layers on the JAX side")
  p.add_argument("--scan", action="store_true", help="scan the LM layers on the JAX side")
  p.add_argument("--peak-repeats", type=int, default=10, help="timed 2048^2 matmuls per peak measurement")
  p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
  p.add_argument("--json", metavar="PATH", default=None, help="also write the results and settings as JSON")
  args = p.parse_args(argv)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  if args.steps < 1:
    p.error("--steps must be at least 1")

  t_start = time.perf_counter()
  matmul = _common.jax_matmul()
  peak = _common.matmul_peak(matmul, repeats=args.peak_repeats)
  print(f"peak float32 matmul 2048² (jitted JAX, median of {args.peak_repeats}): {peak / 1e9:.0f} GFLOP/s", flush=True)
  info = dict(_common.machine_info(jax, torch, transformers), dtype="float32", load_start=os.getloadavg()[0])
  print(_common.describe(info), flush=True)

  rows = []
  for size in [s for s in args.sizes.split(",") if s]:
    with tempfile.TemporaryDirectory() as folder:
      rows.append(bench(size, args, folder))

  peak_end = _common.matmul_peak(matmul, repeats=args.peak_repeats)
  info.update(peak_start=peak, peak_end=peak_end, load_end=os.getloadavg()[0])
  peak = max(peak, peak_end)
  info["peak_flops"] = peak
  for r in rows:
    for side in ("jax", "torch"):
      r[f"{side}_mfu_xla"] = r["xla_flops"] / r[f"{side}_s"] / peak
      r[f"{side}_mfu_6nd"] = r["flops_6nd"] / r[f"{side}_s"] / peak

  print()
  print(table(rows))
  print(f"\nfloat32, CPU, forward + backward + clip + AdamW; median of {args.steps} steps after {args.warmup} "
        f"warm-up; ratio = vlm_jax tok/s ÷ torch tok/s; MFU = model FLOPs/s ÷ peak {peak / 1e9:.0f} GFLOP/s "
        f"(jitted f32 2048² matmul, median, higher of start {info['peak_start'] / 1e9:.0f} and end "
        f"{info['peak_end'] / 1e9:.0f}); 'xla' = XLA cost analysis of the JAX step, '6ND' = 6 x params x tokens; "
        f"remat {'on' if args.remat else 'off'}, scan {'on' if args.scan else 'off'}; order {args.order}. "
        f"Load average (1 min) {info['load_start']:.1f} at the start, {info['load_end']:.1f} at the end "
        f"(on a shared machine, compare the ratio, not the absolute numbers). "
        f"Total {time.perf_counter() - t_start:.0f}s.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(settings=vars(args), info=info, results=rows), f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
