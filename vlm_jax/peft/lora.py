"""LoRA and SparseLoRA as a transform of the parameter tree (METHODS §4).

Every adapted kernel W `[..., in, out]` gets factors A `[..., in, r]` and B
`[..., r, out]` (B starts at zero, so training starts from the base model).
The model always runs on the merged kernel

    W' = (W + (α/r)·A·B) ⊙ M      (M: the kernel's sparsity mask, if it has one)

which for M = 1 is plain LoRA (`x·W + (α/r)·x·A·B`, computed as one matmul)
and otherwise SparseLoRA: the mask applies to the sum, so the merged weights
are exactly as sparse as M, and exporting is this same function. The base
stays frozen and dense (the distillation teacher is `base` itself).

`forward_kernels` names SparseLoRA's three forward modes (`MODES`, as in RESSA's
code): "sparse" is the merge above; "non_sparse", `W ⊙ M + (α/r)·A·B`, leaves
the adapter's delta unmasked (dense merged kernels); "dense", `W + (α/r)·A·B`,
ignores the mask.

The adapter tree mirrors the parameters: `lora[...]["q"]["kernel"] = {"a", "b"}`,
so it shards, checkpoints and exports like any pytree. A kernel's rank is the
last axis of its A; α is one number for the whole model.

Dropout on the adapter's input (the usual `lora_dropout`) is not offered: it
needs a separate per-token adapter path, which SparseLoRA's masked sum rules out.
"""

import json
import os
import re
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vlm_jax.models.params import check_companion_fits, flat, is_linear_kernel, unflat


def adapted_kernels(params: dict, ranks: Iterable[tuple[str, int]]) -> dict[str, int]:
  """{kernel path: rank} for linear kernels matching a `(path regex, rank)` (first match wins; rank 0 skips)."""
  rules = [(re.compile(p), int(r)) for p, r in ranks]
  out = {}
  for path, leaf in flat(params).items():
    if not is_linear_kernel(path, leaf):
      continue
    rank = next((r for p, r in rules if p.fullmatch(path)), 0)
    if rank:
      out[path] = rank
  if not out:
    raise ValueError(f"no linear kernel matches the LoRA targets {[p for p, _ in ranks]}")
  return out


def init(params: dict, ranks: Iterable[tuple[str, int]], rng: jax.Array) -> dict:
  """Fresh adapters: A ~ U(±1/√in) (PEFT's default), B = 0."""
  chosen = adapted_kernels(params, ranks)
  fp = flat(params)
  out = {}
  for i, (path, rank) in enumerate(sorted(chosen.items())):
    w = fp[path]
    *lead, fan_in, fan_out = np.shape(w)
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, fan_in, rank), jnp.float32, -bound, bound)
    out[path] = {"a": a, "b": jnp.zeros((*lead, rank, fan_out), jnp.float32)}
  return unflat({f"{p}/{k}": v for p, ab in out.items() for k, v in ab.items()})


def abstract(params: dict, ranks: Iterable[tuple[str, int]]) -> dict:
  """ShapeDtypeStructs of `init`'s adapters, without allocating them."""
  return jax.eval_shape(lambda: init(params, ranks, jax.random.key(0)))


def _factors(lora: dict) -> dict[str, dict]:
  return {path[: -len("/a")]: {"a": a, "b": flat(lora)[path[: -len("/a")] + "/b"]}
          for path, a in flat(lora).items() if path.endswith("/a")}


def merge(params: dict, lora: Optional[dict], masks: Optional[dict], alpha: float) -> dict:
  """The kernels the model runs on: `(W + (α/r)·A·B) ⊙ M`, differentiable in the adapters."""
  factors = _factors(lora) if lora else {}
  fm = flat(masks) if masks else {}
  if masks:
    check_companion_fits(params, masks, "mask")
  out = {}
  for path, w in flat(params).items():
    if path in factors:
      a, b = factors[path]["a"], factors[path]["b"]
      delta = (alpha / a.shape[-1]) * jnp.einsum("...ir,...ro->...io", a, b)
      w = (w.astype(jnp.float32) + delta).astype(w.dtype)
    if path in fm:
      w = jnp.where(fm[path], w, jnp.zeros((), w.dtype))
    out[path] = w
  return unflat(out)


MODES = ("sparse", "non_sparse", "dense")


def forward_kernels(params: dict, lora: Optional[dict], masks: Optional[dict], alpha: float,
                    mode: str = "sparse") -> dict:
  """The kernels of SparseLoRA's forward `mode`: what the mask applies to differs.

  sparse      (W + (α/r)·A·B) ⊙ M   exactly as sparse as M (`merge`; training and export here)
  non_sparse  W ⊙ M + (α/r)·A·B     the pruned base plus an unmasked delta: dense again
  dense       W + (α/r)·A·B         the mask ignored (plain LoRA on the unpruned base)
  """
  if mode == "sparse":
    return merge(params, lora, masks, alpha)
  if mode == "non_sparse":
    return merge(merge(params, None, masks, alpha), lora, None, alpha)
  if mode == "dense":
    return merge(params, lora, None, alpha)
  raise ValueError(f"unknown SparseLoRA forward mode {mode!r}; modes are {MODES}")


def save_adapters(directory: str, lora: dict, alpha: float) -> None:
  """The adapters alone: `<directory>/adapters` (Orbax) and `adapter_config.json` (α, rank per kernel)."""
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(directory, "adapters"), lora, force=True)
  ranks = {p: int(f["a"].shape[-1]) for p, f in _factors(lora).items()}
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump({"alpha": alpha, "ranks": ranks}, f, indent=1)


def load_adapters(directory: str) -> tuple[dict, float]:
  """(adapters, α) written by `save_adapters`, as host arrays; `merge` applies them to a base."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, "adapter_config.json")) as f:
    alpha = json.load(f)["alpha"]
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(os.path.join(directory, "adapters")), alpha
