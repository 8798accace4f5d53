"""Pruning and sparse-training speed, CPU float32: vlm_jax vs the PyTorch reference procedure.

    .venv/bin/python benchmarks/sparsity.py                 # LLaMA 4 x 512 (vocab 8000), 32 x 128 calibration tokens
    .venv/bin/python benchmarks/sparsity.py --hidden 768 --layers 6 --samples 64

1. Wanda calibration + pruning (50% unstructured and 2:4) of one transformers LLaMA with
   random weights and fixed calibration tokens: `vlm_jax.sparsity.prune` (layer by layer,
   jitted; the first call includes compilation, the second is warm) next to the independent
   PyTorch implementation of the reference procedure in tests/sparsity_reference.py (batch 1
   per sample, as the reference). The masks are compared too: identical on the test model;
   at this size a few near-equal scores can flip with float32 summation order.
2. Train-step overhead on the same model: the train loop's jitted step dense, under a 50%
   mask (masked full fine-tuning), and SparseLoRA (r = 8, α = 16) with and without
   distillation (λ = 0.1: one more forward of the dense teacher), `--batch` x `--seq` tokens,
   median of `--steps` steps after 2 warm-up steps.
"""

import _common  # first: the environment, the repo root on sys.path

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import vlm_jax
from tests import sparsity_reference as ref
from vlm_jax import sparsity
from vlm_jax.data import schema
from vlm_jax.data.synthetic import SyntheticBatches
from vlm_jax.models.build import model_config
from vlm_jax.report import print_table
from vlm_jax.sparsity import masks as masks_lib
from vlm_jax.sparsity import repair
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.config import default_config
from vlm_jax.train.extension import PLAIN
from vlm_jax.train.init_from import initial_params
from vlm_jax.train.setup import step_setup
from vlm_jax.train.step import TrainState


def llama(args) -> transformers.LlamaForCausalLM:
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4 // 8 * 8,
      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
      head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False, attn_implementation="eager")
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(config).float().eval()


def bench_pruning(args, folder: str) -> list[dict]:
  ids = ref.calibration_ids(args.samples, args.seq, args.vocab)
  batches = [{"input_ids": ids[i:i + 8].numpy(), "attention_mask": np.ones((min(8, args.samples - i), args.seq))}
             for i in range(0, args.samples, 8)]
  rows = []
  for name, pattern, n, m in (("50% unstructured", "row", 0, 0), ("2:4", "2:4", 2, 4)):
    model, params = vlm_jax.from_hf(folder)
    prune = lambda: jax.block_until_ready(sparsity.prune(model, params, method="wanda", pattern=pattern,
                                                         ratios={"lm": 0.5}, calibration=batches, progress=False))
    (_, masks), cold = _common.timed(prune)
    _, warm = _common.timed(prune)
    torch_model = transformers.LlamaForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
      want, torch_s = _common.timed(lambda: ref.reference_prune(torch_model, ids, "wanda", 0.5, n, m))
    flat = masks_lib.flat(masks)
    differ = sum(int(np.sum(~np.asarray(flat[f"layers_{k.split('.')[2]}/{short}/kernel"]).T != v.numpy()))
                 for k, v in want.items() for short in [k.split(".")[-1].replace("_proj", "")])
    total = sum(v.numel() for v in want.values())
    rows.append({"wanda": name, "vlm_jax cold s": cold, "vlm_jax warm s": warm, "torch reference s": torch_s,
                 "speed-up (warm)": torch_s / warm, "mask entries differing": f"{differ} of {total}"})
  return rows


def bench_steps(args, folder: str) -> list[dict]:
  model, params = vlm_jax.from_hf(folder)
  masks_dir = tempfile.mkdtemp()
  _, masks = sparsity.prune(model, params, method="magnitude", ratios={"lm": 0.5})
  masks_lib.save_masks(masks_dir, masks)
  host = SyntheticBatches(global_batch=args.batch, seq_len=args.seq, vocab_size=args.vocab, seed=0).batch(0)
  rows = []
  for name, mode, kd in (("dense", None, 0.0), ("masked (50%)", "masked", 0.0),
                         ("SparseLoRA", "sparse_lora", 0.0), ("SparseLoRA + KD", "sparse_lora", 0.1)):
    c = default_config()
    c.model = model_config(model)
    c.total_steps = 100
    c.init = f"hf:{folder}"
    c.optim.groups = repair.repair_groups(mode) if mode else [(".*", 1.0)]
    ext = PLAIN
    if mode:
      c.sparse = repair.sparse_config(masks_dir, mode, rank_vision=8, rank_lm=8, kd=kd)
      ext = repair.extension(c)
    s = step_setup(c, jax.devices()[:1], ext)
    # A fresh start as the train loop makes it (the step donates the state, so each run reads its own).
    start = initial_params(c.init, s.model, s.model_params, s.model_shardings, c.seed)
    if ext.initial_params:
      start = jax.device_put(ext.initial_params(start, masks, c.seed), s.param_shardings)
    trainable, _ = optim_lib.split(start, s.labels)
    state = jax.device_put(TrainState(jnp.zeros((), jnp.int32), start, s.tx.init(trainable),
                                      jax.random.key_data(jax.random.key(0))), s.shardings)
    batch = jax.device_put(schema.device_batch(host), s.batch_sharding)
    extra = (jax.device_put(masks, s.input_shardings),) if s.input_shardings is not None else ()

    def step():
      nonlocal state
      state, metrics = s.step(state, batch, *extra)
      jax.block_until_ready(metrics)

    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      median_s = _common.median_time(step, args.steps, warmup=2)
    rows.append({"train step": name, "median s": median_s, "tokens/s": args.batch * args.seq / median_s})
  for r in rows:
    r["vs dense"] = r["median s"] / rows[0]["median s"]
  return rows


def main():
  p = _common.parser(__doc__)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--vocab", type=int, default=8000)
  p.add_argument("--samples", type=int, default=32, help="calibration sequences")
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=8, help="train-step rows")
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count())
  with tempfile.TemporaryDirectory() as folder:
    llama(args).save_pretrained(folder)
    print(f"LLaMA {args.layers} x {args.hidden}, vocab {args.vocab}; {args.samples} x {args.seq} calibration tokens; "
          f"{jax.device_count()} JAX device(s); {_common.describe(_common.machine_info(jax, torch, transformers))}\n")
    print_table(bench_pruning(args, folder), "Wanda calibration + pruning (wall seconds)")
    print()
    print_table(bench_steps(args, folder), f"train step, {args.batch} x {args.seq} tokens")


if __name__ == "__main__":
  main()
