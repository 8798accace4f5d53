"""Synth²: synthesis in embedding space vs pixel space, and the VLM step on codes vs pixels.

    .venv/bin/python benchmarks/synth.py
    .venv/bin/python benchmarks/synth.py --pairs 256 --repeats 5 --json /tmp/synth.json

The models of configs/synth.py (64 px, an 8x8 grid of codes from 128), random weights.
Measured interleaved (a, b, a, b, ...) so that a load change on a shared machine favours
neither side, medians after one untimed (compiling) call:

  embedding space   captions -> code grids (MaskGIT, `generate.code_steps` steps): what
                    Synth² feeds the VLM
  pixel space       the same, then the tokenizer's decoder to pixels and its encoder back to
                    codes: the route a pixel-space generator would take to the same VLM input
  VLM step, codes   one jitted train step of the code-reading VLM, every image slot given as
                    codes (the synthetic pairs)
  VLM step, pixels  the same step with the slots as pixels through the tokenizer's encoder
                    (the real pairs)

The paper reports embedding-space synthesis ~25% faster than pixel space with its models;
here the ratio is that of these small models on this machine.
"""

import _common  # first: the environment, the repo root on sys.path

import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from configs import synth as synth_config
from vlm_jax.models import build_model, init_params
from vlm_jax.models.maskgit import CodeGenerator, generate_codes
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.config import default_config
from vlm_jax.train.setup import step_setup
from vlm_jax.train.step import TrainState


def synthesis_fns(pairs: int, steps: int, batch: int):
  model = build_model(synth_config.generator_block(512))
  params = init_params(model, jax.random.key(0))
  g = model.config.generator
  generator = CodeGenerator(g)
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.integers(1, 512, (pairs, g.max_text_len)), jnp.int32)
  mask = jnp.asarray(np.arange(g.max_text_len)[None] < rng.integers(20, 40, (pairs, 1)))
  keys = jax.random.split(jax.random.key(1), pairs)
  decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=lambda m, c: m.vq.decode(c)))
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.vq.encode(x)))

  def codes():
    out = [generate_codes(generator, params["generator"], text[i:i + batch], mask[i:i + batch], keys[i:i + batch],
                          steps=steps) for i in range(0, pairs, batch)]
    return jax.block_until_ready(out)

  def through_pixels():
    return jax.block_until_ready([encode(params, decode(params, c)) for c in codes()])

  return {"embedding space": codes, "pixel space": through_pixels}


def vlm_step_fns(batch: int, seq_len: int):
  c = default_config()
  c.model = synth_config.vlm_block()
  c.total_steps = 100
  c.mesh.data = 1
  setup = step_setup(c, jax.devices()[:1])
  model = setup.model
  params = init_params(model, jax.random.key(0))
  trainable, _ = optim_lib.split(params, setup.labels)
  state = TrainState(jnp.zeros((), jnp.int32), params, setup.tx.init(trainable),
                     jax.random.key_data(jax.random.key(0)))
  mc = model.config
  t = mc.tokens_per_image
  rng = np.random.default_rng(0)
  ids = np.concatenate([np.full((batch, t), mc.image_token_id), rng.integers(1, 500, (batch, seq_len - t))], 1)
  base = dict(input_ids=jnp.asarray(ids, jnp.int32), loss_mask=jnp.ones((batch, seq_len), jnp.float32),
              attention_mask=jnp.ones((batch, seq_len), jnp.int32),
              positions=jnp.tile(jnp.arange(seq_len, dtype=jnp.int32), (batch, 1)),
              segment_ids=jnp.ones((batch, seq_len), jnp.int32),
              images=jnp.asarray(rng.normal(size=(batch, 1, mc.vq.image_size, mc.vq.image_size, 3)), jnp.float32),
              image_codes=jnp.asarray(rng.integers(0, mc.vq.codebook_size, (batch, 1, mc.vq.num_tokens)), jnp.int32))
  batches = {"VLM step, codes": {**base, "code_given": jnp.ones((batch, 1), jnp.int32)},
             "VLM step, pixels": {**base, "code_given": jnp.zeros((batch, 1), jnp.int32)}}
  step = setup.step  # jitted, the state donated
  holder = {"state": state}

  def run(b):
    holder["state"], metrics = step(holder["state"], b)
    return jax.block_until_ready(metrics["loss"])

  return {name: (lambda b=b: run(b)) for name, b in batches.items()}


def main():
  p = _common.parser(__doc__)
  p.add_argument("--pairs", type=int, default=256, help="synthetic pairs per timed call")
  p.add_argument("--code_steps", type=int, default=8)
  p.add_argument("--batch", type=int, default=64, help="generation batch")
  p.add_argument("--vlm_batch", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", default="")
  args = p.parse_args()

  synth = synthesis_fns(args.pairs, args.code_steps, args.batch)
  vlm = vlm_step_fns(args.vlm_batch, args.seq_len)
  med = {}
  for fns in (synth, vlm):
    times, _ = _common.run_timed(list(fns.values()), args.repeats, warmup=1)
    med.update({name: statistics.median(ts[1:]) for name, ts in zip(fns, times)})
  rows = [[name, f"{med[name] * 1e3:.1f}", f"{args.pairs / med[name]:.1f} pairs/s"] for name in synth]
  rows += [[name, f"{med[name] * 1e3:.1f}", f"{args.vlm_batch / med[name]:.1f} samples/s"] for name in vlm]
  ratios = {"pixel / embedding synthesis time": med["pixel space"] / med["embedding space"],
            "VLM step pixels / codes time": med["VLM step, pixels"] / med["VLM step, codes"]}
  info = _common.machine_info(jax)
  print(_common.describe(info))
  print(f"{args.pairs} pairs, {args.code_steps} MaskGIT steps, generation batch {args.batch}; VLM batch "
        f"{args.vlm_batch} x {args.seq_len} tokens; median of {args.repeats}")
  print(_common.text_table(["", "ms", "rate"], rows, left=1))
  for name, value in ratios.items():
    print(f"{name}: {value:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "machine": info, "median_s": med, **ratios}, f, indent=2)


if __name__ == "__main__":
  main()
