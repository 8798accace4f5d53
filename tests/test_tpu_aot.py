"""Ahead-of-time compilation for real TPU slices (`launch.simulate --topology`), and multi-slice meshes.

The TPU tests need libtpu (the `tpu` extra, which `make test` installs, so CI runs them: the TPU
path cannot rot silently) and are skipped without it; each compiles for ~20-30 s. The mesh tests
on CPU devices and the error for a missing libtpu run everywhere.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import tiny_train
from vlm_jax.parallel.mesh import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB, GiB = 2 ** 20, 1024 ** 3
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")
TPU_ENV = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def run(args, timeout=240) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=TPU_ENV)


def simulate(*args: str) -> str:
  proc = run(["-m", "launch.simulate", "--config=configs/tiny_train.py", *args])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def size_of(row: str, out: str) -> float:
  m = re.search(rf"^\s+{re.escape(row)}\s+([\d.]+) (GiB|MiB)", out, re.M)
  assert m, f"no {row!r} row in:\n{out}"
  return float(m.group(1)) * (GiB if m.group(2) == "GiB" else MiB)


def tiny_sizes(vocab: int = 512):
  """(parameters, batch bytes per row) of configs/tiny_train.py, counted by hand from its model config."""
  c = tiny_train.get_config().model
  t, v = c.text, c.vision
  e, heads, kv, hd = t.embed_dim, t.num_heads, t.num_kv_heads, t.head_dim
  attn = e * heads * hd + 2 * e * kv * hd + heads * hd * e
  lm = 2 * vocab * e + t.num_layers * (attn + 3 * e * t.mlp_dim + 2 * e) + e
  patches = (v.image_size // v.patch_size) ** 2
  w = v.width
  block = 4 * (w * w + w) + 2 * (w * v.mlp_dim) + v.mlp_dim + w + 4 * w
  vit = 3 * v.patch_size ** 2 * w + w + (patches + 1) * w + v.depth * block + 2 * w + 2 * w  # CLIP: pre+post LN
  projector = w * e + e + e * e + e
  seq = tiny_train.get_config().data.seq_len
  row = 5 * seq * 4 + v.image_size ** 2 * 3 * 4  # five int32/float32 token arrays and one float32 image
  return lm + vit + projector, row


def test_tiny_sizes_match_the_model():
  """The hand count above is the one the AOT assertions use: it must be the model's (532,096)."""
  assert tiny_sizes()[0] == 532_096


@needs_libtpu
def test_tiny_config_compiles_for_v5e_2x2():
  out = simulate("--topology=v5e:2x2")
  assert re.search(r"mesh\s+data=4 fsdp=1 tensor=1\s+\(4 TPU v5 lite chips\)", out), out
  params, row = tiny_sizes()
  # Data parallel: every chip holds the float32 parameters and Adam's two moments, and 2 of the 8 rows;
  # the TPU lays small arrays out in padded (8, 128) tiles, so a little more (here ~10%), never less.
  exact = 12 * params + 2 * row
  assert exact <= size_of("arguments", out) + 0.05 * MiB < 1.15 * exact
  assert size_of("temporaries", out) > 0.1 * MiB
  assert re.search(r"^\s+fits\s+yes: peak [\d.]+ GiB of 16 GiB per device", out, re.M), out
  flops = float(re.search(r"= ([\d.e+]+) per device", out).group(1))
  read = float(re.search(r"bytes accessed\s+([\d.e+]+) per device", out).group(1))
  # The roofline row is the chip arithmetic on those two numbers (v5e: 197 TFLOP/s, 819 GB/s).
  step_ms = max(flops / 197e12, read / 819e9) * 1e3
  m = re.search(r"roofline \(estimate\)\s+step >= ([\d.e+-]+) ms", out)
  assert m and float(m.group(1)) == pytest.approx(step_ms, rel=1e-3), out
  mfu = 6 * params * 8 * 48 / 4 / (step_ms / 1e3 * 197e12)
  assert float(re.search(r"MFU ceiling\s+([\d.]+)%", out).group(1)) == pytest.approx(100 * mfu, abs=0.06)


