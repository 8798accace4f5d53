"""Model soups (vlm_jax.soups, METHODS §3): exact float32 means, rankings and tie rules,
refused ingredients, the streaming memory bound, Orbax and Hugging Face round trips, the job."""

import json
import os
import tracemalloc
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from vlm_jax import soups
from vlm_jax.train.checkpoint import Checkpointer, restore_params

F32 = np.float32
BF16 = ml_dtypes.bfloat16


def small(seed, dtype=F32):
  r = np.random.default_rng(seed)
  return {"lm": {"layers_0": {"q": {"kernel": r.normal(size=(4, 3)).astype(dtype)}},
                 "norm": {"scale": r.normal(size=(3,)).astype(dtype)}},
          "proj": {"bias": r.normal(size=(2,)).astype(dtype)}}


def hand_mean(trees):
  """Σ in listed order, in float32, then / k: what the soup must give bit for bit."""
  def mean(*xs):
    s = np.asarray(xs[0], F32).copy()
    for x in xs[1:]:
      s = (s + np.asarray(x, F32)).astype(F32)
    return (s / F32(len(xs))).astype(F32)
  return jax.tree.map(mean, *trees)


def assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_run(workdir, steps):
  """An Orbax run dir as the train loop writes it: {step: params}."""
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=len(steps), asynchronous=False)
  for step, params in steps.items():
    ckpt.save(step, params, {"step": np.asarray(step, np.int32)}, {"epoch": 0})
  ckpt.close()
  return str(workdir)


# ----------------------------------------------------------------------------- uniform, float32

def test_uniform_soup_equals_hand_computation():
  trees = [small(s) for s in range(3)]
  soup = soups.uniform_soup(trees)
  assert_tree_equal(soup, hand_mean(trees))
  # Exactly representable numbers: (1 + 2 + 6) / 3 = 3 and (0.5 + 0.25 + 0.75) / 3 = 0.5.
  exact = soups.uniform_soup([{"w": np.array([1, .5], F32)}, {"w": np.array([2, .25], F32)},
                              {"w": np.array([6, .75], F32)}])
  np.testing.assert_array_equal(exact["w"], np.array([3, .5], F32))
  # load() gives float32 host arrays whatever is stored; a single ingredient is its own soup.
  assert_tree_equal(soups.uniform_soup([trees[0]]), trees[0])
  assert soups.load(small(0, BF16))["proj"]["bias"].dtype == F32


def test_bfloat16_ingredients_are_averaged_in_float32(tmp_path):
  a = np.array([1.0, 256.0], BF16)
  b = np.array([1.0078125, 1.0], BF16)  # 1 + 2^-7, exact in bf16
  in_bf16 = ((a + b) / BF16(2)).astype(F32)  # the reference's way: sum and divide in bf16
  in_f32 = np.array([1.00390625, 128.5], F32)  # 1 + 2^-8 and 128.5: not representable in bf16
  assert not np.array_equal(in_bf16, in_f32)
  soup = soups.uniform_soup([{"w": a}, {"w": jnp.asarray(b)}])  # NumPy and JAX bf16 inputs
  assert soup["w"].dtype == F32
  np.testing.assert_array_equal(soup["w"], in_f32)
  # The same from bf16 Orbax checkpoints: stored as bf16, summed in float32.
  runs = [save_run(tmp_path / f"r{i}", {1: {"w": x}}) for i, x in enumerate((a, b))]
  assert soups.load(runs[0], dtype=None)["w"].dtype == BF16
  np.testing.assert_array_equal(soups.uniform_soup(runs)["w"], in_f32)
  # Many small bf16 updates on a large value vanish in bf16 arithmetic, not here.
  many = [{"w": np.array([256.0 if i == 0 else 1.0], BF16)} for i in range(8)]
  assert soups.uniform_soup(many)["w"][0] == F32(263 / 8)


# ----------------------------------------------------------------------------- maximum and ranking

def scalar(v):
  return {"w": np.array([v], F32)}


VALUES = [1.0, 2.0, 4.0, 8.0]
SCORES = [0.5, 0.9, 0.9, 0.7]


def test_rank_breaks_ties_later_listed_first():
  assert soups.rank(SCORES) == [2, 1, 3, 0]
  assert soups.rank([0.3, 0.3, 0.3]) == [2, 1, 0]


