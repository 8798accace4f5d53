"""The training loop: one config file, any mesh, exact resume.

    state shapes (eval_shape) -> shardings -> restore the newest checkpoint, or
    initialise directly sharded -> jitted step over the data -> checkpoints,
    metrics (JSONL + TensorBoard), a progress bar and a summary table.

Running the same command again continues where the last run stopped. SIGTERM
(preemption) saves a checkpoint and returns cleanly. A NaN loss stops the run
with an error naming the step and the batch.
"""

import json
import logging
import os
import signal
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from vlm_jax.data import schema
from vlm_jax.models.build import build_model
from vlm_jax.models.params import example_inputs
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.parallel.distributed import global_batch
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.checkpoint import Checkpointer, abstract_like, check_same_shapes, restore_params
from vlm_jax.peft import lora as lora_lib
from vlm_jax.sparsity import masks as masks_lib
from vlm_jax.train.step import SparseTraining, TrainState, make_train_step

log = logging.getLogger(__name__)


class Preempted(Exception):
  """Raised inside the loop when SIGTERM arrived; the loop saves and returns."""


# ----------------------------------------------------------------------------- shapes and shardings

def param_shapes_and_shardings(model: nn.Module, mesh, rules):
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(model))["params"])
  shardings = mesh_lib.logical_shardings(nn.get_partition_spec(boxed), mesh, rules)
  return nn.meta.unbox(boxed), shardings


def state_shardings(tx, abstract_params, param_shardings, labels, mesh):
  trainable, _ = optim_lib.split(abstract_params, labels)
  trainable_shardings, _ = optim_lib.split(param_shardings, labels)
  abstract_opt = jax.eval_shape(tx.init, trainable)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, trainable_shardings,
                                        transform_non_params=lambda _: mesh_lib.replicated(mesh))
  rep = mesh_lib.replicated(mesh)
  return TrainState(rep, param_shardings, opt_shardings, rep), abstract_opt


class StepSetup(NamedTuple):
  """The mesh, model, optimiser, shardings and jitted step of a config; nothing allocated yet."""
  mesh: Any
  rules: list
  model: nn.Module
  abstract_params: dict
  param_shardings: dict
  labels: dict
  optim: Any  # config.optim with total_steps filled in
  tx: optax.GradientTransformation
  shardings: TrainState
  abstract_opt: Any
  batch_sharding: Any
  step: Callable  # jitted (state, batch[, masks]) -> (state, metrics), state donated
  sparse: Optional[SparseTraining] = None  # config.sparse: training a pruned model under its masks
  mask_shardings: Any = None


def sparse_training(config) -> Optional[SparseTraining]:
  """`config.sparse` (masks: the prune job's workdir; lora_alpha 0 = masked full fine-tuning)."""
  sparse = config.get("sparse")
  if not sparse or not sparse.get("masks"):
    return None
  return SparseTraining(lora_alpha=float(sparse.get("lora_alpha", 0.0)) or None,
                        kd_weight=float(sparse.get("kd_weight", 0.0)),
                        kd_temperature=float(sparse.get("kd_temperature", 1.0)))


