r"""The `synth` job: real caption pairs + a concept list -> a real + synthetic training set -> a VLM.

    python -m launch.main --config=configs/synth.py --workdir=workdirs/synth

Synth² (METHODS §6) in five parts, each an ordinary run of the engine or a resumable loop,
each skipped when its result is already in `<workdir>` (so the same command resumes):

  tokenizer/   the VQ image tokenizer (kind "vq"), trained on the real pairs' images
               (or `tokenizer.reuse = "<workdir of a tokenizer run>"`)
  caption_lm/  the caption writer (kind "lm"), trained on the real captions, each prompted
               with the concepts of the list it mentions
  generator/   text -> code grid (kind "text_to_codes": MaskGIT over the tokenizer's codes),
               trained on the real pairs only; its `vq` is the tokenizer's, frozen
  pairs/       `generate.num` synthetic pairs: balanced concept sets -> captions (exact
               copies of real captions dropped) -> code grids, written in chunks (sharded
               over processes, resumable: every id written once), then a TFDS set
  vlm/         the VLM reading codes (`model.vision_input = "vq"`, its `vq` the tokenizer's,
               frozen), trained on real : synthetic = 1 : `vlm.synthetic_weight` (exact
               ratio; 0 = real only) plus any `vlm.extra_sources`

Synthetic images never exist as pixels: their code grids enter the VLM after the tokenizer.
The captions' statistics (distinct n-grams, self-BLEU, concept coverage and balance) are
printed beside the real captions' and written to `<workdir>/synth.json` with every part's
summary. Python API: `train_tokenizer`, `train_caption_lm`, `train_generator`,
`generate_pairs` and `train_vlm` below; `captions.generate_captions` and
`embeddings.generate_embeddings` for the generation steps alone.
"""

import json
import os
import time
from typing import Optional, Sequence

import jax
import ml_collections

from vlm_jax import report
from vlm_jax.data import builders, sources, synthetic_pairs
from vlm_jax.data.tokenizer import load_tokenizer, shapes_world_tokenizer
from vlm_jax.parallel.distributed import barrier
from vlm_jax.synth import captions as captions_lib
from vlm_jax.synth import embeddings
from vlm_jax.train.checkpoint import read_params
from vlm_jax.train import config as engine_config
from vlm_jax.train.init_from import model_of
from vlm_jax.train.loop import stop_unless_finished, train

FROZEN_TOKENIZER = [("vq/.*", None), (".*", 1.0)]


def default_config() -> ml_collections.ConfigDict:
  """Every key the `synth` job reads (configs/synth.py fills them in)."""
  part = lambda **kw: ml_collections.ConfigDict(dict(model=ml_collections.ConfigDict(), steps=100, lr=1e-3,
                                                     batch=32, reuse="", **kw))
  c = ml_collections.ConfigDict()
  c.job = "synth"
  c.seed = 0
  c.progress = True
  c.checkpoint_every = 200
  c.data_dir = ""  # TFDS sets (default <workdir>/data)
  c.tokenizer = ""  # the text tokenizer's folder (Hugging Face format)
  c.seq_len = 128
  c.chat_template = ml_collections.ConfigDict()  # empty: the pipeline's default
  c.real = ""  # the real caption pairs: a TFDS name (split train) or "captions:<jsonl>"; "" = the shapes world's
  c.shapes_world_pairs = 400  # with real = "": that many shapes-world caption pairs
  c.concepts = []
  c.image_tokenizer = part()
  c.caption_lm = part(per_prompt=(1, 3))
  c.generator = part()
  c.generate = ml_collections.ConfigDict(dict(
      num=1000, chunk_size=256, per_prompt=(1, 3), temperature=1.0, top_p=0.9, max_new_tokens=32,
      code_steps=8, code_temperature=1.0, guidance_scale=0.0, batch_size=64, max_rounds=5))
  c.vlm = part(synthetic_weight=1.0, extra_sources=[], groups=list(FROZEN_TOKENIZER))
  return c


# ----------------------------------------------------------------------------- runs of the engine

