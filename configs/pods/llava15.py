r"""LLaVA-1.5 VILA stages sized for TPU pods: compile them ahead of time for the real slice first.

    python -m launch.simulate --config=configs/pods/llava15.py:stage=1 --topology=v5e:16x16
    python -m launch.simulate --config=configs/pods/llava15.py:stage=2 --topology=v5e:16x16
    python -m launch.simulate --config=configs/pods/llava15.py:lm=13b,stage=1 --topology=v5e:16x16
    python -m launch.simulate --config=configs/pods/llava15.py:stage=1,loss_chunk=512 --topology=v5e:16x16
    python -m launch.simulate --config=configs/pods/llava15.py:stage=1,slices=2 --topology=v5e:16x16 --num_slices=2

(`--topology` needs the `tpu` extra: `pip install -e '.[tpu]'`.) The model, dtypes, scanned and
rematerialised LM layers and optimiser are those of `configs/llava15_7b_stage1.py`; this file sets
what a pod changes: the global batch (`rows_per_chip` rows of `seq_len` tokens on every chip, the
batch being sharded over all of them), the stage, the LM size and the chunked loss.

  stage=1   VILA stage 1 (pre-training): projector + LM trained, vision tower frozen
  stage=2   the tower unfrozen as well (every parameter trained)
  lm=7b     LLaMA-2-7B (the `llava15_7b` preset); lm=13b: LLaMA-2-13B's shape (40 layers, width 5120,
            40 heads, MLP 13824) behind the same CLIP ViT-L/14-336 tower (LLaVA-1.5-13B)
  slices=S  S slices joined by DCN (mesh.dcn_data), data parallel across them; fully sharded within
"""

import ml_collections

from configs import common, llava15_7b_stage1

LLAMA2_13B = dict(num_layers=40, embed_dim=5120, num_heads=40, num_kv_heads=40, head_dim=128, mlp_dim=13824)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, lm="7b", stage=1, seq_len=2048, rows_per_chip=1, chips=256, loss_chunk=0,
                          slices=1)
  if args.lm not in ("7b", "13b") or args.stage not in (1, 2):
    raise ValueError(f"lm must be 7b or 13b and stage 1 or 2, got lm={args.lm}, stage={args.stage}")
  config = llava15_7b_stage1.get_config()
  with config.unlocked():
    if args.lm == "13b":
      config.model.text.update(LLAMA2_13B)
    config.model.text.max_position = max(config.model.text.max_position, args.seq_len)
    config.data.global_batch_size = args.rows_per_chip * args.chips * args.slices
    config.data.seq_len = args.seq_len
    config.loss_chunk = args.loss_chunk
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=args.slices))
    if args.stage == 2:
      config.optim.groups = [(".*", 1.0)]
  return config
