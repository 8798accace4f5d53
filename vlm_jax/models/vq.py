"""A VQ image tokenizer: images <-> grids of discrete codes (Synth², METHODS §6).

    images [B, H, W, 3] -> conv encoder -> z [B, g, g, code_dim] -> nearest codebook
    entry (squared L2) -> codes [B, g*g] -> codebook lookup -> transposed-conv decoder

Each of `channels` is one stride-2 convolution, so the grid is image_size / 2**len(channels).
Training is the original VQ-VAE (van den Oord et al. 2017): the straight-through
estimator carries the reconstruction gradient past the argmin, and the codebook learns
from its own loss term, not from EMA updates.

`ImageTokenizer` is the model a tokenizer run trains: it holds the autoencoder under the
one top-level parameter key `vq`, as the VLM of vision_input="vq" does, so either takes the
other's tokenizer with `config.init_parts = {"vq": "checkpoint:<workdir>"}`.
"""

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.layers import activation


@dataclasses.dataclass(frozen=True)
class VQConfig:
  image_size: int = 64
  channels: tuple[int, ...] = (32, 64)  # one stride-2 3x3 convolution each
  codebook_size: int = 256
  code_dim: int = 32
  beta: float = 0.25  # weight of the commitment loss
  # l2-normalised codes (ViT-VQGAN, Yu et al. 2022): encoder outputs and codebook rows are
  # unit vectors, so the lookup is by cosine similarity; keeps far more of the codebook in use
  normalized: bool = False
  act: str = "silu"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "channels", tuple(int(ch) for ch in self.channels))  # hashable; configs give lists
    stride = 2 ** len(self.channels)
    if self.image_size % stride:
      raise ValueError(f"VQConfig.image_size {self.image_size} is not divisible by {stride}, the total "
                       f"stride of {len(self.channels)} stride-2 stages")
    if self.codebook_size < 1 or self.code_dim < 1:
      raise ValueError(f"VQConfig needs codebook_size and code_dim >= 1, got {self.codebook_size}, {self.code_dim}")
    activation(self.act)

  @property
  def grid(self) -> int:
    return self.image_size // 2 ** len(self.channels)

  @property
  def num_tokens(self) -> int:
    return self.grid ** 2


# ----------------------------------------------------------------------------- pure functions