@needs_libtpu
def test_generation_compiles_for_v5e_2x2_with_its_kv_cache():
  """`--function=generate` with the TPU compiler: parameters replicated (4 bytes each, no optimiser
  state), and temporaries that hold at least the two rows' KV cache."""
  out = simulate("--topology=v5e:2x2", "--function=generate", "--new_tokens=16")
  assert "compiled for v5e:2x2 by the TPU compiler: generation" in out, out
  params, _ = tiny_sizes()
  assert 4 * params <= size_of("arguments", out) < 1.3 * 4 * params
  t, seq = tiny_train.get_config().model.text, tiny_train.get_config().data.seq_len
  assert size_of("temporaries", out) >= 2 * 2 * t.num_layers * (seq + 16) * t.num_kv_heads * t.head_dim * 4
  assert re.search(r"roofline \(estimate\)\s+train step only", out) and re.search(r"^\s+fits\s+yes", out, re.M), out


@needs_libtpu
def test_a_config_too_big_for_the_chip_does_not_fit():
  vocab = 8 * 2 ** 20  # 2 x 8M x 128 embedding + head parameters, replicated with Adam: ~24 GiB per chip
  out = simulate("--topology=v5e:2x2", f"--config.model.text.vocab_size={vocab}")
  # The TPU compiler refuses to build it; what it says it needs covers at least the replicated state.
  params, _ = tiny_sizes(vocab)
  m = re.search(r"^\s+fits\s+does not fit: needs ([\d.]+) GiB of the ([\d.]+) GiB the compiler may use "
                r"\(16 GiB HBM\); ([\d.]+) GiB over", out, re.M)
  assert m, out
  needed, usable, over = (float(g) for g in m.groups())
  assert needed >= 12 * params / GiB and 15 < usable <= 16
  assert over == pytest.approx(needed - usable, abs=0.011)
  assert re.search(r"^\s+compiler\s+RESOURCE_EXHAUSTED: Ran out of memory on HBM", out, re.M), out


@needs_libtpu
def test_two_slices_compile_with_a_hybrid_mesh():
  out = simulate("--topology=v5e:2x2", "--num_slices=2", "--config.mesh.data=1", "--config.mesh.fsdp=-1")
  # Per slice data=1 x fsdp=4; the data axis spans the two slices.
  assert re.search(r"mesh\s+data=2 fsdp=4 tensor=1\s+\(8 TPU v5 lite chips, 2 slices over DCN\)", out), out
  params, row = tiny_sizes()
  # The state is sharded over the 4 chips of a slice (padded small tiles add ~35% here): more than a 4-way
  # shard and one row, far less than the 12 bytes per parameter replicated or the half of it 2-way.
  assert 12 * params / 4 + row < size_of("arguments", out) < 12 * params / 2
  assert re.search(r"^\s+fits\s+yes", out, re.M), out


