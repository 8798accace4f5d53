"""Declarative name maps between vlm_jax parameters and Hugging Face tensors.

A map is a list of `Rule(ours, hf, kind)`. `ours` is a module path in our tree
(or a full parameter path for the tensor kinds), `hf` the matching Hugging Face
module (or tensor) name; `{i}` stands for a layer index in both. The `kind`
says which leaves a module has and how each is transformed.
"""

import dataclasses
import re
from typing import Optional


# Leaf transforms: (ours -> hf, hf -> ours).
_T = (lambda x: x.T, lambda x: x.T)
_CONV = (lambda x: x.transpose(3, 2, 0, 1), lambda x: x.transpose(2, 3, 1, 0))  # HWIO <-> OIHW
_ID = (lambda x: x, lambda x: x)
_SCALAR1 = (lambda x: x.reshape(1), lambda x: x.reshape(()))

# kind -> {our leaf name: (hf leaf name, transform)}; "" = the rule names a whole tensor.
KINDS = {
    "linear": {"kernel": ("weight", _T), "bias": ("bias", _ID)},
    "norm": {"scale": ("weight", _ID), "bias": ("bias", _ID)},
    "embed": {"embedding": ("weight", _ID)},
    "conv": {"kernel": ("weight", _CONV), "bias": ("bias", _ID)},
    "tensor": {"": ("", _ID)},
    "tensor_t": {"": ("", _T)},
    "scalar1": {"": ("", _SCALAR1)},
}


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str
  hf: str
  kind: str


def prefixed(rules: list[Rule], ours: str, hf: str) -> list[Rule]:
  return [Rule(ours + r.ours, hf + r.hf, r.kind) for r in rules]


def encoder_block(ours: str, hf: str) -> list[Rule]:
  """A CLIP/SigLIP encoder layer."""
  return [
      Rule(f"{ours}/attn_norm", f"{hf}.layer_norm1", "norm"),
      Rule(f"{ours}/attn/q", f"{hf}.self_attn.q_proj", "linear"),
      Rule(f"{ours}/attn/k", f"{hf}.self_attn.k_proj", "linear"),
      Rule(f"{ours}/attn/v", f"{hf}.self_attn.v_proj", "linear"),
      Rule(f"{ours}/attn/o", f"{hf}.self_attn.out_proj", "linear"),
      Rule(f"{ours}/mlp_norm", f"{hf}.layer_norm2", "norm"),
      Rule(f"{ours}/mlp/fc1", f"{hf}.mlp.fc1", "linear"),
      Rule(f"{ours}/mlp/fc2", f"{hf}.mlp.fc2", "linear"),
  ]


DECODER_LM = [
    Rule("embed", "model.embed_tokens", "embed"),
    Rule("layers_{i}/attn_norm", "model.layers.{i}.input_layernorm", "norm"),
    Rule("layers_{i}/q", "model.layers.{i}.self_attn.q_proj", "linear"),
    Rule("layers_{i}/k", "model.layers.{i}.self_attn.k_proj", "linear"),
    Rule("layers_{i}/v", "model.layers.{i}.self_attn.v_proj", "linear"),
    Rule("layers_{i}/o", "model.layers.{i}.self_attn.o_proj", "linear"),
    Rule("layers_{i}/mlp_norm", "model.layers.{i}.post_attention_layernorm", "norm"),
    Rule("layers_{i}/gate", "model.layers.{i}.mlp.gate_proj", "linear"),
    Rule("layers_{i}/up", "model.layers.{i}.mlp.up_proj", "linear"),
    Rule("layers_{i}/down", "model.layers.{i}.mlp.down_proj", "linear"),
    Rule("norm", "model.norm", "norm"),
    Rule("lm_head", "lm_head", "linear"),
]

