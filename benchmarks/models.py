"""Throughput of vlm_jax (JAX, jitted) against transformers (PyTorch) on the same weights, float32, CPU.

    .venv/bin/python benchmarks/models.py                       # tiny + small, LM + VLM
    .venv/bin/python benchmarks/models.py --sizes tiny --kinds lm --repeats 3
    .venv/bin/python benchmarks/models.py --sizes small --gen-batches 1,8,32 --json /tmp/bench.json

For each size and kind (the LLaMA-family LM alone, and the LLaVA VLM with a
CLIP tower) a transformers model is built from a config with random weights
(`torch.manual_seed`), saved with `save_pretrained` and loaded with
`vlm_jax.from_hf`, so both sides run identical weights. Then:

- forward: tokens/s of one batch (`--batch` x `--seq` tokens), median of
  `--repeats` timed runs after a warm-up; JAX jitted once with
  `block_until_ready`, PyTorch under `torch.inference_mode()`. The max absolute
  difference of the two logits is printed (should be < 1e-4).
- generate: new tokens/s of greedy decoding of `--new-tokens` tokens from
  B prompts of `--prompt-len` tokens (plus the image tokens for the VLM), one
  row per B in `--gen-batches` (default 1, 8, 32): `vlm_jax.generate` vs
  `hf.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`, the
  new tokens compared token for token. The first call (compile for JAX, one
  per batch size) is reported apart.
- MFU: model FLOPs (2 x matmul parameters per token, plus 4 x layers x
  heads x head_dim x context per token for attention, plus the vision tower
  for the VLM) per second over the peak float32 matmul throughput measured in
  the same run (jitted 2048x2048 JAX matmul, fastest of 10, measured at the
  start and at the end; the higher is used).
- Timed runs of the two sides are interleaved (jax, torch, jax, ...) so a load
  change on a shared machine does not favour one side.

Sizes come from `configs/models.py` (presets `tiny`, `small`) when it exists
and can be read, else from the definitions below.
"""

import _common  # first: the environment, the repo root on sys.path

import argparse
import dataclasses
import importlib.util
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import traverse_util

import vlm_jax
from vlm_jax.interop import hf_configs
from vlm_jax.models import LMConfig, ViTConfig, VLMConfig, count_params
from vlm_jax.models.build import config_from_dict

# --------------------------------------------------------------------------- sizes

# Used when configs/models.py is absent. `small` is ~100M parameters (LM ~96M, VLM ~107M).
BUILTIN = {
    "tiny": VLMConfig(
        vision=ViTConfig(style="clip", image_size=32, patch_size=8, width=64, depth=2, num_heads=4,
                         mlp_dim=128, act="quick_gelu"),
        text=LMConfig(vocab_size=1024, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, mlp_dim=176, max_position=512),
        projector_act="gelu", feature_layer=-2, feature_select="default", image_token_id=1023),
    "small": VLMConfig(
        vision=ViTConfig(style="clip", image_size=128, patch_size=16, width=384, depth=6, num_heads=6,
                         mlp_dim=1536, act="quick_gelu"),
        text=LMConfig(vocab_size=32000, embed_dim=512, num_layers=16, num_heads=8, num_kv_heads=4,
                      head_dim=64, mlp_dim=2048, max_position=2048),
        projector_act="gelu", feature_layer=-2, feature_select="default", image_token_id=31999),
}


