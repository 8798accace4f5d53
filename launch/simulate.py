r"""Scale by simulation: compile a config's train step for N devices on this CPU, and size it.

    python -m launch.simulate --config=configs/llava15_7b_stage1.py --devices=64 --hbm_gib=80
    python -m launch.simulate --config=configs/tiny_train.py --devices=8 --config.mesh.fsdp=2
    python -m launch.simulate --config=configs/llava15_7b_stage1.py --topology=v5e:8x8   # needs .[tpu]
    python -m launch.simulate --config=configs/tiny_train.py --topology=v5e:2x2 --num_slices=2
    python -m launch.simulate --config=configs/llava15_7b_stage1.py --topology=v5e:8x8 --function=generate

`--function=score|generate` compiles perplexity scoring (the `score` job's forward and per-record
NLL) or generation (prefill, then `--new_tokens` KV-cache decoding steps) instead of the train
step, with the same parameters, shardings and global batch (the prompt: `data.seq_len` tokens).

`--topology` (v4, v5e, v5p, v6e names: `v5e:16x16`, `v5p:4x4x4`, `v4:2x2x4`) compiles
for a real TPU slice with the TPU compiler itself, on this CPU: libtpu (the `tpu`
extra, `pip install -e '.[tpu]'`) describes the slice's chips
(`jax.experimental.topologies`), and the memory and cost figures are the ones the
pod will see. `--num_slices=S` compiles for S such slices joined by DCN, with
`mesh.dcn_data = S` (data parallel across slices). The table adds a roofline
estimate from the chip's published peak bf16 FLOP/s and HBM bandwidth: step time
>= max(FLOPs / peak, bytes accessed / bandwidth), and the MFU that time allows.
It ignores ICI/DCN communication and any overlap, so it is a ceiling, not a forecast.

Without `--topology`, N virtual CPU devices stand in for the accelerators (`XLA_FLAGS=
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
~10 s, FLOPs count ~27 s) and ~1 GB of memory; with `--topology` the TPU
compiler needs a few minutes for it.
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


def _topology_in_argv(argv) -> bool:
  return any(a == "--topology" or a.startswith("--topology=") for a in argv)


if __name__ == "__main__":
  if not _topology_in_argv(sys.argv[1:]):
    _n = _devices_from_argv(sys.argv[1:])
    _flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{_flags.strip()} --xla_force_host_platform_device_count={_n}".strip()
  # CPU devices run (the TPU is only compiled for); no TPU runtime to initialise.
  os.environ["JAX_PLATFORMS"] = "cpu"
# Any other JAX process on this machine holds libtpu's /tmp/libtpu_lockfile while it lives; describing
# a topology needs no TPU, so it must not wait for (or fail on) that lock.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple, Optional  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# --function -> (what the arguments, outputs and temporaries hold)
FUNCTIONS = {
    "train": ("train state + batch shards", "new train state + metrics", "activations, gradients, collectives"),
    "score": ("parameters + batch shards", "per-record NLL sums and token counts", "activations, logits"),
    "generate": ("parameters + prompt shards", "new tokens", "KV cache, activations, logits"),
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Train config file[:args] to simulate.",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 8, "Number of (virtual CPU) devices to compile for; the "
                                "config's mesh (one axis may be -1) must fit this many.")
_EXACT_FLOPS = flags.DEFINE_boolean(
    "exact_flops", True, "XLA's cost analysis counts a loop body once, so a scanned LM (and grad_accum) "
    "is undercounted: also compile 1- and 2-layer unscanned copies of the step and extrapolate to all "
    "layers (two small extra compiles). --noexact_flops reports XLA's count as is.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 80.0, "Memory per device in GiB that the peak must fit in "
                              "(80: H100/A100-80G; 95: TPU v5p; 16: TPU v5e; 32: TPU v4). With --topology "
                              "the chip's HBM, unless given.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice to compile for with the TPU compiler "
                                "(needs the `tpu` extra), e.g. v5e:16x16, v5p:4x4x4, v4:2x2x4; "
                                "replaces --devices.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "This many slices over DCN (with --topology: copies "
                                   "of the slice; on CPU: consecutive blocks of --devices); the mesh gets "
                                   "dcn_data = num_slices.")
_FUNCTION = flags.DEFINE_enum("function", "train", list(FUNCTIONS), "What to compile: the train step (default), "
                              "perplexity scoring (forward + per-record NLL, as the `score` job) or "
                              "generation (prefill + KV-cache decoding of --new_tokens, as `generate`), "
                              "each on the config's global batch and sequence length.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Tokens to decode after the prompt (--function=generate).")
flags.mark_flags_as_required(["config"])

GiB = 1024 ** 3


class Chip(NamedTuple):
  """A TPU generation's published per-chip figures, as the Cloud TPU system-architecture pages
  (docs.cloud.google.com/tpu/docs/v4, v5e, v5p, v6e) give them; their "GB" of HBM capacity is
  taken as GiB, as the compiler's own limit (15.75 GiB usable of v5e's 16) shows."""
  kind: str  # jax's device_kind
  peak_flops: float  # bf16 FLOP/s
  hbm_gib: float
  hbm_bandwidth: float  # bytes/s
  chip_config: str  # libtpu's chip config: one JAX device per chip


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32, 1.2e12, "megacore"),
    "v5e": Chip("TPU v5 lite", 197e12, 16, 819e9, "default"),
    "v5p": Chip("TPU v5", 459e12, 95, 2.765e12, "default"),
    "v6e": Chip("TPU v6 lite", 918e12, 32, 1.638e12, "default"),
}


def tpu_devices(topology: str, num_slices: int = 1):
  """(device descriptions of `num_slices` slices of `topology`, its Chip): compile-only TPU devices."""
  m = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+){1,2})", topology)
  if not m or m.group(1) not in CHIPS:
    raise ValueError(f"--topology={topology!r}: expected <generation>:<shape> with a generation of "
                     f"{sorted(CHIPS)}, e.g. v5e:16x16, v5p:4x4x4, v4:2x2x4")
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be at least 1")
  if importlib.util.find_spec("libtpu") is None:
    raise ImportError("--topology compiles with the TPU compiler, which comes with libtpu: install the "
                      "`tpu` extra (pip install -e '.[tpu]'), or simulate on CPU with --devices=N")
  from jax.experimental import topologies
  chip = CHIPS[m.group(1)]
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip.chip_config,
                                      chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
  return list(desc.devices), chip


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


def target_mesh(devices):
  """The model is initialised (abstractly) before the step's mesh exists: under a mesh of the
  target devices it traces for their platform, so a TPU kernel (attention="splash") knows it is
  compiled for a TPU, not run on this CPU. A no-op for the visible devices."""
  import jax
  import numpy as np
  if devices is None:
    return contextlib.nullcontext()
  mesh = jax.sharding.Mesh(np.asarray(devices), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def compile_step(config, devices=None, function: str = "train", new_tokens: int = 32):
  """(step_setup, compiled function, seconds to build, lower, compile) for `devices` (default: all
  visible). `function`: the train step, or scoring / generation (see `FUNCTIONS`) with the same
  parameters, shardings and batch."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from vlm_jax.train.checkpoint import abstract_like
  from vlm_jax.train.setup import step_setup
  from vlm_jax.train.step import TrainState

  if function not in FUNCTIONS:
    raise ValueError(f"function={function!r}: choose one of {sorted(FUNCTIONS)}")
  t0 = time.perf_counter()
  with target_mesh(devices):
    s = step_setup(config, devices=devices)
  rep = s.shardings.step
  params = abstract_like(s.abstract_params, s.param_shardings)
  batch = abstract_batch(config, s.model, s.batch_sharding)
  if function == "train":
    fn = s.step
    args = (TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params,
                       abstract_like(s.abstract_opt, s.shardings.opt_state),
                       jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=s.shardings.rng)), batch)
  elif function == "score":
    from vlm_jax.curation.perplexity import make_score_fn
    fn, args = jax.jit(make_score_fn(s.model)), (params, batch)
  else:
    from vlm_jax.models.generate import generate_fn
    key = jax.eval_shape(lambda: jax.random.key(0))
    fn = generate_fn(s.model, new_tokens)
    args = (params, batch["input_ids"], batch["attention_mask"], batch.get("images"), None,
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep))
  t_build = time.perf_counter() - t0

  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
  return s, compiled, (t_build, t_lower, t_compile)


