"""A MaskGIT text-to-codes generator: caption -> grid of VQ code ids (Synth², METHODS §6).

    [caption tokens (own positions, padding masked out) ; T code tokens (K+1 ids: the
    codebook and the mask token K)] -> bidirectional transformer -> logits [B, T, K]

Training (Chang et al. 2022, "MaskGIT"): per row draw r ~ U(0, 1), mask
ceil(cos(pi/2 r)·T) code positions at random, and score cross-entropy on the masked
ones only; with probability `cond_dropout` the caption is dropped (every caption
token padded out: the "null" condition), so the same network also predicts without
text, which classifier-free guidance needs.

Decoding starts fully masked (or with some codes fixed) and, over `steps` rounds,
samples every masked position in parallel and keeps the most confident samples, so
that after round t a fraction cos(pi/2 (t+1)/steps) of the initially masked
positions is still masked (none after the last).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax.models.attention import STRUCTURED, Segments, check_attention
from vlm_jax.models.layers import EncoderBlock, LayerNorm, Linear, constrain
from vlm_jax.models.metrics import argmax_equals


@dataclasses.dataclass(frozen=True)
class MaskGITConfig:
  codebook_size: int = 256  # K; the mask token is id K
  num_tokens: int = 256  # T = grid², the VQ tokenizer's codes per image
  text_vocab_size: int = 32000
  max_text_len: int = 64
  width: int = 512
  depth: int = 8
  num_heads: int = 8
  mlp_dim: int = 2048
  cond_dropout: float = 0.1  # probability of training a row on the null condition
  act: str = "gelu"
  norm_eps: float = 1e-6
  attention: str = "xla"  # the kernel, not the numbers: see vlm_jax.models.attention
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in ("codebook_size", "num_tokens", "text_vocab_size", "max_text_len", "width", "depth",
                 "num_heads", "mlp_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"MaskGITConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.width % self.num_heads:
      raise ValueError(f"MaskGITConfig.width {self.width} is not divisible by num_heads {self.num_heads}")
    if not 0.0 <= self.cond_dropout <= 1.0:
      raise ValueError(f"MaskGITConfig.cond_dropout must lie in [0, 1], got {self.cond_dropout}")
    check_attention(self.attention)

  @property
  def mask_id(self) -> int:
    return self.codebook_size


# ----------------------------------------------------------------------------- input checks

def _check_range(x, low: int, high: int, what: str) -> None:
  """Values of x in [low, high) (eager inputs only: a traced array has no values to read)."""
  if isinstance(x, jax.core.Tracer) or x.size == 0:
    return
  x = np.asarray(x)  # a concrete array closed over by a jitted caller reads too
  lo, hi = int(x.min()), int(x.max())
  if lo < low or hi >= high:
    raise ValueError(f"{what} hold ids in [{lo}, {hi}], outside [{low}, {high})")


def check_text(c: MaskGITConfig, text_ids, text_mask) -> None:
  """A clear error for a caption batch the generator cannot embed."""
  if text_ids.ndim != 2 or tuple(text_mask.shape) != tuple(text_ids.shape):
    raise ValueError(f"text_ids [B, Lt] and text_mask of the same shape expected, got "
                     f"{tuple(text_ids.shape)} and {tuple(text_mask.shape)}")
  if text_ids.shape[1] > c.max_text_len:
    raise ValueError(f"text length {text_ids.shape[1]} exceeds max_text_len {c.max_text_len}")
  _check_range(text_ids, 0, c.text_vocab_size, f"text_ids (text_vocab_size {c.text_vocab_size})")


def check_grid_shape(c: MaskGITConfig, x, batch: int, what: str) -> None:
  """A clear error for anything per code position that is not [B, T]."""
  if x.ndim != 2 or x.shape[0] != batch:
    raise ValueError(f"{what} must be [B={batch}, T={c.num_tokens}], got shape {tuple(x.shape)}")
  if x.shape[1] != c.num_tokens:
    raise ValueError(f"{what} hold {x.shape[1]} codes per row but config.num_tokens is {c.num_tokens}")


def check_codes(c: MaskGITConfig, codes, batch: int, what: str = "codes", allow_mask: bool = False) -> None:
  """A clear error for a code grid of the wrong size or with ids outside the codebook
  (`allow_mask`: the mask id K is a legal input of the network)."""
  check_grid_shape(c, codes, batch, what)
  _check_range(codes, 0, c.codebook_size + allow_mask, f"{what} (codebook_size {c.codebook_size})")


def example_inputs(c: MaskGITConfig) -> tuple:
  """The smallest inputs that create every parameter of a `CodeGenerator`."""
  return jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool), jnp.zeros((1, c.num_tokens), jnp.int32)


# ----------------------------------------------------------------------------- schedule, masking, loss

def mask_ratio(r):
  """MaskGIT's cosine schedule: the fraction of positions masked at progress r in [0, 1]."""
  return jnp.cos(jnp.pi / 2 * r)