def test_maximum_soup_top_p_count_and_fraction():
  trees = [scalar(v) for v in VALUES]
  top = lambda p: float(soups.maximum_soup(trees, SCORES, p)["w"][0])
  assert top(1) == 4.0  # the later of the two 0.9s
  assert top(2) == 3.0 == top(0.5) == top("50%") == top("2")  # {2, 1}
  assert top(0.75) == F32(14.0) / F32(3.0)  # ceil(0.75 * 4) = 3: {2, 1, 3}
  assert top(1.0) == top(4) == 3.75  # all
  assert soups.top_p_count(0.2, 8) == 2 and soups.top_p_count(0.01, 8) == 1
  for bad in (0, 5, 1.5, 0.0, True):
    with pytest.raises(ValueError, match="top_p"):
      soups.top_p_count(bad, 4)


# ----------------------------------------------------------------------------- greedy

def _key(x):
  return round(float(x), 5)


def f32_mean(*vs):
  s = F32(0)
  for v in vs:
    s = F32(s + F32(v))
  return s / F32(len(vs))


# Score of each soup the greedy pass can build from VALUES (ranking 2, 1, 3, 0): w -> score.
TABLE = {_key(f32_mean(*vs)): s for vs, s in [
    ((1,), 0.5), ((2,), 0.9), ((4,), 0.9), ((8,), 0.7),
    ((4, 2), 0.9),           # equal to the best alone: strict rejects, geq accepts
    ((4, 8), 0.95),          # strict path: accepted
    ((4, 8, 1), 0.94),       # strict path: rejected
    ((4, 2, 8), 0.85),       # geq path: rejected
    ((4, 2, 1), 0.9)]}       # geq path: equal again, accepted


class ToyEval:

  def __init__(self):
    self.calls = []

  def __call__(self, params):
    self.calls.append(_key(params["w"][0]))
    return TABLE[self.calls[-1]]


def toy_evaluator(params):  # for the job test: "tests.test_soups:toy_evaluator"
  return TABLE[_key(params["w"][0])]


def test_greedy_soup_order_and_strict_ties():
  ev = ToyEval()
  soup, history = soups.greedy_soup([scalar(v) for v in VALUES], ev, SCORES)
  assert [e["index"] for e in history] == [2, 1, 3, 0]
  assert [e["accepted"] for e in history] == [True, False, True, False]
  assert [e["soup_score"] for e in history] == [0.9, 0.9, 0.95, 0.94]
  assert [e["soup_size"] for e in history] == [1, 1, 2, 2]
  assert ev.calls == [_key(f32_mean(4, 2)), _key(f32_mean(4, 8)), _key(f32_mean(4, 8, 1))]
  assert soup["w"][0] == F32(6.0)


def test_greedy_soup_geq_accepts_ties():
  soup, history = soups.greedy_soup([scalar(v) for v in VALUES], ToyEval(), SCORES, tie="geq")
  assert [e["accepted"] for e in history] == [True, True, False, True]
  assert soup["w"][0] == f32_mean(4, 2, 1)
  with pytest.raises(ValueError, match="tie"):
    soups.greedy_soup([scalar(1.0)], ToyEval(), [0.5], tie="ge")


def test_greedy_soup_scores_ingredients_when_no_scores():
  ev = ToyEval()
  soup, history = soups.greedy_soup([scalar(v) for v in VALUES], ev)
  assert ev.calls[:4] == [1.0, 2.0, 4.0, 8.0]  # each ingredient scored first
  assert [e["index"] for e in history] == [2, 1, 3, 0] and soup["w"][0] == F32(6.0)


# ----------------------------------------------------------------------------- refused ingredients

def test_mismatched_ingredients_name_the_first_differing_parameter():
  def tree(q_cols=48, k_cols=16, extra=False, q_dtype=F32):
    t = {"lm": {"layers_0": {"q": {"kernel": np.zeros((64, q_cols), q_dtype)},
                             "k": {"kernel": np.zeros((64, 16), F32)}},
                "layers_1": {"k": {"kernel": np.zeros((64, k_cols), F32)}}}}
    if extra:
      t["lm"]["layers_0"]["q"]["bias"] = np.zeros((q_cols,), F32)
    return t
  good = tree()
  # Two differences: the error names the first in key order (layers_0/q before layers_1/k).
  with pytest.raises(ValueError) as e:
    soups.uniform_soup([good, good, tree(q_cols=32, k_cols=8)])
  assert str(e.value) == ("ingredient 2 (<in-memory tree>): parameter 'lm/layers_0/q/kernel' has shape "
                          "(64, 32), the first ingredient (64, 48)")
  with pytest.raises(ValueError, match=r"ingredient 1 .*'lm/layers_0/q/bias' \(shape \(48,\)\) is not in"):
    soups.uniform_soup([good, tree(extra=True)])
  with pytest.raises(ValueError, match=r"ingredient 1 .*'lm/layers_0/q/bias' is missing"):
    soups.uniform_soup([tree(extra=True), good])
  with pytest.raises(ValueError, match=r"'lm/layers_0/q/kernel' is integer with shape \(64, 48\)"):
    soups.uniform_soup([good, tree(q_dtype=np.int32)])
  with pytest.raises(ValueError, match="ingredient 1 .*'lm/layers_1/k/kernel' has shape"):
    soups.greedy_soup([good, tree(k_cols=8)], lambda p: 0.0, [1.0, 0.5])
  mixed = soups.uniform_soup([good, jax.tree.map(lambda x: x.astype(BF16), good)])  # same class: fine
  assert mixed["lm"]["layers_0"]["q"]["kernel"].dtype == F32