def _train_config(config, part, model, init_parts: Optional[dict], sources_: Sequence[tuple[str, float]],
                  seed: int, image_codes: int = 0, groups=((".*", 1.0),), image_slots: int = 1
                  ) -> ml_collections.ConfigDict:
  c = engine_config.default_config()
  c.seed = seed
  c.model = model
  c.init = "scratch"
  for name, source in (init_parts or {}).items():
    c.init_parts[name] = source
  c.total_steps = part.steps
  c.checkpoint_every = config.checkpoint_every
  c.progress = config.progress
  c.optim.lr = part.lr
  c.optim.groups = [tuple(g) for g in groups]
  c.data = ml_collections.ConfigDict(dict(
      source="pipeline", sources=[dict(name=name, split="train", weight=w) for name, w in sources_],
      data_dir=data_dir_of(config), tokenizer=config.tokenizer, global_batch_size=part.batch,
      seq_len=config.seq_len, image_slots=image_slots, packing=False, image_codes=image_codes))
  if config.chat_template:
    c.data.chat_template = config.chat_template
  return c


def data_dir_of(config, workdir: str = "") -> str:
  return config.data_dir or os.path.join(workdir, "data")


def _run(config, part, model, workdir: str, sources_, *, init_parts=None, seed=None, image_codes=0,
         groups=((".*", 1.0),), image_slots=1) -> str:
  """Trains one part in `workdir` (resumed, or skipped when finished) unless `part.reuse` names
  a finished run; returns the workdir the part's weights are in."""
  if part.reuse:
    return part.reuse
  c = _train_config(config, part, model, init_parts, sources_, config.seed if seed is None else seed,
                    image_codes, groups, image_slots)
  stop_unless_finished(train(c, workdir))
  return workdir


def train_tokenizer(config, workdir: str) -> str:
  """The VQ image tokenizer on the real pairs' images."""
  return _run(config, config.image_tokenizer, config.image_tokenizer.model, workdir, [(config.real, 1.0)])


def real_captions(config) -> list[str]:
  """The captions of the real pairs (the assistant turn of each caption record)."""
  data = sources.open_source(sources.Source(name=config.real, split="train"), config.data_dir)
  out = []
  for i in range(len(data)):
    turns = data[i]["turns"]
    roles, contents = turns["role"], turns["content"]
    text = [c for r, c in zip(roles, contents) if (r.decode() if isinstance(r, bytes) else r) == "assistant"]
    out.append(text[0].decode() if isinstance(text[0], bytes) else text[0])
  return out


def train_caption_lm(config, workdir: str, real: Sequence[str]) -> str:
  """The caption writer: a decoder LM on the real captions, prompted with their concepts."""
  part = config.caption_lm
  if part.reuse:
    return part.reuse
  os.makedirs(workdir, exist_ok=True)
  path = captions_lib.write_training_data(os.path.join(workdir, "captions.jsonl"), real, list(config.concepts),
                                          seed=config.seed, per_prompt=tuple(part.per_prompt))
  builder = builders.build_from_files("conversations", path, config.data_dir)
  return _run(config, part, part.model, workdir, [(f"{builder.name}/{builder.builder_config.name}", 1.0)],
              image_slots=0)


def train_generator(config, workdir: str, tokenizer_dir: str) -> str:
  """Text -> code grid on the real pairs; its tokenizer is `tokenizer_dir`'s, frozen."""
  return _run(config, config.generator, config.generator.model, workdir, [(config.real, 1.0)],
              init_parts={"vq": f"checkpoint:{tokenizer_dir}"}, groups=FROZEN_TOKENIZER)


def load_run(model_block, run_dir: str):
  """(model, parameters) of a finished run of `model_block`."""
  c = ml_collections.ConfigDict(dict(model=model_block, init="scratch"))
  return model_of(c), read_params(run_dir)


# ----------------------------------------------------------------------------- generation

