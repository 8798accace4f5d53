r"""Scale by simulation: compile a config's train step for N devices on this CPU, and size it.

    python -m launch.simulate --config=configs/llava15_7b_stage1.py --devices=64 --hbm_gib=80
    python -m launch.simulate --config=configs/tiny_train.py --devices=8 --config.mesh.fsdp=2

N virtual CPU devices stand in for the accelerators (`XLA_FLAGS=
--xla_force_host_platform_device_count=N`, set before JAX starts). The model,
optimiser, shardings and jitted step are built by the train loop's own
`step_setup` (mesh, logical rules, parameter groups, donation); the state and
the batch are `jax.ShapeDtypeStruct`s with their shardings, so no weight is
ever allocated. The step is lowered and compiled ahead of time and the table
reports, per device: parameters, mesh, XLA's memory analysis (arguments,
outputs, temporaries, generated code, donated/aliased, peak), the FLOPs per
step from XLA's cost analysis, and whether the peak fits in `--hbm_gib`.

What the numbers are: XLA:CPU's buffer assignment for the per-device SPMD
program. Arguments and outputs (the sharded train state and batch) are exact
for any backend. Temporaries (activations, gradients, gathered weights) are the
CPU compiler's, which schedules differently from the TPU and GPU compilers:
scan the LM layers (`scan_layers=True`) for a meaningful number. Without scan,
XLA:CPU keeps every layer's gathered weights live at once (the 7B stage-1 config: 77 GiB of
temporaries per device, against 5.3 GiB scanned). The peak is arguments +
outputs - donated + temporaries (XLA:CPU's own peak figure leaves the
temporaries out); keep a margin. FLOPs: XLA counts a loop body once, so with a
scanned LM (or grad_accum > 1) 1- and 2-layer unscanned copies are compiled as
well and the count extrapolated to every layer (`--noexact_flops` skips it).
The total is per device x devices: work that is replicated (e.g. the optimiser
update of unsharded parameters under pure data parallelism) counts on every device.

Cost on a 2-core machine: the 7B config on 64 devices takes ~40 s (compile
~10 s, FLOPs count ~27 s) and ~1 GB of memory.
"""

import os
import re
import sys


def _devices_from_argv(argv) -> int:
  """--devices before absl parses anything: XLA reads XLA_FLAGS when its backend starts."""
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


if __name__ == "__main__":
  _n = _devices_from_argv(sys.argv[1:])
  _flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{_flags.strip()} --xla_force_host_platform_device_count={_n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"  # the virtual devices are host (CPU) devices
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Train config file[:args] to simulate.",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 8, "Number of (virtual CPU) devices to compile for; the "
                                "config's mesh (one axis may be -1) must fit this many.")
_EXACT_FLOPS = flags.DEFINE_boolean(
    "exact_flops", True, "XLA's cost analysis counts a loop body once, so a scanned LM (and grad_accum) "
    "is undercounted: also compile 1- and 2-layer unscanned copies of the step and extrapolate to all "
    "layers (two small extra compiles). --noexact_flops reports XLA's count as is.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 80.0, "Memory per device in GiB that the peak must fit in "
                              "(80: H100/A100-80G; 95: TPU v5p; 16: TPU v5e; 32: TPU v4).")
flags.mark_flags_as_required(["config"])

GiB = 1024 ** 3


def abstract_batch(config, model, sharding):
  """ShapeDtypeStructs of one global batch in the `vlm_jax.data.schema` format."""
  import jax
  import jax.numpy as jnp
  data = config.data
  b, l = int(data.global_batch_size), int(data.seq_len)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch = {"input_ids": sds((b, l), jnp.int32), "loss_mask": sds((b, l), jnp.float32),
           "attention_mask": sds((b, l), jnp.int32), "positions": sds((b, l), jnp.int32),
           "segment_ids": sds((b, l), jnp.int32)}
  vision = getattr(model.config, "vision", None)
  slots = int(data.get("images_per_row", data.get("image_slots", 1)))
  if vision is not None and hasattr(model.config, "tokens_per_image") and slots:
    s = vision.image_size
    batch["images"] = sds((b, slots, s, s, 3), jnp.float32)
  return batch


def compile_step(config):
  """(step_setup, compiled step, seconds to build, lower, compile) for all visible devices."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from vlm_jax.train.checkpoint import abstract_like
  from vlm_jax.train.setup import step_setup
  from vlm_jax.train.step import TrainState

  t0 = time.perf_counter()
  s = step_setup(config)
  rep = s.shardings.step
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                     abstract_like(s.abstract_params, s.param_shardings),
                     abstract_like(s.abstract_opt, s.shardings.opt_state),
                     jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=s.shardings.rng))
  batch = abstract_batch(config, s.model, s.batch_sharding)
  t_build = time.perf_counter() - t0

  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    t0 = time.perf_counter()
    lowered = s.step.lower(state, batch)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
  return s, compiled, (t_build, t_lower, t_compile)


def xla_flops(compiled) -> float:
  """FLOPs of the per-device program, by XLA's cost analysis (a loop body counts once)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _lm_block(config):
  kind = config.model.get("kind")
  return config.model.text if kind == "vlm" else config.model if kind == "lm" else None


def extrapolated_flops(config) -> float:
  """Per-device FLOPs of the whole step with every layer counted: the step compiled with 1 and 2
  unscanned LM layers and no gradient accumulation, extrapolated linearly to all layers."""
  def count(layers):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      if layers:
        _lm_block(c).scan_layers = False
        _lm_block(c).num_layers = layers
      c.grad_accum = 1
    return xla_flops(compile_step(c)[1])
  if _lm_block(config) is None:  # no scanned layers: only the accumulation loop to unroll
    return count(None)
  one, two = count(1), count(2)
  return one + (_lm_block(config).num_layers - 1) * (two - one)


