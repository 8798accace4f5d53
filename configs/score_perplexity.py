r"""Perplexity scoring and filtering of a data set (METHODS §2, POINTS): jobs `score` and `filter`.

Score every record of one data set with a VLM (PPL over the caption / answer tokens, their
end token included, conditioned on the image and a fixed prompt), then keep the lowest-PPL
fraction as a new TFDS data set. See vlm_jax/curation/ (perplexity.py: the
formula; scoring.py: the loop; jobs.py: these jobs and their config, `jobs.default_config`).

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
Keys beyond the arguments: logprob_dtype ("float32"; "points_reference" reproduces the
official POINTS filter, target probabilities rounded to bfloat16:
`vlm_jax.curation.perplexity.token_nll`), max_batches (stop after N batches; 0 = all),
progress, filter.{scores, output_dir, tails, bins}.
"""

import ml_collections

from configs import common, models
from configs.shapes import vila as shapes_vila
from vlm_jax.curation import jobs
from vlm_jax.curation.perplexity import DEFAULT_PROMPT


def _model(name: str):
  """A preset, the shapes-world VLM, or None ("hf": the init folder says)."""
  if name == "hf":
    return None  # read from the init folder
  if name == "shapes_vila":
    return shapes_vila.get_config().model.copy_and_resolve_references()
  return models.preset(name)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, model="tiny", init="scratch", source="shapes_world/caption", split="train",
                       data_dir="", tokenizer="", batch=32, seq_len=256, prompt=DEFAULT_PROMPT,
                       keep_fraction=0.2, threshold="")
  return jobs.default_config(model=_model(a.model), init=a.init, source=a.source, split=a.split,
                             data_dir=a.data_dir, tokenizer=a.tokenizer, batch=a.batch, seq_len=a.seq_len,
                             prompt=a.prompt, keep_fraction=a.keep_fraction,
                             threshold=float(a.threshold) if a.threshold else None)
