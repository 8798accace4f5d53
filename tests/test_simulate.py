"""launch.simulate: the train step compiled for N virtual devices, sized without allocating weights."""

import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3
MEMORY_ROWS = ("arguments", "outputs", "temporaries", "generated code", "alias/donated", "peak estimate")


def simulate(*args: str, timeout: int) -> str:
  proc = subprocess.run([sys.executable, "-m", "launch.simulate", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def size_of(row: str, out: str) -> float:
  """Bytes in a `  row   1.23 GiB ...` line of the table."""
  m = re.search(rf"^\s+{re.escape(row)}\s+([\d.]+) (GiB|MiB)", out, re.M)
  assert m, f"no {row!r} row in:\n{out}"
  return float(m.group(1)) * (GiB if m.group(2) == "GiB" else 2 ** 20)


def test_tiny_config_on_8_devices():
  t0 = time.perf_counter()
  out = simulate("--config=configs/tiny_train.py", "--devices=8", "--config.mesh.data=2",
                 "--config.mesh.fsdp=4", timeout=120)
  assert time.perf_counter() - t0 < 60
  for row in MEMORY_ROWS:
    size_of(row, out)
  assert re.search(r"mesh\s+data=2 fsdp=4 tensor=1\s+\(8 virtual CPU devices\)", out), out
  assert re.search(r"parameters\s+532,096 total; 532,096 trainable", out), out
  assert re.search(r"FLOPs per step\s+[\d.]+e\+\d+", out), out
  assert re.search(r"^\s+fits\s+yes", out, re.M), out


def test_scoring_and_generation_compile_with_the_parameters_alone():
  """`--function=score|generate`: the arguments are the replicated float32 parameters and one row
  per device (no optimiser state); generation's temporaries hold at least its KV cache."""
  from configs import tiny_train
  c = tiny_train.get_config()
  t, rows = c.model.text, 8
  for function in ("score", "generate"):
    out = simulate("--config=configs/tiny_train.py", "--devices=8", f"--function={function}", "--new_tokens=16",
                   timeout=120)
    assert re.search(r"parameters\s+532,096 total", out) and re.search(r"FLOPs per call\s+[\d.]+e\+\d+", out), out
    row = c.data.seq_len * 4 * (5 if function == "score" else 2) + c.model.vision.image_size ** 2 * 3 * 4
    # (the table prints 0.1 MiB; the train step holds 12 bytes a parameter, 6.1 MiB)
    assert size_of("arguments", out) == pytest.approx(4 * 532_096 + row * c.data.global_batch_size / rows,
                                                      abs=0.06 * 2 ** 20)
    assert "alias/donated" not in out and "optimiser" not in out
  cache = 2 * t.num_layers * (c.data.seq_len + 16) * t.num_kv_heads * t.head_dim * 4  # k and v, one row, float32
  assert size_of("temporaries", out) >= cache
  assert "16 new tokens decoded" in out


@pytest.mark.slow
def test_llava15_7b_stage1_on_64_devices():
  out = simulate("--config=configs/llava15_7b_stage1.py", "--devices=64", "--hbm_gib=80", timeout=900)
  m = re.search(r"parameters\s+([\d,]+) total; ([\d,]+) trainable", out)
  total, trainable = (int(g.replace(",", "")) for g in m.groups())
  assert 7.0e9 < total < 7.1e9 and 6.7e9 < trainable < 6.8e9  # the ViT (~0.3B) is frozen
  # Fully sharded: float32 parameters plus Adam's two moments of the trainable ones, over 64 devices.
  floor = (4 * total + 8 * trainable) / 64
  arguments, peak = size_of("arguments", out), size_of("peak estimate", out)
  assert 0.99 * floor < arguments < 1.05 * floor  # the state and a one-row batch shard, nothing replicated
  # Activations of one 2048-token row with scanned, rematerialised layers, the gathered layer weights
  # and the gradients add a few GiB on top; well under what an unscanned step needs (~78 GiB).
  assert floor + 0.5 * GiB < peak < floor + 16 * GiB
  assert re.search(r"^\s+fits\s+yes: peak [\d.]+ GiB of 80 GiB", out, re.M), out
  flops = float(re.search(r"FLOPs per step\s+([\d.e+]+)", out).group(1))
  assert 6 * trainable * 64 * 2048 < flops < 10 * trainable * 64 * 2048  # 6ND, plus remat and attention
