"""Where a run's starting weights come from: the one reader of `config.init` and `config.init_parts`.

The order, the first that applies wins:
  1. resume: this run's own newest readable checkpoint (`<workdir>/checkpoints`): parameters,
     optimiser state, step, RNG and the data iterator's state, so a restarted run continues
     exactly where it stopped; `config.init` is not read;
  2. `config.init = "checkpoint:<workdir>"`: another run's newest parameters (the previous stage);
  3. `config.init = "hf:<folder>"`: a Hugging Face checkpoint (`vlm_jax.from_hf`);
  4. `config.init = "scratch"`: random, from `config.seed`.
After 2-4, `config.init_parts = {subtree: "checkpoint:<workdir>"}` replaces top-level
subtrees by another run's (a VLM that starts from a contrastive run's vision tower), and a
train extension may wrap the result (`TrainExtension.initial_params`).

`config.model` may be None (or empty) only with `init = "hf:<folder>"`: the folder's
config.json then says what the model is (`model_of`). Jobs that need a model and its
weights but no training (scoring, pruning) call `load_model`.
"""

import logging
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.interop import from_hf, model_from_folder
from vlm_jax.models.build import build_model
from vlm_jax.models.params import example_inputs
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.checkpoint import (Checkpointer, CheckpointMismatch, abstract_like, check_same_shapes,
                                      restore_params)
from vlm_jax.train.setup import StepSetup, param_shapes_and_shardings
from vlm_jax.train.step import TrainState

log = logging.getLogger(__name__)

KINDS = ("scratch", "checkpoint", "hf")


def parse(init: str) -> tuple[str, str]:
  """`"scratch"` | `"checkpoint:<workdir>"` | `"hf:<folder>"` -> (kind, path)."""
  kind, _, path = str(init).partition(":")
  if kind not in KINDS or (kind == "scratch") != (not path):
    raise ValueError(f"config.init must be 'scratch', 'hf:<folder>' or 'checkpoint:<workdir>', got {init!r}")
  return kind, path


def model_of(config) -> nn.Module:
  """The model of `config.model`, or of the Hugging Face folder of `init="hf:<folder>"` when it is empty."""
  if config.get("model"):
    return build_model(config.model)
  kind, path = parse(config.init)
  if kind != "hf":
    raise ValueError(f"config.model is empty: the model can only come from init='hf:<folder>', "
                     f"got init={config.init!r}")
  return model_from_folder(path)


# ----------------------------------------------------------------------------- 2-4: config.init

def initial_params(init: str, model: nn.Module, abstract_params, param_shardings, seed: int,
                   parts: Optional[Mapping[str, str]] = None):
  """`init` (`config.init`) then `parts` (`config.init_parts`), placed with their shardings (steps 2-4)."""
  kind, path = parse(init)
  if kind == "scratch":
    fn = lambda rng: nn.meta.unbox(model.init(rng, *example_inputs(model))["params"])
    params = jax.jit(fn, out_shardings=param_shardings)(jax.random.key(seed))
  elif kind == "checkpoint":
    params = restore_params(path, abstract_like(abstract_params, param_shardings))
  else:
    scanned = getattr(getattr(model.config, "text", model.config), "scan_layers", False)
    _, params = from_hf(path, **({"scan_layers": True} if scanned else {}))  # from_hf stacks the layers
    check_same_shapes(params, abstract_params, path)
    params = jax.device_put(params, param_shardings)
  return load_parts(params, dict(parts or {}), abstract_params, param_shardings)


def _initial_params_of(config, model: nn.Module, abstract_params, param_shardings):
  return initial_params(config.init, model, abstract_params, param_shardings, config.seed,
                        config.get("init_parts"))


def load_parts(params: dict, parts: Mapping[str, str], abstract_params, param_shardings) -> dict:
  """Replaces top-level subtrees of `params` by the same subtrees of other runs:
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


def load_model(config, mesh, rules, params: Optional[Any] = None) -> tuple[nn.Module, Any, Any]:
  """(model, parameters placed with their shardings, shardings) for a job that does not train;
  `params` (tests, notebooks) replaces reading `config.init`."""
  model = model_of(config)
  abstract, shardings = param_shapes_and_shardings(model, mesh, rules)
  if params is None:
    params = _initial_params_of(config, model, abstract, shardings)
  return model, jax.device_put(params, shardings), shardings


# ----------------------------------------------------------------------------- 1-4: a train run's state

def start(config, setup: StepSetup, ckpt: Checkpointer) -> tuple[int, TrainState, Optional[dict], Any]:
  """(first step, state, data-iterator state or None, the extension's step inputs) of a train run."""
  ext = setup.extension
  inputs = ext.load_inputs(setup.model_params, setup.model_shardings) if ext.load_inputs else None
  shardings = setup.shardings
  # 1. resume this run.
  abstract_train = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                    "opt_state": abstract_like(setup.abstract_opt, shardings.opt_state),
                    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shardings.rng)}
  try:
    restored = ckpt.restore_latest(abstract_like(setup.abstract_params, setup.param_shardings), abstract_train)
  except CheckpointMismatch as e:
    if not config.checkpoint.get("overwrite", False):
      raise CheckpointMismatch(f"{e}. This is not the run of this config: use another --workdir, or "
                               f"--config.checkpoint.overwrite=True to move those checkpoints aside "
                               f"(nothing is deleted) and start fresh") from None
    log.warning("%s; checkpoint.overwrite=True: they are moved to %s", e, ckpt.move_all_aside())
    restored = None
  if restored:
    step, params, train_items, data_state = restored
    log.info("resumed from step %d", step)
    return step, TrainState(train_items["step"], params, train_items["opt_state"], train_items["rng"]), \
        data_state, inputs
  # 2-4. config.init (+ init_parts), then the extension's wrapping.
  params = _initial_params_of(config, setup.model, setup.model_params, setup.model_shardings)
  if ext.initial_params:
    params = jax.device_put(ext.initial_params(params, inputs, config.seed), setup.param_shardings)
  trainable, _ = optim_lib.split(params, setup.labels)
  opt_state = jax.jit(setup.tx.init, out_shardings=shardings.opt_state)(trainable)
  rng = jax.random.key_data(jax.random.key(config.seed))
  state = TrainState(jnp.zeros((), jnp.int32), params, opt_state, rng)
  return 0, jax.device_put(state, shardings), None, inputs