def _preset_from_configs(size: str):
  """The `size` VLM preset of configs/models.py as a VLMConfig, or None (with the reason)."""
  path = os.path.join(_common.ROOT, "configs", "models.py")
  if not os.path.exists(path):
    return None, "configs/models.py absent"
  try:
    spec = importlib.util.spec_from_file_location("_bench_config_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = None
    for name in ("PRESETS", "MODELS", "SIZES", "presets"):
      table = getattr(mod, name, None)
      if isinstance(table, dict) and size in table:
        cfg = table[size]
        break
    if cfg is None:
      for name in ("get_model", "model_config", "get_model_config", "preset", "get_preset", "get_config"):
        fn = getattr(mod, name, None)
        if callable(fn):
          try:
            cfg = fn(size)
            break
          except Exception:  # noqa: BLE001 - try the next spelling
            continue
    if cfg is None and hasattr(mod, size):
      cfg = getattr(mod, size)
      cfg = cfg() if callable(cfg) else cfg
    if cfg is None:
      return None, f"no preset {size!r} found in configs/models.py"
    if isinstance(cfg, VLMConfig):
      config = cfg
    else:
      d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
      d = d.get("model", d)
      d = {"kind": "vlm", **d} if "kind" not in d else d
      _, config = config_from_dict(d)
    if not isinstance(config, VLMConfig):
      return None, f"preset {size!r} is not a VLM config"
    text = dataclasses.replace(config.text, scan_layers=False, remat=False, dtype="float32",
                               param_dtype="float32")
    vision = dataclasses.replace(config.vision, dtype="float32", param_dtype="float32")
    config = dataclasses.replace(config, text=text, vision=vision, projector="mlp2x_gelu")
    if config.image_token_id >= text.vocab_size:  # HF LLaVA embeds the image token
      config = dataclasses.replace(config, image_token_id=text.vocab_size - 1)
    return config, "configs/models.py"
  except Exception as e:  # noqa: BLE001 - fall back to the built-in sizes
    return None, f"configs/models.py unreadable ({type(e).__name__}: {e})"


def model_config(size: str):
  config, source = _preset_from_configs(size)
  if config is None:
    if size not in BUILTIN:
      raise SystemExit(f"unknown size {size!r} ({source}); built-in sizes: {sorted(BUILTIN)}")
    return BUILTIN[size], f"built-in ({source})"
  return config, source


# --------------------------------------------------------------------------- FLOPs


def matmul_params(lm_params: dict, tied: bool, vocab: int, width: int) -> int:
  """Parameters that take part in a matmul per token (all `kernel`s; the tied head)."""
  flat = traverse_util.flatten_dict(lm_params)
  n = sum(int(np.prod(v.shape)) for k, v in flat.items() if k[-1] == "kernel")
  return n + (vocab * width if tied else 0)


def lm_flops(c: LMConfig, n_mm: int, tokens: int, context: float) -> float:
  """2 N per token plus attention (QK^T and PV over `context` keys, causality not discounted)."""
  return tokens * (2.0 * n_mm + 4.0 * c.num_layers * c.num_heads * c.head_dim * context)


def vision_flops(c: VLMConfig, vlm_params: dict, images: int) -> float:
  """Patch embedding, the encoder layers up to the feature layer, and the projector."""
  v = c.vision
  used = c.feature_layer % (v.depth + 1)
  t = v.num_tokens
  layer = vlm_params["vision"]["layers_0"]
  per_layer = sum(int(np.prod(x.shape)) for k, x in traverse_util.flatten_dict(layer).items()
                  if k[-1] == "kernel")
  patch = int(np.prod(vlm_params["vision"]["patch_embed"]["kernel"].shape))
  proj = sum(int(np.prod(x.shape)) for k, x in traverse_util.flatten_dict(vlm_params["projector"]).items()
             if k[-1] == "kernel")
  per_image = (2.0 * patch * v.grid ** 2 + used * (2.0 * per_layer * t + 4.0 * v.width * t * t)
               + 2.0 * proj * c.tokens_per_image)
  return images * per_image


def gen_flops(c: LMConfig, n_mm: int, batch: int, prompt: int, new: int) -> float:
  """Prefill of the prompt (giving the first new token), then `new - 1` one-token steps."""
  total = lm_flops(c, n_mm, batch * prompt, prompt)
  for j in range(new - 1):
    total += lm_flops(c, n_mm, batch, prompt + j + 1)
  return total


# --------------------------------------------------------------------------- peak


def peak_matmul(n: int = 2048, repeats: int = 10) -> tuple[float, float]:
  """Peak float32 matmul FLOP/s, (JAX jitted, torch): the fastest of `repeats` timed runs.

  The fastest run, not the median: on a shared machine the median measures the load.
  """
  ta, tb = torch.randn(n, n), torch.randn(n, n)
  with torch.inference_mode():
    return tuple(_common.matmul_peak(fn, n, repeats, stat=min)
                 for fn in (_common.jax_matmul(n), lambda: torch.mm(ta, tb)))


# --------------------------------------------------------------------------- models


def build_pair(kind: str, config: VLMConfig, folder: str, seed: int):
  """A transformers model with random weights, saved, then loaded by vlm_jax."""
  torch.manual_seed(seed)
  if kind == "lm":
    hf_config = hf_configs.lm_to_hf(config.text)
    hf_cls = transformers.LlamaForCausalLM if not config.text.qkv_bias else transformers.Qwen2ForCausalLM
  else:
    hf_config = hf_configs.vlm_to_hf(config)
    hf_cls = transformers.LlavaForConditionalGeneration
  # No EOS: greedy decoding then runs the same on both sides (min_new_tokens would
  # otherwise ban the EOS token in transformers only); pad 0 silences a warning.
  for c in (hf_config, getattr(hf_config, "text_config", None)):
    if c is not None:
      c.eos_token_id, c.bos_token_id, c.pad_token_id = None, None, 0
  hf = hf_cls(hf_config).eval().to(torch.float32)
  hf.generation_config.eos_token_id = None
  hf.generation_config.bos_token_id = None
  hf.generation_config.pad_token_id = 0
  hf.save_pretrained(folder)
  model, params = vlm_jax.from_hf(folder)
  return hf, model, params


def make_inputs(kind: str, config: VLMConfig, batch: int, text_len: int, rng: np.random.Generator):
  """input_ids [batch, len] (int64) and images [batch, h, w, 3] or None (one image per sample)."""
  vocab = config.text.vocab_size
  if kind == "lm":
    return rng.integers(0, vocab, (batch, text_len)), None
  limit = vocab - 1 if config.image_token_id == vocab - 1 else vocab
  text = rng.integers(0, limit, (batch, text_len))
  text = np.where(text == config.image_token_id, 0, text)
  img = np.full((batch, config.tokens_per_image), config.image_token_id)
  head = min(2, text_len)  # a couple of text tokens, the image, then the rest of the text
  ids = np.concatenate([text[:, :head], img, text[:, head:]], axis=1)
  s = config.vision.image_size
  images = rng.standard_normal((batch, s, s, 3)).astype(np.float32)
  return ids, images


def bench_one(size: str, kind: str, config: VLMConfig, args, folder: str) -> list[dict]:
  rng = np.random.default_rng(0)
  hf, model, params = build_pair(kind, config, folder, seed=0)
  c = config.text
  lm_p = params if kind == "lm" else params["lm"]
  n_params = count_params(params)
  n_mm = matmul_params(lm_p, c.tie_embeddings, c.vocab_size, c.embed_dim)
  rows = []
  base = dict(model=f"{size}-{kind}", params=n_params, kind=kind, size=size)

  # ---------------- forward
  text_len = args.seq
  if kind == "vlm":  # the image tokens count in --seq, unless that leaves fewer than 32 text tokens
    text_len = args.seq - config.tokens_per_image if args.seq - config.tokens_per_image >= 32 else args.seq
  ids_np, images_np = make_inputs(kind, config, args.batch, text_len, rng)
  seq = ids_np.shape[1]
  ids_j = jnp.asarray(ids_np, jnp.int32)
  ids_t = torch.from_numpy(ids_np)
  if kind == "lm":
    fwd = jax.jit(lambda p, ids: model.apply({"params": p}, ids).logits)
    jax_call = lambda: fwd(params, ids_j).block_until_ready()
    torch_kw = {}
  else:
    images_j = jnp.asarray(images_np)
    fwd = jax.jit(lambda p, ids, im: model.apply({"params": p}, ids, images=im).logits)
    jax_call = lambda: fwd(params, ids_j, images_j).block_until_ready()
    torch_kw = dict(pixel_values=torch.from_numpy(images_np.transpose(0, 3, 1, 2).copy()))
  with torch.inference_mode():
    (j_first, j_med, j_logits, runs), (t_first, t_med, t_out, _) = _common.timed_pair(
        jax_call, lambda: hf(input_ids=ids_t, **torch_kw, use_cache=False).logits, args.repeats, args.budget_s)
  diff = float(np.max(np.abs(np.asarray(j_logits) - t_out.float().numpy())))
  tokens = args.batch * seq
  flops = lm_flops(c, n_mm, tokens, seq)
  if kind == "vlm":
    flops += vision_flops(config, params, args.batch)
  rows.append(dict(
      base, task=f"forward {args.batch}x{seq}", batch=args.batch, tokens=tokens,
      jax_s=j_med, torch_s=t_med, jax_tok_s=tokens / j_med, torch_tok_s=tokens / t_med,
      ratio=t_med / j_med, check=f"{diff:.1e}" + (" (!)" if diff > 1e-4 else ""), max_abs_dlogits=diff, jax_first_s=j_first, torch_first_s=t_first,
      jax_compile_s=max(j_first - j_med, 0.0), model_flops=flops, timed_runs=runs))
  print(f"  {size}-{kind} forward: jax {tokens / j_med:,.0f} tok/s, torch {tokens / t_med:,.0f} tok/s, "
        f"max|dlogits| {diff:.1e} (jax first call {j_first:.1f}s, {runs} timed runs)", flush=True)

  # ---------------- generate, at each batch size
  for batch in args.gen_batches if args.new_tokens > 0 else ():
    rows.append(bench_generate(size, kind, config, args, hf, model, params, batch, base, n_mm, rng))
  del hf
  return rows


def bench_generate(size, kind, config, args, hf, model, params, batch, base, n_mm, rng) -> dict:
  """Greedy decoding of `args.new_tokens` from `batch` prompts: vlm_jax.generate vs hf.generate."""
  c = config.text
  gen_ids_np, gen_images_np = make_inputs(kind, config, batch, args.prompt_len, rng)
  prompt = gen_ids_np.shape[1]
  g_ids_j = jnp.asarray(gen_ids_np, jnp.int32)
  g_ids_t = torch.from_numpy(gen_ids_np)
  n = args.new_tokens
  jax_kw, hf_kw = {}, {}
  if kind == "vlm":
    jax_kw = dict(images=jnp.asarray(gen_images_np))
    hf_kw = dict(pixel_values=torch.from_numpy(gen_images_np.transpose(0, 3, 1, 2).copy()))
  gen_j = lambda: vlm_jax.generate(model, params, g_ids_j, max_new_tokens=n, **jax_kw).block_until_ready()
  gen_t = lambda: hf.generate(input_ids=g_ids_t, attention_mask=torch.ones_like(g_ids_t), **hf_kw,
                              do_sample=False, max_new_tokens=n, min_new_tokens=n)
  with torch.inference_mode():
    (j_first, j_med, j_tokens, runs), (t_first, t_med, t_tokens, _) = _common.timed_pair(
        gen_j, gen_t, args.gen_repeats, args.budget_s)
  t_new = t_tokens[:, prompt:].numpy()
  j_new = np.asarray(j_tokens)
  same = int((t_new == j_new).sum()) if t_new.shape == j_new.shape else 0
  new_tokens = batch * n
  flops = gen_flops(c, n_mm, batch, prompt, n)
  if kind == "vlm":
    flops += vision_flops(config, params, batch)
  print(f"  {size}-{kind} generate batch {batch}: jax {new_tokens / j_med:,.0f} tok/s, torch "
        f"{new_tokens / t_med:,.0f} tok/s, same tokens {same}/{new_tokens} (jax first call {j_first:.1f}s, "
        f"{runs} timed runs)", flush=True)
  return dict(
      base, task=f"generate {batch}x{prompt}+{n}", batch=batch, tokens=new_tokens,
      jax_s=j_med, torch_s=t_med, jax_tok_s=new_tokens / j_med, torch_tok_s=new_tokens / t_med,
      ratio=t_med / j_med, check=f"tok {same}/{new_tokens}" + ("" if same == new_tokens else " (!)"),
      same_tokens=same, max_abs_dlogits=None, jax_first_s=j_first, torch_first_s=t_first,
      jax_compile_s=max(j_first - j_med, 0.0), model_flops=flops, timed_runs=runs)


# --------------------------------------------------------------------------- table


def table(rows: list[dict]) -> str:
  head = ["model", "params", "task", "vlm_jax tok/s", "torch tok/s", "ratio", "MFU jax/torch",
          "max|Δlogits|", "jax compile s", "torch 1st s"]
  body = [[r["model"], _common.fmt_params(r["params"]), r["task"], f"{r['jax_tok_s']:,.0f}",
           f"{r['torch_tok_s']:,.0f}", f"{r['ratio']:.2f}x",
           f"{100 * r['jax_mfu']:.1f}%/{100 * r['torch_mfu']:.1f}%", r["check"],
           f"{r['jax_compile_s']:.1f}", f"{r['torch_first_s']:.2f}"] for r in rows]
  return _common.text_table(head, body)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description="Forward and greedy-generation throughput of vlm_jax (JAX, jitted) vs transformers "
                  "(PyTorch) on identical random float32 weights, on CPU, with a logits check and MFU.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--sizes", default="tiny,small",
                 help="comma-separated model sizes: the VLM presets of configs/models.py when it exists (there "
                      "'tiny' is a 0.43M LM / 0.53M VLM, 'small' a 74M LM / 96M VLM; the LM benchmark uses the "
                      "preset's text model), else the built-in 'tiny' (0.4M LM) and 'small' (96M LM / 107M VLM)")
  p.add_argument("--kinds", default="lm,vlm",
                 help="comma-separated: 'lm' (LlamaForCausalLM vs DecoderLM), 'vlm' (LlavaForConditionalGeneration "
                      "vs VLM, one image per sample)")
  p.add_argument("--batch", type=int, default=8, help="sequences per forward batch")
  p.add_argument("--gen-batches", default="1,8,32",
                 help="comma-separated batch sizes of the generation benchmark (one row each; each compiles anew)")
  p.add_argument("--seq", type=int, default=128,
                 help="forward sequence length in tokens; for the VLM it includes the image tokens, unless "
                      "that leaves fewer than 32 text tokens (then it is image tokens + SEQ text tokens)")
  p.add_argument("--prompt-len", type=int, default=32,
                 help="text tokens per generation prompt (the VLM adds its image tokens)")
  p.add_argument("--new-tokens", type=int, default=32,
                 help="greedy new tokens per sequence in the generation benchmark (0 skips it)")
  p.add_argument("--repeats", type=int, default=5, help="timed forward runs after the warm-up (median reported)")
  p.add_argument("--gen-repeats", type=int, default=3,
                 help="timed generation runs after the first (compile) call (median reported)")
  p.add_argument("--budget-s", type=float, default=20.0,
                 help="seconds of timed runs per measurement after which no new jax+torch round starts (at "
                      "least one runs); keeps the whole run short when a loaded machine slows torch down")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads value; 0 keeps torch's default")
  p.add_argument("--json", metavar="PATH", default=None, help="also write the results and run settings as JSON")
  args = p.parse_args(argv)
  args.sizes = [s for s in args.sizes.split(",") if s]
  args.kinds = [k for k in args.kinds.split(",") if k]
  args.gen_batches = [int(b) for b in args.gen_batches.split(",") if b]
  bad = [k for k in args.kinds if k not in ("lm", "vlm")]
  if bad:
    p.error(f"unknown kind(s) {bad}; use lm and/or vlm")
  if any(b < 1 for b in args.gen_batches):
    p.error(f"--gen-batches must be positive, got {args.gen_batches}")
  return args


