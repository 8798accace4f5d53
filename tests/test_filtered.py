"""A filtered subset keeps every field of the records it copies: the image code grids of a
Synth² pairs set round-trip, a set of images keeps no `codes` field."""

import numpy as np
import pytest

from vlm_jax.data import builders, filtered, rendering
from vlm_jax.data import sources as sources_lib
from vlm_jax.data import synthetic_pairs as sp

T, K = 4, 16  # code grid length and codebook size


def codes_of(index: int) -> np.ndarray:
  """Codes that name their pair: pair n holds (3n, 3n+1, 3n+2, 3n+3) mod K."""
  return ((3 * index + np.arange(T)) % K).astype(np.int32)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  """A finished synthetic pairs set of 6 (caption, codes) pairs and its data_dir."""
  root = tmp_path_factory.mktemp("pairs")
  w = sp.SyntheticPairsWriter(str(root / "pairs"), 6, 4, num_tokens=T, codebook_size=K, fingerprint="vq-test")
  for c in w.pending():
    ids = w.chunk_ids(c)
    n = [int(i.rsplit("-", 1)[1]) for i in ids]
    w.write(c, [f"caption {i}" for i in n], np.stack([codes_of(i) for i in n]))
  data_dir = str(root / "data")
  return sp.build_synthetic_pairs(data_dir, str(root / "pairs")), data_dir


def records_of(builder) -> list:
  src = sources_lib.open_source(sources_lib.Source(builder=builder))
  return [rendering.parse_record(src[i]) for i in range(len(src))]


def test_a_filtered_code_set_keeps_its_codes(pairs, tmp_path):
  synth, data_dir = pairs
  name = f"{synth.name}/{synth.builder_config.name}"
  assert filtered.code_length(dict(name=name, split="train", data_dir=data_dir)) == T
  kept = ["synth-4", "synth-1", "synth-5"]
  b = filtered.build_filtered(dict(name=name, split="train"), kept, str(tmp_path / "out"), source_data_dir=data_dir)
  got = records_of(b)
  assert [r.id for r in got] == ["synth-1", "synth-4", "synth-5"]  # source order
  for r in got:
    i = int(r.id.rsplit("-", 1)[1])
    assert r.images == [] and len(r.codes) == 1
    np.testing.assert_array_equal(r.codes[0], codes_of(i))
    assert r.turns == [("user", "<image>"), ("assistant", f"caption {i}")]
  # Reopened by name, as a config's data.sources would name it.
  again = sources_lib.open_source(sources_lib.Source(name=f"{b.name}/{b.builder_config.name}"), str(tmp_path / "out"))
  np.testing.assert_array_equal(np.stack([again[i]["codes"][0] for i in range(len(again))]),
                                np.stack([codes_of(i) for i in (1, 4, 5)]))


def test_a_filtered_image_set_has_no_codes_field(tmp_path):
  data_dir = str(tmp_path / "data")
  real = builders.build_shapes_world(data_dir, "caption", sizes={"train": 4}, image_size=16, max_objects=1)
  name = f"{real.name}/{real.builder_config.name}"
  assert filtered.code_length(dict(name=name, split="train", data_dir=data_dir)) == 0
  b = filtered.build_filtered(dict(name=name, split="train", data_dir=data_dir), ["shapes/caption/train/000002"],
                              str(tmp_path / "out"))
  assert "codes" not in b.info.features
  (rec,) = records_of(b)
  source = sources_lib.open_source(sources_lib.Source(builder=real))
  assert rec.images[0] == rendering.parse_record(source[2]).images[0]  # byte for byte
