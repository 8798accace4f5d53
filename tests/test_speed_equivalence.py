"""The train step's faster code paths give the numbers of straightforward references, float32.

`Linear` flattens leading axes into one 2-D product and `xla_attention` works head-major
(both so XLA:CPU copies no large activation into a transposed layout); each is compared
with the plain `[batch, length, features]` einsum it replaced, values and gradients,
alone and inside the whole tiny VLM.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from launch.local import HUGEPAGE_TUNABLE, hugepage_env
from vlm_jax.models import attention as attention_lib
from vlm_jax.models import build_model, init_params
from vlm_jax.models.layers import Linear
from vlm_jax.models.lm import attention_mask_matrix

RTOL = 1e-5


def reference_linear(params: dict, x: jax.Array) -> jax.Array:
  y = jnp.einsum("...i,io->...o", x, params["kernel"])
  return y + params["bias"] if "bias" in params else y


def reference_attention(q, k, v, mask, heads_major=False):
  """The sequence-major einsums `xla_attention` used before: scores `[b, kv, group, lq, lk]`."""
  b, lq, h, d = q.shape
  kvh = k.shape[1] if heads_major else k.shape[2]
  kv = "bksd" if heads_major else "bskd"
  scores = jnp.einsum(f"bqkgd,{kv}->bkgqs", q.reshape(b, lq, kvh, h // kvh, d), k) * d ** -0.5
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  out = jnp.einsum(f"bkgqs,{kv}->bqkgd", jax.nn.softmax(scores, axis=-1), v)
  return out.reshape(b, lq, h, d)


def assert_trees_close(got, want, rtol=RTOL):
  """Relative to each leaf's largest magnitude, so near-zero entries do not fail on rounding.

  The 1e-8 floor is for leaves that are zero up to rounding (a key bias, which the softmax
  cancels, gets ~1e-9 noise on either path); every other gradient here is above 1e-3.
  """
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(g, w, atol=rtol * scale + 1e-8, rtol=rtol)


@pytest.mark.parametrize("shape,use_bias", [((7,), True), ((3, 7), False), ((2, 5, 7), True), ((2, 3, 4, 7), False)],
                         ids=["1d_bias", "2d", "3d_bias", "4d"])
def test_linear_equals_the_einsum_with_gradients(shape, use_bias):
  layer = Linear(6, ("embed", "mlp"), use_bias=use_bias)
  x = jax.random.normal(jax.random.key(0), shape)
  params = nn.unbox(layer.init(jax.random.key(1), x)["params"])
  if use_bias:
    params = {**params, "bias": jax.random.normal(jax.random.key(2), (6,))}
  w = jax.random.normal(jax.random.key(3), (*shape[:-1], 6))  # a loss that weighs every output differently
  loss = lambda f: lambda p, x: jnp.sum(f(p, x) * w)
  ours = lambda p, x: layer.apply({"params": p}, x)
  assert ours(params, x).shape == (*shape[:-1], 6)
  assert_trees_close(ours(params, x), reference_linear(params, x))
  assert_trees_close(jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x),
                     jax.jit(jax.grad(loss(reference_linear), argnums=(0, 1)))(params, x))


def _attention_cases():
  b, l = 2, 9
  pad = jnp.arange(l)[None] >= jnp.asarray([[0], [3]])  # left padding: fully masked query rows
  slots = jnp.arange(l)
  causal = attention_mask_matrix(pad, slots, slots)
  return {"gqa_causal_left_padded": (4, 2, causal), "mha_bidirectional": (4, 4, None),
          "mqa_causal": (4, 1, causal), "one_query": (4, 4, None)}


@pytest.mark.parametrize("case", list(_attention_cases()))
def test_head_major_attention_equals_the_sequence_major_einsums(case):
  heads, kv_heads, mask = _attention_cases()[case]
  b, l, d = 2, 9, 8
  lq = 1 if case == "one_query" else l
  kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (b, lq, heads, d))
  k = jax.random.normal(kk, (b, l, kv_heads, d))
  v = jax.random.normal(kv, (b, l, kv_heads, d))
  w = jax.random.normal(kw, (b, lq, heads, d))
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask) * w)
  assert_trees_close(attention_lib.xla_attention(q, k, v, mask), reference_attention(q, k, v, mask))
  assert_trees_close(jax.jit(jax.grad(loss(attention_lib.xla_attention), argnums=(0, 1, 2)))(q, k, v),
                     jax.jit(jax.grad(loss(reference_attention), argnums=(0, 1, 2)))(q, k, v))
  # the KV cache's head-major keys give the same numbers
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  assert_trees_close(attention_lib.xla_attention(q, kh, vh, mask, heads_major=True),
                     reference_attention(q, kh, vh, mask, heads_major=True))


def test_attention_with_heads_not_a_multiple_of_kv_heads_is_a_clear_error():
  q = jnp.zeros((1, 3, 4, 8))
  kv = jnp.zeros((1, 3, 3, 8))
  with pytest.raises(ValueError, match="4 query heads.*3 key/value heads"):
    attention_lib.xla_attention(q, kv, kv, None)


@pytest.mark.slow  # 17 s idle, ~70 s on a loaded 2-core machine; the default run compares the pieces
def test_tiny_vlm_logits_and_gradients_equal_the_reference_paths(monkeypatch):
  """The whole tiny VLM (ViT, projector, GQA decoder) with every Linear and every attention
  swapped for the references above."""
  model = build_model(presets.get_config("tiny"))
  c = model.config
  params = init_params(model, jax.random.key(0))
  t, img = c.tokens_per_image, c.image_token_id
  ids = jnp.asarray([[1] + [img] * t + [2, 3, 4, 5], [6, 7] + [img] * t + [8, 9, 0]])
  images = jax.random.normal(jax.random.key(1), (2, c.vision.image_size, c.vision.image_size, 3))
  w = jax.random.normal(jax.random.key(2), (*ids.shape, c.text.vocab_size))

  def loss(p, ids, images):  # ids as an argument: traced, so the VLM skips its eager-only check
    logits = model.apply({"params": p}, ids, images, attention_mask=ids != 0).logits
    return jnp.sum(logits * w), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, ids, images)

  def linear_as_einsum(next_fun, args, kwargs, context):
    if isinstance(context.module, Linear) and context.method_name == "__call__":
      next_fun(*args, **kwargs)  # creates nothing new; keeps the module's bookkeeping as it is
      return reference_linear(context.module.variables["params"], args[0].astype(jnp.float32))
    return next_fun(*args, **kwargs)

  monkeypatch.setattr(attention_lib, "xla_attention", reference_attention)
  with nn.intercept_methods(linear_as_einsum):
    (_, want_logits), want_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, ids, images)
  assert_trees_close(logits, want_logits)
  assert_trees_close(grads, want_grads)


def test_hugepage_env_adds_the_tunable_keeps_others_and_respects_an_explicit_choice():
  assert hugepage_env({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": HUGEPAGE_TUNABLE}
  assert hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
  assert hugepage_env(off) == off