def random_mask(rng: jax.Array, batch: int, num_tokens: int, *, return_ratios: bool = False):
  """bool [batch, T], True = masked: per row r ~ U(0, 1) and max(1, ceil(mask_ratio(r)·T))
  positions, chosen uniformly. With `return_ratios`, also the r drawn [batch]."""
  ratio_rng, order_rng = jax.random.split(rng)
  r = jax.random.uniform(ratio_rng, (batch,))
  count = jnp.maximum(1, jnp.ceil(mask_ratio(r) * num_tokens)).astype(jnp.int32)
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(order_rng, (batch, num_tokens)), axis=-1), axis=-1)
  mask = rank < count[:, None]
  return (mask, r) if return_ratios else mask


def masked_loss(logits: jax.Array, codes: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
  """Cross-entropy of logits [B, T, K] against codes [B, T], averaged over the masked positions
  only (the visible ones are given in the input, so predicting them teaches nothing)."""
  logits = logits.astype(jnp.float32)
  weight = mask.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, codes) * weight) / count
  accuracy = jnp.sum(argmax_equals(logits, codes) * weight) / count
  return loss, {"loss": loss, "masked_accuracy": accuracy}


# ----------------------------------------------------------------------------- the network

class CodeGenerator(nn.Module):
  """`apply({'params': p}, text_ids [B, Lt], text_mask [B, Lt], codes [B, T]) -> logits [B, T, K]`.

  codes may hold the mask id K. A row whose text_mask is all False is the null condition:
  its code tokens attend to no caption token. Also `method=CodeGenerator.train_loss`.
  """
  config: MaskGITConfig

  @nn.compact
  def __call__(self, text_ids: jax.Array, text_mask: jax.Array, codes: jax.Array) -> jax.Array:
    c = self.config
    check_text(c, text_ids, text_mask)
    check_codes(c, codes, text_ids.shape[0], allow_mask=True)
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    kw = dict(dtype=dtype, param_dtype=pdtype)
    b, lt = text_ids.shape
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    text = nn.Embed(c.text_vocab_size, c.width, param_dtype=pdtype, name="text_embed",
                    embedding_init=init(("vocab", "embed")))(text_ids)
    text_pos = self.param("text_pos", init((None, "embed")), (c.max_text_len, c.width), pdtype)
    code = nn.Embed(c.codebook_size + 1, c.width, param_dtype=pdtype, name="code_embed",
                    embedding_init=init(("vocab", "embed")))(codes)
    code_pos = self.param("code_pos", init((None, "embed")), (c.num_tokens, c.width), pdtype)
    x = jnp.concatenate([text.astype(dtype) + text_pos[:lt].astype(dtype)[None],
                         code.astype(dtype) + code_pos.astype(dtype)[None]], axis=1)
    x = constrain(x, ("batch", "length", "embed"))
    keys = jnp.concatenate([text_mask.astype(bool), jnp.ones((b, c.num_tokens), bool)], axis=1)
    if c.attention in STRUCTURED:  # a kernel takes the structure; padded queries then see only padding,
      mask = Segments.of(keys)     # which no real token reads: the code logits are the same
    else:
      mask = jnp.broadcast_to(keys[:, None, :], (b, keys.shape[1], keys.shape[1]))
    for i in range(c.depth):
      x = EncoderBlock(c.num_heads, c.mlp_dim, c.act, c.norm_eps, c.attention, name=f"layers_{i}", **kw)(x, mask)
    x = LayerNorm(c.norm_eps, name="final_norm", **kw)(x[:, lt:])
    logits = Linear(c.codebook_size, ("embed", "vocab"), use_bias=True, name="head", **kw)(x)
    return logits.astype(jnp.float32)

  def train_loss(self, text_ids: jax.Array, text_mask: jax.Array, codes: jax.Array,
                 rng: jax.Array) -> tuple[jax.Array, dict]:
    """The MaskGIT objective on real (caption, code grid) pairs: (loss, metrics)."""
    c = self.config
    check_codes(c, codes, text_ids.shape[0])
    mask_rng, drop_rng = jax.random.split(rng)
    mask = random_mask(mask_rng, codes.shape[0], c.num_tokens)
    keep_text = ~jax.random.bernoulli(drop_rng, c.cond_dropout, (codes.shape[0],))
    logits = self(text_ids, text_mask.astype(bool) & keep_text[:, None], jnp.where(mask, c.mask_id, codes))
    return masked_loss(logits, codes, mask)


def train_loss(model: CodeGenerator, params: dict, text_ids, text_mask, codes,
               rng: jax.Array) -> tuple[jax.Array, dict]:
  """`CodeGenerator.train_loss` as a function of the parameters (for `jax.grad`)."""
  return model.apply({"params": params}, text_ids, text_mask, codes, rng, method=CodeGenerator.train_loss)


# ----------------------------------------------------------------------------- decoding

def remaining_masked(initially_masked, steps: int):
  """How many positions stay masked after each round: [steps, ...] =
  floor(mask_ratio((t+1)/steps) · M0), 0 after the last round."""
  ratios = np.cos(np.pi / 2 * np.arange(1, steps + 1) / steps).astype(np.float32)
  ratios[-1] = 0.0  # cos(pi/2) is 6e-17, not 0: the last round unmasks everything
  m0 = jnp.asarray(initially_masked, jnp.float32)
  return jnp.floor(ratios.reshape((steps,) + (1,) * m0.ndim) * m0).astype(jnp.int32)