def step_setup(config, devices: Optional[Sequence[jax.Device]] = None) -> StepSetup:
  """Everything `train` builds before it touches data or weights (also what launch.simulate compiles)."""
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  rules = [tuple(r) for r in config.rules]
  model = build_model(config.model)
  abstract_params, param_shardings = param_shapes_and_shardings(model, mesh, rules)
  sparse, mask_shardings = sparse_training(config), None
  if sparse:
    mask_shardings = masks_lib.mask_shardings(config.sparse.masks, param_shardings)
    if sparse.lora_alpha:  # the state holds the dense frozen base and the adapters
      adapters = lora_lib.abstract(abstract_params, [tuple(r) for r in config.sparse.lora_ranks])
      abstract_params = {"base": abstract_params, "lora": adapters}
      param_shardings = {"base": param_shardings,
                         "lora": jax.tree.map(lambda _: mesh_lib.replicated(mesh), adapters)}
  labels = optim_lib.path_labels(abstract_params, [tuple(g) for g in config.optim.groups])
  optim = config.optim.copy_and_resolve_references()
  with optim.unlocked():
    optim.total_steps = config.total_steps
  tx = optim_lib.make_optimizer(optim, labels)
  shardings, abstract_opt = state_shardings(tx, abstract_params, param_shardings, labels, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  step_fn = make_train_step(model, tx, labels, optim_lib.schedule(optim), config.get("z_loss", 0.0),
                            config.get("grad_accum", 1), sparse)
  in_shardings = (shardings, batch_sharding) + ((mask_shardings,) if sparse else ())
  jitted = jax.jit(step_fn, in_shardings=in_shardings,
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  return StepSetup(mesh, rules, model, abstract_params, param_shardings, labels, optim, tx, shardings,
                   abstract_opt, batch_sharding, jitted, sparse, mask_shardings)


# ----------------------------------------------------------------------------- initial parameters

def initial_params(init: str, model: nn.Module, abstract_params, param_shardings, seed: int):
  """`scratch` | `hf:<folder>` | `checkpoint:<workdir>` -> params, placed with their shardings."""
  kind, _, path = init.partition(":")
  if kind == "scratch":
    fn = lambda rng: nn.meta.unbox(model.init(rng, *example_inputs(model))["params"])
    return jax.jit(fn, out_shardings=param_shardings)(jax.random.key(seed))
  if kind == "checkpoint":
    return restore_params(path, abstract_like(abstract_params, param_shardings))
  if kind == "hf":
    from vlm_jax.interop import from_hf
    scanned = getattr(getattr(model.config, "text", model.config), "scan_layers", False)
    _, params = from_hf(path, **({"scan_layers": True} if scanned else {}))  # from_hf stacks the layers
    check_same_shapes(params, abstract_params, path)
    return jax.device_put(params, param_shardings)
  raise ValueError(f"config.init must be 'scratch', 'hf:<folder>' or 'checkpoint:<workdir>', got {init!r}")


def load_parts(params: dict, parts: Mapping[str, str], abstract_params, param_shardings) -> dict:
  """Replaces top-level subtrees of fresh `params` by the same subtrees of other runs:
  `{"vision": "checkpoint:<workdir>"}` starts a VLM from a two-tower run's vision tower."""
  for name, source in parts.items():
    kind, _, path = source.partition(":")
    if kind != "checkpoint" or not path:
      raise ValueError(f"config.init_parts[{name!r}] must be 'checkpoint:<workdir>', got {source!r}")
    if name not in params:
      raise ValueError(f"config.init_parts names {name!r}, but this model's parameters are {sorted(params)}")
    wanted = {name: abstract_like(abstract_params[name], param_shardings[name])}
    params = {**params, **restore_params(path, wanted, partial=True)}
    log.info("%s from %s", name, path)
  return params


def sparse_initial_params(config, setup: StepSetup, masks: dict) -> dict:
  """A pruned model's start: `config.init` under its masks, or the dense base plus fresh adapters."""
  if not setup.sparse.lora_alpha:
    params = initial_params(config.init, setup.model, setup.abstract_params, setup.param_shardings, config.seed)
    return masks_lib.apply_masks(params, masks)
  base = initial_params(config.init, setup.model, setup.abstract_params["base"], setup.param_shardings["base"],
                        config.seed)
  adapters = lora_lib.init(base, [tuple(r) for r in config.sparse.lora_ranks], jax.random.key(config.seed))
  return {"base": base, "lora": jax.device_put(adapters, setup.param_shardings["lora"])}


# ----------------------------------------------------------------------------- data

def make_data(config, model: nn.Module):
  data = config.data
  if data.get("source", "pipeline") == "synthetic":
    from vlm_jax.data.synthetic import SyntheticBatches
    c = model.config
    vision = getattr(c, "vision", None)
    return SyntheticBatches(
        global_batch=data.global_batch_size, seq_len=data.seq_len,
        vocab_size=getattr(c, "text", c).vocab_size, seed=config.seed,
        image_size=vision.image_size if vision else 0,
        tokens_per_image=c.tokens_per_image if vision else 0,
        image_token_id=c.image_token_id if vision else -1,
        images_per_row=data.get("images_per_row", 1), repeat_first=data.get("repeat_first", False),
        process_index=jax.process_index(), process_count=jax.process_count())
  from vlm_jax.data import pipeline
  return pipeline.from_config(data, model.config, seed=config.seed)


# ----------------------------------------------------------------------------- bookkeeping

class MetricsLog:
  """metrics.jsonl (one line per logged step) and TensorBoard events, on process 0."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    if not self.active:
      return
    if os.path.exists(self.path):  # drop what a killed run logged past its last checkpoint
      with open(self.path) as f:
        kept = [l for l in f if json.loads(l).get("step", 0) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    import tensorflow as tf  # a pinned dependency already (TFDS); writes TensorBoard events
    try:
      tf.config.set_visible_devices([], "GPU")  # TF only writes files here; keep it off the GPUs
    except RuntimeError:  # TF already initialised by someone else
      pass
    self.tf = tf
    self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    if self.writer:
      # tf.summary.write with the scalars plugin's metadata: what tf.summary.scalar
      # writes, without needing the `tensorboard` package at write time.
      from tensorflow.core.framework import summary_pb2
      meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
      with self.writer.as_default(step=step):
        for k, v in metrics.items():
          self.tf.summary.write(k, self.tf.constant(float(v), self.tf.float32), metadata=meta)

  def close(self):
    if self.writer:
      self.writer.flush()


def check_finite(step: int, metrics: dict, ids: Sequence[str]) -> None:
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    shown = ", ".join(map(str, list(ids)[:4])) + (" ..." if len(ids) > 4 else "")
    raise FloatingPointError(f"loss is {loss} at step {step} (batch ids: {shown}); stopping the run. "
                             f"The last checkpoint before it is intact.")


def print_summary(rows: list[tuple[str, Any]]) -> str:
  width = max(len(k) for k, _ in rows)
  text = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
  print("\nrun summary\n" + text, flush=True)
  return text


# ----------------------------------------------------------------------------- the loop

def train(config, workdir: str, hooks: Sequence[Callable[[int, TrainState], dict]] = (),
          devices: Optional[Sequence[jax.Device]] = None) -> dict:
  """Runs (or resumes) `config` in `workdir`; returns the summary as a dict.

  hooks: called as `hook(step, state) -> metrics` every `config.eval_every`
    steps and at the end (evaluations); their metrics are logged.
  devices: the devices of the mesh (default: all).
  """
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # --- Mesh, model, optimiser, jitted step.
  setup = step_setup(config, devices)
  (mesh, rules, model, abstract_params, param_shardings, labels, optim, tx, shardings, abstract_opt,
   batch_sharding, jitted, sparse, _) = setup
  masks = None
  if sparse:  # an explicit input of every step
    base_abstract, base_shardings = ((abstract_params["base"], param_shardings["base"]) if sparse.lora_alpha
                                     else (abstract_params, param_shardings))
    masks = masks_lib.load_masks(config.sparse.masks, base_abstract, base_shardings)
  step_inputs = () if masks is None else (masks,)

  # --- Data and state: resume, or start.
  data = make_data(config, model)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.get("keep", 3),
                      asynchronous=config.checkpoint.get("asynchronous", True))
  abstract_train = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                    "opt_state": abstract_like(abstract_opt, shardings.opt_state),
                    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shardings.rng)}
  restored = ckpt.restore_latest(abstract_like(abstract_params, param_shardings), abstract_train)
  if restored:
    start, params, train_items, data_state = restored
    data.set_state(data_state)
    state = TrainState(train_items["step"], params, train_items["opt_state"], train_items["rng"])
    log.info("resumed from step %d", start)
  else:
    start = 0
    params = sparse_initial_params(config, setup, masks) if sparse else \
        initial_params(config.init, model, abstract_params, param_shardings, config.seed)
    params = load_parts(params, dict(config.get("init_parts") or {}), abstract_params, param_shardings)
    trainable, _ = optim_lib.split(params, labels)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable)
    rng = jax.random.key_data(jax.random.key(config.seed))
    state = TrainState(jnp.zeros((), jnp.int32), params, opt_state, rng)
    state = jax.device_put(state, shardings)

  # --- Preemption: SIGTERM sets a flag; the loop saves and returns.
  preempted = {"flag": False}
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
  debug = config.get("debug", {})

  metrics_log = MetricsLog(workdir, start)
  total = int(config.total_steps)
  bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
             disable=jax.process_index() != 0 or not config.get("progress", True))
  seen = {"first_loss": None, "last": {}, "tokens": 0, "steps": 0}
  t0 = time.perf_counter()

  def record(pending) -> None:
    """Checks and logs a finished step's metrics (read one step late, so the device never waits)."""
    step, metrics, ids, tokens, dt = pending
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    check_finite(step, metrics, ids)
    metrics["tokens_per_s"] = tokens / max(dt, 1e-9)
    if seen["first_loss"] is None:
      seen["first_loss"] = metrics["loss"]
    seen["last"] = metrics
    if (step + 1) % config.get("log_every", 1) == 0 or step + 1 == total:
      metrics_log.write(step + 1, metrics)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")

  pending = None
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for step in range(start, total):
        if debug.get("preempt_at_step", -1) == step:
          simulate_preemption(workdir, debug.get("preempt_signal", "SIGTERM"))
        if _any_process(preempted["flag"]):
          raise Preempted()
        t_step = time.perf_counter()
        batch = next(data)
        state, metrics = jitted(state, global_batch(schema.device_batch(batch), batch_sharding), *step_inputs)
        if pending is not None:
          record(pending)
        tokens = int(np.asarray(batch["attention_mask"]).sum()) * jax.process_count()
        pending = (step, metrics, batch.get("id", []), tokens, time.perf_counter() - t_step)
        seen["tokens"] += tokens
        seen["steps"] += 1
        bar.update(1)
        done = step + 1
        checkpoint_due = done % config.checkpoint_every == 0 or done == total
        eval_due = hooks and (done % config.get("eval_every", total) == 0 or done == total)
        if checkpoint_due or eval_due:
          record(pending)  # never save or evaluate past an unchecked loss
          pending = None
        if checkpoint_due:
          ckpt.save(done, state.params, _train_items(state), data.get_state())
        if eval_due:
          evals = {}
          for hook in hooks:
            evals.update(hook(done, state))
          metrics_log.write(done, evals)
          seen["last"] = {**seen["last"], **evals}
      if pending is not None:
        record(pending)
    status = "finished"
  except Preempted:
    step_now = int(jax.device_get(state.step))
    ckpt.save(step_now, state.params, _train_items(state), data.get_state(), force=True)
    status = f"preempted: saved step {step_now}"
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    bar.close()
    ckpt.close()
    metrics_log.close()

  wall = time.perf_counter() - t0
  last = seen["last"]
  summary = {"status": status, "steps": f"{start} -> {int(jax.device_get(state.step))} of {total}",
             "first loss": seen["first_loss"], "last loss": last.get("loss"),
             "last accuracy": last.get("accuracy"),
             "tokens/s": seen["tokens"] / wall if seen["steps"] else None, "wall (s)": round(wall, 1),
             "skipped records": data.skipped() or "none", "workdir": workdir}
  summary.update({k: v for k, v in last.items() if k.startswith("eval/")})
  if jax.process_index() == 0:
    print_summary([(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in summary.items()])
  summary["state"] = state
  summary["model"] = model
  return summary


def simulate_preemption(workdir: str, signal_name: str) -> None:
  """Sends this process `signal_name`, once per workdir (for tests of resume and preemption)."""
  marker = os.path.join(workdir, "simulated_preemption")
  if os.path.exists(marker):
    return
  open(marker, "w").close()
  os.kill(os.getpid(), getattr(signal, signal_name))


def _train_items(state: TrainState) -> dict:
  return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def _any_process(flag: bool) -> bool:
  """Whether any process saw SIGTERM (all must stop at the same step)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