# ----------------------------------------------------------------------------- streaming memory bound

class TrackingLoader:
  """The default loader, copying into NumPy-owned buffers (which tracemalloc sees) and
  counting how many ingredient trees have any leaf still alive."""

  def __init__(self):
    self.alive = {}
    self.max_alive = 0
    self.loads = 0

  def __call__(self, ingredient):
    tree = jax.tree.map(np.array, soups.load(ingredient, dtype=None))
    tid = self.loads
    self.loads += 1
    leaves = jax.tree.leaves(tree)
    self.alive[tid] = len(leaves)
    for leaf in leaves:
      weakref.finalize(leaf, self._release, tid)
    self.max_alive = max(self.max_alive, sum(1 for n in self.alive.values() if n))
    return tree

  def _release(self, tid):
    self.alive[tid] -= 1


def test_streaming_keeps_one_ingredient_alive(tmp_path):
  shape = (512, 512)  # 4 leaves x 1 MiB: 4 MiB an ingredient
  runs = []
  for i in range(8):
    r = np.random.default_rng(i)
    runs.append(save_run(tmp_path / f"r{i}", {1: {f"w{j}": r.normal(size=shape).astype(F32) for j in range(4)}}))
  model_bytes = 4 * shape[0] * shape[1] * 4

  peaks = {}
  for k in (2, 8):
    loader = TrackingLoader()
    tracemalloc.start()
    try:
      soups.uniform_soup(runs[:k], loader=loader)
      peaks[k] = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert loader.loads == k and loader.max_alive == 1
  # k=8 needs no more than k=2 (8 models would be 32 MiB more); about sum + one ingredient + mean.
  assert peaks[8] <= peaks[2] * 1.1 + (1 << 20), peaks
  assert peaks[8] < 3.5 * model_bytes, peaks

  loader = TrackingLoader()
  scores = list(np.linspace(0.1, 0.8, 8))
  soups.greedy_soup(runs, lambda p: 1.0, scores, tie="geq", loader=loader)  # accepts all
  assert loader.loads == 8 and loader.max_alive == 1  # one load per trial, not |P|


def test_orbax_ingredients_stream_through_one_set_of_arrays(tmp_path):
  ps = [small(s) for s in range(3)]
  runs = [save_run(tmp_path / f"r{i}", {1: p}) for i, p in enumerate(ps)]
  reader = soups.StreamReader()
  first = reader(soups.Ingredient.parse(runs[0]))
  scale = first["lm"]["norm"]["scale"]
  second = reader(soups.Ingredient.parse(runs[1]))
  assert second["lm"]["norm"]["scale"] is scale  # read in place, not into new arrays
  assert_tree_equal(second, ps[1])
  assert_tree_equal(soups.uniform_soup(runs), hand_mean(ps))
  # A bfloat16 ingredient after float32 ones does not fit their arrays: read into new ones, averaged alike.
  bf = jax.tree.map(lambda x: x.astype(BF16), ps[2])
  assert_tree_equal(soups.uniform_soup(runs[:2] + [save_run(tmp_path / "bf", {1: bf})]), hand_mean(ps[:2] + [bf]))
  # Another model's checkpoint: the soup's own message, nothing reshaped into the arrays.
  other = save_run(tmp_path / "other", {1: {**ps[0], "proj": {"bias": np.zeros(5, F32)}}})
  with pytest.raises(ValueError, match=r"ingredient 1 .*'proj/bias' has shape \(5,\), the first ingredient \(2,\)"):
    soups.uniform_soup([runs[0], other])


# ----------------------------------------------------------------------------- round trips

def tiny_lm():
  from vlm_jax.models import DecoderLM, LMConfig
  return DecoderLM(LMConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                            head_dim=8, mlp_dim=32, max_position=64))


_BASE = []


