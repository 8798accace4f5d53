"""Compiled train-step temporaries with and without the chunked loss (`config.loss_chunk`).

    python benchmarks/loss_memory.py --batch 16 --length 512 --chunks 256 128

An LM with a 32k vocabulary (width 512, 2 scanned rematerialised layers, AdamW), compiled by
XLA for one device of this machine; the table is `memory_analysis()` of each compiled step.
"""

import _common  # noqa: F401  (environment first)

import jax
import jax.numpy as jnp
import optax

from vlm_jax.models.lm import DecoderLM, LMConfig
from vlm_jax.models.params import abstract_params
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.step import TrainState, make_train_step

VOCAB = 32000


def main():
  p = _common.parser(__doc__)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--chunks", type=int, nargs="*", default=[256, 128], help="loss_chunk values beside 0")
  args = p.parse_args()
  model = DecoderLM(LMConfig(vocab_size=VOCAB, embed_dim=512, num_layers=2, num_heads=8, num_kv_heads=8,
                             head_dim=64, mlp_dim=1376, scan_layers=True, remat=True))
  params = abstract_params(model)
  labels = optim_lib.path_labels(params, [(".*", 1.0)])
  tx = optax.adamw(1e-4)
  trainable, _ = optim_lib.split(params, labels)
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, trainable),
                     jax.ShapeDtypeStruct((2,), jnp.uint32))
  ids = jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
  gib = 2 ** 30
  rows = []
  for chunk in [0, *args.chunks]:
    step = make_train_step(model, tx, labels, lambda s: 1e-4, z_loss=1e-4, loss_chunk=chunk)
    mem = jax.jit(step).lower(state, batch).compile().memory_analysis()
    rows.append([str(chunk)] + [f"{b / gib:.3f}" for b in (mem.temp_size_in_bytes, mem.argument_size_in_bytes,
                                                             mem.output_size_in_bytes)])
  print(f"LM vocab {VOCAB}, batch {args.batch} x {args.length}: full float32 logits "
        f"{args.batch * args.length * VOCAB * 4 / gib:.2f} GiB | {_common.describe(_common.machine_info(jax))}")
  print(_common.text_table(["loss_chunk", "temporaries GiB", "arguments GiB", "outputs GiB"], rows, left=1))


if __name__ == "__main__":
  main()
