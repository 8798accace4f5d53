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
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

from vlm_jax.data import schema
from vlm_jax.data.inputs import make_data
from vlm_jax.parallel.distributed import any_process, global_batch
from vlm_jax.report import print_rows
from vlm_jax.train import init_from
from vlm_jax.train.checkpoint import Checkpointer
from vlm_jax.train.extension import PLAIN, TrainExtension
from vlm_jax.train.setup import step_setup
from vlm_jax.train.step import TrainState

log = logging.getLogger(__name__)


class RunStopped(Exception):
  """A run ended before `total_steps` after saving its state: SIGTERM (preemption), a first
  Ctrl-C, or data that ran out. `train` itself returns a summary whose status says so; a job
  that chains runs raises this (`stop_unless_finished`) so that nothing after the cut-short
  run happens; `launch.main` exits 0 on it, and the same command again resumes."""


def stop_unless_finished(summary: dict) -> dict:
  """`summary` of a finished run; raises RunStopped when the run was cut short."""
  if summary["status"] != "finished":
    raise RunStopped(f"{summary['workdir']}: {summary['status']}; run the same command again to continue")
  return summary


class _Stop(Exception):
  """Raised inside the loop to leave it at a step boundary; `status` goes into the summary."""

  def __init__(self, status: str):
    super().__init__(status)
    self.status = status


class StopSignals:
  """SIGTERM, and a first SIGINT (Ctrl-C), ask the loop to save and stop at the next step;
  a second Ctrl-C aborts at once. The previous handlers come back on exit."""

  def __enter__(self):
    self.received = None
    self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.received == "SIGINT":
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    if signum == signal.SIGINT:
      log.warning("Ctrl-C: saving a checkpoint at the next step and stopping; press Ctrl-C again to abort")

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


# ----------------------------------------------------------------------------- bookkeeping

class MetricsLog:
  """metrics.jsonl (one line per logged step) and TensorBoard events, on process 0."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    if not self.active:
      return
    if os.path.exists(self.path) and resume_step == 0 and os.path.getsize(self.path):
      kept = keep_aside(self.path)  # a fresh start over an earlier run's log: keep that log
      log.warning("%s starts from step 0; the earlier metrics are kept as %s", workdir, kept)
    elif os.path.exists(self.path):  # drop what a killed run logged past its last checkpoint
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
      from tensorflow.core.framework import summary_pb2  # TF is imported lazily, with the writer
      meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
      with self.writer.as_default(step=step):
        for k, v in metrics.items():
          self.tf.summary.write(k, self.tf.constant(float(v), self.tf.float32), metadata=meta)

  def close(self):
    if self.writer:
      self.writer.flush()


def keep_aside(path: str) -> str:
  """Renames `path` to the first free `<stem>.<n><ext>` (history kept, nothing overwritten); returns it."""
  stem, ext = os.path.splitext(path)
  n = 1
  while os.path.exists(f"{stem}.{n}{ext}"):
    n += 1
  os.rename(path, f"{stem}.{n}{ext}")
  return f"{stem}.{n}{ext}"


def write_config(workdir: str, config) -> None:
  """`<workdir>/config.json`; a resumed run with another config keeps the earlier one as config.<n>.json."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    log.warning("the config differs from the one %s last ran with; that one is kept as %s", workdir,
                keep_aside(path))
  with open(path, "w") as f:
    f.write(text)


def check_finite(step: int, metrics: dict, ids: Sequence[str], saved_steps: Callable[[], Sequence[int]]) -> None:
  """Stops the run at a non-finite loss, before anything of this step is saved."""
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    shown = ", ".join(map(str, list(ids)[:4])) + (" ..." if len(ids) > 4 else "")
    saved = saved_steps()  # listed only now: on a remote file system a listing per step costs
    newest = f"the newest checkpoint is step {saved[-1]}" if saved else "no checkpoint was saved"
    raise FloatingPointError(f"loss is {loss} at step {step} (batch ids: {shown}); stopping the run. "
                             f"Nothing from this step on was saved; {newest} (its weights gave finite "
                             f"losses up to it).")


# ----------------------------------------------------------------------------- the loop

def train(config, workdir: str, hooks: Sequence[Callable[[int, TrainState], dict]] = (),
          devices: Optional[Sequence[jax.Device]] = None, extension: TrainExtension = PLAIN) -> dict:
  """Runs (or resumes) `config` in `workdir`; returns the summary as a dict.

  hooks: called as `hook(step, state) -> metrics` every `config.eval_every`
    steps and at the end (evaluations); their metrics are logged.
  devices: the devices of the mesh (default: all).
  extension: how a technique changes training (`vlm_jax.train.extension`); the
    default trains the model as it is.
  """
  if int(config.total_steps) <= 0:
    raise ValueError(f"config.total_steps must be positive, got {config.total_steps}")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)

  # --- Mesh, model, optimiser, jitted step.
  setup = step_setup(config, devices, extension)
  mesh, rules, model, jitted, batch_sharding = setup.mesh, setup.rules, setup.model, setup.step, setup.batch_sharding

  # --- Data and state: resume, or start (train/init_from.py says from what).
  data = make_data(config, model)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.get("keep", 3),
                      asynchronous=config.checkpoint.get("asynchronous", True))
  start, state, data_state, inputs = init_from.start(config, setup, ckpt)
  if jax.process_index() == 0:  # after the checkpoints were found to be this run's
    write_config(workdir, config)
  if data_state is not None:
    data.set_state(data_state)
  step_inputs = () if inputs is None else (inputs,)

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
    check_finite(step, metrics, ids, ckpt.steps)
    metrics["tokens_per_s"] = tokens / max(dt, 1e-9)
    if seen["first_loss"] is None:
      seen["first_loss"] = metrics["loss"]
    seen["last"] = metrics
    if (step + 1) % config.get("log_every", 1) == 0 or step + 1 == total:
      metrics_log.write(step + 1, metrics)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")

  pending = None
  signals = StopSignals()
  try:
    with signals, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for step in range(start, total):
        if debug.get("preempt_at_step", -1) == step:
          simulate_preemption(workdir, debug.get("preempt_signal", "SIGTERM"))
        if any_process(signals.received is not None):
          raise _Stop("interrupted by Ctrl-C" if signals.received == "SIGINT" else "preempted")
        t_step = time.perf_counter()
        try:
          batch = next(data)
        except StopIteration:
          raise _Stop(f"the data ran out after {step - start} step(s) of this run (data.num_epochs?)") from None
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
  except _Stop as stop:
    if pending is not None:
      record(pending)  # its metrics line, and its loss checked before the state is saved
    step_now = int(jax.device_get(state.step))
    ckpt.wait()
    if step_now not in ckpt.steps():  # a checkpoint step just saved it
      ckpt.save(step_now, state.params, _train_items(state), data.get_state(), force=True)
    status = f"{stop.status}: saved step {step_now}"
  finally:
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
    print_rows("\nrun summary", list(summary.items()))
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
