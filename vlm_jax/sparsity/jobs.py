"""The config-file jobs `prune` and `repair` (configs/prune.py, configs/repair.py).

prune:  model (a Hugging Face folder or a checkpoint) -> calibration batches from
        `config.data` -> masks -> `<workdir>`: the pruned parameters as an Orbax
        run (`init="checkpoint:<workdir>"` reads them), `masks/` + `mask_paths.json`,
        `sparsity.json`, and a Hugging Face folder when `config.export_hf` is set.
repair: the train loop with the TrainExtension of `config.sparse` (`repair.py`:
        SparseLoRA + distillation, or masked full fine-tuning), then the merged weights `(W + (α/r)AB) ⊙ M` as an
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

from vlm_jax import report
from vlm_jax.data import schema
from vlm_jax.data.inputs import make_data
from vlm_jax.interop import to_hf
from vlm_jax.models.build import build_model, model_config
from vlm_jax.models.params import abstract_params
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.peft import lora as lora_lib
from vlm_jax.sparsity import masks as masks_lib
from vlm_jax.sparsity import repair as repair_lib
from vlm_jax.sparsity.prune import prune as prune_model
from vlm_jax.train import init_from
from vlm_jax.train.checkpoint import save_params
from vlm_jax.train.loop import stop_unless_finished, train

log = logging.getLogger(__name__)


def load_model(config):
  """(model, params) of `config.init` (`train/init_from.py`); the model from the folder for `hf:` without `model`."""
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  model, params, _ = init_from.load_model(config, mesh, [tuple(r) for r in config.rules])
  return model, params


def calibration_batches(config, model) -> list[dict]:
  """`config.calibration.rows` rows from `config.data` (the pipeline), as device batches."""
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
    return prune_model(model, params, method=p.method, pattern=p.pattern, ratios=dict(p.ratios),
                       overrides=[tuple(o) for o in p.get("overrides", ())],
                       include=tuple(p.get("include", ())), calibration=batches,
                       progress=config.get("progress", True),
                       rows_sharding=mesh_lib.batch_sharding(mesh, rules))


def write_outputs(workdir: str, model, params: dict, masks: dict, export_hf: str = "") -> list[dict]:
  """The pruned (or merged) model: Orbax run, masks, sparsity table/JSON, optional HF folder."""
  params = jax.device_get(params)
  save_params(workdir, params)
  masks_lib.save_masks(workdir, masks)
  rows = masks_lib.sparsity_report(params, masks)
  if jax.process_index() == 0:
    masks_lib.print_report(rows, per_layer=False)
    report.write_json(os.path.join(workdir, "sparsity.json"), rows)
  if export_hf:
    to_hf(model, params, export_hf)
    log.info("wrote the Hugging Face checkpoint %s", export_hf)
  return rows


def prune(config, workdir: str) -> list[dict]:
  model, params = load_model(config)
  batches = calibration_batches(config, model) if config.prune.method != "magnitude" else None
  params, masks = prune_params(config, model, params, batches)
  return write_outputs(workdir, model, params, masks, config.get("export_hf", ""))


def repair(config, workdir: str) -> dict:
  if not config.get("model"):  # the loop builds the model from its config: take it from the HF folder
    with config.unlocked():
      config.model = ml_collections.ConfigDict(model_config(init_from.model_of(config)))
  summary = stop_unless_finished(train(config, workdir, extension=repair_lib.extension(config)))  # no merge of partial weights
  masks = jax.device_get(masks_lib.load_masks(config.sparse.masks, *_base_abstract(config)))
  alpha = repair_lib.SparseTraining.from_config(config.sparse).lora_alpha
  merged = repair_lib.merged_params(jax.device_get(summary["state"].params), masks, alpha)
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
