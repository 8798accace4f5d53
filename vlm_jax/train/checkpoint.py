"""Orbax checkpoints: parameters, the rest of the train state, and the data iterator.

Three items per step: `params` (alone, so a later stage or an export can read
just them), `train` (step, optimiser state, RNG) and `data` (the input
iterator's JSON state, so a resumed run sees exactly the next batch).
A checkpoint that cannot be read (its write was cut off) is skipped in favour
of the newest one that can.
"""

import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("params", "train", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                             create=True))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, params: Any, train: Any, data_state: dict, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
        data=ocp.args.JsonSave(data_state)), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore_latest(self, abstract_params: Any, abstract_train: Any) -> Optional[tuple[int, Any, Any, dict]]:
    """(step, params, train, data_state) of the newest readable checkpoint, or None.

    The abstract trees carry the target shardings: restoring onto another mesh works.
    """
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params), train=ocp.args.StandardRestore(abstract_train),
            data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 — any unreadable checkpoint is skipped, loudly
        log.warning("checkpoint %d in %s is unreadable (%s: %s); trying an older one",
                    step, self.directory, type(e).__name__, e)
        continue
      return step, restored.params, restored.train, dict(restored.data)
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, abstract_params: Any, step: Optional[int] = None, partial: bool = False) -> Any:
  """Only the parameters of a run's checkpoint (the latest by default): how a stage starts from the last.

  partial: restore just the subtrees `abstract_params` names (e.g. {"vision": ...}
  from a two-tower checkpoint); the checkpoint may hold more.
  """
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  manager = ocp.CheckpointManager(directory, item_names=("params", "train", "data"))
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory!r}")
  step = steps[-1] if step is None else step
  if partial:
    args = ocp.args.PyTreeRestore(abstract_params, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params))
  else:
    args = ocp.args.StandardRestore(abstract_params)
  try:
    params = manager.restore(step, args=ocp.args.Composite(params=args)).params
  except ValueError as e:
    raise ValueError(f"the checkpoint {directory}/{step} does not fit this model "
                     f"(a checkpoint of another model?): {e}") from e
  finally:
    manager.close()
  if partial:  # Orbax leaves what it did not find abstract, and does not check shapes
    _check_restored(params, abstract_params, f"{directory}/{step}")
  return params


def _check_restored(params: Any, abstract_params: Any, source: str) -> None:
  missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"the checkpoint {source} has no parameter {missing[0]} (a checkpoint of another model?)")
  check_same_shapes(params, abstract_params, f"the checkpoint {source}")


def check_same_shapes(params, abstract, source: str) -> None:
  """Raises a ValueError naming the first parameter `params` lacks, adds or shapes otherwise than `abstract`."""
  got = traverse_util.flatten_dict(params, sep="/")
  want = traverse_util.flatten_dict(abstract, sep="/")
  for name in sorted(set(got) | set(want)):
    if name not in got or name not in want or got[name].shape != want[name].shape:
      raise ValueError(f"{source} does not fit config.model: parameter {name!r} is "
                       f"{got[name].shape if name in got else 'missing'} there and "
                       f"{want[name].shape if name in want else 'absent'} in the config")


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with shardings: what Orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def params_item_dir(path: str, step: Optional[int] = None) -> str:
  """The `params` item directory under a run dir, a manager dir, a step dir or the item dir itself.

  The latest step unless `step` names one; errors name the path and the steps there.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no such directory {path!r}")
  if os.path.isdir(os.path.join(path, "checkpoints")):  # a run's workdir
    path = os.path.join(path, "checkpoints")
  if os.path.exists(os.path.join(path, "_METADATA")) or os.path.exists(os.path.join(path, "manifest.ocdbt")):
    if step is not None:
      raise ValueError(f"{path!r} is a single checkpoint item; it has no steps")
    return path  # a params item dir itself
  if os.path.isdir(os.path.join(path, "params")) and step is None:
    return os.path.join(path, "params")  # one step dir
  manager = ocp.CheckpointManager(path, item_names=("params", "train", "data"))
  try:
    steps = sorted(manager.all_steps())
  finally:
    manager.close()
  if not steps:
    raise FileNotFoundError(f"no Orbax checkpoint in {path!r}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no step {step} in {path!r} (steps: {steps})")
  item = os.path.join(path, str(step), "params")
  if not os.path.isdir(item):
    raise FileNotFoundError(f"checkpoint {path}/{step} has no 'params' item")
  return item


def read_params(path: str, step: Optional[int] = None) -> Any:
  """The `params` item (see `params_item_dir`) as host NumPy arrays in their stored dtypes.

  No abstract tree needed: what averages or inspects checkpoints of any model reads this.
  """
  item = params_item_dir(path, step)
  handler = ocp.PyTreeCheckpointHandler()
  checkpointer = ocp.Checkpointer(handler)
  try:
    metadata = handler.metadata(epath.Path(item)).tree  # the handler's own: no step-metadata warning
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # noqa: BLE001 — name the checkpoint, keep the cause
    raise ValueError(f"cannot read the Orbax checkpoint {item!r} ({type(e).__name__}: {e}); "
                     f"pick another step") from e
  finally:
    checkpointer.close()


def save_params(directory: str, params: Any, step: int = 0) -> None:
  """Parameters alone as a training run's checkpoint `<directory>/checkpoints/<step>`.

  Items `params`, `train` (`{"step": step}`) and `data` (`{}`), so `restore_params(directory, ...)`
  and `init="checkpoint:<directory>"` start from it like from a run.
  """
  ckpt = Checkpointer(os.path.join(directory, "checkpoints"), keep=1, asynchronous=False)
  try:
    ckpt.save(step, params, {"step": np.asarray(step, np.int32)}, {}, force=True)
  finally:
    ckpt.close()  # waits for the write
