"""Attention, the one function every tower and the decoder call, by implementation.

A model config's `attention` field picks it; all give the same numbers as "xla":

  "xla"                    the reference: einsum scores, float32 softmax, any platform.
  "dot_product_attention"  `jax.nn.dot_product_attention` with JAX choosing the kernel
                           (in jax 0.10 that is XLA's fused-softmax graph on every platform).
  "cudnn"                  the same call forced onto cuDNN's fused flash attention: GPU
                           only, bfloat16/float16 only.
  "splash"                 the Pallas TPU splash-attention kernel (block-sparse flash
                           attention), run per device under `shard_map` over the mesh's batch
                           and head axes (Mosaic kernels are not partitioned automatically).
                           TPU only; on CPU inside `interpret_kernels()` (slow: for tests).

The mask is a dense `[b, lq, lk]` boolean array (causal, padding and packed segments already
combined by the caller) or, for self-attention, its structure: `Segments` (a causal flag and
per-token segment ids). A kernel cannot take a per-row dense mask, so the implementations in
`STRUCTURED` need `Segments` (or no mask), and callers build it for them; the others keep the
dense mask (and densify `Segments` if given one). Grouped-query heads are passed as they are
(`num_heads % num_kv_heads == 0`). The KV-cache decode path always runs "xla": its keys are
head-major and it attends from a handful of queries, where a fused kernel buys nothing.
"""

import contextlib
import functools
from typing import Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

# implementation -> the platforms it runs on (None: every platform)
IMPLEMENTATIONS: dict[str, Optional[tuple[str, ...]]] = {
    "xla": None,
    "dot_product_attention": None,
    "cudnn": ("gpu",),
    "splash": ("tpu",),
}
# Pallas kernels that run anywhere inside `interpret_kernels()`
PALLAS = ("splash",)
# implementations that take the mask's structure (`Segments`), never a dense mask
STRUCTURED = ("splash",)
# the name `remat_policy="save_attention_out"` keeps: every implementation's output
ATTENTION_OUT = "attention_out"
SPLASH_BLOCKS = (512, 256, 128)  # the kernel's tiles along each sequence, largest that divides first

_interpret = False


@contextlib.contextmanager
def interpret_kernels():
  """Runs the Pallas kernels in interpret mode (any platform, slowly): for tests on CPU.

  Read when a function is traced: jit (or apply) it inside the block.
  """
  global _interpret
  previous, _interpret = _interpret, True
  try:
    yield
  finally:
    _interpret = previous


@flax.struct.dataclass
class Segments:
  """A self-attention mask by its structure: query i sees key j when their ids are equal
  and, if `causal`, j <= i.

  ids: [b, l] int32, one id >= 0 per packed sequence and -1 for padding: a real token never
  sees padding, and a padding query sees only padding (so no row is empty, and no kernel
  divides by zero there).
  """
  ids: jax.Array
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def of(cls, key_mask: jax.Array, segment_ids: Optional[jax.Array] = None,
         causal: bool = False) -> "Segments":
    """From a [b, l] validity mask (True = real token) and optional packed-segment ids (>= 0)."""
    ids = jnp.zeros(key_mask.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return cls(jnp.where(key_mask.astype(bool), ids, -1), causal)

  def dense(self) -> jax.Array:
    """The same mask as a [b, l, l] boolean array (real rows as `lm.attention_mask_matrix` builds)."""
    mask = self.ids[:, :, None] == self.ids[:, None, :]
    if self.causal:
      mask = mask & jnp.tril(jnp.ones(mask.shape[1:], bool))[None]
    return mask


Mask = Optional[Union[jax.Array, Segments]]


def check_attention(name: str) -> None:
  """Fails at config time on a name that is no implementation (a typo)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention={name!r}: unknown attention implementation; choose one of {sorted(IMPLEMENTATIONS)}")


def _check_platform(name: str) -> None:
  """A kernel forced onto a platform that lacks it is an error, never a silent fallback.

  The platform is the context mesh's (an ahead-of-time compile for TPU on a CPU host traces
  under a mesh of TPU devices), else the default backend's.
  """
  check_attention(name)
  platforms = IMPLEMENTATIONS[name]
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  platform = jax.default_backend() if device is None else device.platform
  if platforms is not None and platform not in platforms and not (_interpret and name in PALLAS):
    usable = sorted(n for n, p in IMPLEMENTATIONS.items() if p is None or platform in p)
    hint = " (or run it in Pallas interpret mode, `interpret_kernels()`, to test)" if name in PALLAS else ""
    raise ValueError(f"attention={name!r} needs a {' or '.join(platforms)} backend, but this one is "
                     f"{platform!r}; on {platform} use one of {usable}{hint}")


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


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _block(length: int) -> int:
  return next(b for b in SPLASH_BLOCKS if length % b == 0)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: Optional[jax.Array],
                  kv_ids: Optional[jax.Array], causal: bool) -> jax.Array:
  """The kernel on one device's shard: pads both lengths to whole tiles, runs it per row."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  lq_pad, lk_pad = _round_up(lq, SPLASH_BLOCKS[-1]), _round_up(lk, SPLASH_BLOCKS[-1])
  if (lq_pad, lk_pad) != (lq, lk) and q_ids is None:
    q_ids, kv_ids = jnp.zeros((b, lq), jnp.int32), jnp.zeros((b, lk), jnp.int32)
  if q_ids is not None:  # the padded tiles are a segment of their own (-2): no query of ours sees them
    q_ids = jnp.pad(q_ids, ((0, 0), (0, lq_pad - lq)), constant_values=-2)
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, lk_pad - lk)), constant_values=-2)
  heads_major = lambda x, pad: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  # The kernel does not scale the scores; scaling q in float32 first keeps bfloat16 close to "xla".
  q = heads_major((q.astype(jnp.float32) * d ** -0.5).astype(q.dtype), lq_pad - lq)
  k, v = heads_major(k, lk_pad - lk), heads_major(v, lk_pad - lk)
  bq, bkv = _block(lq_pad), _block(lk_pad)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  one_head = splash.CausalMask((lq_pad, lk_pad)) if causal else splash.FullMask((lq_pad, lk_pad))
  kernel = splash.make_splash_mha(splash.MultiHeadMask([one_head] * h), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=_interpret)
  if q_ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    out = jax.vmap(lambda q, k, v, i, j: kernel(q, k, v, splash.SegmentIds(i, j)))(q, k, v, q_ids, kv_ids)
  return out.transpose(0, 2, 1, 3)[:, :lq]


