"""`make bench`'s driver (benchmarks/bench.py) and the read paths it measures."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench  # noqa: E402  (benchmarks/ is on sys.path above)
import checkpoint_read  # noqa: E402
from vlm_jax.interop.safetensors_io import write_tensors  # noqa: E402


def test_quick_io_sections_write_every_row(tmp_path):
  out = tmp_path / "bench.json"
  bench.main(["--quick", "--only", "soups,checkpoint", "--out", str(out)])
  result = json.loads(out.read_text())
  assert result["quick"] and result["info"]["peak_flops"] > 1e9
  soups = [r for r in result["rows"] if r["section"] == "soups"]
  reads = {r["row"] for r in result["rows"] if r["section"] == "checkpoint"}
  assert len(soups) == 4 and len(reads) == 16  # every measure but the memcpy each divides by
  assert "orbax as saved today, read_params" in reads and "safetensors mmap view, copied out" in reads
  for r in result["rows"]:  # a share of memcpy: vlm_jax GB/s over the memcpy GB/s of the same run
    assert r["reference_name"] == "memcpy" and r["ratio"] == pytest.approx(r["vlm_jax"] / r["reference"])


def test_table_formats_ratios_by_kind():
  rows = [bench.row("generate", "small-lm 8x32+32", "tok/s", 1500.0, 1000.0, "hf.generate", 1.5, "tok 256/256"),
          bench.row("soups", "uniform soup", "GB/s", 1.2, 4.8, "memcpy", 0.25)]
  lines = bench.table(rows).splitlines()
  assert "1,500 tok/s" in lines[2] and "1.50x" in lines[2] and "tok 256/256" in lines[2]
  assert "25%" in lines[3] and "1.2 GB/s" in lines[3]


def test_unknown_section_is_an_error(capsys):
  with pytest.raises(SystemExit):
    bench.parse_args(["--only", "train,decoding"])
  assert "decoding" in capsys.readouterr().err


def test_mmap_views_read_back_every_tensor(tmp_path):
  tensors = {"a.kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "b.bias": np.float32([-1.5, 2.25]),
             "c.ids": np.arange(5, dtype=np.int64)}
  write_tensors(str(tmp_path), tensors.items())
  got = checkpoint_read.read_mmap_views(str(tmp_path / "model.safetensors"))
  assert set(got) == set(tensors)
  for name, want in tensors.items():
    assert got[name].dtype == want.dtype and np.array_equal(got[name], want)


def test_orbax_variants_restore_the_same_tree(tmp_path):
  tree = {"w": np.random.default_rng(0).standard_normal((64, 32), dtype=np.float32), "b": np.float32([1, 2, 3])}
  for i, kw in enumerate([{}, dict(compression=False), dict(compression=False, zarr3=True),
                          dict(compression=False, ocdbt=False)]):
    checkpoint_read.save_orbax(str(tmp_path / str(i)), tree, **kw)
    got = checkpoint_read.restore_orbax(str(tmp_path / str(i)), concurrent_gb=1)
    assert np.array_equal(got["w"], tree["w"]) and np.array_equal(got["b"], tree["b"])


@pytest.mark.slow
def test_quick_run_has_every_section(tmp_path):
  out = tmp_path / "bench.json"
  bench.main(["--quick", "--out", str(out)])
  result = json.loads(out.read_text())
  assert {r["section"] for r in result["rows"]} == set(bench.SECTIONS)
  generate = [r for r in result["rows"] if r["section"] == "generate"]
  assert len(generate) == 4  # tiny LM and VLM at batch 1 and 2
  assert all("(!)" not in r["note"] for r in generate)  # greedy tokens agree with hf.generate


def test_tensorstore_reads_orbax_arrays_into_buffers(tmp_path):
  tree = {"embed": {"embedding": np.arange(24, dtype=np.float32).reshape(6, 4)}, "norm": np.float32([0.5, -2])}
  checkpoint_read.save_orbax(str(tmp_path / "p"), tree, compression=False)
  stores = checkpoint_read.open_arrays(str(tmp_path / "p"))
  buffers = {name: np.zeros(s.shape, s.dtype.numpy_dtype) for name, s in stores.items()}
  checkpoint_read.read_into(stores, buffers)
  assert sorted(buffers) == ["embed.embedding", "norm"]
  assert np.array_equal(buffers["embed.embedding"], tree["embed"]["embedding"])
  assert np.array_equal(buffers["norm"], tree["norm"])
