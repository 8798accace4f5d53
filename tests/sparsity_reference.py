"""Reference Wanda / magnitude pruning in PyTorch, for the exactness test of vlm_jax's sparsity code.

This is an independent re-implementation, written for that test, of the procedure in the Wanda
paper's code (locuslab/wanda, `lib/prune.py`: `prune_wanda` and `prune_magnitude`), as specified in
METHODS §4. It uses only torch and transformers (never vlm_jax) and works on a Hugging Face
`LlamaForCausalLM` in float32:

- Wanda: sequential calibration. The hidden states entering decoder layer 0 are captured for every
  calibration sample; then, layer by layer, the dense layer is run on each sample (batch 1) with
  forward hooks on its nn.Linear modules collecting `scaler_row` (running mean over samples of the
  squared L2 norm of each input channel), all linears of the layer are pruned with the score
  |W| * sqrt(scaler_row), and the pruned layer is re-run to give the next layer its inputs.
- Magnitude: score |W|, no calibration.
- Unstructured: Wanda prunes the int(in * s) lowest scores of each output row (stable sort);
  magnitude prunes every |W| <= the sorted value at index int(numel * s) of the whole matrix
  (that is int(numel * s) + 1 weights when there are no ties, as in the reference).
- N:M: in every group of M consecutive input columns, the N lowest scores of each row are pruned.
- Wanda's variant (`use_variant`, the reference's `--use_variant`): per row, the sorted scores'
  cumulative sums; for one alpha per matrix, each row prunes every score <= its largest sorted
  score whose cumulative sum is <= alpha * the row's total (`return_given_alpha`); alpha is
  bisected from 0.4 within [0, 0.8] until the whole matrix's sparsity is within 0.001 of the
  target or the bounds are less than 0.001 apart.

Masks are True where a weight is pruned; pruned weights are set to zero in place.
"""

import torch
import transformers
from torch import nn


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
  """A small random float32 Llama (intermediate 128, a multiple of 8, so 4:8 fits down_proj)."""
  config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
      max_position_embeddings=256, tie_word_embeddings=False, attn_implementation="eager")
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(config).float().eval()


def calibration_ids(nsamples: int = 8, seqlen: int = 16, vocab: int = 128, seed: int = 0) -> torch.Tensor:
  generator = torch.Generator().manual_seed(seed)
  return torch.randint(0, vocab, (nsamples, seqlen), generator=generator)