def _row_keys(rng: jax.Array, batch: int) -> jax.Array:
  """One key per row: a single key is split; a batch of keys is taken as it is."""
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  single = rng.ndim == (0 if typed else 1)
  keys = jax.random.split(rng, batch) if single else rng
  if keys.shape[0] != batch:
    raise ValueError(f"rng holds {keys.shape[0]} per-row keys for a batch of {batch}")
  return keys


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _decode(model: CodeGenerator, params, text_ids, text_mask, keys, fixed, fixed_mask, temperature,
            guidance_scale, *, steps: int):
  c = model.config
  b, t_len = fixed.shape
  text_mask = text_mask.astype(bool)

  def conditional(codes):
    return model.apply({"params": params}, text_ids, text_mask, codes)

  def guided(codes):  # the caption and the null condition in one forward pass
    both = model.apply({"params": params}, jnp.concatenate([text_ids, text_ids]),
                       jnp.concatenate([text_mask, jnp.zeros_like(text_mask)]),
                       jnp.concatenate([codes, codes]))
    return (1 + guidance_scale) * both[:b] - guidance_scale * both[b:]

  def predict(codes):  # one compilation serves both; only the branch taken runs
    return jax.lax.cond(guidance_scale > 0, guided, conditional, codes)

  def sample(key, logits):  # one row: logits [T, K] -> codes [T]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    return jnp.where(temperature > 0, jax.random.categorical(key, scaled), jnp.argmax(logits, -1))

  masked0 = ~fixed_mask
  remaining = remaining_masked(masked0.sum(-1), steps)  # [steps, B]

  def round_(carry, t):
    codes, masked = carry
    logits = predict(jnp.where(masked, c.mask_id, codes))
    step_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, t)))(keys)
    sampled = jax.vmap(sample)(step_keys[:, 0], logits).astype(jnp.int32)
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), sampled[..., None], -1)[..., 0]
    # MaskGIT's confidence: log-probability plus Gumbel noise annealed to 0 over the rounds.
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (t_len,)))(step_keys[:, 1])
    anneal = temperature * (1.0 - (t + 1) / steps)
    confidence = jnp.where(masked, log_p + anneal * noise, jnp.inf)  # decided positions never re-mask
    rank = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)
    still = masked & (rank < remaining[t][:, None])
    codes = jnp.where(masked & ~still, sampled, codes)
    return (codes, still), (jnp.where(still, c.mask_id, codes), still)

  start = (jnp.where(fixed_mask, fixed, c.mask_id).astype(jnp.int32), masked0)
  (codes, _), trace = jax.lax.scan(round_, start, jnp.arange(steps))
  return codes, trace


def generate_codes(model: CodeGenerator, params: dict, text_ids, text_mask, rng: jax.Array, *,
                   steps: int = 8, temperature: float = 1.0, guidance_scale: float = 0.0,
                   fixed=None, fixed_mask=None, return_trace: bool = False):
  """MaskGIT iterative parallel decoding: int32 codes [B, T] in [0, K) for each caption.

  rng: one key (split into one per row), or a batch of B keys: row i's codes depend only on
    its caption and its key, never on the rest of the batch.
  temperature: of the sampling and of the confidence noise; 0 is greedy and deterministic.
  guidance_scale s > 0: classifier-free guidance, logits = (1+s)·cond − s·null.
  fixed, fixed_mask [B, T]: codes given in advance (never changed); the rest are generated.
  return_trace: also (codes [steps, B, T] with K where still masked, masks [steps, B, T])
    after each round.
  Jitted once per shapes and steps (temperature and guidance_scale are traced).
  """
  if not isinstance(model, CodeGenerator):
    raise TypeError(f"generate_codes needs a CodeGenerator, got {type(model).__name__}")
  c = model.config
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if temperature < 0 or guidance_scale < 0:
    raise ValueError(f"temperature and guidance_scale must be >= 0, got {temperature}, {guidance_scale}")
  text_ids, text_mask = jnp.asarray(text_ids), jnp.asarray(text_mask)
  check_text(c, text_ids, text_mask)
  b = text_ids.shape[0]
  if (fixed is None) != (fixed_mask is None):
    raise ValueError("fixed and fixed_mask come together: give both or neither")
  if fixed is None:
    fixed = jnp.zeros((b, c.num_tokens), jnp.int32)
    fixed_mask = jnp.zeros((b, c.num_tokens), bool)
  fixed, fixed_mask = jnp.asarray(fixed, jnp.int32), jnp.asarray(fixed_mask, bool)
  check_grid_shape(c, fixed, b, "fixed")
  check_grid_shape(c, fixed_mask, b, "fixed_mask")
  check_codes(c, jnp.where(fixed_mask, fixed, 0), b, "fixed")  # only the fixed positions are read
  codes, trace = _decode(model, params, text_ids, text_mask, _row_keys(rng, b), fixed, fixed_mask,
                         jnp.float32(temperature), jnp.float32(guidance_scale), steps=steps)
  return (codes, trace) if return_trace else codes
