"""How `params` is stored and read back (vlm_jax.train.checkpoint): uncompressed for new
checkpoints, zstd ones still read; reads into reused buffers; checksums on both formats;
a streamed soup's peak memory."""

import json
import os
import subprocess
import sys
import textwrap
import zlib

import google_crc32c
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from vlm_jax.train import checkpoint
from vlm_jax.train.checkpoint import CheckpointCorrupt, CheckpointMismatch, read_params, save_params

F32, BF16 = np.float32, ml_dtypes.bfloat16


def tree(seed, rows=6, dtype=F32):
  r = np.random.default_rng(seed)
  return {"lm": {"embed": {"embedding": r.normal(size=(rows, 4)).astype(dtype)},
                 "layers_0": {"q": {"kernel": r.normal(size=(4, 4)).astype(dtype)}}},
          "proj": {"bias": r.normal(size=(3,)).astype(BF16)}}


def assert_same(got, want):
  flat_got, flat_want = checkpoint.traverse_util.flatten_dict(got), checkpoint.traverse_util.flatten_dict(want)
  assert sorted(flat_got) == sorted(flat_want)
  for k, x in flat_want.items():
    assert flat_got[k].dtype == x.dtype and np.array_equal(flat_got[k], x), k


def save_compressed_the_old_way(workdir, params, step=1):
  """A checkpoint as the stack wrote them before: every item through Orbax's defaults (zstd)."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=checkpoint.ITEMS,
                                  options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True))
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             train=ocp.args.StandardSave({"step": np.int32(step)}),
                                             data=ocp.args.JsonSave({})))
  manager.wait_until_finished()
  manager.close()
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  with open(os.path.join(step_dir, checkpoint.CHECKSUMS), "w") as f:  # zlib's CRC32, bare hex, as then
    json.dump({name: f"{zlib.crc32(open(os.path.join(step_dir, name), 'rb').read()):08x}"
               for name in checkpoint._files(step_dir)}, f)
  return str(workdir)


def compressor(workdir, item, name, step=1):
  """The zarr codec of one stored array (None: raw bytes), in an OCDBT item or a plain one."""
  base = os.path.join(workdir, "checkpoints", str(step), item)
  kvstore = ({"driver": "ocdbt", "base": f"file://{base}/", "path": name}
             if os.path.exists(os.path.join(base, "manifest.ocdbt")) else {"driver": "file", "path": f"{base}/{name}/"})
  return ts.open({"driver": "zarr", "kvstore": kvstore}).result().spec().to_json()["metadata"]["compressor"]


def test_new_checkpoints_store_params_raw_and_the_train_state_compressed(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1, asynchronous=False)
  ckpt.save(1, tree(0), {"mu": np.ones((64, 64), F32)}, {})
  ckpt.close()
  assert compressor(tmp_path, "params", "lm.embed.embedding") is None
  raw = tmp_path / "checkpoints" / "1" / "params" / "lm.embed.embedding" / "0.0"  # one file, the array's bytes
  assert raw.read_bytes() == tree(0)["lm"]["embed"]["embedding"].tobytes()
  assert compressor(tmp_path, "train", "mu")["id"] == "zstd"
  assert "OCDBT" not in caplog.text  # no warning that the raw `params` has no OCDBT to merge


def test_reads_into_reused_buffers_equal_fresh_reads(tmp_path):
  a, b = tree(0), tree(1)
  save_params(str(tmp_path / "a"), a)
  save_params(str(tmp_path / "b"), b)
  out = read_params(str(tmp_path / "a"))
  assert_same(out, a)
  kernel = out["lm"]["layers_0"]["q"]["kernel"]
  again = read_params(str(tmp_path / "b"), out=out)
  assert again["lm"]["layers_0"]["q"]["kernel"] is kernel  # read in place: no new arrays
  assert_same(again, b)
  assert_same(read_params(str(tmp_path / "b")), again)


def test_another_model_is_refused_before_the_buffers_change(tmp_path):
  save_params(str(tmp_path / "a"), tree(0))
  save_params(str(tmp_path / "wide"), tree(1, rows=8))
  save_params(str(tmp_path / "bf16"), tree(1, dtype=BF16))
  out = read_params(str(tmp_path / "a"))
  with pytest.raises(CheckpointMismatch, match=r"parameter 'lm/embed/embedding' is \(8, 4\) float32 there "
                                               r"and \(6, 4\) float32 in `out`"):
    read_params(str(tmp_path / "wide"), out=out)
  with pytest.raises(CheckpointMismatch, match=r"'lm/embed/embedding' is \(6, 4\) bfloat16 there"):
    read_params(str(tmp_path / "bf16"), out=out)
  extra = {**out, "head": np.zeros(2, F32)}
  with pytest.raises(CheckpointMismatch, match=r"parameter 'head' is missing there and \(2,\) float32 in `out`"):
    read_params(str(tmp_path / "a"), out=extra)
  assert_same(out, tree(0))  # untouched
  frozen = dict(out, proj={"bias": np.broadcast_to(out["proj"]["bias"][:1], (3,))})
  with pytest.raises(ValueError, match="writable, C-contiguous"):
    read_params(str(tmp_path / "a"), out=frozen)


def test_old_compressed_checkpoints_still_read_and_are_checked(tmp_path):
  old = save_compressed_the_old_way(tmp_path / "old", tree(2))
  assert compressor(old, "params", "lm.embed.embedding")["id"] == "zstd"
  assert_same(read_params(old), tree(2))
  save_params(str(tmp_path / "new"), tree(3))
  out = read_params(str(tmp_path / "new"))
  assert_same(read_params(old, out=out), tree(2))  # an old checkpoint into a new one's buffers
  abstract = {k: v for k, v in tree(2).items()}
  assert_same(checkpoint.restore_params(old, abstract), tree(2))


def test_new_steps_record_each_file_s_crc32c(tmp_path):
  """The recorded value is the file's CRC32C (an independent computation), named as such."""
  save_params(str(tmp_path), tree(5), step=1)
  step_dir = os.path.join(tmp_path, "checkpoints", "1")
  sums = json.load(open(os.path.join(step_dir, checkpoint.CHECKSUMS)))
  assert any(name.startswith("params") for name in sums)
  for name, recorded in sums.items():
    data = open(os.path.join(step_dir, name), "rb").read()
    assert recorded == f"crc32c:{google_crc32c.value(data):08x}", name