def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """The index (int32) of the codebook row nearest to each vector of z [..., d] in squared L2."""
  z = z.astype(jnp.float32)
  e = codebook.astype(jnp.float32)
  distances = jnp.sum(z * z, -1, keepdims=True) - 2 * z @ e.T + jnp.sum(e * e, -1)
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def quantize(z: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(z_q, codes, e): e the nearest codebook rows, and z_q = z + sg(e - z), which is e in the
  forward pass and passes its gradient to z unchanged (the straight-through estimator)."""
  codes = nearest_codes(z, codebook)
  e = codebook[codes].astype(z.dtype)
  return z + jax.lax.stop_gradient(e - z), codes, e


def vq_losses(z: jax.Array, e: jax.Array) -> dict:
  """The VQ-VAE terms, each a mean over all elements: `codebook_loss` = |sg(z) - e|² moves
  the codes to the encoder's outputs; `commitment` = |z - sg(e)|² keeps the encoder near its
  codes (weighted by beta in the loss)."""
  z, e = z.astype(jnp.float32), e.astype(jnp.float32)
  return {"codebook_loss": jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e)),
          "commitment": jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))}


def code_usage(codes: jax.Array, codebook_size: int) -> dict:
  """How much of the codebook a batch uses: `code_perplexity`, exp of the entropy of the
  code histogram (codebook_size when uniform, 1 when collapsed), and `codes_used`, the
  fraction of codes used at least once (the rest are dead codes for this batch)."""
  counts = jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"code_perplexity": jnp.exp(entropy), "codes_used": jnp.mean((counts > 0).astype(jnp.float32))}


def check_codes(codes, num_tokens: int, codebook_size: int, where: str = "image_codes") -> None:
  """A clear error for a code grid of the wrong size (always) or ids outside the codebook
  (eager inputs only: a traced array has no values to read)."""
  if codes.shape[-1] != num_tokens:
    raise ValueError(f"{where} hold {codes.shape[-1]} codes per image but this tokenizer's grid has "
                     f"{num_tokens} (shape {tuple(codes.shape)})")
  if isinstance(codes, jax.core.Tracer):
    return
  low, high = int(jnp.min(codes)), int(jnp.max(codes))
  if low < 0 or high >= codebook_size:
    raise ValueError(f"{where} hold code ids in [{low}, {high}], outside [0, {codebook_size}) "
                     f"of a codebook of size {codebook_size}")


# ----------------------------------------------------------------------------- modules

def _conv(cls, features: int, kernel: int, strides: int, padding, name: str, c: VQConfig):
  return cls(features, (kernel, kernel), strides=strides, padding=padding, name=name,
             dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
             kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None,) * 4),
             bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


class VQEncoder(nn.Module):
  """Images [n, H, W, 3] -> z [n, grid, grid, code_dim]."""
  config: VQConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    x = images.astype(jnp.dtype(c.dtype))
    for i, channels in enumerate(c.channels):
      x = activation(c.act)(_conv(nn.Conv, channels, 3, 2, ((1, 1), (1, 1)), f"conv_{i}", c)(x))
    return _conv(nn.Conv, c.code_dim, 1, 1, "VALID", "to_codes", c)(x)


class VQDecoder(nn.Module):
  """Quantised z [n, grid, grid, code_dim] -> images [n, H, W, 3]: the encoder's stages reversed,
  each a nearest-neighbour 2x upsampling and a 3x3 convolution (as VQGAN's decoder; on XLA:CPU
  the gradient of a stride-2 transposed convolution measured 15x slower)."""
  config: VQConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    c = self.config
    x = z.astype(jnp.dtype(c.dtype))
    for i, channels in enumerate(reversed(c.channels)):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = activation(c.act)(_conv(nn.Conv, channels, 3, 1, ((1, 1), (1, 1)), f"up_{i}", c)(x))
    return _conv(nn.Conv, 3, 3, 1, ((1, 1), (1, 1)), "to_pixels", c)(x)


@flax.struct.dataclass
class VQOutput:
  reconstruction: jax.Array  # [n, H, W, 3]
  codes: jax.Array  # int32 [n, T]
  z: jax.Array  # the encoder's output [n, grid, grid, code_dim]
  e: jax.Array  # its nearest codes [n, grid, grid, code_dim]


class VQAutoencoder(nn.Module):
  """The tokenizer: `encode` images [..., H, W, 3] -> codes int32 [..., T] (row-major grid),
  `embed` codes -> codebook rows [..., T, code_dim], `decode` codes -> images;
  `__call__` runs the whole autoencoder (what training and init use).
  Parameters: `encoder`, `decoder`, `codebook` [codebook_size, code_dim]."""
  config: VQConfig

  def setup(self):
    c = self.config
    k = c.codebook_size
    self.encoder = VQEncoder(c)
    self.decoder = VQDecoder(c)
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)  # as the paper
    self.codebook = self.param("codebook", nn.with_logical_partitioning(init, (None, None)), (k, c.code_dim),
                               jnp.dtype(c.param_dtype))

  def _unit(self, x: jax.Array) -> jax.Array:
    """x itself, or x scaled to unit length along its last axis (config.normalized)."""
    if not self.config.normalized:
      return x
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))

  def _encode_z(self, images: jax.Array) -> jax.Array:
    return self._unit(self.encoder(images))

  def _grid(self, x: jax.Array) -> jax.Array:
    g = self.config.grid
    return x.reshape(x.shape[0], g, g, x.shape[-1])

  def encode(self, images: jax.Array) -> jax.Array:
    lead = images.shape[:-3]
    z = self._encode_z(images.reshape(-1, *images.shape[-3:]))
    return nearest_codes(z, self._unit(self.codebook)).reshape(*lead, self.config.num_tokens)

  def embed(self, codes: jax.Array) -> jax.Array:
    return self._unit(self.codebook)[codes].astype(jnp.dtype(self.config.dtype))

  def decode(self, codes: jax.Array) -> jax.Array:
    lead = codes.shape[:-1]
    e = self.embed(codes.reshape(-1, codes.shape[-1]))
    images = self.decoder(self._grid(e))
    return images.reshape(*lead, *images.shape[1:])

  def __call__(self, images: jax.Array) -> VQOutput:
    z = self._encode_z(images)
    z_q, codes, e = quantize(z, self._unit(self.codebook))
    return VQOutput(self.decoder(z_q), codes.reshape(codes.shape[0], -1), z, e)


class ImageTokenizer(nn.Module):
  """The model of kind "vq": a `VQAutoencoder` named `vq` and its training objective.

  `apply({'params': p}, images) -> VQOutput`; the engine trains it on `train_loss`.
  """
  config: VQConfig

  def setup(self):
    self.vq = VQAutoencoder(self.config)

  def __call__(self, images: jax.Array) -> VQOutput:
    return self.vq(images)

  def train_loss(self, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """VQ-VAE loss on a pipeline batch (its first image slot): reconstruction MSE +
    codebook loss + beta * commitment; the metrics add the codebook's usage."""
    del rng  # the objective is deterministic
    images = batch["images"][:, 0]
    out = self.vq(images)
    recon_mse = jnp.mean(jnp.square(out.reconstruction.astype(jnp.float32) - images.astype(jnp.float32)))
    terms = vq_losses(out.z, out.e)
    loss = recon_mse + terms["codebook_loss"] + self.config.beta * terms["commitment"]
    return loss, {"loss": loss, "recon_mse": recon_mse, **terms, **code_usage(out.codes, self.config.codebook_size)}