def linears(module: nn.Module, prefix: str) -> dict[str, nn.Linear]:
  """Every nn.Linear inside `module`, by full name (reference `find_layers`)."""
  return {f"{prefix}.{name}": m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


# ---------------------------------------------------------------------------------------------
# Masks from scores.


def nm_mask(score: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
  """In each group of prune_m consecutive input columns, the prune_n lowest scores of each row."""
  mask = torch.zeros_like(score, dtype=torch.bool)
  for ii in range(0, score.shape[1], prune_m):
    group = score[:, ii:ii + prune_m].float()
    mask.scatter_(1, ii + torch.topk(group, prune_n, dim=1, largest=False)[1], True)
  return mask


def return_given_alpha(alpha, sort_res, W_metric, tmp_metric, sum_before):
  """(pruned mask, sparsity of the whole matrix) for one alpha, as the reference computes them."""
  thres_cumsum = sum_before * alpha
  sort_mask = tmp_metric <= thres_cumsum.reshape((-1, 1))
  thres = torch.gather(sort_res[0], dim=1, index=sort_mask.sum(dim=1, keepdims=True) - 1)
  W_mask = (W_metric <= thres)
  cur_sparsity = (W_mask == True).sum() / W_mask.numel()  # noqa: E712 (as the reference)
  return W_mask, cur_sparsity


def variant_mask(score, sparsity) -> torch.Tensor:
  """Wanda's variant: alpha bisected so that the matrix is `sparsity`-sparse (to 0.001)."""
  sort_res = torch.sort(score, dim=-1, stable=True)
  tmp_metric = torch.cumsum(sort_res[0], dim=1)
  sum_before = score.sum(dim=1)
  alpha = 0.4
  alpha_hist = [0., 0.8]
  W_mask, cur_sparsity = return_given_alpha(alpha, sort_res, score, tmp_metric, sum_before)
  while (torch.abs(cur_sparsity - sparsity) > 0.001) and (alpha_hist[1] - alpha_hist[0] >= 0.001):
    if cur_sparsity > sparsity:
      alpha_new = (alpha + alpha_hist[0]) / 2.0
      alpha_hist[1] = alpha
    else:
      alpha_new = (alpha + alpha_hist[1]) / 2.0
      alpha_hist[0] = alpha
    alpha = alpha_new
    W_mask, cur_sparsity = return_given_alpha(alpha, sort_res, score, tmp_metric, sum_before)
  return W_mask


def wanda_mask(weight, scaler_row, sparsity, prune_n=0, prune_m=0, use_variant=False) -> torch.Tensor:
  score = weight.abs() * torch.sqrt(scaler_row.reshape(1, -1))
  if prune_n != 0:
    return nm_mask(score, prune_n, prune_m)
  if use_variant:
    return variant_mask(score, sparsity)
  mask = torch.zeros_like(score, dtype=torch.bool)
  order = torch.sort(score, dim=-1, stable=True)[1]
  mask.scatter_(1, order[:, :int(score.shape[1] * sparsity)], True)
  return mask


def magnitude_mask(weight, sparsity, prune_n=0, prune_m=0) -> torch.Tensor:
  score = weight.abs()
  if prune_n != 0:
    return nm_mask(score, prune_n, prune_m)
  thresh = torch.sort(score.flatten())[0][int(weight.numel() * sparsity)]
  return score <= thresh


# ---------------------------------------------------------------------------------------------
# Calibration.


class _Stop(Exception):
  pass


def capture_layer0_inputs(model, calib_ids):
  """Hidden states entering decoder layer 0, [nsamples, seqlen, hidden], and the layer-call kwargs.

  A pre-hook on layer 0 records exactly what LlamaModel.forward passes (the reference's `Catcher`).
  In transformers 5 that is: attention_mask (4-D additive causal mask for eager attention),
  position_embeddings ((cos, sin), computed once at the model level), position_ids,
  past_key_values and use_cache. The model is called with use_cache=False, so no KV cache is
  created (with the default use_cache=True a DynamicCache would be passed and would grow on replay).
  All samples have the same length and no padding, so the kwargs are the same for every sample.
  """
  layer0 = model.model.layers[0]
  inputs, kwargs = [], {}

  def hook(_, args, kw):
    inputs.append(args[0] if args else kw.pop("hidden_states"))
    kwargs.clear()
    kwargs.update(kw)
    raise _Stop

  handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
  try:
    with torch.no_grad():
      for j in range(calib_ids.shape[0]):
        try:
          model(calib_ids[j:j + 1], use_cache=False)
        except _Stop:
          pass
  finally:
    handle.remove()
  assert kwargs.get("past_key_values") is None
  return torch.cat(inputs, dim=0), kwargs


def run_layer(layer, inps, kwargs) -> torch.Tensor:
  """Runs a decoder layer on every sample, one at a time (batch 1). The layer returns a tensor."""
  with torch.no_grad():
    return torch.cat([layer(inps[j:j + 1], **kwargs) for j in range(inps.shape[0])], dim=0)


def collect_scaler_rows(layer, inps, kwargs, prefix="") -> dict[str, torch.Tensor]:
  """scaler_row [in] of every linear of `layer`, from one batch-1 pass per sample (`add_batch`)."""
  subset = linears(layer, prefix)
  stats = {name: [torch.zeros(m.in_features), 0] for name, m in subset.items()}

  def make_hook(name):
    def hook(_, args, __):
      x = args[0].detach()
      tmp = x.shape[0] if x.dim() == 3 else 1
      x = x.reshape(-1, x.shape[-1]).float()
      scaler_row, nsamples = stats[name]
      scaler_row *= nsamples / (nsamples + tmp)
      nsamples += tmp
      scaler_row += torch.norm(x, p=2, dim=0) ** 2 / nsamples
      stats[name][1] = nsamples
    return hook

  handles = [m.register_forward_hook(make_hook(name)) for name, m in subset.items()]
  try:
    run_layer(layer, inps, kwargs)
  finally:
    for h in handles:
      h.remove()
  return {name: s[0] for name, s in stats.items()}


# ---------------------------------------------------------------------------------------------
# The procedure.


def reference_prune(model, calib_ids, method, sparsity=0.5, prune_n=0, prune_m=0,
                    use_variant=False) -> dict[str, torch.Tensor]:
  """Prunes `model` (a transformers LlamaForCausalLM, float32) in place and returns the masks.

  calib_ids: LongTensor [nsamples, seqlen] of calibration tokens (no padding).
  method: "wanda" | "magnitude"; use_variant: Wanda's variant (unstructured Wanda only).
  Returns {module name, e.g. "model.layers.0.self_attn.q_proj": BoolTensor [out, in], True = PRUNED}
  for every nn.Linear inside model.model.layers (lm_head and embeddings are not pruned).
  """
  masks = {}
  layers = model.model.layers
  if method == "magnitude":
    with torch.no_grad():
      for i, layer in enumerate(layers):
        for name, lin in linears(layer, f"model.layers.{i}").items():
          masks[name] = magnitude_mask(lin.weight.data, sparsity, prune_n, prune_m)
          lin.weight.data[masks[name]] = 0
    return masks
  if method != "wanda":
    raise ValueError(f"unknown method {method!r}")

  inps, kwargs = capture_layer0_inputs(model, calib_ids)
  for i, layer in enumerate(layers):
    prefix = f"model.layers.{i}"
    scaler_rows = collect_scaler_rows(layer, inps, kwargs, prefix)  # dense layer i
    with torch.no_grad():
      for name, lin in linears(layer, prefix).items():
        masks[name] = wanda_mask(lin.weight.data, scaler_rows[name], sparsity, prune_n, prune_m, use_variant)
        lin.weight.data[masks[name]] = 0
    inps = run_layer(layer, inps, kwargs)  # pruned layer i -> inputs of layer i+1
  return masks