def lm_params(n):
  """n parameter trees of the tiny LM: one `init_params` (slow on CPU), then seeded perturbations."""
  from vlm_jax.models import init_params
  if not _BASE:
    _BASE.append(jax.device_get(init_params(tiny_lm(), jax.random.key(0))))
  return [jax.tree.map(lambda x, r=np.random.default_rng(s): (x + r.normal(size=x.shape)).astype(F32), _BASE[0])
          for s in range(n)]


def test_orbax_round_trip(tmp_path):
  from vlm_jax.train.init_from import initial_params
  model = tiny_lm()
  ps = lm_params(4)
  a = save_run(tmp_path / "a", {10: ps[3], 20: ps[0]})  # latest step: 20
  b = save_run(tmp_path / "b", {5: ps[1], 6: ps[3]})
  c = save_run(tmp_path / "c", {7: ps[2]})
  sources = [a, f"{b}@5", os.path.join(c, "checkpoints")]
  open(os.path.join(a, "config.json"), "w").write("{}")  # a training workdir has its run's config.json
  assert soups.Ingredient.parse(a).kind == "orbax"
  soup = soups.uniform_soup(sources)
  assert_tree_equal(soup, hand_mean(ps[:3]))
  assert_tree_equal(soups.load(f"{a}@10"), ps[3])
  assert_tree_equal(soups.load(os.path.join(c, "checkpoints", "7")), ps[2])  # one step dir

  out = str(tmp_path / "soup")
  assert soups.save(soup, a, out) == "orbax"
  abstract = jax.eval_shape(lambda: soup)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored = restore_params(out, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                              abstract))
  assert_tree_equal(jax.device_get(restored), soup)
  shardings = jax.tree.map(lambda _: sharding, abstract)
  started = initial_params(f"checkpoint:{out}", model, abstract, shardings, 0)  # a stage's init
  assert_tree_equal(jax.device_get(started), soup)
  with pytest.raises(FileExistsError):
    soups.save(soup, a, out)
  with pytest.raises(FileNotFoundError, match="no step 99"):
    soups.uniform_soup([f"{a}@99"])


def test_hugging_face_round_trip(tmp_path):
  from vlm_jax import from_hf, to_hf
  from vlm_jax.models import stack_layers
  model = tiny_lm()
  folders = []
  for s, (params, dtype) in enumerate(zip(lm_params(3), (None, "bfloat16", None))):
    folders.append(str(tmp_path / f"hf{s}"))
    to_hf(model, params, folders[-1], dtype=dtype)
  loaded = [jax.device_get(from_hf(f)[1]) for f in folders]
  soup = soups.uniform_soup(folders)
  assert_tree_equal(soup, hand_mean(loaded))
  out = str(tmp_path / "soup_hf")
  assert soups.output_format(folders[0]) == "hf" and soups.save(soup, folders[0], out) == "hf"
  back_model, back = from_hf(out)
  assert back_model.config == model.config
  assert_tree_equal(jax.device_get(back), soup)
  # A scanned `like` restacks the layers of a Hugging Face folder.
  stacked = soups.load(folders[0], like=jax.eval_shape(stack_layers, loaded[0]))
  assert stacked["layers"]["q"]["kernel"].shape == (2,) + loaded[0]["layers_0"]["q"]["kernel"].shape


# ----------------------------------------------------------------------------- the job

def test_soup_job_greedy(tmp_path, capsys):
  from configs import soup as soup_config
  from launch.main import JOBS
  runs = [save_run(tmp_path / f"r{i}", {1: scalar(v)}) for i, v in enumerate(VALUES)]
  config = soup_config.get_config(f"kind=greedy,evaluator=tests.test_soups:toy_evaluator,ingredients={';'.join(runs)}")
  with config.unlocked():
    config.scores = tuple(SCORES)
  workdir = str(tmp_path / "job")
  JOBS["soup"](config, workdir)
  text = capsys.readouterr().out
  assert "greedy soup of 4 ingredients" in text and "soup score" in text
  result = json.load(open(os.path.join(workdir, "soup.json")))
  assert result["accepted"] == [False, False, True, True] and result["format"] == "orbax"
  assert [e["index"] for e in result["greedy_log"]] == [2, 1, 3, 0]
  np.testing.assert_array_equal(soups.load(os.path.join(workdir, "soup"))["w"], [6.0])

  config = soup_config.get_config(f"kind=maximum,top_p=0.5,scores=0.5;0.9;0.9;0.7,ingredients={';'.join(runs)},"
                                  f"output={tmp_path / 'max'}")
  soups.jobs.soup(config, str(tmp_path / "job_max"))
  result = json.load(open(tmp_path / "job_max" / "soup.json"))
  assert result["accepted"] == [False, True, True, False]
  np.testing.assert_array_equal(soups.load(str(tmp_path / "max"))["w"], [3.0])
