"""The config-file jobs `prune` and `repair` (configs/prune.py, configs/repair.py).

prune:  model (a Hugging Face folder or a checkpoint) -> calibration batches from
        `config.data` -> masks -> `<workdir>`: the pruned parameters as an Orbax
        run (`init="checkpoint:<workdir>"` reads them), `masks/` + `mask_paths.json`,
        `sparsity.json`, and a Hugging Face folder when `config.export_hf` is set.
repair: the train loop with `config.sparse` (SparseLoRA + distillation, or
        masked full fine-tuning), then the merged weights `(W + (α/r)AB) ⊙ M` as an
        Orbax run in `<workdir>/merged` (and `config.export_hf`), with their sparsity,
        and for SparseLoRA the adapters alone in `<workdir>/adapters`
        (`vlm_jax.peft.lora.load_adapters`; `merge(base, adapters, masks, α)`).
"""

import logging
import os
from typing import Optional

import flax.linen as nn
import jax
import ml_collections

from vlm_jax import sparsity
from vlm_jax.data import schema
from vlm_jax import report
from vlm_jax.models.build import build_model
from vlm_jax.models.params import abstract_params
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.peft import lora as lora_lib
from vlm_jax.sparsity import masks as masks_lib

log = logging.getLogger(__name__)


def load_model(config):
  """(model, params) from `config.init`; the model from `config.model`, or from the folder for `hf:`."""
  from vlm_jax.train import loop
  kind, _, path = config.init.partition(":")
  if kind == "hf" and not config.get("model"):
    from vlm_jax.interop import from_hf
    return from_hf(path)
  model = build_model(config.model)
  abstract = abstract_params(model)
  shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh_lib.make_mesh(dict(config.mesh))), abstract)
  return model, loop.initial_params(config.init, model, abstract, shardings, config.seed)


def calibration_batches(config, model) -> list[dict]:
  """`config.calibration.rows` rows from `config.data` (the pipeline), as device batches."""
  from vlm_jax.train.loop import make_data
  data = make_data(config, model)
  rows, batches = 0, []
  while rows < config.calibration.rows:
    batch = schema.device_batch(next(data))
    batches.append(batch)
    rows += batch["input_ids"].shape[0]
  return batches


def prune_params(config, model, params, batches: Optional[list] = None) -> tuple[dict, dict]:
  """`sparsity.prune` with the settings of `config.prune`, calibration rows sharded over `config.mesh`."""
  p = config.prune
  rules = [tuple(r) for r in config.rules]
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return sparsity.prune(model, params, method=p.method, pattern=p.pattern, ratios=dict(p.ratios),
                          overrides=[tuple(o) for o in p.get("overrides", ())],
                          include=tuple(p.get("include", ())), calibration=batches,
                          progress=config.get("progress", True),
                          rows_sharding=mesh_lib.batch_sharding(mesh, rules))


def write_outputs(workdir: str, model, params: dict, masks: dict, export_hf: str = "") -> list[dict]:
  """The pruned (or merged) model: Orbax run, masks, sparsity table/JSON, optional HF folder."""
  from vlm_jax.soups import save
  params = jax.device_get(params)
  save(params, None, workdir, format="orbax")
  masks_lib.save_masks(workdir, masks)
  rows = sparsity.sparsity_report(params, masks)
  if jax.process_index() == 0:
    sparsity.print_report(rows, per_layer=False)
    report.write_json(os.path.join(workdir, "sparsity.json"), rows)
  if export_hf:
    from vlm_jax.interop import to_hf
    to_hf(model, params, export_hf)
    log.info("wrote the Hugging Face checkpoint %s", export_hf)
  return rows


def prune(config, workdir: str) -> list[dict]:
  model, params = load_model(config)
  batches = calibration_batches(config, model) if config.prune.method != "magnitude" else None
  params, masks = prune_params(config, model, params, batches)
  return write_outputs(workdir, model, params, masks, config.get("export_hf", ""))


def merged_params(state_params: dict, masks: dict, lora_alpha: Optional[float]) -> dict:
  """What a repaired model exports: the merged SparseLoRA weights, or the masked weights."""
  if lora_alpha:
    return lora_lib.merge(state_params["base"], state_params["lora"], masks, lora_alpha)
  return masks_lib.apply_masks(state_params, masks)


def repair(config, workdir: str) -> dict:
  from vlm_jax.train.loop import train
  kind, _, path = config.init.partition(":")
  if kind == "hf" and not config.get("model"):  # the loop builds the model from its config
    from vlm_jax.models.build import model_config
    from vlm_jax.soups import _hf_model
    with config.unlocked():
      config.model = ml_collections.ConfigDict(model_config(_hf_model(path)))
  summary = train(config, workdir)
  masks = jax.device_get(masks_lib.load_masks(config.sparse.masks, *_base_abstract(config)))
  alpha = float(config.sparse.get("lora_alpha", 0.0)) or None
  merged = merged_params(jax.device_get(summary["state"].params), masks, alpha)
  summary["merged"] = merged
  if alpha and jax.process_index() == 0:  # the adapters alone, too
    lora_lib.save_adapters(os.path.join(workdir, "adapters"), jax.device_get(summary["state"].params["lora"]), alpha)
  summary["sparsity"] = write_outputs(os.path.join(workdir, "merged"), summary["model"], merged, masks,
                                      config.get("export_hf", ""))
  return summary


def _base_abstract(config):
  """The model's abstract params and (single-device) shardings, for reading masks on the host."""
  abstract = abstract_params(build_model(config.model))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return abstract, jax.tree.map(lambda _: device, abstract)
