r"""Runs any vlm_jax job from a config file, on one CPU or on a pod.

    python -m launch.main --config=configs/tiny_train.py --workdir=/tmp/run
    python -m launch.main --config=configs/tiny_train.py:model=small --workdir=/tmp/run \
        --config.total_steps=100 --config.mesh.fsdp=4

`--config.key=value` overrides any key; a mistyped key is an error naming it, and so
is a missing config file (one line) or `total_steps` < 1. A checkpoint that cannot be
written (a full disk) ends the run with one message naming the intact checkpoints. `--workdir=~/x` is expanded.
The config's `job` says what runs (`train`, ...). Running the same command
again resumes from the newest checkpoint in the workdir.

Multi-host: on TPU pods and SLURM, JAX finds its peers by itself; elsewhere
pass --coordinator=HOST:PORT --num_processes=N --process_id=I (or set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
"""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved config go.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_LOCAL_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Virtual CPU devices in this process (testing).")
flags.mark_flags_as_required(["config", "workdir"])


def _lazy(target: str):
  """`"module:function"` -> a job that imports its module only when it runs."""
  module, function = target.split(":")

  def run(config, workdir):
    import importlib
    return getattr(importlib.import_module(module), function)(config, workdir)
  return run


# config.job -> what runs it, as `(config, workdir)`.
JOBS = {name: _lazy(target) for name, target in {
    "train": "vlm_jax.train.loop:train",
    "soup": "vlm_jax.soups.jobs:soup",
    "score": "vlm_jax.curation.jobs:score",
    "filter": "vlm_jax.curation.jobs:filter_data",
    "prune": "vlm_jax.sparsity.jobs:prune",
    "repair": "vlm_jax.sparsity.jobs:repair",
    "fewshot": "vlm_jax.adapters.jobs:fewshot",
    "region_guidance": "vlm_jax.guidance.jobs:evaluate",
    "synth": "vlm_jax.synth.jobs:synth",
    # the shapes-world demonstrations: vlm_jax/experiments/shapes/<name>.py, configs/shapes/<name>.py
    **{f"shapes_{name}": f"vlm_jax.experiments.shapes.{name}:run" for name in ("vila", "ppl_filter", "soups",
                                                                               "sparsity", "region_guidance",
                                                                               "fewshot", "synth")},
}.items()}


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    config = _CONFIG.value
    name = config.get("job", "train")  # the first use raises a load error deferred by the flag
  except OSError as e:  # a missing or unloadable config file: its error in one line, not a traceback
    sys.exit(f"cannot load the config file {config_flags.get_config_filename(flags.FLAGS['config'])!r}: "
             f"{str(e).strip().splitlines()[-1].strip()}")
  if name not in JOBS:
    sys.exit(f"unknown job {name!r} in the config; known jobs: {sorted(JOBS)}")
  if int(config.get("total_steps", 1)) <= 0:  # else a run "finishes" at once with no checkpoint
    sys.exit(f"config.total_steps is {config.total_steps}; it must be at least 1")
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))  # `--workdir=~/x` is not expanded by the shell
  from vlm_jax.parallel import initialize
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _LOCAL_DEVICES.value)
  from vlm_jax.train.checkpoint import CheckpointWriteFailed
  from vlm_jax.train.loop import RunStopped
  try:
    JOBS[name](config, workdir)
  except RunStopped as e:  # saved; nothing after the cut-short run ran
    logging.warning("stopped early: %s", e)
  except CheckpointWriteFailed as e:  # e.g. a full disk: what is intact and what to do, in one message
    sys.exit(f"error: {e}")


def parse_flags(argv):
  """absl's flag parsing, with a mistyped `--config.key` said in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError, flags.Error) as e:
    while isinstance(e, (KeyError, AttributeError)) and e.args and isinstance(e.args[0], Exception):
      e = e.args[0]  # ml_collections wraps the KeyError that says which key
    message = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() is its repr
    sys.exit(f"config error: {message}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
