r"""Repairing a pruned model (METHODS §4, RESSA's sparse cross-modality adaptation).

Architecture. The prune job leaves the dense model W and boolean masks M (True = kept).
Repair trains low-rank adapters A, B on top of the frozen dense model, and the model
always runs on the masked sum, so the repaired model is exactly as sparse as M:

    student  = (W + (α/r)·A·B) ⊙ M        (SparseLoRA; `peft.lora.merge`)
    teacher  = W                          (the frozen dense base itself: no second copy)
    loss     = (1 − λ)·task(student) + λ·KL(p_teacher ‖ p_student)     (temperature T)
    export   = the same merge, once        (`jobs.repair` writes it, as Orbax and optionally HF)

The alternative, masked full fine-tuning (`lora_alpha = 0`), trains the kept weights
themselves: gradients and updated weights are projected onto the mask, so pruned weights
stay exactly zero; it has no dense copy, hence no teacher.

Neither is a branch of the engine: `extension(config)` builds the `TrainExtension`
(`vlm_jax.train.extension`) that the train loop runs with; the masks are an explicit
input of every step, sharded like their parameters. Reference settings: r = 4 (vision),
8 (projector, LM), α = 16, λ = 0.1, T = 1 (`sparse_config`'s defaults).
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.params import flat
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.peft import lora as lora_lib
from vlm_jax.sparsity import masks as masks_lib
from vlm_jax.train.extension import TrainExtension
from vlm_jax.train.step import forward

MODES = ("sparse_lora", "masked")


@dataclasses.dataclass(frozen=True)
class SparseTraining:
  """How a pruned model trains: SparseLoRA (`lora_alpha` α) with optional distillation
  (`kd_weight` λ, `kd_temperature` T), or masked full fine-tuning (`lora_alpha` None)."""
  lora_alpha: Optional[float] = None
  kd_weight: float = 0.0
  kd_temperature: float = 1.0

  def __post_init__(self):
    if self.kd_weight and self.lora_alpha is None:
      raise ValueError("distillation needs the dense teacher: use SparseLoRA (lora_alpha), where the frozen "
                       "base is the teacher; masked full fine-tuning has no dense copy")

  @classmethod
  def from_config(cls, sparse) -> "SparseTraining":
    """From a config's `sparse` block (`sparse_config`); lora_alpha 0 = masked fine-tuning."""
    return cls(lora_alpha=float(sparse.get("lora_alpha", 0.0)) or None,
               kd_weight=float(sparse.get("kd_weight", 0.0)),
               kd_temperature=float(sparse.get("kd_temperature", 1.0)))


def sparse_config(masks: str, mode: str = "sparse_lora", alpha: float = 16.0, rank_vision: int = 4,
                  rank_lm: int = 8, kd: float = 0.1, temperature: float = 1.0) -> ml_collections.ConfigDict:
  """The `sparse` block of a repair config; `masks` is the prune job's workdir."""
  if mode not in MODES:
    raise ValueError(f"repair mode must be one of {MODES}, got {mode!r}")
  lora = mode == "sparse_lora"
  return ml_collections.ConfigDict(dict(
      masks=masks, lora_alpha=alpha if lora else 0.0,
      lora_ranks=[("vision/.*", rank_vision), ("(projector|lm)/.*", rank_lm), (".*", rank_lm)],
      kd_weight=kd if lora else 0.0, kd_temperature=temperature))


def repair_groups(mode: str) -> list:
  """What trains: the adapters alone (SparseLoRA), or every weight (masked fine-tuning)."""
  return [("lora/.*", 1.0), (".*", None)] if mode == "sparse_lora" else [(".*", 1.0)]


def kd_sum(student_logits: jax.Array, teacher_logits: jax.Array, batch: dict, temperature: float) -> jax.Array:
  """Σ over target tokens of KL(p_teacher ‖ p_student), both softmaxes at temperature T.

  Divided by the target-token count by the step ("batchmean" per token); no T² factor
  (the reference repair uses T = 1).
  """
  s = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return jnp.sum(kl * batch["loss_mask"][:, 1:].astype(jnp.float32))


def project_onto(tree: dict, masks: dict) -> dict:
  """Zeroes the masked entries of a flat, path-keyed tree (gradients, updated weights)."""
  fm = flat(masks)
  return {k: (jnp.where(fm[k], v, jnp.zeros((), v.dtype)) if k in fm else v) for k, v in tree.items()}


def extension(config) -> TrainExtension:
  """The TrainExtension of `config.sparse` (masks from `config.sparse.masks`)."""
  settings = SparseTraining.from_config(config.sparse)
  masks_dir = config.sparse.masks
  step_inputs = dict(
      input_shardings=lambda model_shardings: masks_lib.mask_shardings(masks_dir, model_shardings),
      load_inputs=lambda abstract, shardings: masks_lib.load_masks(masks_dir, abstract, shardings))
  if settings.lora_alpha is None:
    return TrainExtension(name="masked fine-tuning", **step_inputs,
                          initial_params=lambda params, masks, seed: masks_lib.apply_masks(params, masks),
                          project=project_onto)

  ranks = [tuple(r) for r in config.sparse.lora_ranks]
  alpha, kd_weight, temperature = settings.lora_alpha, settings.kd_weight, settings.kd_temperature

  def wrap_params(abstract, shardings, mesh):  # the state holds the dense frozen base and the adapters
    adapters = lora_lib.abstract(abstract, ranks)
    return ({"base": abstract, "lora": adapters},
            {"base": shardings, "lora": jax.tree.map(lambda _: mesh_lib.replicated(mesh), adapters)})

  def initial_params(params, masks, seed):
    return {"base": params, "lora": lora_lib.init(params, ranks, jax.random.key(seed))}

  def distill(model, params, masks, batch, logits, task_sum):
    teacher = jax.lax.stop_gradient(forward(model, params["base"], batch))
    kd = kd_sum(logits, teacher, batch, temperature)
    return (1.0 - kd_weight) * task_sum + kd_weight * kd, {"kd_sum": kd}

  return TrainExtension(name="SparseLoRA", **step_inputs, wrap_params=wrap_params, initial_params=initial_params,
                        student=lambda params, masks: lora_lib.merge(params["base"], params["lora"], masks, alpha),
                        loss=distill if kd_weight else None)


def merged_params(state_params: dict, masks: dict, lora_alpha: Optional[float]) -> dict:
  """What a repaired model exports: the merged SparseLoRA weights, or the masked weights."""
  if lora_alpha:
    return lora_lib.merge(state_params["base"], state_params["lora"], masks, lora_alpha)
  return masks_lib.apply_masks(state_params, masks)
