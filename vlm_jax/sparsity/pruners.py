"""Pruning criteria for one kernel `[in, out]`: magnitude, Wanda and SparseGPT (METHODS §4).

Each returns the kept-mask (and SparseGPT also the updated weights). Input
statistics come from `vlm_jax.sparsity.calibrate`:
  sq_norms  [in]      Σ_t x_tj², the squared L2 norm of input channel j over
                      all calibration tokens (Wanda's ‖X_j‖₂²; the reference's
                      per-sample mean differs by a constant, which no per-row
                      comparison sees)
  hessian   [in, in]  Σ_t x_t x_tᵀ (SparseGPT; its damping and updates are
                      invariant to the scale)

`pattern=None` (or "") means the method's reference rule, `DEFAULT_PATTERN`:
magnitude one threshold per matrix (`prune_magnitude`), Wanda per output unit
(`prune_wanda`), SparseGPT one threshold per block of inputs (`fasterprune`,
the matrix rule on each block: "row" and "matrix" both give it, and differ only
for the kernels without input statistics, pruned by magnitude).
"""

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from vlm_jax.sparsity.masks import mask_from_scores, parse_pattern

METHODS = ("magnitude", "wanda", "sparsegpt")
DEFAULT_PATTERN = {"magnitude": "matrix", "wanda": "row", "sparsegpt": "matrix"}


def resolve_pattern(method: str, pattern: Optional[str]) -> str:
  """`pattern`, or the method's reference rule for None / ""; a clear error for what the method lacks."""
  if method not in METHODS:
    raise ValueError(f"unknown pruning method {method!r}; known: {METHODS}")
  pattern = pattern or DEFAULT_PATTERN[method]
  if parse_pattern(pattern)[0] == "variant" and method != "wanda":
    raise ValueError(f"pattern 'variant' is Wanda's (the reference's --use_variant), not {method}'s")
  return pattern


def magnitude(kernel: jax.Array, ratio: float, pattern: str) -> jax.Array:
  """|W|; a vector (a norm's scale, a bias) is one column."""
  scores = jnp.abs(kernel if kernel.ndim > 1 else kernel[:, None])
  return mask_from_scores(scores, ratio, pattern).reshape(kernel.shape)


def wanda(kernel: jax.Array, sq_norms: jax.Array, ratio: float, pattern: str) -> jax.Array:
  """|W_ij|·‖X_j‖₂, compared within each output unit (or N:M group; "variant": Wanda's variant)."""
  scores = jnp.abs(kernel.astype(jnp.float32)) * jnp.sqrt(sq_norms.astype(jnp.float32))[:, None]
  return mask_from_scores(scores, ratio, pattern)


@partial(jax.jit, static_argnames=("ratio", "pattern", "blocksize", "damp"))
def sparsegpt(kernel: jax.Array, hessian: jax.Array, ratio: float, pattern: str,
              blocksize: int = 128, damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """SparseGPT's one-shot OBS pruning (Frantar & Alistarh 2023) -> (new kernel, kept-mask).

  Columns of Wᵀ (inputs) are pruned left to right in blocks; each pruned
  weight's error is spread over the not-yet-visited inputs through the upper
  Cholesky factor of H⁻¹. Unstructured: the mask of each block keeps the
  largest w²/[H⁻¹]_jj² over the whole block; N:M: chosen per group as the scan
  reaches it.
  """
  kind, n, m = parse_pattern(pattern)
  if kind == "variant":
    raise ValueError("SparseGPT has no 'variant' pattern (it is Wanda's)")
  w = kernel.T.astype(jnp.float32)  # [out, in]: the reference's layout
  rows, cols = w.shape
  h = hessian.astype(jnp.float32)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[None], 0.0, w)
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(cols)
  u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T  # upper factor of H⁻¹

  pruned = jnp.zeros_like(w, bool)
  for start in range(0, cols, blocksize):
    end = min(start + blocksize, cols)
    w1, u1 = w[:, start:end], u[start:end, start:end]
    d = jnp.diag(u1)
    if kind == "nm":
      if (end - start) % m:
        raise ValueError(f"{pattern}: block of {end - start} inputs is not a multiple of {m}")
      mask1 = jnp.zeros_like(w1, bool)
    else:
      s = jnp.square(w1) / jnp.square(d)[None]
      k = int(s.size * ratio)
      mask1 = s <= jnp.sort(s.ravel())[k] if k else jnp.zeros_like(w1, bool)

    def column(i, carry):
      w1, q1, err1, mask1 = carry
      if kind == "nm":
        group = jax.lax.dynamic_slice_in_dim(w1, i - i % m, m, axis=1)
        gd = jax.lax.dynamic_slice_in_dim(d, i - i % m, m)
        ranks = jnp.argsort(jnp.argsort(jnp.square(group) / jnp.square(gd)[None], axis=1, stable=True),
                            axis=1, stable=True)
        fresh = jax.lax.dynamic_update_slice_in_dim(mask1, ranks < n, i - i % m, axis=1)
        mask1 = jnp.where(i % m == 0, fresh, mask1)
      col = w1[:, i]
      q = jnp.where(mask1[:, i], 0.0, col)
      err = (col - q) / d[i]
      w1 = w1 - err[:, None] * u1[i][None, :]  # u1 is upper triangular: only columns >= i move
      return w1, q1.at[:, i].set(q), err1.at[:, i].set(err), mask1

    init = (w1, jnp.zeros_like(w1), jnp.zeros_like(w1), mask1)
    _, q1, err1, mask1 = jax.lax.fori_loop(0, end - start, column, init)
    w = w.at[:, start:end].set(q1)
    w = w.at[:, end:].add(-err1 @ u[start:end, end:])
    pruned = pruned.at[:, start:end].set(mask1)
  keep = ~pruned.T
  return jnp.where(keep, w.T, 0.0).astype(kernel.dtype), keep
