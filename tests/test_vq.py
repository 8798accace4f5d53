"""The VQ image tokenizer, the VLM that reads its codes, and the engine's own-objective step."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlm_jax.models import build_model, init_params
from vlm_jax.models.build import model_config
from vlm_jax.models.vq import code_usage, nearest_codes, quantize, vq_losses
from vlm_jax.parallel import make_mesh
from vlm_jax.train import optim as optim_lib
from vlm_jax.train.checkpoint import CheckpointMismatch, abstract_like, restore_params
from vlm_jax.train.config import default_config
from vlm_jax.train.extension import TrainExtension
from vlm_jax.train.init_from import load_parts
from vlm_jax.train.loop import train
from vlm_jax.train.setup import param_shapes_and_shardings
from vlm_jax.train.step import TrainState, forward_output, make_train_step

VQ = dict(image_size=16, channels=[8, 8], codebook_size=16, code_dim=4)
T = 16  # (16 / 4)**2 codes per image
IMAGE = 63


def jit_apply(model, **kw):
  """`model.apply` jitted (one compile instead of op-by-op dispatch: these tests run on 2 shared cores)."""
  return jax.jit(lambda params, *args: model.apply({"params": params}, *args, **kw))


def jit_init(model):
  return jax.jit(lambda key: init_params(model, key))(jax.random.key(0))


def tokenizer_block(**vq):
  return dict(kind="vq", vq={**VQ, **vq})


def vlm_block(**vq):
  return dict(kind="vlm", vision_input="vq", vq={**VQ, **vq}, image_token_id=IMAGE, code_layers=1,
              vision=dict(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32),
              text=dict(vocab_size=64, embed_dim=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                        mlp_dim=32))


# ----------------------------------------------------------------------------- the quantiser

def test_nearest_codes_match_a_numpy_search():
  rng = np.random.default_rng(0)
  z, codebook = rng.normal(size=(3, 5, 4)).astype(np.float32), rng.normal(size=(9, 4)).astype(np.float32)
  want = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  got = nearest_codes(jnp.asarray(z), jnp.asarray(codebook))
  assert got.dtype == jnp.int32 and np.array_equal(np.asarray(got), want)
  # hand-built: each vector sits next to one code
  codebook = np.array([[0., 0.], [1., 0.], [0., 5.]], np.float32)
  z = np.array([[0.9, 0.2], [0.1, 3.0], [-0.2, 0.1]], np.float32)
  assert np.asarray(nearest_codes(z, codebook)).tolist() == [1, 2, 0]


def test_straight_through_passes_the_gradient_at_z_q_to_z_unchanged():
  codebook = jnp.array([[0., 0.], [1., 0.], [0., 5.]])
  z = jnp.array([[0.9, 0.2], [0.1, 3.0]])
  w = jnp.array([[1.5, -2.0], [0.5, 3.0]])
  f = lambda zq: jnp.sum(w * jnp.sin(zq))  # nonlinear: its gradient depends on where it is taken
  z_q, codes, e = quantize(z, codebook)
  np.testing.assert_allclose(z_q, codebook[jnp.array([1, 2])], atol=1e-7)  # the forward value is e
  assert np.asarray(codes).tolist() == [1, 2]
  grad_z, grad_codebook = jax.grad(lambda z, cb: f(quantize(z, cb)[0]), argnums=(0, 1))(z, codebook)
  np.testing.assert_allclose(grad_z, jax.grad(f)(z_q), atol=1e-7)  # = w * cos(e), not w * cos(z)
  np.testing.assert_allclose(grad_z, w * np.cos(np.asarray(e)), atol=1e-6)
  assert not np.allclose(grad_z, w * np.cos(np.asarray(z)))
  assert np.all(np.asarray(grad_codebook) == 0)  # the codebook learns from its own loss only


def test_vq_losses_match_numpy_and_stop_the_right_gradients():
  rng = np.random.default_rng(1)
  z, e = rng.normal(size=(2, 3, 3, 4)).astype(np.float32), rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  got = vq_losses(jnp.asarray(z), jnp.asarray(e))
  np.testing.assert_allclose(got["codebook_loss"], np.mean((z - e) ** 2), rtol=1e-6)
  np.testing.assert_allclose(got["commitment"], np.mean((z - e) ** 2), rtol=1e-6)
  g_cb = jax.grad(lambda z, e: vq_losses(z, e)["codebook_loss"], argnums=(0, 1))(z, e)
  g_commit = jax.grad(lambda z, e: vq_losses(z, e)["commitment"], argnums=(0, 1))(z, e)
  assert np.all(np.asarray(g_cb[0]) == 0) and np.all(np.asarray(g_commit[1]) == 0)
  np.testing.assert_allclose(g_cb[1], 2 * (e - z) / z.size, rtol=1e-5)
  np.testing.assert_allclose(g_commit[0], 2 * (z - e) / z.size, rtol=1e-5)


def test_code_usage_is_the_perplexity_and_fraction_of_the_histogram():
  got = code_usage(jnp.array([[0, 0], [1, 3]]), 4)
  p = np.array([0.5, 0.25, 0.25])
  np.testing.assert_allclose(got["code_perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
  assert float(got["codes_used"]) == 0.75
  assert float(code_usage(jnp.zeros((3, 5), jnp.int32), 8)["code_perplexity"]) == pytest.approx(1.0)


def test_tokenizer_train_loss_is_the_vq_vae_loss_of_its_outputs():
  model = build_model(tokenizer_block(beta=0.5))
  params = jit_init(model)
  images = jax.random.normal(jax.random.key(1), (3, 2, 16, 16, 3))
  loss, metrics = jit_apply(model, method="train_loss")(params, {"images": images}, jax.random.key(2))
  out = jit_apply(model)(params, images[:, 0])
  z, e, recon = map(np.asarray, (out.z, out.e, out.reconstruction))
  cb = np.asarray(params["vq"]["codebook"])
  codes = np.argmin(((z[..., None, :] - cb) ** 2).sum(-1), -1).reshape(3, -1)
  np.testing.assert_array_equal(out.codes, codes)
  np.testing.assert_allclose(e, cb[codes].reshape(z.shape), atol=1e-7)
  recon_mse = np.mean((recon - np.asarray(images[:, 0])) ** 2)
  sq = np.mean((z - e) ** 2)
  np.testing.assert_allclose(metrics["recon_mse"], recon_mse, rtol=1e-5)
  np.testing.assert_allclose(loss, recon_mse + sq + 0.5 * sq, rtol=1e-5)
  assert metrics["loss"] == loss and metrics["codes_used"] == len(np.unique(codes)) / 16
  assert out.reconstruction.shape == (3, 16, 16, 3) and out.codes.shape == (3, T)
  # encode / embed / decode are the same path, method by method
  vq = lambda name, x: jit_apply(model, method=lambda m, x: getattr(m.vq, name)(x))(params, x)
  np.testing.assert_array_equal(vq("encode", images), np.stack([codes, vq("encode", images[:, 1])], 1))
  np.testing.assert_allclose(vq("embed", out.codes), cb[codes], atol=1e-7)
  assert vq("decode", out.codes).shape == (3, 16, 16, 3)


def test_config_errors_and_round_trip():
  with pytest.raises(ValueError, match="not divisible by 4"):
    build_model(tokenizer_block(image_size=18))
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['codes'\] in model.vq"):
    build_model(tokenizer_block(codes=3))
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['text'\]"):
    build_model({**tokenizer_block(), "text": {}})
  with pytest.raises(ValueError, match=r"vision.image_size \(32\).*vq.image_size \(16\)"):
    build_model({**vlm_block(), "vision": dict(image_size=32, patch_size=8)})
  for block in (tokenizer_block(), vlm_block()):
    model = build_model(block)
    assert build_model(model_config(model)).config == model.config
  assert build_model(vlm_block()).config.tokens_per_image == T
  assert build_model({**vlm_block(), "projector": "downsample"}).config.tokens_per_image == T // 4


# ----------------------------------------------------------------------------- the VLM reading codes

@pytest.fixture(scope="module")
def vlm():
  model = build_model(vlm_block())
  return model, jit_init(model)


def encode(model, params, images):
  return jit_apply(model, method=lambda m, x: m.vq.encode(x))(params, images)


def image_ids(rows: int, images_per_row: int) -> jnp.ndarray:
  row = [1] + sum([[IMAGE] * T + [5 + i] for i in range(images_per_row)], [])
  return jnp.array([row] * rows, jnp.int32)


def test_vlm_gives_the_same_logits_for_images_and_their_codes(vlm):
  model, params = vlm
  logits = jax.jit(lambda params, ids, images=None, **kw: model.apply({"params": params}, ids, images, **kw).logits)
  run = lambda *a, **kw: np.asarray(logits(params, *a, **kw))
  images = jax.random.normal(jax.random.key(3), (2, 2, 16, 16, 3))
  codes = encode(model, params, images)
  assert codes.shape == (2, 2, T) and codes.dtype == jnp.int32
  ids = image_ids(2, 2)
  from_pixels = run(ids, images)
  np.testing.assert_allclose(run(ids, image_codes=codes), from_pixels, atol=1e-6)
  # the Hugging Face layout: [n, T] codes taken in order across the batch
  np.testing.assert_allclose(run(ids, image_codes=codes.reshape(4, T)), from_pixels, atol=1e-6)
  # a mixed batch: given slots hold codes (their pixels blank), the others pixels (their codes junk)
  given = jnp.array([[1, 0], [0, 1]])
  blank = images * (1 - given)[..., None, None, None]
  junk = jnp.where(given[..., None] == 1, codes, 7)
  np.testing.assert_allclose(run(ids, blank, image_codes=junk, code_given=given), from_pixels, atol=1e-6)
  # and the codes matter: other codes give other logits
  assert np.abs(run(ids, image_codes=(codes + 1) % 16) - from_pixels).max() > 1e-4
  features = jit_apply(model, method="encode_codes")(params, codes)
  assert features.shape == (2, 2, T, 16)


def test_forward_output_passes_a_batch_s_codes(vlm):
  model, params = vlm
  images = jax.random.normal(jax.random.key(4), (2, 1, 16, 16, 3))
  codes = encode(model, params, images)
  batch = {"input_ids": image_ids(2, 1), "images": jnp.zeros_like(images), "image_codes": codes,
           "code_given": jnp.ones((2, 1), jnp.int32)}
  want = jit_apply(model)(params, batch["input_ids"], images).logits
  got = jax.jit(lambda params, batch: forward_output(model, params, batch).logits)(params, batch)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_vlm_rejects_a_wrong_grid_or_codes_outside_the_codebook(vlm):
  model, params = vlm
  ids = image_ids(1, 1)
  with pytest.raises(ValueError, match="hold 9 codes per image but this tokenizer's grid has 16"):
    model.apply({"params": params}, ids, image_codes=jnp.zeros((1, 1, 9), jnp.int32))
  with pytest.raises(ValueError, match=r"code ids in \[16, 16\], outside \[0, 16\)"):
    model.apply({"params": params}, ids, image_codes=jnp.full((1, 1, T), 16, jnp.int32))
  with pytest.raises(ValueError, match=r"\[-1, 0\], outside \[0, 16\)"):
    model.apply({"params": params}, ids, jnp.zeros((1, 1, 16, 16, 3)),
                image_codes=jnp.zeros((1, 1, T), jnp.int32).at[0, 0, 3].set(-1), code_given=jnp.ones((1, 1)))
  with pytest.raises(ValueError, match="need code_given"):
    model.apply({"params": params}, ids, jnp.zeros((1, 1, 16, 16, 3)), image_codes=jnp.zeros((1, 1, T), jnp.int32))
  vit = build_model({**vlm_block(), "vision_input": "vit"})
  with pytest.raises(ValueError, match="image_codes need vision_input='vq'"):
    vit.apply({"params": jit_init(vit)}, ids, image_codes=jnp.zeros((1, 1, T), jnp.int32))


# ----------------------------------------------------------------------------- the engine

class Probe(nn.Module):
  """A model with its own objective that reports the rng it was given."""

  @nn.compact
  def __call__(self, x):
    return self.param("w", nn.initializers.ones, (2,)) * x

  def train_loss(self, batch, rng):
    loss = jnp.sum(jnp.square(self(batch["x"])))
    return loss, {"draw": jax.random.uniform(rng)}


def test_objective_step_trains_on_the_model_s_train_loss():
  model = Probe()
  params = model.init(jax.random.key(0), jnp.ones((2,)))["params"]
  labels = optim_lib.path_labels(params, [(".*", 1.0)])
  tx = optax.sgd(0.1)
  step = jax.jit(make_train_step(model, tx, labels, lambda s: 0.1))
  rng = jax.random.key_data(jax.random.key(5))
  state = TrainState(jnp.asarray(3, jnp.int32), params, tx.init(params), rng)
  batch = {"x": jnp.array([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]])}
  new, metrics = step(state, batch)
  # loss = sum_i (w x_i)^2 with w = 1; d/dw = 2 w sum_i x_i^2
  assert float(metrics["loss"]) == pytest.approx(16.0) and float(metrics["target_tokens"]) == 3
  np.testing.assert_allclose(new.params["w"], 1 - 0.1 * 2 * np.array([10.0, 6.0]), rtol=1e-6)
  want_draw = jax.random.uniform(jax.random.fold_in(jax.random.wrap_key_data(rng), 3))
  assert float(metrics["draw"]) == pytest.approx(float(want_draw)) and int(new.step) == 4
  for kwargs in (dict(grad_accum=2), dict(extension=TrainExtension(name="x")), dict(z_loss=1e-4)):
    with pytest.raises(ValueError, match="trains on its own train_loss"):
      make_train_step(model, tx, labels, lambda s: 0.1, **kwargs)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  from vlm_jax.data import builders, tokenizer
  root = tmp_path_factory.mktemp("vq_world")
  b = builders.build_shapes_world(str(root / "data"), "caption", sizes={"train": 64}, image_size=16, max_objects=2)
  tokenizer.shapes_world_tokenizer(str(root / "tok"), vocab_size=512, num_examples=200)
  return dict(name=f"{b.name}/{b.builder_config.name}", data_dir=str(root / "data"), tokenizer=str(root / "tok"))


def tokenizer_run_config(world, steps=24, **overrides):
  c = default_config()
  c.model = tokenizer_block(codebook_size=32, code_dim=8, channels=[16, 16])
  c.total_steps = steps
  c.checkpoint_every = 8
  c.progress = False
  c.optim.lr = 3e-3
  # image_size and tokens_per_image are given: the pipeline's vision_settings reads no tokenizer model
  c.data = ml_collections.ConfigDict(dict(
      sources=[dict(name=world["name"], split="train", weight=1.0)], data_dir=world["data_dir"],
      tokenizer=world["tokenizer"], global_batch_size=8, seq_len=32, image_slots=1, image_size=16,
      tokens_per_image=1, packing=False, truncate=True))
  with c.unlocked():
    c.update_from_flattened_dict(overrides)
  return c


def metric(workdir, name):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r[name] for r in map(json.loads, f) if name in r}


def abstract_of(model_block):
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  return param_shapes_and_shardings(build_model(model_block), mesh, default_config().rules)


@pytest.fixture(scope="module")
def tokenizer_run(world, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tokenizer"))
  summary = train(tokenizer_run_config(world), workdir)
  assert summary["status"] == "finished"
  return workdir


def test_tokenizer_trains_through_the_loop_and_reconstructs_better(tokenizer_run):
  recon = metric(tokenizer_run, "recon_mse")
  assert sorted(recon) == list(range(1, 25))
  first, last = np.mean([recon[s] for s in (1, 2, 3)]), np.mean([recon[s] for s in (22, 23, 24)])
  assert last < 0.7 * first, (first, last)
  for name in ("codebook_loss", "commitment", "code_perplexity", "codes_used", "grad_norm"):
    assert sorted(metric(tokenizer_run, name)) == list(range(1, 25)), name
  assert metric(tokenizer_run, "target_tokens")[1] == 8


@pytest.mark.slow  # two more runs through the loop
def test_a_preempted_tokenizer_run_resumes_to_the_same_weights(world, tokenizer_run, tmp_path):
  workdir = str(tmp_path / "resumed")
  stopped = train(tokenizer_run_config(world, **{"debug.preempt_at_step": 12}), workdir)
  assert stopped["status"] == "preempted: saved step 12"
  resumed = train(tokenizer_run_config(world), workdir)
  assert resumed["steps"] == "12 -> 24 of 24"
  abstract, shardings = abstract_of(tokenizer_block(codebook_size=32, code_dim=8, channels=[16, 16]))
  want = restore_params(tokenizer_run, abstract_like(abstract, shardings))
  got = restore_params(workdir, abstract_like(abstract, shardings))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
               got, want)


def test_a_vlm_takes_the_tokenizer_with_init_parts(tokenizer_run):
  parts = {"vq": f"checkpoint:{tokenizer_run}"}
  abstract, shardings = abstract_of(vlm_block(codebook_size=32, code_dim=8, channels=[16, 16]))
  params = load_parts(abstract, parts, abstract, shardings)  # the rest stays abstract: only `vq` is read
  tok_abstract, tok_shardings = abstract_of(tokenizer_block(codebook_size=32, code_dim=8, channels=[16, 16]))
  trained = restore_params(tokenizer_run, abstract_like(tok_abstract, tok_shardings))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params["vq"], trained["vq"])
  # another codebook size: the error names the parameter and both shapes
  abstract, shardings = abstract_of(vlm_block(codebook_size=64, code_dim=8, channels=[16, 16]))
  with pytest.raises(CheckpointMismatch, match=r"'vq/codebook' is \(32, 8\) there and \(64, 8\) in this config"):
    load_parts(abstract, parts, abstract, shardings)


def test_normalized_codes_are_the_cosine_nearest_unit_rows():
  """With `normalized`, the encoder's outputs and the codebook rows are unit vectors: codes are
  the rows of largest cosine similarity (NumPy), and `embed` gives those unit rows."""
  from vlm_jax.models.vq import VQAutoencoder, VQConfig
  config = VQConfig(image_size=16, channels=(8, 8), codebook_size=32, code_dim=4, normalized=True)
  model = VQAutoencoder(config)
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = model.init(jax.random.key(0), images)["params"]
  params = jax.tree.map(lambda x: x, nn.meta.unbox(params))
  z = np.asarray(model.apply({"params": params}, images, method=lambda m, x: m.encoder(x))).reshape(-1, 4)
  book = np.asarray(params["codebook"])
  cosine = (z / np.linalg.norm(z, axis=-1, keepdims=True)) @ (book / np.linalg.norm(book, axis=-1, keepdims=True)).T
  codes = np.asarray(model.apply({"params": params}, images, method="encode")).reshape(-1)
  np.testing.assert_array_equal(codes, cosine.argmax(-1))
  rows = np.asarray(model.apply({"params": params}, codes[None], method="embed"))[0]
  np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1.0, rtol=1e-6)
  out = model.apply({"params": params}, images)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out.z), axis=-1), 1.0, rtol=1e-5)
