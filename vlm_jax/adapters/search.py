"""Hyper-parameter search (α, β, λ) on a VALIDATION split, vectorised over the grid.

The β-free terms (the text logits and the f·Fᵀ affinities, the only matmuls) are computed once;
for one β the cache terms (`logits.parts_at`) are then one exp and a vote each; α and λ act
linearly, so every (α, λ) pair is a `vmap` over cheap [N, C] combinations, and the β axis is a
`lax.map` (one β's [nα, nλ, N, C] at a time: bounded memory). Tip-Adapter is the same search
with λ = 1 and no negative path. Ties go to the first grid point in (β, α, λ) order.

`search` takes a `Split` and refuses one whose name is not the validation split's: the fitting
code holds only `Shots` (which carry the validation split and nothing else), and this check
keeps a test split from being passed in by hand.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.adapters import logits as L
from vlm_jax.adapters.task import VALIDATION, Split
from vlm_jax.models.metrics import argmax_equals


@dataclasses.dataclass(frozen=True)
class Grid:
  """(lo, hi, count) per hyper-parameter, linearly spaced, or geometrically for the names in
  `geometric` (lo > 0); Tip-Adapter's ranges by default."""
  alpha: tuple = (0.1, 5.0, 20)
  beta: tuple = (0.1, 7.0, 20)
  lam: tuple = (0.0, 1.0, 11)
  geometric: tuple = ()

  def values(self, name: str) -> np.ndarray:
    lo, hi, n = getattr(self, name)
    space = np.geomspace if name in self.geometric else np.linspace
    return space(lo, hi, int(n)).astype(np.float32)

  @property
  def size(self) -> int:
    return int(self.alpha[2] * self.beta[2] * self.lam[2])


def _check(split: Split) -> None:
  if not isinstance(split, Split):
    raise TypeError(f"the search takes a validation Split, got {type(split).__name__}")
  if split.name != VALIDATION:
    raise ValueError(f"the hyper-parameter search reads the {VALIDATION!r} split only, not {split.name!r}")


@jax.jit
def _accuracies(arrays, x, y, betas, alphas, lams, text_scale, neg_scale):
  """[nβ, nα, nλ] validation accuracies; `arrays` without w_neg / neg_keys: no negative path."""
  terms = L.beta_free_terms(x, arrays["w_pos"], arrays.get("w_neg"), arrays["keys"], arrays.get("neg_keys"),
                            text_scale, neg_scale)  # once: the search's only matmuls

  def per_beta(beta):
    parts = L.parts_at(terms, arrays["pos_labels"], arrays.get("neg_labels"), beta)

    def acc(alpha, lam):
      return jnp.mean(argmax_equals(L.combine(parts, alpha, lam), y))
    return jax.vmap(jax.vmap(acc, (None, 0)), (0, None))(alphas, lams)  # [nα, nλ]
  return jax.lax.map(per_beta, betas)  # [nβ, nα, nλ]


def search(arrays: dict, validation: Split, grid: Grid = Grid(), *, negative: bool,
           text_scale: float = L.TEXT_SCALE, neg_scale: float = L.NEG_SCALE) -> dict:
  """The best (alpha, beta[, lam]) on the validation split -> {"alpha", "beta", "lam", "accuracy", "grid"}.

  `arrays` as an Adapter's (tip: w_pos, keys, pos_labels; dual: all six). negative=False is
  Tip-Adapter's search (λ fixed at 1).
  """
  _check(validation)
  betas, alphas = grid.values("beta"), grid.values("alpha")
  lams = grid.values("lam") if negative else np.ones((1,), np.float32)
  names = ("w_pos", "w_neg", "keys", "neg_keys", "pos_labels", "neg_labels") if negative else (
      "w_pos", "keys", "pos_labels")
  acc = np.asarray(_accuracies({n: jnp.asarray(arrays[n]) for n in names}, jnp.asarray(validation.x),
                               jnp.asarray(validation.y), betas, alphas, lams, float(text_scale),
                               float(neg_scale)))
  ib, ia, il = np.unravel_index(int(np.argmax(acc)), acc.shape)
  out = {"alpha": float(alphas[ia]), "beta": float(betas[ib]), "accuracy": float(acc[ib, ia, il]),
         "grid": int(acc.size)}
  if negative:
    out["lam"] = float(lams[il])
  return out
