"""Rematerialisation policies by name: what a layer keeps for the backward pass.

A tower config's `remat` field picks one; the numbers never change, only memory and time:

  "none"                every activation is kept (fastest, most memory).
  "full"                only each layer's input is kept; the backward pass recomputes the rest.
  "save_dots"           the results of matrix products without batch dimensions (the
                        projections and the MLP) are kept; the cheap element-wise work and the
                        attention scores are recomputed.
  "save_attention_out"  only each layer's input and its attention output (`ATTENTION_OUT`)
                        are kept: the backward pass recomputes the projections and the MLP,
                        never the attention.

`True` and `False` (older configs) read as "full" and "none".
"""

from typing import Callable, Optional, Union

import flax.linen as nn
import jax

from vlm_jax.models.attention import ATTENTION_OUT

POLICIES: dict[str, Optional[Callable]] = {
    "none": None,
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
}


def remat_policy(value: Union[str, bool]) -> str:
  """The policy name of a config value (bools from older configs), or a clear error."""
  if isinstance(value, bool):
    return "full" if value else "none"
  if value not in POLICIES:
    raise ValueError(f"remat={value!r}: unknown remat policy; choose one of {sorted(POLICIES)}")
  return value


def rematerialised(block: type[nn.Module], policy: str, scanned: bool) -> type[nn.Module]:
  """`block` with the policy applied (itself for "none"); parameter names are unchanged.

  Outside a scan, common subexpressions must not merge the recomputation back into the
  forward pass (`prevent_cse`); inside one the loop already keeps them apart.
  """
  if remat_policy(policy) == "none":
    return block
  return nn.remat(block, policy=POLICIES[policy], prevent_cse=not scanned)