def simulate(config, hbm_gib: float = 80.0, exact_flops: bool = True) -> dict:
  """Compiles `config`'s train step for all visible devices; returns the numbers of the table."""
  import jax
  from flax import traverse_util

  from vlm_jax.train.optim import FROZEN

  s, compiled, (t_build, t_lower, t_compile) = compile_step(config)
  batch = abstract_batch(config, s.model, s.batch_sharding)
  flops_xla = xla_flops(compiled)
  loops = (_lm_block(config) is not None and _lm_block(config).scan_layers) or config.get("grad_accum", 1) > 1
  t0 = time.perf_counter()
  extrapolate = exact_flops and loops
  flops = extrapolated_flops(config) if extrapolate else flops_xla
  t_flops = time.perf_counter() - t0

  flat = traverse_util.flatten_dict(s.abstract_params, sep="/")
  total = sum(int(v.size) for v in flat.values())
  trainable = sum(int(v.size) for k, v in flat.items() if s.labels[k] != FROZEN)
  state_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(s.abstract_params))
  state_bytes += sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(s.abstract_opt))

  m = compiled.memory_analysis()
  n = s.mesh.size
  args, outs, temps = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  code, alias = m.generated_code_size_in_bytes, m.alias_size_in_bytes
  # XLA:CPU's own peak_memory_in_bytes leaves the temporaries out; this is the usual estimate.
  peak = args + outs - alias + temps + code
  tokens = int(config.data.global_batch_size) * int(config.data.seq_len)
  return dict(
      devices=n, mesh={k: int(v) for k, v in s.mesh.shape.items()}, model_kind=type(s.model).__name__,
      params_total=total, params_trainable=trainable, state_bytes=state_bytes,
      batch=(int(config.data.global_batch_size), int(config.data.seq_len)),
      images=tuple(batch["images"].shape[1:2]) if "images" in batch else (),
      arguments=args, outputs=outs, temporaries=temps, generated_code=code, alias=alias,
      peak=peak, hbm_bytes=hbm_gib * GiB, fits=peak <= hbm_gib * GiB,
      flops_per_device=flops, flops_total=flops * n, flops_xla_per_device=flops_xla,
      flops_extrapolated=extrapolate, flops_6nd=6.0 * trainable * tokens,
      build_s=t_build, lower_s=t_lower, compile_s=t_compile, flops_s=t_flops)


def table(r: dict, config_name: str, wall_s: float) -> str:
  gib = lambda x: f"{x / GiB:9.2f} GiB" if x >= GiB / 10 else f"{x / 2 ** 20:9.1f} MiB"
  b, l = r["batch"]
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  frozen = r["params_total"] - r["params_trainable"]
  images = f", {r['images'][0]} image(s) per row" if r["images"] else ""
  rows = [
      ("config", config_name),
      ("model", r["model_kind"]),
      ("parameters", f"{r['params_total']:,} total; {r['params_trainable']:,} trainable; {frozen:,} frozen"),
      ("mesh", f"{mesh}  ({r['devices']} virtual CPU devices)"),
      ("global batch", f"{b} x {l} tokens{images}; {b / r['devices']:g} row(s) per device"),
      ("per-device memory", "(XLA:CPU buffer assignment of the SPMD program)"),
      ("  arguments", gib(r["arguments"]) + "   train state + batch shards"),
      ("  outputs", gib(r["outputs"]) + "   new train state + metrics"),
      ("  temporaries", gib(r["temporaries"]) + "   activations, gradients, collectives"),
      ("  generated code", gib(r["generated_code"])),
      ("  alias/donated", gib(r["alias"]) + "   outputs written into the donated state"),
      ("  peak estimate", gib(r["peak"]) + "   arguments + outputs - alias + temporaries + code"),
      ("  state floor", gib(r["state_bytes"] / r["devices"]) + "   (params + optimiser state) / devices, if fully sharded"),
      ("FLOPs per step", f"{r['flops_total']:.4g} = {r['flops_per_device']:.4g} per device x {r['devices']}"
                         + ("   (XLA cost analysis, every layer counted)" if r["flops_extrapolated"] else
                            "   (XLA cost analysis)")),
      *([("  XLA as is", f"{r['flops_xla_per_device'] * r['devices']:.4g}   (a scanned loop body counted once)")]
        if r["flops_extrapolated"] else []),
      ("  6·N·tokens", f"{r['flops_6nd']:.4g}   (N = trainable parameters; no attention, no remat)"),
      ("fits", f"{'yes' if r['fits'] else 'NO'}: peak {r['peak'] / GiB:.2f} GiB of "
               f"{r['hbm_bytes'] / GiB:g} GiB per device ({100 * r['peak'] / r['hbm_bytes']:.1f}%)"),
      ("time", f"build {r['build_s']:.1f}s, lower {r['lower_s']:.1f}s, compile {r['compile_s']:.1f}s, "
               f"FLOPs count {r['flops_s']:.1f}s; "
               f"wall {wall_s:.1f}s"),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv):
  del argv
  import jax
  n = _DEVICES.value
  if jax.device_count() != n:
    sys.exit(f"JAX sees {jax.device_count()} devices, not --devices={n}: XLA_FLAGS must be set before "
             f"JAX starts (run this as `python -m launch.simulate`)")
  t0 = time.perf_counter()
  result = simulate(_CONFIG.value, _HBM_GIB.value, _EXACT_FLOPS.value)
  config_name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "?")
  print(f"\nsimulated train step\n{table(result, config_name, time.perf_counter() - t0)}", flush=True)


if __name__ == "__main__":
  app.run(main)
