"""Contrastive region guidance: guided decoding against plain decoding of the same batch, and
guided multiple-choice scoring.

    .venv/bin/python benchmarks/guidance.py                         # tiny preset, CPU
    .venv/bin/python benchmarks/guidance.py --model small --batch 8 --new 32 --repeats 3
    .venv/bin/python benchmarks/guidance.py --json /tmp/guidance.json

Random weights of a `configs/models.py` preset; a batch of `--batch` prompts (text, one
image, text), every row with one box. Measured, interleaved (plain, guided, plain, ...)
so that a load change on a shared machine favours neither:

  plain decode   `vlm_jax.models.generate.generate`, greedy, `--new` tokens (no EOS: every
                 row decodes all of them)
  guided decode  `vlm_jax.guidance.guided_generate`, α = 1: both branches as one doubled
                 batch with one KV cache (target: ≤ 2.1x the time of plain decoding)
  plain score    one teacher-forced forward pass over `--batch` candidate rows (the answer
                 tokens' log-probability), jitted
  guided score   `vlm_jax.guidance.guided_score` over the same rows, α in {0, 0.5, 1, 2}
                 from the one doubled pass (host-side masking included)

Medians of `--repeats` calls after one untimed (compiling) call. tokens/s counts new
tokens of all rows; samples/s counts scored rows.
"""

import _common  # first: the environment, the repo root on sys.path

import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from configs import models
from vlm_jax.guidance import guided_generate, guided_score
from vlm_jax.models import build_model, init_params
from vlm_jax.models.generate import generate


def main():
  p = _common.parser(__doc__)
  p.add_argument("--model", default="tiny")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--new", type=int, default=32, help="new tokens per row")
  p.add_argument("--text", type=int, default=24, help="text tokens per prompt")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", default="")
  args = p.parse_args()

  model = build_model(models.preset(args.model))
  params = init_params(model, jax.random.key(0))
  c = model.config
  s, t = c.vision.image_size, c.tokens_per_image
  rng = np.random.default_rng(0)
  b, half = args.batch, args.text // 2
  vocab = min(c.text.vocab_size, c.image_token_id) - 1
  ids = np.concatenate([rng.integers(1, vocab, (b, half)), np.full((b, t), c.image_token_id),
                        rng.integers(1, vocab, (b, args.text - half))], axis=1).astype(np.int32)
  images = rng.normal(size=(b, 1, s, s, 3)).astype(np.float32)
  boxes = [[[[s // 4, s // 4, s // 2, s // 2]]] for _ in range(b)]
  target = np.zeros_like(ids)
  target[:, -3:] = 1

  kw = dict(max_new_tokens=args.new, eos_token_id=None)
  plain_forward = jax.jit(lambda p_, i_, im: jax.nn.log_softmax(
      model.apply({"params": p_}, i_, images=im).logits[:, :-1], -1))

  def plain_score():
    logp = plain_forward(params, jnp.asarray(ids), jnp.asarray(images))
    return np.asarray((jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], -1)[..., 0]
                       * target[:, 1:]).sum(-1))

  fns = {
      "plain decode": lambda: np.asarray(generate(model, params, ids, images=images, **kw)),
      "guided decode": lambda: np.asarray(guided_generate(model, params, ids, images=images, boxes=boxes,
                                                          alpha=1.0, **kw)),
      "plain score": plain_score,
      "guided score": lambda: guided_score(model, params, ids, target, images=images, boxes=boxes,
                                           alphas=(0.0, 0.5, 1.0, 2.0))["guided"],
  }
  times, _ = _common.run_timed(list(fns.values()), args.repeats, warmup=1)
  med = {name: statistics.median(ts[1:]) for name, ts in zip(fns, times)}
  rows = []
  for name in fns:
    unit = b * args.new if "decode" in name else b
    rows.append([name, f"{med[name] * 1e3:.1f}", f"{unit / med[name]:.1f}",
                 "tokens/s" if "decode" in name else "samples/s"])
  ratio_decode = med["guided decode"] / med["plain decode"]
  ratio_score = med["guided score"] / med["plain score"]
  info = _common.machine_info(jax)
  print(_common.describe(info))
  print(f"model {args.model}, batch {b}, prompt {ids.shape[1]} tokens ({t} image), {args.new} new tokens, "
        f"median of {args.repeats}")
  print(_common.text_table(["", "ms", "rate", "unit"], rows, left=1))
  print(f"guided / plain decoding time: {ratio_decode:.2f}x (target <= 2.1x); "
        f"guided (4 alphas) / plain scoring time: {ratio_score:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "machine": info, "median_s": med, "guided_over_plain_decode": ratio_decode,
                 "guided_over_plain_score": ratio_score}, f, indent=2)


if __name__ == "__main__":
  main()
