r"""LLaVA-1.5 VILA stages sized for TPU pods: compile them ahead of time for the real slice first.

    python -m launch.simulate --config=configs/pods/llava15.py:stage=1 --topology=v5e:16x16
    python -m launch.simulate --config=configs/pods/llava15.py:stage=2 --topology=v5e:16x16
    python -m launch.simulate --config=configs/pods/llava15.py:model=llava15_13b,stage=1 --topology=v5e:16x16
    python -m launch.simulate --config=configs/pods/llava15.py:model=vila15_3b,stage=1,data=2 --topology=v5e:16x16
    python -m launch.simulate --config=configs/pods/llava15.py:stage=1,seq_len=4096 --topology=v5e:16x16
    python -m launch.simulate --config=configs/pods/llava15.py:stage=1,chips=64 --topology=v4:4x4x4
    python -m launch.simulate --config=configs/pods/llava15.py:stage=1,loss_chunk=512 --topology=v5e:16x16
    python -m launch.simulate --config=configs/pods/llava15.py:stage=1,slices=2 --topology=v5e:16x16 --num_slices=2

(`--topology` needs the `tpu` extra: `pip install -e '.[tpu]'`.) The dtypes, scanned and
rematerialised LM layers and optimiser are those of `configs/llava15_7b_stage1.py`; this file sets
what a pod changes: the global batch (`rows_per_chip` rows of `seq_len` tokens on every chip, the
batch being sharded over all of them), the stage, the model and the chunked loss.

  stage=1   VILA stage 1 (pre-training): projector + LM trained, vision tower frozen
  stage=2   the tower unfrozen as well (every parameter trained)
  model=llava15_7b   CLIP ViT-L/14-336 + LLaMA-2-7B (the `llava15_7b` preset, the default)
  model=llava15_13b  LLaMA-2-13B's shape (40 layers, width 5120, 40 heads, MLP 13824) behind the same
                     tower (LLaVA-1.5-13B)
  model=vila15_3b    VILA1.5-3B's shape (the `vila15_3b` preset): SigLIP so400m/14-384 + Sheared-LLaMA-2.7B,
                     2x2 downsample projector (196 tokens per image)
  seq_len=L tokens per row; the LM's max_position grows to L if it is shorter
  data=D    D-way data parallel, fully sharded over the other chips / D (fsdp); SigLIP's width 1152 needs
            fsdp to divide it: model=vila15_3b on 256 chips takes data=2 (fsdp=128)
  slices=S  S slices joined by DCN (mesh.dcn_data), data parallel across them; fully sharded within
"""

import ml_collections

from configs import common, llava15_7b_stage1, models

LLAMA2_13B = dict(num_layers=40, embed_dim=5120, num_heads=40, num_kv_heads=40, head_dim=128, mlp_dim=13824)
MODELS = ("llava15_7b", "llava15_13b", "vila15_3b")
RECIPE = {"text": ("dtype", "param_dtype", "scan_layers", "remat"), "vision": ("dtype", "param_dtype")}


def model_config(name: str) -> ml_collections.ConfigDict:
  """The preset `name`, with the 7B config's dtypes and scanned, rematerialised LM (the same recipe at
  every size, so rows differ by the model only)."""
  base = llava15_7b_stage1.get_config().model
  model = models.preset("vila15_3b") if name == "vila15_3b" else base.copy_and_resolve_references()
  if name == "llava15_13b":
    model.text.update(LLAMA2_13B)
  for tower, keys in RECIPE.items():
    model[tower].update({k: base[tower][k] for k in keys})
  return model


def check_fsdp(model: ml_collections.ConfigDict, chips: int, data: int):
  """Both towers shard their width over fsdp = chips / data: refuse a split that does not divide it
  here, with the setting that does, rather than deep inside the compile."""
  if data < 1 or chips % data:
    raise ValueError(f"data={data} must be a positive divisor of chips={chips}")
  fsdp = chips // data
  for what, width in (("LM width", model.text.embed_dim), ("vision width", model.vision.width)):
    if width % fsdp:
      ok = next(d for d in range(data, chips + 1) if chips % d == 0 and width % (chips // d) == 0)
      raise ValueError(f"the {what} {width} is not divisible by fsdp={fsdp} (chips={chips} / data={data}): "
                       f"set data={ok} (fsdp={chips // ok})")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, model="llava15_7b", stage=1, seq_len=2048, rows_per_chip=1, chips=256,
                          loss_chunk=0, slices=1, data=1)
  if args.model not in MODELS or args.stage not in (1, 2):
    raise ValueError(f"model must be one of {', '.join(MODELS)} and stage 1 or 2, "
                     f"got model={args.model}, stage={args.stage}")
  model = model_config(args.model)
  check_fsdp(model, args.chips, args.data)
  config = llava15_7b_stage1.get_config()
  with config.unlocked():
    config.model = model
    config.model.text.max_position = max(config.model.text.max_position, args.seq_len)
    config.data.global_batch_size = args.rows_per_chip * args.chips * args.slices
    config.data.seq_len = args.seq_len
    config.loss_chunk = args.loss_chunk
    config.mesh = ml_collections.ConfigDict(dict(data=args.data, fsdp=-1, tensor=1, dcn_data=args.slices))
    if args.stage == 2:
      config.optim.groups = [(".*", 1.0)]
  return config
