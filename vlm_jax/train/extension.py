"""`TrainExtension`: the seam through which a technique changes training.

The engine (setup, step, loop) knows no technique. A technique that trains
differently (a pruned model under its masks, SparseLoRA with distillation, ...)
builds one `TrainExtension` and passes it to `loop.train(..., extension=...)`;
every hook left `None` leaves the engine's behaviour as it is, so a plain run
takes exactly the plain path.

The hooks, in the order the engine calls them:

  setup (no arrays yet)
    wrap_params(abstract, shardings, mesh) -> (abstract, shardings)
        the tree the train state holds, from the model's (e.g. {"base": model, "lora": adapters})
    input_shardings(model_shardings) -> shardings
        extra inputs of every step (e.g. masks), sharded like the parameters they go with
  start (a fresh run; a resumed one restores the wrapped tree from its checkpoint)
    load_inputs(model_abstract, model_shardings) -> inputs
    initial_params(model_params, inputs, seed) -> params of the state
  every step (inside jit; `inputs` is None without `input_shardings`)
    student(params, inputs) -> the parameters the model runs on
    loss(model, params, inputs, batch, logits, task_sum) -> (total_sum, {name_sum: value})
        the objective, summed over target tokens like the task loss; each `<name>_sum` is
        logged as the metric `<name>` (per target token)
    project(tree, inputs) -> tree
        applied to the gradients and to the updated trainable parameters (flat, path-keyed;
        e.g. zeroing pruned weights so they stay exactly zero)
"""

import dataclasses
from typing import Any, Callable, Optional

import jax


@dataclasses.dataclass(frozen=True)
class TrainExtension:
  name: str = "extension"
  wrap_params: Optional[Callable[[Any, Any, jax.sharding.Mesh], tuple[Any, Any]]] = None
  input_shardings: Optional[Callable[[Any], Any]] = None
  load_inputs: Optional[Callable[[Any, Any], Any]] = None
  initial_params: Optional[Callable[[Any, Any, int], Any]] = None
  student: Optional[Callable[[Any, Any], Any]] = None
  loss: Optional[Callable[..., tuple[jax.Array, dict]]] = None
  project: Optional[Callable[[dict, Any], dict]] = None

  def __post_init__(self):
    if (self.input_shardings is None) != (self.load_inputs is None):
      raise ValueError(f"{self.name}: step inputs need both input_shardings and load_inputs")


PLAIN = TrainExtension(name="plain")
