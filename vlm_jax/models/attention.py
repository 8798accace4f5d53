"""Attention, the one function every tower and the decoder call, by implementation.

A model config's `attention` field picks it; all give the same numbers as "xla":

  "xla"                    the reference: einsum scores, float32 softmax, any platform.
  "dot_product_attention"  `jax.nn.dot_product_attention` with JAX choosing the kernel
                           (in jax 0.10 that is XLA's fused-softmax graph on every platform).
  "cudnn"                  the same call forced onto cuDNN's fused flash attention: GPU
                           only, bfloat16/float16 only.

All take the same boolean mask (causal, padding and packed segments already combined by
the caller), so a kernel never has to re-derive them; grouped-query heads are passed
as they are (`num_heads % num_kv_heads == 0`). The KV-cache decode path always runs
"xla": its keys are head-major and it attends from a handful of queries, where a
fused kernel buys nothing.
"""

from typing import Optional

import jax
import jax.numpy as jnp

# implementation -> the platforms it runs on (None: every platform)
IMPLEMENTATIONS: dict[str, Optional[tuple[str, ...]]] = {
    "xla": None,
    "dot_product_attention": None,
    "cudnn": ("gpu",),
}
NOT_YET = {"splash": "the Pallas TPU splash-attention kernel is not implemented in vlm_jax yet"}


def check_attention(name: str) -> None:
  """Fails at config time on a name that is no implementation (a typo, or a kernel not built yet)."""
  if name in IMPLEMENTATIONS:
    return
  why = NOT_YET.get(name, "unknown attention implementation")
  raise ValueError(f"attention={name!r}: {why}; choose one of {sorted(IMPLEMENTATIONS)}")


def _check_platform(name: str) -> None:
  """A kernel forced onto a platform that lacks it is an error, never a silent fallback."""
  check_attention(name)
  platforms = IMPLEMENTATIONS[name]
  platform = jax.default_backend()
  if platforms is not None and platform not in platforms:
    usable = sorted(n for n, p in IMPLEMENTATIONS.items() if p is None or platform in p)
    raise ValueError(f"attention={name!r} needs a {' or '.join(platforms)} backend, but this one is "
                     f"{platform!r}; on {platform} use one of {usable}")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  mask: Optional[jax.Array], heads_major: bool = False) -> jax.Array:
  """Grouped-query attention with a float32 softmax (the reference).

  q: [b, lq, heads, d]; k, v: [b, lk, kv_heads, d], or [b, kv_heads, lk, d] when
  `heads_major` (the KV cache's layout); mask: [b, lq, lk] bool (True = attend).
  Fully masked rows give a uniform distribution (as the reference does), never NaN.
  """
  b, lq, h, d = q.shape
  if not heads_major:
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  kvh = k.shape[1]
  if h % kvh:
    raise ValueError(f"{h} query heads do not split into groups over {kvh} key/value heads")
  # Everything head-major ([b, kv_heads, group, lq, d]): both products then make and read the
  # [lq, lk] scores in the layout the softmax uses, so XLA:CPU copies the small q/k/v/out into
  # place instead of the scores (one transposed copy of them is left, for the keys' gradient).
  q = q.reshape(b, lq, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
  scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k)
  scores = scores.astype(jnp.float32) * (d ** -0.5)
  if mask is not None:
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bksd->bkgqd", probs, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array],
              implementation: str = "xla") -> jax.Array:
  """Self- or cross-attention in the `[batch, length, heads, head_dim]` layout.

  q: [b, lq, heads, d]; k, v: [b, lk, kv_heads, d]; mask: [b, lq, lk] bool or None.
  A fully masked query row (padding) gets a uniform distribution under "xla" and
  "dot_product_attention"; cuDNN may return anything there, so such rows must not count.
  """
  _check_platform(implementation)
  if implementation == "xla":
    return xla_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(
      q, k, v, mask=None if mask is None else mask[:, None],
      implementation="cudnn" if implementation == "cudnn" else None)
