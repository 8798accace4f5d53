"""The few-shot classifiers' logits (METHODS §5) as pure functions over arrays.

Shapes: f [N, D] L2-normalised image features; C classes, K shots, D feature width.
    W⁺, W⁻        [C, D]     positive / negative text weights (prompt ensembles)
    keys          [C, K, D]  positive cache F: one key per shot, averaged over augmented views
    neg_keys      [C, K, D]  negative cache F⁻[c, j] = normalise(mean_{c' ≠ c} F[c', j])
    labels        [C, K]     cache label weights of each key's own class: 1 (Tip-Adapter, the
                             negative path) or the refined K·w_j (DualAdapter, K > 1)

A key of class c only ever votes for class c, so "affinity @ L" (L one-hot [C·K, C]) is a sum
over the K keys of each class: `einsum("nck,ck->nc")`, never a dense one-hot matmul.

    zero-shot     scale·f·Wᵀ (+ bias: SigLIP)
    Tip-Adapter   100·f·Wᵀ + α·exp(−β(1 − f·Fᵀ))·L
    DualAdapter   P⁺ = 100·f·W⁺ᵀ + α·exp(−β(1 − f·Fᵀ))·L̃
                  P⁻ = 15·(1 − f·W⁻ᵀ) + α·exp(−β·f·F⁻ᵀ)·L
                  logits = λ·P⁺ + (1 − λ)·P⁻
"""

from typing import Optional

import jax
import jax.numpy as jnp

TEXT_SCALE = 100.0  # CLIP's trained logit scale, as METHODS §5 writes it
NEG_SCALE = 15.0
REFINE_TEMPERATURE = 0.1


def normalise(x: jax.Array, axis: int = -1) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def zero_shot_logits(f: jax.Array, w: jax.Array, scale: float, bias: Optional[float] = None) -> jax.Array:
  """CLIP: scale·f·Wᵀ (softmax over classes); SigLIP: scale·f·Wᵀ + bias (a sigmoid per class)."""
  logits = scale * f @ w.T
  return logits if bias is None else logits + bias


def cache_affinity(f: jax.Array, keys: jax.Array) -> jax.Array:
  """f·Fᵀ as [N, C, K]."""
  return jnp.einsum("nd,ckd->nck", f, keys)


def cache_vote(affinity_term: jax.Array, labels: jax.Array) -> jax.Array:
  """Σ_k term[n, c, k]·labels[c, k] -> [N, C] (the "·L" of the formulas)."""
  return jnp.einsum("nck,ck->nc", affinity_term, labels)


def tip_logits(f, w, keys, labels, alpha, beta, text_scale: float = TEXT_SCALE) -> jax.Array:
  """Tip-Adapter: 100·f·Wᵀ + α·exp(−β(1 − f·Fᵀ))·L."""
  cache = cache_vote(jnp.exp(-beta * (1.0 - cache_affinity(f, keys))), labels)
  return text_scale * f @ w.T + alpha * cache


def negative_cache(keys: jax.Array) -> jax.Array:
  """F⁻[c, j] = normalise(mean over c' ≠ c of F[c', j]) -> [C, K, D] (C ≥ 2)."""
  c = keys.shape[0]
  if c < 2:
    raise ValueError("the negative cache needs at least 2 classes")
  others = (jnp.sum(keys, axis=0, keepdims=True) - keys) / (c - 1)
  return normalise(others)


def refine_labels(keys: jax.Array, temperature: float = REFINE_TEMPERATURE) -> jax.Array:
  """Label refinement: [C, K] weights K·softmax_j(s_j / T), s_j = (Σ_j' f_j·f_j' − 1)/(K − 1).

  K = 1 gives ones (nothing to compare a lone shot with).
  """
  k = keys.shape[1]
  if k == 1:
    return jnp.ones(keys.shape[:2], jnp.float32)
  sims = jnp.einsum("cjd,cid->cji", keys, keys)
  s = (jnp.sum(sims, axis=-1) - 1.0) / (k - 1)
  return k * jax.nn.softmax(s / temperature, axis=-1)


def beta_free_terms(f, w_pos, w_neg, keys, neg_keys, text_scale: float = TEXT_SCALE,
                    neg_scale: float = NEG_SCALE):
  """The terms that do not depend on β, and the logits' only matmuls: (text⁺, f·Fᵀ, text⁻, f·F⁻ᵀ).

  Without a negative path (`w_neg`, `neg_keys` None: Tip-Adapter) the last two are None.
  """
  text_pos = text_scale * f @ w_pos.T
  if w_neg is None:
    return text_pos, cache_affinity(f, keys), None, None
  return text_pos, cache_affinity(f, keys), neg_scale * (1.0 - f @ w_neg.T), cache_affinity(f, neg_keys)


def parts_at(terms, pos_labels, neg_labels, beta):
  """The four logit terms at one β from `beta_free_terms`, each [N, C]: (text⁺, cache⁺, text⁻,
  cache⁻); zeros for a missing negative path."""
  text_pos, aff_pos, text_neg, aff_neg = terms
  cache_pos = cache_vote(jnp.exp(-beta * (1.0 - aff_pos)), pos_labels)
  if text_neg is None:
    return text_pos, cache_pos, jnp.zeros_like(text_pos), jnp.zeros_like(text_pos)
  return text_pos, cache_pos, text_neg, cache_vote(jnp.exp(-beta * aff_neg), neg_labels)


def dual_parts(f, w_pos, w_neg, keys, neg_keys, pos_labels, neg_labels, beta,
               text_scale: float = TEXT_SCALE, neg_scale: float = NEG_SCALE):
  """The four logit terms, each [N, C]: (text⁺, cache⁺, text⁻, cache⁻) with α = λ = 1.

  P⁺ = text⁺ + α·cache⁺, P⁻ = text⁻ + α·cache⁻; split so that α and λ act linearly (the search).
  """
  terms = beta_free_terms(f, w_pos, w_neg, keys, neg_keys, text_scale, neg_scale)
  return parts_at(terms, pos_labels, neg_labels, beta)


def combine(parts, alpha, lam) -> jax.Array:
  text_pos, cache_pos, text_neg, cache_neg = parts
  return lam * (text_pos + alpha * cache_pos) + (1.0 - lam) * (text_neg + alpha * cache_neg)


def dual_logits(f, w_pos, w_neg, keys, neg_keys, pos_labels, neg_labels, alpha, beta, lam,
                text_scale: float = TEXT_SCALE, neg_scale: float = NEG_SCALE) -> jax.Array:
  """DualAdapter: λ·P⁺ + (1 − λ)·P⁻ (see the module docstring)."""
  parts = dual_parts(f, w_pos, w_neg, keys, neg_keys, pos_labels, neg_labels, beta, text_scale, neg_scale)
  return combine(parts, alpha, lam)
