r"""Model soups on the shapes world (METHODS §3; the `shapes_soups` job).

    python -m launch.main --config='configs/shapes/soups.py:base=workdirs/shapes_vila/stage2' \
        --workdir=workdirs/soup_demo

From one checkpoint (`base`, a run of the main job), one ingredient is fine-tuned per
instruction mix (`mixes`: counting, colour, spatial VQA and region questions by default,
restricted with the shapes world's `qtypes`), with the same steps, lr, batch and seed:
only the data differs. Then, on a held-out mix of all of them:

  base        the starting checkpoint
  <mix>       every ingredient
  uniform     the average of all ingredients
  maximum     the average of the top `top_p` by validation score
  greedy      ranked by validation score, each next ingredient kept if the soup's
              validation score improves (`tie`: "strict" > or "geq" >=)

Selection (ranking, maximum, greedy) only ever sees the validation split; the test column
is the test split, used for nothing else. A model's score on a split is the mean over the
mixes of its VQA exact match on `eval.<split>` records of that mix (each mix weighs the same).

Reuses the main job's training (`common.train_config` + the train loop), the soups of
`vlm_jax.soups` (streamed from the ingredients' Orbax checkpoints) and the VQA evaluator
(`evaluate.EVALUATORS`, `Generator`). Workdir: data/, tokenizer/ (only with base=scratch),
ingredients/<mix>, results.json (each finished sub-step's result: a re-run skips it),
soup_demo.json (the table and the greedy log).
"""

import os
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from vlm_jax import report, soups
from vlm_jax.data import builders, shapes_world, tokenizer
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.eval.evaluate import EVALUATORS, Generator
from vlm_jax.experiments.shapes import common
from vlm_jax.models.build import build_model
from vlm_jax.models.params import init_params
from vlm_jax.train.loop import stop_unless_finished, train


# --- Data and the starting point -----------------------------------------------------------


def mix_options(mix) -> dict:
  """The shapes-world options of a mix (its question types; all of the task's when empty)."""
  return {"qtypes": tuple(mix.qtypes)} if mix.qtypes else {}


def prepare(config, workdir: str) -> tuple[dict, str, str]:
  """Builds one train set per ingredient mix and finds (or builds) the tokenizer;
  returns ({mix: TFDS name}, tokenizer dir, data dir)."""
  data_dir = config.data_dir or os.path.join(workdir, "data")
  datasets = {}
  for name in config.ingredients:
    mix = config.mixes[name]
    b = builders.build_shapes_world(data_dir, mix.task, sizes={"train": config.world.train},
                                    image_size=config.world.image_size, seed=config.world.seed, **mix_options(mix))
    datasets[name] = f"{b.name}/{b.builder_config.name}"
  return datasets, tokenizer_dir(config, workdir), data_dir


def tokenizer_dir(config, workdir: str) -> str:
  """The base run's tokenizer (`<base>/../tokenizer` unless given); built in the workdir for base=scratch."""
  if config.tokenizer:
    return config.tokenizer
  if config.base == "scratch":
    folder = os.path.join(workdir, "tokenizer")
    tokenizer.shapes_world_tokenizer(folder, vocab_size=config.vocab_size)
    return folder
  folder = os.path.join(os.path.dirname(os.path.abspath(config.base)), "tokenizer")
  if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
    raise FileNotFoundError(f"no tokenizer next to the base checkpoint ({folder}): pass tokenizer=<folder>, "
                            f"the one the base model was trained with")
  return folder


def base_params(config, model):
  """The starting parameters as float32 host arrays: the base checkpoint, or the seed's random init."""
  if config.base == "scratch":
    return jax.device_get(init_params(model, jax.random.key(config.seed)))
  return soups.load(f"checkpoint:{config.base}")


def base_init(config) -> str:
  return "scratch" if config.base == "scratch" else f"checkpoint:{os.path.abspath(config.base)}"


