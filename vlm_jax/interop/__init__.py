"""Hugging Face import and export."""

from vlm_jax.interop.hf import ARCHITECTURES, from_hf, to_hf
from vlm_jax.interop.safetensors_io import CheckpointError