VISION_TOWER = [
    Rule("patch_embed", "embeddings.patch_embedding", "conv"),
    Rule("cls", "embeddings.class_embedding", "tensor"),
    Rule("pos_embed", "embeddings.position_embedding.weight", "tensor"),
    Rule("pre_norm", "pre_layrnorm", "norm"),
    *encoder_block("layers_{i}", "encoder.layers.{i}"),
    Rule("post_norm", "post_layernorm", "norm"),
    Rule("head/probe", "head.probe", "tensor"),
    Rule("head/in_proj", "head.attention.in_proj_weight", "tensor_t"),
    Rule("head/in_proj_bias", "head.attention.in_proj_bias", "tensor"),
    Rule("head/o", "head.attention.out_proj", "linear"),
    Rule("head/norm", "head.layernorm", "norm"),
    Rule("head/mlp/fc1", "head.mlp.fc1", "linear"),
    Rule("head/mlp/fc2", "head.mlp.fc2", "linear"),
]

TEXT_TOWER = [
    Rule("token_embed", "embeddings.token_embedding", "embed"),
    Rule("pos_embed", "embeddings.position_embedding.weight", "tensor"),
    *encoder_block("layers_{i}", "encoder.layers.{i}"),
    Rule("final_norm", "final_layer_norm", "norm"),
]

LLAVA = [
    *prefixed(DECODER_LM, "lm/", "language_model."),
    *prefixed(VISION_TOWER, "vision/", "vision_tower."),
    Rule("projector/linear_1", "multi_modal_projector.linear_1", "linear"),
    Rule("projector/linear_2", "multi_modal_projector.linear_2", "linear"),
]

CLIP = [
    *prefixed(VISION_TOWER, "vision/", "vision_model."),
    *prefixed(TEXT_TOWER, "text/", "text_model."),
    Rule("vision_proj", "visual_projection", "linear"),
    Rule("text_proj", "text_projection", "linear"),
    Rule("logit_scale", "logit_scale", "tensor"),
]

SIGLIP = [
    *prefixed(VISION_TOWER, "vision/", "vision_model."),
    *prefixed(TEXT_TOWER, "text/", "text_model."),
    Rule("text_proj", "text_model.head", "linear"),
    Rule("logit_scale", "logit_scale", "scalar1"),
    Rule("logit_bias", "logit_bias", "scalar1"),
]

# Other spellings of the same tensors, rewritten on read to the names above:
# transformers 5 in-memory LLaVA names, and the `vision_model.` level that
# older vision checkpoints (and LLaVA checkpoints on the Hub) carry.
ALIASES = {
    "llava": [(r"^model\.language_model\.", "language_model.model."),
              (r"^lm_head\.", "language_model.lm_head."),
              (r"^model\.vision_tower\.", "vision_tower."),
              (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
              (r"^vision_tower\.vision_model\.", "vision_tower.")],
    "vision": [(r"^vision_model\.", "")],
}


def canonical_name(name: str, aliases: list[tuple[str, str]]) -> str:
  for pattern, repl in aliases:
    name = re.sub(pattern, repl, name)
  return name


def _template_regex(template: str) -> re.Pattern:
  return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class Match:
  hf_name: str
  to_hf: callable
  from_hf: callable


class NameMap:
  """Resolves each of our parameter paths (`a/b/kernel`) to a Hugging Face tensor."""

  def __init__(self, rules: list[Rule]):
    self._rules = [(r, _template_regex(r.ours)) for r in rules]

  def resolve(self, path: str) -> Optional[Match]:
    module, _, leaf = path.rpartition("/")
    for rule, regex in self._rules:
      leaves = KINDS[rule.kind]
      target, name = (path, "") if "" in leaves else (module, leaf)
      m = regex.match(target)
      if m and name in leaves:
        hf_leaf, (to_hf, from_hf) = leaves[name]
        hf = rule.hf.format(i=m.group("i")) if "i" in m.groupdict() else rule.hf
        return Match(f"{hf}.{hf_leaf}" if hf_leaf else hf, to_hf, from_hf)
    return None
