"""Small transformers models with random weights, saved to disk, for parity tests."""

import numpy as np
import torch
import transformers


def tiny_lm_config(arch: str = "llama", **kw):
  base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256)
  base.update(kw)
  cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
  return cls(**base)


def tiny_vision_config(style: str = "clip", image_size: int = 28, patch_size: int = 7, **kw):
  base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=image_size, patch_size=patch_size)
  base.update(kw)
  cls = {"clip": transformers.CLIPVisionConfig, "siglip": transformers.SiglipVisionConfig}[style]
  return cls(**base)


def save(model, folder) -> str:
  model.eval()
  model.save_pretrained(folder)
  return str(folder)


def build(cls, config, folder, seed: int = 0):
  torch.manual_seed(seed)
  model = cls(config).eval()
  # Non-trivial norms and biases, so a mapping that drops them fails.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "layernorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model, save(model, folder)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(n, size, size, 3).astype(np.float32)


def to_torch_images(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
