"""Hugging Face import and export."""

from vlm_jax.interop.hf import ARCHITECTURES, from_hf, hf_names, model_from_folder, to_hf
from vlm_jax.interop.safetensors_io import CheckpointError