def xla_cost(compiled) -> tuple:
  """(FLOPs, bytes accessed) of the per-device program, by XLA's cost analysis (a loop body counts once)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def xla_flops(compiled) -> float:
  return xla_cost(compiled)[0]


def _lm_block(config):
  kind = config.model.get("kind")
  return config.model.text if kind == "vlm" else config.model if kind == "lm" else None


def extrapolated_cost(config, devices=None) -> tuple:
  """Per-device (FLOPs, bytes accessed) of the whole step with every layer counted: the step compiled
  with 1 and 2 unscanned LM layers and no gradient accumulation, extrapolated linearly to all layers."""
  def count(layers):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      if layers:
        _lm_block(c).scan_layers = False
        _lm_block(c).num_layers = layers
      c.grad_accum = 1
    return xla_cost(compile_step(c, devices)[1])
  if _lm_block(config) is None:  # no scanned layers: only the accumulation loop to unroll
    return count(None)
  one, two = count(1), count(2)
  layers = _lm_block(config).num_layers
  return tuple(a + (layers - 1) * (b - a) for a, b in zip(one, two))


def extrapolated_flops(config, devices=None) -> float:
  return extrapolated_cost(config, devices)[0]


def roofline(flops: float, bytes_accessed: float, chip: Chip, model_flops: float) -> dict:
  """Per-chip lower bound on the step time from peak FLOP/s and HBM bandwidth, and the MFU it allows
  (`model_flops`: the useful FLOPs per chip). Communication and imperfect overlap only add time."""
  compute_s, memory_s = flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth
  step_s = max(compute_s, memory_s)
  return dict(compute_s=compute_s, memory_s=memory_s, step_s=step_s,
              bound="compute" if compute_s >= memory_s else "memory",
              mfu=model_flops / (step_s * chip.peak_flops) if step_s else 0.0)


def simulate(config, hbm_gib: float = 80.0, exact_flops: bool = True, devices=None,
             chip: Optional[Chip] = None, function: str = "train", new_tokens: int = 32) -> dict:
  """Compiles `config`'s train step (or `function`, see `FUNCTIONS`) for `devices` (default: all
  visible); returns the numbers of the table. `chip`: the TPU the devices describe, for the
  roofline estimate (of the train step)."""
  import jax
  from flax import traverse_util

  from vlm_jax.train.optim import FROZEN

  try:
    s, compiled, (t_build, t_lower, t_compile) = compile_step(config, devices, function, new_tokens)
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program bigger than the chip
    if "RESOURCE_EXHAUSTED" not in str(e) or chip is None:
      raise
    return refusal(str(e), hbm_gib)
  batch = abstract_batch(config, s.model, s.batch_sharding)
  flops_xla, bytes_xla = xla_cost(compiled)
  train = function == "train"
  loops = ((_lm_block(config) is not None and _lm_block(config).scan_layers)
           or (train and config.get("grad_accum", 1) > 1) or function == "generate")
  t0 = time.perf_counter()
  extrapolate = exact_flops and loops and train  # the extrapolation compiles train steps
  flops, bytes_accessed = extrapolated_cost(config, devices) if extrapolate else (flops_xla, bytes_xla)
  t_flops = time.perf_counter() - t0

  flat = traverse_util.flatten_dict(s.abstract_params, sep="/")
  total = sum(int(v.size) for v in flat.values())
  trainable = sum(int(v.size) for k, v in flat.items() if s.labels[k] != FROZEN)
  state_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(s.abstract_params))
  if train:  # scoring and generation hold no optimiser state
    state_bytes += sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(s.abstract_opt))

  m = compiled.memory_analysis()
  n = s.mesh.size
  args, outs, temps = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  code, alias = m.generated_code_size_in_bytes, m.alias_size_in_bytes
  # XLA:CPU's own peak_memory_in_bytes leaves the temporaries out (TPU's stats have none); the usual estimate.
  peak = args + outs - alias + temps + code
  tokens = int(config.data.global_batch_size) * int(config.data.seq_len)
  hbm_bytes = hbm_gib * GiB
  platform = s.mesh.devices.flat[0].platform
  # Mosaic custom calls: the Pallas TPU kernels (attention="splash") the step really runs
  kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"') if platform == "tpu" else 0
  return dict(
      function=function, new_tokens=new_tokens if function == "generate" else 0,
      devices=n, mesh={k: int(v) for k, v in s.mesh.shape.items()}, model_kind=type(s.model).__name__,
      slices=int(config.mesh.get("dcn_data", 1)), platform=platform,
      device_kind=s.mesh.devices.flat[0].device_kind,
      params_total=total, params_trainable=trainable, state_bytes=state_bytes,
      batch=(int(config.data.global_batch_size), int(config.data.seq_len)),
      images=tuple(batch["images"].shape[1:2]) if "images" in batch else (),
      arguments=args, outputs=outs, temporaries=temps, generated_code=code, alias=alias,
      peak=peak, hbm_bytes=hbm_bytes, fits=peak <= hbm_bytes,
      flops_per_device=flops, flops_total=flops * n, flops_xla_per_device=flops_xla,
      bytes_per_device=bytes_accessed,
      flops_extrapolated=extrapolate, flops_6nd=6.0 * trainable * tokens,
      # A loop body counted once would make the roofline a fraction of the real step: no estimate then.
      roofline=roofline(flops, bytes_accessed, chip, 6.0 * trainable * tokens / n)
      if chip and train and (extrapolate or not loops) else None,
      pallas_kernels=kernels, build_s=t_build, lower_s=t_lower, compile_s=t_compile, flops_s=t_flops)


def refusal(message: str, hbm_gib: float) -> dict:
  """The result for a program the TPU compiler would not build because it does not fit: what it says
  it needs, and what it has (the chip's HBM less what the runtime reserves)."""
  needed = usable = None
  m = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
  if m:
    needed, usable = float(m.group(1)) * GiB, float(m.group(2)) * GiB
  m = m or re.search(r"Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\)", message)
  if m and needed is None:
    needed, usable = float(m.group(1)), float(m.group(2))
  return dict(refused=message.strip().splitlines()[0][:400], needed=needed, usable=usable,
              hbm_bytes=hbm_gib * GiB, fits=False)


def refusal_table(r: dict, config_name: str, wall_s: float) -> str:
  over = (f"needs {r['needed'] / GiB:.2f} GiB of the {r['usable'] / GiB:.2f} GiB the compiler may use "
          f"({r['hbm_bytes'] / GiB:g} GiB HBM); {(r['needed'] - r['usable']) / GiB:.2f} GiB over"
          if r["needed"] else "the compiler ran out of HBM")
  rows = [("config", config_name), ("fits", f"does not fit: {over}"), ("compiler", r["refused"]),
          ("time", f"wall {wall_s:.1f}s")]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def table(r: dict, config_name: str, wall_s: float) -> str:
  gib = lambda x: f"{x / GiB:9.2f} GiB" if x >= GiB / 10 else f"{x / 2 ** 20:9.1f} MiB"
  b, l = r["batch"]
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  frozen = r["params_total"] - r["params_trainable"]
  images = f", {r['images'][0]} image(s) per row" if r["images"] else ""
  tpu = r["platform"] == "tpu"
  slices = f", {r['slices']} slices over DCN" if r["slices"] > 1 else ""
  where = f"{r['devices']} {r['device_kind']} chips{slices}" if tpu else f"{r['devices']} virtual CPU devices"
  spare = r["hbm_bytes"] - r["peak"]
  holds, train = FUNCTIONS[r["function"]], r["function"] == "train"
  counted_once = "   (XLA cost analysis; a scanned or decoding loop's body counted once)"
  rows = [
      ("config", config_name),
      ("model", r["model_kind"]),
      ("parameters", f"{r['params_total']:,} total; {r['params_trainable']:,} trainable; {frozen:,} frozen"),
      ("mesh", f"{mesh}  ({where})"),
      ("global batch", f"{b} x {l} tokens{images}; {b / r['devices']:g} row(s) per device"
                       + (f"; {r['new_tokens']} new tokens decoded" if r["new_tokens"] else "")),
      ("per-device memory", "(the TPU compiler's buffer assignment)" if tpu else
                            "(XLA:CPU buffer assignment of the SPMD program)"),
      ("  arguments", gib(r["arguments"]) + f"   {holds[0]}"),
      ("  outputs", gib(r["outputs"]) + f"   {holds[1]}"),
      ("  temporaries", gib(r["temporaries"]) + f"   {holds[2]}"),
      ("  generated code", gib(r["generated_code"])),
      *([("  alias/donated", gib(r["alias"]) + "   outputs written into the donated state")] if train else []),
      ("  peak estimate", gib(r["peak"]) + "   arguments + outputs - alias + temporaries + code"),
      ("  state floor", gib(r["state_bytes"] / r["devices"]) + ("   (params + optimiser state)" if train else
                                                               "   params") + " / devices, if fully sharded"),
      ("FLOPs per call" if not train else "FLOPs per step",
       f"{r['flops_total']:.4g} = {r['flops_per_device']:.4g} per device x {r['devices']}"
       + ("   (XLA cost analysis, every layer counted)" if r["flops_extrapolated"] else
          counted_once if not train else "   (XLA cost analysis)")),
      *([("  XLA as is", f"{r['flops_xla_per_device'] * r['devices']:.4g}   (a scanned loop body counted once)")]
        if r["flops_extrapolated"] else []),
      *([("  6·N·tokens", f"{r['flops_6nd']:.4g}   (N = trainable parameters; no attention, no remat)")]
        if train else []),
      ("bytes accessed", f"{r['bytes_per_device']:.4g} per device   (XLA cost analysis)"),
      *([("Pallas kernels", f"{r['pallas_kernels']} Mosaic calls (splash attention"
                            + (", forward and backward)" if train else ")"))] if r["pallas_kernels"] else []),
      *(_roofline_rows(r["roofline"]) if r["roofline"] else
        [("roofline (estimate)", "none: a scanned loop counted once (drop --noexact_flops)" if train else
          "train step only")]
        if r["platform"] == "tpu" else []),
      ("fits", f"{'yes' if r['fits'] else 'does not fit'}: peak {r['peak'] / GiB:.2f} GiB of "
               f"{r['hbm_bytes'] / GiB:g} GiB per device ({100 * r['peak'] / r['hbm_bytes']:.1f}%); "
               + (f"{spare / GiB:.2f} GiB to spare" if spare >= 0 else f"{-spare / GiB:.2f} GiB over")),
      ("time", f"build {r['build_s']:.1f}s, lower {r['lower_s']:.1f}s, compile {r['compile_s']:.1f}s, "
               f"FLOPs count {r['flops_s']:.1f}s; "
               f"wall {wall_s:.1f}s"),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _roofline_rows(roof: dict) -> list:
  return [("roofline (estimate)", f"step >= {roof['step_s'] * 1e3:.4g} ms, {roof['bound']}-bound: compute "
                                  f"{roof['compute_s'] * 1e3:.4g} ms, HBM {roof['memory_s'] * 1e3:.4g} ms "
                                  "(peak bf16 FLOP/s, HBM bandwidth; no communication)"),
          ("  MFU ceiling", f"{100 * roof['mfu']:.1f}%   (6·N·tokens per chip / (peak x roofline step))")]


def with_slices(config, num_slices: int):
  """`config` with mesh.dcn_data = num_slices (a config's own dcn_data must agree)."""
  own = int(config.mesh.get("dcn_data", 1))
  if own not in (1, num_slices):
    raise ValueError(f"config.mesh.dcn_data={own} but --num_slices={num_slices}")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mesh.dcn_data = num_slices
  return config


def main(argv):
  del argv
  import jax
  config, devices, chip, hbm_gib = _CONFIG.value, None, None, _HBM_GIB.value
  if _TOPOLOGY.value:
    try:
      devices, chip = tpu_devices(_TOPOLOGY.value, _NUM_SLICES.value)
    except (ImportError, ValueError) as e:
      sys.exit(str(e))
    if not flags.FLAGS["hbm_gib"].present:
      hbm_gib = chip.hbm_gib
  elif jax.device_count() != _DEVICES.value:
    sys.exit(f"JAX sees {jax.device_count()} devices, not --devices={_DEVICES.value}: XLA_FLAGS must be set "
             f"before JAX starts (run this as `python -m launch.simulate`)")
  if _NUM_SLICES.value != 1:
    config = with_slices(config, _NUM_SLICES.value)
  t0 = time.perf_counter()
  result = simulate(config, hbm_gib, _EXACT_FLOPS.value, devices, chip, _FUNCTION.value, _NEW_TOKENS.value)
  config_name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "?")
  what = f"compiled for {_TOPOLOGY.value} by the TPU compiler" if chip else "simulated"
  show = refusal_table if "refused" in result else table
  name = {"train": "train step", "score": "perplexity scoring", "generate": "generation"}[_FUNCTION.value]
  print(f"\n{what}: {name}\n{show(result, config_name, time.perf_counter() - t0)}", flush=True)


if __name__ == "__main__":
  app.run(main)