def synthetic_captions(config, caption_lm_dir: str, real: Sequence[str], tokenizer) -> list[str]:
  """`generate.num` captions from balanced concept sets, exact copies of real captions dropped
  (rounds with fresh seeds fill up what was dropped, at most `generate.max_rounds`; a later round
  asks for twice what is missing, as a caption LM that copies often copies again)."""
  g = config.generate
  concepts = captions_lib.check_concepts(list(config.concepts))
  model, params = load_run(config.caption_lm.model, caption_lm_dir)
  kept: list[str] = []
  for round_ in range(g.max_rounds):
    need = g.num - len(kept)
    if need <= 0:
      break
    ask = need if round_ == 0 else 2 * need + g.batch_size
    sets = captions_lib.concept_sets(concepts, ask, tuple(g.per_prompt), seed=config.seed + round_)
    new = captions_lib.generate_captions(model, params, tokenizer, sets, temperature=g.temperature,
                                         top_p=g.top_p, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                                         seed=config.seed + round_, progress=config.progress,
                                         chat_template=config.chat_template.to_dict() or None)
    fresh, _ = captions_lib.drop_real_duplicates([c for c in new if c], real)
    kept.extend(fresh)
  if len(kept) < g.num:
    raise ValueError(f"the caption LM wrote only {len(kept)} captions that are not copies of real ones in "
                     f"{g.max_rounds} rounds (wanted {g.num}): raise generate.temperature or max_rounds")
  return kept[:g.num]


def generate_pairs(config, workdir: str, tokenizer_dir: str, caption_lm_dir: str, generator_dir: str,
                   real: Sequence[str]) -> dict:
  """Writes the synthetic pairs (resumable, sharded over processes) and builds their TFDS set."""
  g = config.generate
  os.makedirs(workdir, exist_ok=True)
  tokenizer, _ = load_tokenizer(config.tokenizer)
  captions_file = os.path.join(workdir, "captions.json")
  if not os.path.exists(captions_file):  # every process writes the same captions (same seeds); one saves them
    texts = synthetic_captions(config, caption_lm_dir, real, tokenizer)
    if jax.process_index() == 0:
      report.write_json(captions_file, texts)
  barrier("synth captions")
  with open(captions_file) as f:
    texts = json.load(f)
  model, params = load_run(config.generator.model, generator_dir)
  vq = model.config.vq
  fingerprint = _fingerprint(tokenizer_dir)
  writer = synthetic_pairs.SyntheticPairsWriter(os.path.join(workdir, "chunks"), num=g.num, chunk_size=g.chunk_size,
                                                num_tokens=vq.num_tokens, codebook_size=vq.codebook_size,
                                                fingerprint=fingerprint)
  for chunk in writer.pending(jax.process_index(), jax.process_count()):
    lo = chunk * g.chunk_size
    batch = texts[lo:lo + g.chunk_size]
    codes = embeddings.generate_embeddings(model, params, tokenizer, batch, steps=g.code_steps,
                                           temperature=g.code_temperature, guidance_scale=g.guidance_scale,
                                           batch_size=g.batch_size, seed=config.seed, first_index=lo,
                                           progress=config.progress,
                                           chat_template=config.chat_template.to_dict() or None)
    writer.write(chunk, batch, codes)
  barrier("synth pairs")
  builder = synthetic_pairs.build_synthetic_pairs(config.data_dir, os.path.join(workdir, "chunks"))
  stats = captions_lib.compare_stats(real, texts[:len(real)], list(config.concepts))  # sets of equal size
  return {"dataset": f"{builder.name}/{builder.builder_config.name}", "num": g.num, "stats": stats}


def _fingerprint(tokenizer_dir: str) -> str:
  """Which tokenizer made the codes: its run's directory and newest step (a synthetic set of
  another tokenizer is refused by the writer)."""
  steps = sorted(int(s) for s in os.listdir(os.path.join(tokenizer_dir, "checkpoints")) if s.isdigit())
  return f"{os.path.abspath(tokenizer_dir)}@{steps[-1] if steps else 'none'}"


# ----------------------------------------------------------------------------- the VLM