@pytest.mark.parametrize("old", [False, True])
def test_flipped_bytes_are_caught_in_either_format(tmp_path, old):
  params = tree(4)
  workdir = save_compressed_the_old_way(tmp_path, params) if old else (save_params(str(tmp_path), params, step=1)
                                                                       or str(tmp_path))
  item = os.path.join(workdir, "checkpoints", "1", "params")
  biggest = max((os.path.join(r, f) for r, _, files in os.walk(item) for f in files), key=os.path.getsize)
  with open(biggest, "r+b") as f:  # same size, one byte changed
    f.seek(os.path.getsize(biggest) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x40]))
  with pytest.raises(CheckpointCorrupt, match="has changed since it was written"):
    read_params(workdir)
  out = jax.tree.map(np.zeros_like, params)
  with pytest.raises(CheckpointCorrupt, match="has changed since it was written"):
    read_params(workdir, out=out)


def test_a_streamed_soup_peaks_at_about_two_models(tmp_path):
  """Peak RSS of a fresh process reading k=4 ingredients of 32 MiB: the float32 sum and one
  ingredient (~64 MiB above what it held before), never the 128 MiB of four."""
  rows, k = 2048, 4
  for i in range(k):
    r = np.random.default_rng(i)
    save_params(str(tmp_path / f"r{i}"), {f"w{j}": r.standard_normal((rows, 1024), dtype=F32) for j in range(4)})
  model_mb = 4 * rows * 1024 * 4 / 2**20
  script = textwrap.dedent(f"""
      import json, os
      os.environ["JAX_PLATFORMS"] = "cpu"
      import numpy as np
      from vlm_jax import soups
      from vlm_jax.train.checkpoint import read_params, save_params
      runs = {[str(tmp_path / f"r{i}") for i in range(k)]!r}
      save_params({str(tmp_path / "warm")!r}, {{"w": np.ones(4, np.float32)}})
      read_params({str(tmp_path / "warm")!r})  # libraries' own first-use memory, before the baseline
      def status(field):  # MiB
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) / 1024
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS restarts from the current RSS
      before = status("VmRSS:")
      soup = soups.uniform_soup(runs)
      peak = status("VmHWM:")
      print(json.dumps(dict(before=before, peak=peak, w0=float(soup["w0"][0, 0]))))
      """)
  env = dict(os.environ, GLIBC_TUNABLES="")  # small pages: RSS counts what is touched
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 0, done.stderr[-2000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])
  want = np.mean([np.random.default_rng(i).standard_normal((rows, 1024), dtype=F32)[0, 0] for i in range(k)])
  assert got["w0"] == pytest.approx(float(want), rel=1e-6)
  grew = got["peak"] - got["before"]
  assert 1.5 * model_mb <= grew <= 2.6 * model_mb, (grew, model_mb, got)
