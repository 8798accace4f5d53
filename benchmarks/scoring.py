"""Perplexity-scoring throughput: vlm_jax against a transformers (PyTorch) LLaVA of the same size.

    .venv/bin/python benchmarks/scoring.py                       # tiny preset, 64 shapes-world captions
    .venv/bin/python benchmarks/scoring.py --model small --records 32 --batch 8 --repeats 2
    .venv/bin/python benchmarks/scoring.py --json /tmp/scoring.json

Both sides score the same records with the same weights (METHODS §2: per-record PPL over
the caption tokens and the end token, conditioned on the image and the POINTS prompt,
log-probs in float32):

  data     `--records` shapes-world captions (TFDS, built in a temporary folder at the
           model's image size) and a byte-level BPE tokenizer of the model's vocabulary.
  weights  random (`--seed`), a `configs/models.py` preset; exported with `vlm_jax.to_hf` and
           loaded by `transformers.LlavaForConditionalGeneration.from_pretrained`.
  batches  the input pipeline's (`--batch` rows of `--seq` tokens, one record a row); the
           same NumPy arrays go to both sides.

Measured, in the same run:
  vlm_jax model      the jitted scoring function (`vlm_jax.curation.perplexity.make_score_fn`)
                     over the pre-built batches
  torch model        `LlavaForConditionalGeneration(input_ids, pixel_values, attention_mask)`
                     under `torch.inference_mode()`, then float32 log-softmax, gather and the
                     per-record sums over the loss mask
  vlm_jax job        the whole `score` job (`vlm_jax.curation.scoring.score`): reading and
                     decoding the records, tokenising, sharding, scoring, writing scores.jsonl
                     and the resume state after every batch; one run, compile included and
                     reported apart ("batches 2+": the run after its first batch, with the
                     token counts scaled by the fraction of batches)
Model timings are the median of `--repeats` passes over all batches, the two sides
interleaved (jax, torch, jax, ...) so a load change on a shared machine favours neither.
samples/s counts records; tokens/s counts every real token of a row (image tokens included),
target tok/s only the scored ones. The PPLs of the two sides are compared (max relative
difference; float32 on both, expect < 1e-4).
"""

import _common  # first: the environment, the repo root on sys.path

import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

import vlm_jax
from configs import models
from vlm_jax import report
from vlm_jax.curation import jobs, perplexity, scoring
from vlm_jax.data import builders, pipeline, tokenizer as tokenizers_lib
from vlm_jax.models import count_params
from vlm_jax.models.build import build_model
from vlm_jax.models.params import init_params