@needs_libtpu
def test_hybrid_mesh_on_tpu_descriptions_is_slice_major():
  script = textwrap.dedent("""
      import json
      from launch.simulate import tpu_devices
      from vlm_jax.parallel.mesh import make_mesh
      devices, chip = tpu_devices("v5e:2x2", num_slices=2)
      mesh = make_mesh({"data": 2, "fsdp": 2, "dcn_data": 2}, devices)
      try:
        make_mesh({"data": 1, "fsdp": -1, "dcn_data": 4}, devices)
      except ValueError as e:
        error = str(e)
      print(json.dumps(dict(shape=dict(mesh.shape), kind=chip.kind, error=error,
                            slices=[[d.slice_index for d in row] for row in mesh.devices[:, :, 0]])))
  """)
  proc = run(["-c", script], timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["shape"] == {"data": 4, "fsdp": 2, "tensor": 1} and r["kind"] == "TPU v5 lite"
  assert r["slices"] == [[0, 0], [0, 0], [1, 1], [1, 1]]  # data rows 0-1 on slice 0, rows 2-3 on slice 1
  assert r["error"] == "dcn_data=4 but the devices come from 2 slice(s)"


def test_hybrid_mesh_on_cpu_devices_uses_consecutive_blocks():
  devices = jax.devices()[:8]
  assert not hasattr(devices[0], "slice_index")  # CPU devices: the fallback, not create_hybrid_device_mesh
  mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "dcn_data": 2}, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  np.testing.assert_array_equal(ids[0].ravel() // 4, 0)  # slice 0 = devices 0-3
  np.testing.assert_array_equal(ids[1].ravel() // 4, 1)
  assert sorted(ids.ravel()) == [d.id for d in devices]
  assert dict(make_mesh({"data": -1, "dcn_data": 4}, devices).shape) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_mesh_without_slices_is_unchanged():
  devices = jax.devices()[:8]
  a, b = make_mesh({"data": 2, "fsdp": -1}, devices), make_mesh({"data": 2, "fsdp": -1, "dcn_data": 1}, devices)
  assert dict(a.shape) == dict(b.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert (a.devices == b.devices).all()


def test_bad_slice_counts_are_clear_errors():
  devices = jax.devices()[:8]
  with pytest.raises(ValueError, match="dcn_data=3 must be a positive divisor of the 8 devices"):
    make_mesh({"data": -1, "dcn_data": 3}, devices)
  with pytest.raises(ValueError, match=r"mesh \{'data': 2, 'fsdp': 4, 'tensor': 1\} needs 8 devices, 4 are"):
    make_mesh({"data": 2, "fsdp": 4, "dcn_data": 2}, devices)
  with pytest.raises(ValueError, match=r"unknown mesh axes \['slices'\]"):
    make_mesh({"data": -1, "slices": 2}, devices)


def in_a_subprocess(code: str) -> None:
  """Runs test code that imports launch.simulate in a fresh process: its absl flags (`--config`,
  ...) must not meet launch.main's, which other tests import into this one."""
  out = run(["-c", textwrap.dedent(code)])
  assert out.returncode == 0, out.stderr[-3000:]


def test_topology_errors():
  in_a_subprocess("""
      import importlib.util
      import pytest
      from launch import simulate
      with pytest.raises(ValueError, match=r"--topology='v9x:4x4'.*generation of \\['v4', 'v5e', 'v5p', 'v6e'\\]"):
        simulate.tpu_devices("v9x:4x4")
      with pytest.raises(ValueError, match="expected <generation>:<shape>"):
        simulate.tpu_devices("v5litepod-16")
      importlib.util.find_spec = lambda name, *a: None
      with pytest.raises(ImportError, match=r"install the `tpu` extra \\(pip install -e '\\.\\[tpu\\]'\\)"):
        simulate.tpu_devices("v5e:2x2")
  """)


def test_config_slices_must_agree_with_num_slices():
  in_a_subprocess("""
      import pytest
      from configs import tiny_train
      from launch import simulate
      config = tiny_train.get_config()
      assert simulate.with_slices(config, 2).mesh.dcn_data == 2
      assert "dcn_data" not in config.mesh  # the caller's config is left alone
      with config.unlocked():
        config.mesh.dcn_data = 4
      with pytest.raises(ValueError, match="config.mesh.dcn_data=4 but --num_slices=2"):
        simulate.with_slices(config, 2)
  """)


@needs_libtpu
def test_splash_attention_compiles_for_v5e_2x2():
  """Both towers on the Pallas kernel, under shard_map over the 4 chips' batch shards."""
  out = simulate("--topology=v5e:2x2", "--config.model.text.attention=splash",
                 "--config.model.vision.attention=splash")
  # 2 LM + 2 ViT layers (the tiny VLM reads the last ViT layer), each a forward kernel and the
  # backward's dq and dkv kernels; the ViT's 17 tokens run padded to one 128-token tile.
  m = re.search(r"^\s+Pallas kernels\s+(\d+) Mosaic calls", out, re.M)
  assert m and int(m.group(1)) == 4 * 3, out
  params, row = tiny_sizes()
  assert 12 * params + 2 * row <= size_of("arguments", out) + 0.05 * MiB  # the same state as with "xla"
  assert size_of("temporaries", out) > 0.1 * MiB
  assert re.search(r"^\s+fits\s+yes: peak [\d.]+ GiB of 16 GiB per device", out, re.M), out