def run(args) -> dict:
  """Every row of `args` (from `parse_args`), MFU filled in: {settings, info, sources, results}."""
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  t_start = time.perf_counter()
  peak, torch_peak = peak_matmul()
  print(f"peak float32 matmul 2048x2048 (best of 10): jax {peak / 1e9:.0f} GFLOP/s, "
        f"torch {torch_peak / 1e9:.0f} GFLOP/s", flush=True)
  info = dict(_common.machine_info(jax, torch, transformers), jax_device=str(jax.devices()[0]), dtype="float32",
              load_avg_start=os.getloadavg()[0])
  print(f"{_common.describe(info)} | 1-min load average {info['load_avg_start']:.2f}")

  rows, sources = [], {}
  for size in args.sizes:
    config, source = model_config(size)
    sources[size] = source
    for kind in args.kinds:
      print(f"[{size}/{kind}] sizes from {source}", flush=True)
      with tempfile.TemporaryDirectory() as folder:
        rows.extend(bench_one(size, kind, config, args, folder))

  # Peak again at the end; the higher of the two is the MFU denominator.
  peak2, torch_peak2 = peak_matmul()
  peak, torch_peak = max(peak, peak2), max(torch_peak, torch_peak2)
  info.update(peak_matmul_flops=peak, torch_matmul_flops=torch_peak, load_avg_end=os.getloadavg()[0],
              total_s=time.perf_counter() - t_start)
  for r in rows:
    r["jax_mfu"] = r["model_flops"] / r["jax_s"] / peak
    r["torch_mfu"] = r["model_flops"] / r["torch_s"] / peak
  return dict(settings=vars(args), info=info, sources=sources, results=rows)


def main(argv=None):
  out = run(parse_args(argv))
  info, rows = out["info"], out["results"]
  peak, torch_peak = info["peak_matmul_flops"], info["torch_matmul_flops"]
  print()
  print(table(rows))
  print(f"\nfloat32, CPU; torch threads {info['torch_threads']}; peak float32 matmul (2048², best run, "
        f"start and end): jax {peak / 1e9:.0f} GFLOP/s (the MFU denominator), torch {torch_peak / 1e9:.0f} "
        f"GFLOP/s; 1-min load average {info['load_avg_start']:.2f} at the start, {info['load_avg_end']:.2f} at the end "
        f"(torch slows down far more than jax when another process competes for the cores); ratio = vlm_jax tok/s ÷ torch tok/s; MFU = model FLOPs/s ÷ peak; "
        f"generate tok/s counts new tokens (prefill included in the time); 'tok a/b' = greedy tokens "
        f"equal on both sides; '(!)' = logits differ by more than 1e-4 or tokens differ; jax compile s = first "
        f"call - median call; torch 1st s = first call. Total {info['total_s']:.0f}s.")
  if out["settings"]["json"]:
    with open(out["settings"]["json"], "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {out['settings']['json']}")

if __name__ == "__main__":
  main()
