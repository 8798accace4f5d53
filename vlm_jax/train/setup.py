"""Everything a run builds before it touches data or weights: mesh, model, shapes,
shardings, optimiser and the jitted step (also what `launch.simulate` compiles).

Shapes come first (`jax.eval_shape`, nothing allocated), shardings are derived from
the abstract tree through the config's logical-axis rules, and only then does
`init_from` materialise parameters directly sharded.
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import optax

from vlm_jax.models.build import build_model
from vlm_jax.models.params import example_inputs
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.extension import PLAIN, TrainExtension
from vlm_jax.train.step import TrainState, make_train_step


def param_shapes_and_shardings(model: nn.Module, mesh, rules):
  """(abstract params, their NamedShardings) of `model` under the logical-axis `rules`."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(model))["params"])
  shardings = mesh_lib.logical_shardings(nn.get_partition_spec(boxed), mesh, rules)
  return nn.meta.unbox(boxed), shardings


def state_shardings(tx, abstract_params, param_shardings, labels, mesh):
  """The TrainState's shardings (optimiser state like its parameters) and the abstract optimiser state."""
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
  model_params: dict  # the model's abstract parameters
  model_shardings: dict
  abstract_params: dict  # what the state holds (the model's, or the extension's wrapping of them)
  param_shardings: dict
  labels: dict
  optim: Any  # config.optim with total_steps filled in
  tx: optax.GradientTransformation
  shardings: TrainState
  abstract_opt: Any
  batch_sharding: Any
  input_shardings: Any  # the extension's step inputs (None: the step takes none)
  step: Callable  # jitted (state, batch[, inputs]) -> (state, metrics), state donated
  extension: TrainExtension


def step_setup(config, devices: Optional[Sequence[jax.Device]] = None,
               extension: TrainExtension = PLAIN) -> StepSetup:
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  rules = [tuple(r) for r in config.rules]
  model = build_model(config.model)
  model_params, model_shardings = param_shapes_and_shardings(model, mesh, rules)
  abstract_params, param_shardings = model_params, model_shardings
  if extension.wrap_params:
    abstract_params, param_shardings = extension.wrap_params(model_params, model_shardings, mesh)
  input_shardings = extension.input_shardings(model_shardings) if extension.input_shardings else None
  labels = optim_lib.path_labels(abstract_params, [tuple(g) for g in config.optim.groups])
  optim = config.optim.copy_and_resolve_references()
  with optim.unlocked():
    optim.total_steps = config.total_steps
  tx = optim_lib.make_optimizer(optim, labels)
  shardings, abstract_opt = state_shardings(tx, abstract_params, param_shardings, labels, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  step_fn = make_train_step(model, tx, labels, optim_lib.schedule(optim), config.get("z_loss", 0.0),
                            config.get("grad_accum", 1), extension, config.get("loss_chunk", 0))
  in_shardings = (shardings, batch_sharding) + ((input_shardings,) if input_shardings is not None else ())
  jitted = jax.jit(step_fn, in_shardings=in_shardings,
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  return StepSetup(mesh, rules, model, model_params, model_shardings, abstract_params, param_shardings, labels,
                   optim, tx, shardings, abstract_opt, batch_sharding, input_shardings, jitted, extension)
