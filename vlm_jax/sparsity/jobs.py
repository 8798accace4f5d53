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

`prune` checks its arguments before loading anything (minutes at 7B); both refuse to
write non-finite weights and return at once when `<workdir>` already holds their finished
output (`config.overwrite=True` moves it to `<workdir>.old[.N]` and redoes the job).
"""

import json
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
from vlm_jax.models.params import abstract_params, check_finite
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.parallel.distributed import barrier
from vlm_jax.peft import lora as lora_lib
from vlm_jax.sparsity import masks as masks_lib
from vlm_jax.sparsity import repair as repair_lib
from vlm_jax.sparsity.prune import prune as prune_model
from vlm_jax.sparsity.pruners import resolve_pattern
from vlm_jax.train import init_from
from vlm_jax.train.checkpoint import save_params
from vlm_jax.train.loop import stop_unless_finished, train

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


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
  """The pruned (or merged) model: Orbax run, masks, sparsity table/JSON (written last: the
  job's "done" mark), optional HF folder; NaN or inf weights are refused before anything is written."""
  params = jax.device_get(params)
  check_finite(params, f"refusing to write {workdir}")
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


def check_arguments(config) -> None:
  """One clear error for arguments the prune job cannot use, before the model loads (minutes at 7B)."""
  p = config.prune
  init_from.parse(config.init)
  kind, n, m = masks_lib.parse_pattern(resolve_pattern(p.method, p.pattern))
  unknown = sorted(set(p.ratios) - set(masks_lib.TOWERS))
  if unknown:
    raise ValueError(f"config.prune.ratios: unknown tower(s) {unknown}; towers are {masks_lib.TOWERS}")
  named = [(f"config.prune.ratios.{t}", r) for t, r in p.ratios.items()]
  named += [(f"config.prune.overrides {pat!r}", r) for pat, r in p.get("overrides", ())]
  for name, ratio in named:
    if not 0 <= float(ratio) < 1:
      raise ValueError(f"{name} = {ratio}: a sparsity ratio must be in [0, 1)")
    if kind == "nm" and float(ratio) not in (0.0, n / m):
      raise ValueError(f"{name} = {ratio}: pattern {n}:{m} prunes exactly {n / m:g} (use 0 or {n / m:g})")
  if p.method != "magnitude":
    _check_calibration_data(config)


def _check_calibration_data(config) -> None:
  """Wanda and SparseGPT calibrate on `config.data`: it must name a data set and a tokenizer
  (by default the tokenizer of the `init=hf:<folder>`, when the folder has one)."""
  data, method = config.data, config.prune.method
  if data.get("source", "pipeline") == "synthetic":
    return
  if not any(s.get("name") for s in data.get("sources", ())):
    raise ValueError(f"{method} calibrates on data: name a data set with source=<name printed by "
                     f"launch.build_data> (and data_dir=), or use method=magnitude")
  if data.get("tokenizer"):
    return
  kind, folder = init_from.parse(config.init)
  if kind == "hf" and any(os.path.exists(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
    data.tokenizer = folder
    return
  raise ValueError(f"{method} calibrates on data and needs a tokenizer: pass tokenizer=<folder>"
                   + ("" if kind != "hf" else f" ({folder} has no tokenizer files)"))


def _finished(directory: str, export_hf: str, names: tuple) -> bool:
  """Whether `directory` holds a finished output: `names` (sparsity.json, written last, among
  them) and, when asked for, the Hugging Face folder's config.json (written after its weights)."""
  needed = [os.path.join(directory, n) for n in names] + ([os.path.join(export_hf, "config.json")]
                                                          if export_hf else [])
  return all(os.path.exists(p) for p in needed)


def _redo_or_report(config, workdir: str, output: str, names: tuple) -> Optional[list[dict]]:
  """The sparsity rows of a finished `output` (one line says so), or None to run the job:
  nothing there yet, or `config.overwrite` moves the old `workdir` aside (nothing is deleted)."""
  if not _finished(output, config.get("export_hf", ""), names):
    return None
  if not config.get("overwrite", False):
    print(f"{config.job}: already done in {output}; --config.overwrite=True redoes it", flush=True)
    with open(os.path.join(output, "sparsity.json")) as f:
      return json.load(f)
  target, n = f"{workdir}.old", 1
  while os.path.exists(target):
    target, n = f"{workdir}.old.{n}", n + 1
  if jax.process_index() == 0:
    os.rename(workdir, target)
  barrier(f"{config.job}: moved aside")
  log.warning("config.overwrite=True: the finished %s output moved to %s; redoing it", config.job, target)
  return None


def prune(config, workdir: str) -> list[dict]:
  workdir = os.path.abspath(workdir)
  check_arguments(config)
  done = _redo_or_report(config, workdir, workdir, ("sparsity.json", "mask_paths.json", "masks", "checkpoints"))
  if done is not None:
    return done
  model, params = load_model(config)
  batches = calibration_batches(config, model) if config.prune.method != "magnitude" else None
  params, masks = prune_params(config, model, params, batches)
  return write_outputs(workdir, model, params, masks, config.get("export_hf", ""))


def repair(config, workdir: str) -> dict:
  workdir = os.path.abspath(workdir)
  done = _redo_or_report(config, workdir, os.path.join(workdir, "merged"), ("sparsity.json",))
  if done is not None:
    return {"status": "finished", "workdir": workdir, "sparsity": done}
  if not config.get("model"):  # the loop builds the model from its config: take it from the HF folder
    with config.unlocked():
      config.model = ml_collections.ConfigDict(model_config(init_from.model_of(config)))
  summary = stop_unless_finished(train(config, workdir, extension=repair_lib.extension(config)))  # no merge of partial weights
  masks = jax.device_get(masks_lib.load_masks(config.sparse.masks, *_base_abstract(config)))
  alpha = repair_lib.SparseTraining.from_config(config.sparse).lora_alpha
  merged = repair_lib.merged_params(jax.device_get(summary["state"].params), masks, alpha)
  summary["merged"] = merged
  adapters = jax.device_get(summary["state"].params["lora"]) if alpha else None
  check_finite({"merged": merged, "adapters": adapters}, f"refusing to write {workdir}")  # before the adapters
  if alpha and jax.process_index() == 0:  # the adapters alone, too
    lora_lib.save_adapters(os.path.join(workdir, "adapters"), adapters, alpha)
  summary["sparsity"] = write_outputs(os.path.join(workdir, "merged"), summary["model"], merged, masks,
                                      config.get("export_hf", ""))
  return summary


def _base_abstract(config):
  """The model's abstract params and (single-device) shardings, for reading masks on the host."""
  abstract = abstract_params(build_model(config.model))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return abstract, jax.tree.map(lambda _: device, abstract)
