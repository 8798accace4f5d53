"""Parameter-efficient fine-tuning: LoRA and SparseLoRA (`lora.py`)."""

from vlm_jax.peft.lora import MODES, forward_kernels, merge

__all__ = ["MODES", "forward_kernels", "merge"]
