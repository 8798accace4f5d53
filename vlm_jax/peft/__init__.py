"""Parameter-efficient fine-tuning: LoRA and SparseLoRA (`lora.py`)."""