def heldout(config, split: str) -> dict:
  """{mix: records} of `split`: `eval.validation` or `eval.test` records per mix."""
  out = {}
  for name in config.ingredients:
    mix = config.mixes[name]
    out[name] = list(shapes_world.records(mix.task, split, config.eval[split], seed=config.world.seed,
                                          image_size=config.world.image_size, **mix_options(mix)))
  return out


# --- Ingredients ---------------------------------------------------------------------------


def ingredient_sources(config, name: str) -> list:
  """The data of one ingredient: its own mix, plus `general` weight spread over all mixes
  (POINTS fine-tunes on D ∪ d_i; general=0 gives pure specialists)."""
  weights = {m: config.general / len(config.ingredients) for m in config.ingredients if config.general}
  weights[name] = weights.get(name, 0.0) + 1.0
  return sorted(weights.items(), key=lambda kv: kv[0] != name)  # its own mix first


def finetune(config, name: str, datasets: dict, tok_dir: str, data_dir: str, workdir: str) -> dict:
  """Fine-tunes one ingredient from the base (resumed, or skipped when finished); returns its final loss."""
  start = time.time()
  f = config.finetune
  stage = ml_collections.ConfigDict(dict(lr=f.lr, groups=f.groups, sources=ingredient_sources(config, name),
                                         global_batch_size=f.global_batch_size))
  stop_unless_finished(train(common.train_config(config, stage, f.steps, base_init(config), datasets, tok_dir, data_dir),
                          workdir))
  return {"loss": common.final_loss(workdir), "wall (s)": round(time.time() - start, 1)}


# --- Evaluation on the held-out mix -------------------------------------------------------


def make_scorer(config, model, tokenizer, records: dict) -> Callable:
  """params -> {"<mix> acc", per question type where a mix has several, "score": mean over mixes}."""

  def score(params) -> dict:
    generator = Generator(model, params, tokenizer, batch_size=config.eval.batch_size,
                          max_new_tokens=config.eval.max_new_tokens, image_slots=1)
    out = {}
    for name, recs in records.items():
      out.update(EVALUATORS[config.mixes[name].task](generator, recs, prefix=name))
    out["score"] = float(np.mean([out[f"{name} acc"] for name in records]))
    return out

  return score


def evaluate_row(model: str, members: str, params_fn: Callable, validate: Callable, test: Callable,
                 val=None) -> dict:
  """One table row: {"model", "soup of", "validation", "test", **test metrics, "eval (s)": the time to
  load or mix the parameters and score them}; `val` is the validation score when already known
  (the greedy soup's last accepted trial)."""
  start = time.time()
  params = params_fn()
  t = test(params)
  return {"model": model, "soup of": members, "validation": validate(params)["score"] if val is None else val,
          "test": t["score"], **{k: x for k, x in t.items() if k != "score"},
          "eval (s)": round(time.time() - start, 1)}


def soup_rows(names: Sequence[str], sources: Sequence, validate: Callable, test: Callable,
              top_p="0.5", tie: str = "strict", cache: Callable = None) -> list[dict]:
  """Every ingredient and the three soups, scored on validation (selection) and test (the table).

  names / sources: the ingredients (paths or trees, as `soups` reads them); validate / test:
  params -> {"score", ...}; cache(key, compute) -> value keeps finished rows (default: none).
  Rows: {"model", "soup of", "validation", "test", **test metrics}; the greedy row has "log".
  """
  cache = cache or (lambda key, compute: compute())
  row = lambda model, members, params_fn: evaluate_row(model, members, params_fn, validate, test)
  rows = [cache(f"ingredient/{n}", lambda: row(n, n, lambda: soups.load(s))) for n, s in zip(names, sources)]
  val_scores = [r["validation"] for r in rows]
  rows.append(cache("soup/uniform", lambda: row("uniform soup", "+".join(names),
                                                lambda: soups.uniform_soup(sources))))
  top = [names[i] for i in soups.rank(val_scores)[:soups.top_p_count(top_p, len(names))]]
  rows.append(cache("soup/maximum", lambda: row(f"maximum soup (top {len(top)})", "+".join(top),
                                                lambda: soups.maximum_soup(sources, val_scores, top_p))))

  def greedy():
    start = time.time()
    params, history = soups.greedy_soup(sources, lambda p: validate(p)["score"], val_scores, tie=tie)
    members = [names[e["index"]] for e in history if e["accepted"]]
    final_val = [e["soup_score"] for e in history if e["accepted"]][-1]
    out = evaluate_row(f"greedy soup ({tie})", "+".join(members), lambda: params, validate, test, val=final_val)
    return {**out, "eval (s)": round(time.time() - start, 1),  # with every trial soup's validation
            "log": [{**e, "ingredient": names[e["index"]]} for e in history]}

  rows.append(cache("soup/greedy", greedy))
  return rows


