r"""Perplexity scoring and filtering of a data set (METHODS §2, POINTS): jobs `score` and `filter`.

Score every record of one data set with a VLM (PPL over the caption / answer tokens, their
end token included, conditioned on the image and a fixed prompt), then keep the lowest-PPL
fraction as a new TFDS data set. See vlm_jax/curation/perplexity.py.

1. A data set and a model. Here: 2000 shapes-world captions, 20% of them corrupted (the
   caption of another scene), scored by the VLM of `configs/shapes/vila.py` after training:

    python -m launch.main --config=configs/shapes/vila.py --workdir=workdirs/shapes_vila
    python -c "from vlm_jax.data import builders; b = builders.build_shapes_world('workdirs/ppl/data', 'caption', sizes={'train': 2000}, image_size=64, corruption_rate=0.2); print(f'{b.name}/{b.builder_config.name}')"
    # prints shapes_world/caption_64px_s0_ccaba0a90a

2. Score (one pass, source order, no packing; resumable: after a kill, run the same command
   again). Writes <workdir>/scores.jsonl ({"id", "ppl", "nll", "tokens"} a line) and score.json.
   `prompt=` (empty): the shapes-world model was trained without a caption prompt, and the
   prompt must be the one the scoring model knows (POINTS' prompt is the default, for
   off-the-shelf VLMs):

    python -m launch.main --workdir=workdirs/ppl/score \
        --config='configs/score_perplexity.py:model=shapes_vila,init=checkpoint:workdirs/shapes_vila/stage1,tokenizer=workdirs/shapes_vila/tokenizer,data_dir=workdirs/ppl/data,source=shapes_world/caption_64px_s0_ccaba0a90a,prompt='

3. Filter: the same config and workdir with job `filter`. Prints a PPL histogram, both tails
   and a summary; writes the kept records as the TFDS data set `filtered_records/<name>` in
   <workdir>/data (printed, with the `data` lines to train on it), kept_ids.txt and filter.json
   (`--config.*` overrides come after `--config=`):

    python -m launch.main --workdir=workdirs/ppl/score \
        --config='configs/score_perplexity.py:model=shapes_vila,init=checkpoint:workdirs/shapes_vila/stage1,tokenizer=workdirs/shapes_vila/tokenizer,data_dir=workdirs/ppl/data,source=shapes_world/caption_64px_s0_ccaba0a90a,prompt=' \
        --config.job=filter
    # keep the best half instead of 20%:       add --config.filter.keep_fraction=0.5
    # keep PPL <= 30 (wins over the fraction): add --config.filter.threshold=30

An off-the-shelf LLaVA as a Hugging Face folder (model config and tokenizer are read from it;
a caption set prepared with `python -m launch.build_data --kind=captions ...`), 8 GPUs with the
weights sharded over fsdp:

    python -m launch.main --workdir=/runs/ppl_cc \
        --config='configs/score_perplexity.py:model=hf,init=hf:/models/llava-1.5-7b-hf,source=image_captions/<name>,data_dir=/data/tfds,batch=64,seq_len=768' \
        --config.mesh.data=1 --config.mesh.fsdp=8

Arguments (`:key=value,...`): model (a preset of configs/models.py, "shapes_vila" for the
shapes_vila.py model, or "hf" = from the init folder), init ("scratch" | "hf:<folder>" |
"checkpoint:<workdir>"), source (TFDS name), split, data_dir, tokenizer (folder; default the
init folder for hf), batch (global batch size), seq_len, prompt, keep_fraction, threshold.
The prompt (default "please generate a caption for this image.") goes after the image of
caption records; change it with --config.prompt='...' (a comma does not fit in the arg).
Keys beyond the arguments: logprob_dtype ("float32"; "bfloat16" reproduces the reference
script's flaw), max_batches (stop after N batches; 0 = all), progress, filter.{scores,
output_dir, tails, bins}.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common, models
from vlm_jax.curation.perplexity import DEFAULT_PROMPT
from vlm_jax.data import pipeline
from vlm_jax.parallel.mesh import DEFAULT_RULES


def _model(name: str):
  if name == "hf":
    return None  # read from the init folder
  if name == "shapes_vila":
    from configs.shapes import vila as shapes_vila
    return shapes_vila.get_config().model.copy_and_resolve_references()
  return models.preset(name)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, model="tiny", init="scratch", source="shapes_world/caption", split="train",
                          data_dir="", tokenizer="", batch=32, seq_len=256, prompt=DEFAULT_PROMPT,
                          keep_fraction=0.2, threshold="")
  c = ml_collections.ConfigDict()
  c.job = "score"  # | "filter" (same config and workdir, after `score`)
  c.seed = 0
  c.model = _model(args.model)
  c.init = args.init
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.rules = [tuple(r) for r in DEFAULT_RULES]
  c.batch_size = args.batch
  c.prompt = args.prompt
  c.logprob_dtype = "float32"
  c.max_batches = 0
  c.progress = True

  c.data = pipeline.default_config()
  c.data.sources = [dict(name=args.source, split=args.split, weight=1.0)]
  c.data.data_dir = args.data_dir or None
  c.data.tokenizer = args.tokenizer
  c.data.global_batch_size = c.get_ref("batch_size")
  c.data.seq_len = args.seq_len
  c.data.image_slots = 1
  c.data.packing = False   # required: one record per row
  c.data.truncate = False  # an over-long record is skipped (counted), never scored on a cut caption
  c.data.shuffle = False
  c.data.num_epochs = 1
  c.data.chat_template.caption_prompt = c.get_ref("prompt")

  c.filter = ml_collections.ConfigDict(dict(
      keep_fraction=args.keep_fraction,  # POINTS: 0.2
      threshold=float(args.threshold) if args.threshold else placeholder(float),  # wins when set
      scores="",      # default <workdir>/scores.jsonl
      output_dir="",  # TFDS data_dir of the filtered set; default <workdir>/data
      tails=5,        # records shown from each end
      bins=20))       # histogram bins
  c.lock()
  return c