def parse_args(argv=None):
  parser = _common.parser(__doc__)
  parser.add_argument("--model", default="tiny", help="a VLM preset of configs/models.py (tiny, small, ...)")
  parser.add_argument("--records", type=int, default=64, help="captions to score (a multiple of --batch)")
  parser.add_argument("--batch", type=int, default=16, help="rows per batch")
  parser.add_argument("--seq", type=int, default=96, help="tokens per row (image tokens included)")
  parser.add_argument("--repeats", type=int, default=3, help="timed passes over the batches per side")
  parser.add_argument("--seed", type=int, default=0, help="weights and data seed")
  parser.add_argument("--prompt", default=None, help="caption prompt (default: the POINTS prompt)")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)
  if args.records % args.batch:
    parser.error("--records must be a multiple of --batch (padding rows would hold no image for LLaVA)")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)

  import torch  # heavy, and only the PyTorch side needs it
  import transformers  # heavy, and only the PyTorch side needs it

  tfds.disable_progress_bar()

  tmp = tempfile.mkdtemp(prefix="bench_scoring_")
  preset = models.preset(args.model)
  if preset.get("kind") != "vlm":
    sys.exit(f"--model {args.model} is not a VLM preset")
  model = build_model(preset)
  c = model.config
  vocab = c.text.vocab_size
  if c.image_token_id != vocab - 1:
    sys.exit(f"the benchmark's tokenizer puts <image> at vocab_size - 1 = {vocab - 1}; "
             f"preset {args.model} uses {c.image_token_id}")

  # --- data, tokenizer, weights (shared through a Hugging Face folder)
  t0 = time.perf_counter()
  builder = builders.build_shapes_world(os.path.join(tmp, "data"), "caption", sizes={"train": args.records},
                                        image_size=c.vision.image_size, seed=args.seed)
  tok_dir = os.path.join(tmp, "tok")
  tokenizers_lib.train_bpe(tokenizers_lib.builtin_corpus(2000, args.seed), vocab, tok_dir)
  params = jax.device_get(init_params(model, jax.random.key(args.seed)))
  hf_dir = os.path.join(tmp, "hf")
  vlm_jax.to_hf(model, params, hf_dir)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
  print(f"set-up {time.perf_counter() - t0:.1f}s: {args.records} captions, {args.model} "
        f"({count_params(params) / 1e6:.2f}M parameters)", flush=True)

  config = jobs.default_config(
      model=ml_collections.ConfigDict(preset.to_dict()), source=f"{builder.name}/{builder.builder_config.name}",
      data_dir=os.path.join(tmp, "data"), tokenizer=tok_dir, batch=args.batch, seq_len=args.seq,
      prompt=perplexity.DEFAULT_PROMPT if args.prompt is None else args.prompt)
  with config.unlocked():
    config.progress = False
  data = scoring.scoring_data_config(config)
  batches = list(pipeline.Pipeline.from_config(data, model=c, seed=config.seed))
  if sum(int(bool(i)) for b in batches for i in b["id"]) != args.records:
    sys.exit("some records were skipped by the pipeline (too long?): raise --seq")
  real_tokens = int(sum(b["attention_mask"].sum() for b in batches))
  target_tokens = int(sum(b["loss_mask"].sum() for b in batches))

  # --- the two scorers over the same batches
  score_fn = jax.jit(perplexity.make_score_fn(model))
  jax_batches = [{k: jnp.asarray(b[k]) for k in ("input_ids", "loss_mask", "attention_mask", "positions",
                                                 "segment_ids", "images")} for b in batches]
  torch_batches = [dict(input_ids=torch.from_numpy(b["input_ids"].astype(np.int64)),
                        attention_mask=torch.from_numpy(b["attention_mask"].astype(np.int64)),
                        pixel_values=torch.from_numpy(np.ascontiguousarray(b["images"][:, 0].transpose(0, 3, 1, 2))),
                        loss_mask=torch.from_numpy(b["loss_mask"])) for b in batches]

  def run_jax():
    outs = [score_fn(params, b) for b in jax_batches]
    return [(np.asarray(o["nll_sum"]), np.asarray(o["tokens"])) for o in outs]

  def run_torch():
    res = []
    with torch.inference_mode():
      for b in torch_batches:
        logits = hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                    attention_mask=b["attention_mask"], use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -torch.gather(logp, -1, b["input_ids"][:, 1:, None])[..., 0]
        w = b["loss_mask"][:, 1:]
        res.append(((nll * w).sum(-1).numpy(), w.sum(-1).numpy()))
    return res

  (j_first, j_med, j_out, _), (t_first, t_med, t_out, _) = _common.timed_pair(run_jax, run_torch, args.repeats)
  j_ppl = np.exp(np.concatenate([s / n for s, n in j_out]))
  t_ppl = np.exp(np.concatenate([s / n for s, n in t_out]))
  rel = float(np.max(np.abs(j_ppl - t_ppl) / t_ppl))

  # --- the whole job (pipeline + scoring + writing), once
  workdir = os.path.join(tmp, "job")
  summary = scoring.score(config, workdir, params=params)
  job_s = summary["wall (s)"]
  job_first = summary["first batch incl. compile (s)"]
  job_ppl = {s["id"]: s["ppl"] for s in perplexity.read_scores(os.path.join(workdir, scoring.SCORES_FILE))}
  ids = [str(i) for b in batches for i in b["id"] if i]
  job_rel = float(np.max(np.abs(np.asarray([job_ppl[i] for i in ids]) - j_ppl) / j_ppl))

  n = args.records
  rows = [
      dict(side="vlm_jax model", s=j_med, samples_s=n / j_med, tok_s=real_tokens / j_med,
           target_tok_s=target_tokens / j_med, first_call_s=j_first),
      dict(side="torch model", s=t_med, samples_s=n / t_med, tok_s=real_tokens / t_med,
           target_tok_s=target_tokens / t_med, first_call_s=t_first),
      dict(side="vlm_jax job", s=job_s, samples_s=n / job_s, tok_s=real_tokens / job_s,
           target_tok_s=target_tokens / job_s, first_call_s=job_first),
  ]
  if len(batches) > 1 and job_s > job_first:  # the job without its first batch (compile, warm-up)
    rest = job_s - job_first
    f = (len(batches) - 1) / len(batches)
    rows.append(dict(side="vlm_jax job, batches 2+", s=rest, samples_s=(n - args.batch) / rest,
                     tok_s=real_tokens * f / rest, target_tok_s=target_tokens * f / rest, first_call_s=None))
  title = (f"perplexity scoring, {args.model} ({count_params(params) / 1e6:.2f}M), {n} records, batch "
           f"{args.batch} x {args.seq}, float32, {jax.devices()[0].platform} / torch {torch.__version__} "
           f"({torch.get_num_threads()} threads)")
  report.print_table([{"": r["side"], "samples/s": r["samples_s"], "tokens/s": r["tok_s"],
                       "target tok/s": r["target_tok_s"], "seconds": r["s"], "first call (s)": r["first_call_s"]}
                      for r in rows], title)
  print(f"vlm_jax model / torch model: {t_med / j_med:.2f}x;  max relative PPL difference jax vs torch "
        f"{rel:.1e}, job vs jitted function {job_rel:.1e};  {args.repeats} timed passes each, "
        f"the job once (its seconds include compiling)", flush=True)
  result = dict(model=args.model, params=count_params(params), records=n, batch=args.batch, seq=args.seq,
                real_tokens=real_tokens, target_tokens=target_tokens, rows=rows, max_rel_ppl_diff=rel,
                job_vs_function_rel_diff=job_rel, repeats=args.repeats,
                **_common.machine_info(jax, torch, transformers))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  shutil.rmtree(tmp, ignore_errors=True)
  return result


if __name__ == "__main__":
  main()