# --- The job -------------------------------------------------------------------------------


def print_soup_table(rows: list[dict], mixes: Sequence[str], title: str) -> str:
  """Scores as percentages, one test column per mix (the per-question-type ones stay in the JSON)."""
  columns = ["model", "soup of", "validation", "test"] + [f"{m} acc" for m in mixes] + ["fine-tune (s)", "eval (s)"]
  cell = lambda c, v: (f"{v:.1f}" if c.endswith("(s)") and v is not None else
                       report.format_percent(v) if isinstance(v, float) else v)
  return report.print_table([{c: cell(c, r.get(c)) for c in columns} for r in rows], title, columns=columns)


def run(config, workdir: str) -> dict:
  """The `soup_demo` job: ingredients, soups, the table; returns soup_demo.json's content."""
  if jax.process_count() > 1:
    raise ValueError("the shapes_soups job runs in one process")
  if len(config.ingredients) < 2:
    raise ValueError(f"a soup needs at least two ingredients, got {list(config.ingredients)}")
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  cache_path = os.path.join(workdir, "results.json")
  report.pin_config(os.path.join(workdir, "demo_config.json"), config.to_dict())
  cache = lambda key, compute: report.cached(cache_path, key, compute)
  datasets, tok_dir, data_dir = prepare(config, workdir)
  model = build_model(config.model)
  tokenizer, _ = load_tokenizer(tok_dir)
  validate = make_scorer(config, model, tokenizer, heldout(config, "validation"))
  test = make_scorer(config, model, tokenizer, heldout(config, "test"))

  base = cache("base", lambda: evaluate_row("base (no fine-tuning)", "", lambda: base_params(config, model),
                                            validate, test))
  dirs, train_info = [], {}
  for name in config.ingredients:
    d = os.path.join(workdir, "ingredients", name)
    train_info[name] = cache(f"finetune/{name}", lambda: finetune(config, name, datasets, tok_dir, data_dir, d))
    dirs.append(f"checkpoint:{d}")
  rows = [base] + soup_rows(list(config.ingredients), dirs, validate, test, config.top_p, config.tie, cache)
  rows = [{**r, "fine-tune (s)": train_info[r["model"]]["wall (s)"]} if r["model"] in train_info else r
          for r in rows]

  title = (f"model soups on the shapes world: {len(dirs)} ingredients fine-tuned from {config.base}, "
           f"{config.finetune.steps} steps each; score = mean exact match over the mixes "
           f"({config.eval.validation} validation / {config.eval.test} test questions per mix)")
  print_soup_table(rows, config.ingredients, title)
  greedy = rows[-1]
  result = {"table": [{k: v for k, v in r.items() if k != "log"} for r in rows], "greedy log": greedy.get("log"),
            "finetune": train_info, "datasets": datasets, "base": config.base,
            "wall (s)": round(time.time() - start, 1)}
  report.write_json(os.path.join(workdir, "soup_demo.json"), result)
  return result

