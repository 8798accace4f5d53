"""What the shapes-world experiments share: building the data, one train config, evaluation.

Every shapes-world run trains alike: `train_config` turns a stage description (lr,
freezing groups, sources, batch) into an ordinary train config that the engine runs.
"""

import json
import os

import ml_collections

from vlm_jax.data import builders, shapes_world, tokenizer
from vlm_jax.eval.evaluate import EVALUATORS, Generator
from vlm_jax.train.config import default_config


def prepare_data(config, workdir: str) -> tuple[dict, str]:
  """Builds the shapes-world TFDS sets and the tokenizer; returns ({name: tfds name}, tokenizer dir).

  `config.world.train` maps a name to a size (the task of that name), or to
  {task, num, **options} (e.g. single-object captions: task="caption", max_objects=1).
  """
  data_dir = config.data_dir or os.path.join(workdir, "data")
  names = {}
  for name, spec in config.world.train.items():
    options = {"num": spec} if isinstance(spec, int) else dict(spec.items())
    task, num = options.pop("task", name), options.pop("num")
    builder = builders.build_shapes_world(data_dir, task, sizes={"train": num}, image_size=config.world.image_size,
                                          seed=config.world.seed, **options)
    names[name] = f"{builder.name}/{builder.builder_config.name}"
  tok_dir = config.tokenizer or os.path.join(workdir, "tokenizer")
  tokenizer.shapes_world_tokenizer(tok_dir, vocab_size=config.vocab_size)
  return names, tok_dir


def train_config(config, s, steps: int, init: str, datasets: dict, tokenizer_dir: str,
                 data_dir: str) -> ml_collections.ConfigDict:
  """A shapes-world train config: `s` gives lr, groups, sources [(task, weight)] and
  global_batch_size, `datasets` the TFDS name of each task; the rest comes from `config`
  (seed, model, checkpoint_every, progress, seq_len, image_slots, packing, truncate).
  Shared with the curation and soup demonstrations, so every shapes-world run trains alike."""
  c = default_config()
  c.seed = config.seed
  c.model = config.model
  c.init = init
  c.total_steps = steps
  c.checkpoint_every = config.checkpoint_every
  c.progress = config.progress
  c.optim.lr = s.lr
  c.optim.groups = [tuple(g) for g in s.groups]
  c.data = ml_collections.ConfigDict(dict(
      source="pipeline", sources=[dict(name=datasets[task], split="train", weight=w) for task, w in s.sources],
      data_dir=data_dir, tokenizer=tokenizer_dir, global_batch_size=s.global_batch_size,
      seq_len=config.seq_len, image_slots=config.image_slots, packing=config.packing,
      truncate=config.truncate))
  return c


def final_loss(workdir: str):
  """The last train loss logged in a run's metrics.jsonl (a re-run of a finished run logs none)."""
  loss = None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      loss = json.loads(line).get("loss", loss)
  return loss


def evaluate(config, model, params, tokenizer) -> dict:
  generator = Generator(model, params, tokenizer, batch_size=config.eval.batch_size,
                        max_new_tokens=config.eval.max_new_tokens, image_slots=1)
  results = {}
  for task in config.eval.tasks:
    records = shapes_world.records(task, "test", config.eval.num, seed=config.world.seed,
                                   image_size=config.world.image_size)
    results.update(EVALUATORS[task](generator, records, prefix=task))
  return results