def train_vlm(config, workdir: str, tokenizer_dir: str, synthetic: Optional[str], *, seed: Optional[int] = None,
              synthetic_weight: Optional[float] = None) -> dict:
  """The code-reading VLM on real : synthetic = 1 : weight (+ extra sources); its summary."""
  part = config.vlm
  weight = part.synthetic_weight if synthetic_weight is None else synthetic_weight
  mix = [(config.real, 1.0)] + ([(synthetic, float(weight))] if synthetic and weight > 0 else [])
  mix += [(name, float(w)) for name, w in part.extra_sources]
  vq = model_of(ml_collections.ConfigDict(dict(model=part.model, init="scratch"))).config.vq
  c = _train_config(config, part, part.model, {"vq": f"checkpoint:{tokenizer_dir}"}, mix,
                    config.seed if seed is None else seed, image_codes=vq.num_tokens, groups=part.groups)
  return stop_unless_finished(train(c, workdir))


def synth(config, workdir: str) -> dict:
  """The whole job (see the module docstring); returns what it writes to synth.json."""
  start = time.time()
  captions_lib.check_concepts(list(config.concepts))  # before anything is built or trained
  config = _resolved(config, workdir)
  real = real_captions(config)
  if not real:
    raise ValueError(f"the real pairs {config.real!r} hold no captions")
  cache = os.path.join(workdir, "synth_parts.json")
  tok_dir = report.cached(cache, "tokenizer", lambda: train_tokenizer(config, os.path.join(workdir, "tokenizer")))
  lm_dir = report.cached(cache, "caption_lm",
                         lambda: train_caption_lm(config, os.path.join(workdir, "caption_lm"), real))
  gen_dir = report.cached(cache, "generator",
                          lambda: train_generator(config, os.path.join(workdir, "generator"), tok_dir))
  pairs = report.cached(cache, "pairs", lambda: generate_pairs(config, os.path.join(workdir, "pairs"), tok_dir,
                                                               lm_dir, gen_dir, real))
  report.print_table(pairs["stats"], f"real vs synthetic captions ({len(real)} real, {pairs['num']} synthetic)",
                     columns=["statistic", "real", "synthetic"])
  summary = train_vlm(config, os.path.join(workdir, "vlm"), tok_dir, pairs["dataset"])
  result = {"real pairs": len(real), "synthetic pairs": pairs["num"], "synthetic dataset": pairs["dataset"],
            "caption statistics": pairs["stats"], "vlm last loss": summary["last loss"],
            "runs": {"tokenizer": tok_dir, "caption_lm": lm_dir, "generator": gen_dir,
                     "vlm": os.path.join(workdir, "vlm")},
            "wall (s)": round(time.time() - start, 1)}
  if jax.process_index() == 0:
    report.write_json(os.path.join(workdir, "synth.json"), result)
  return result


def _resolved(config, workdir: str):
  """The config with data_dir filled in (default <workdir>/data) and `real` a prepared TFDS name:
  a `captions:<jsonl>` file is built, an empty `real` is the shapes world's caption set (and,
  without `tokenizer`, its tokenizer in <workdir>/tokenizer_text)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data_dir = data_dir_of(config, workdir)
    kind, sep, path = config.real.partition(":")
    if sep and kind == "captions":
      builder = builders.build_from_files("captions", path, config.data_dir)
      config.real = f"{builder.name}/{builder.builder_config.name}"
    elif not config.real:
      image_size = model_of(ml_collections.ConfigDict(dict(model=config.vlm.model, init="scratch"))).config.vq.image_size
      builder = builders.build_shapes_world(config.data_dir, "caption", sizes={"train": config.shapes_world_pairs},
                                            image_size=image_size, seed=config.seed)
      config.real = f"{builder.name}/{builder.builder_config.name}"
      if not config.tokenizer:
        config.tokenizer = os.path.join(workdir, "tokenizer_text")
        shapes_world_tokenizer(config.tokenizer)
  if not config.tokenizer:
    raise ValueError("config.tokenizer is empty: give the folder of a Hugging Face tokenizer")
  return config