def _mesh_axes(logical: str, size: int, mesh) -> Optional[Union[str, tuple[str, ...]]]:
  """The mesh axes the rules give a logical axis, if they split `size` evenly (else replicated)."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  shards = 1
  for name in names:
    shards *= mesh.shape[name]
  return axes if names and size % shards == 0 else None


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[Segments]) -> jax.Array:
  """The splash kernel on every device's batch and head shard (shapes as in `attention`).

  Lengths that are no multiple of 128 are padded inside, the padded tiles a segment of their own.
  """
  if mask is not None and not isinstance(mask, Segments):
    raise ValueError("attention='splash' needs the mask's structure (a `Segments`: causal flag + per-token "
                     "segment ids), not a dense [b, lq, lk] mask; build it with `Segments.of`")
  if mask is not None and q.shape[1] != k.shape[1]:
    raise ValueError(f"Segments describe self-attention, but {q.shape[1]} queries attend to {k.shape[1]} keys")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads do not split into groups over {k.shape[2]} key/value heads")
  causal = mask is not None and mask.causal
  ids = None if mask is None else mask.ids
  local = functools.partial(_splash_local, causal=causal)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, ids, ids)
  batch = _mesh_axes("batch", q.shape[0], mesh)
  heads = _mesh_axes("heads", k.shape[2], mesh)  # key/value heads split evenly: so do the query heads
  qkv, ids_spec = P(batch, None, heads, None), P(batch, None)
  if ids is None:
    run = jax.shard_map(lambda q, k, v: local(q, k, v, None, None), in_specs=(qkv,) * 3, out_specs=qkv,
                        check_vma=False)
    return run(q, k, v)
  run = jax.shard_map(local, in_specs=(qkv,) * 3 + (ids_spec,) * 2, out_specs=qkv, check_vma=False)
  return run(q, k, v, ids, ids)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
              implementation: str = "xla") -> jax.Array:
  """Self- or cross-attention in the `[batch, length, heads, head_dim]` layout.

  q: [b, lq, heads, d]; k, v: [b, lk, kv_heads, d]; mask: [b, lq, lk] bool, `Segments`
  (self-attention) or None. A fully masked query row (padding) gets a uniform distribution
  under "xla" and "dot_product_attention"; cuDNN may return anything there, so such rows
  must not count. The output is named `ATTENTION_OUT` for remat policies.
  """
  _check_platform(implementation)
  if implementation == "splash":
    out = splash_attention(q, k, v, mask)
  else:
    if isinstance(mask, Segments):
      mask = mask.dense()
    if implementation == "xla":
      out = xla_attention(q, k, v, mask)
    else:
      out = jax.nn.dot_product_attention(
          q, k, v, mask=None if mask is None else mask[:, None],
          implementation="cudnn" if implementation == "cudnn" else None)
  return checkpoint_name(out, ATTENTION_OUT)
