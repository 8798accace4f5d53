"""vlm_jax: train and compress vision-language models in JAX/Flax."""

from vlm_jax.interop import CheckpointError, from_hf, hf_names, to_hf
from vlm_jax.models.generate import generate

__version__ = "0.1.0"
