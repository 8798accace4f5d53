"""Tokenizers: byte-level BPE training, offline reload, the <image> token id."""

import logging
import os

import pytest

from vlm_jax.data import tokenizer as tokenizers_lib

CORPUS = tokenizers_lib.builtin_corpus(400)
TEXT = "A small red circle is left of a blue square. How many? Three. ünïcode ✓"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tok"))
  return folder, tokenizers_lib.train_bpe(CORPUS, 512, folder)


def test_special_token_ids(trained):
  _, tok = trained
  assert len(tok) == 512
  assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<image>"]) == [0, 1, 2, 511]
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  assert tok.encode("<image>", add_special_tokens=False) == [511]
  # No special token is added implicitly: the pipeline places BOS / EOS itself.
  assert tok.encode("a red circle") == tok.encode("a red circle", add_special_tokens=False)


def test_round_trip_offline_through_autotokenizer(trained):
  folder, tok = trained
  assert os.environ.get("HF_HUB_OFFLINE") == "1"
  from transformers import AutoTokenizer
  reloaded = AutoTokenizer.from_pretrained(folder)
  ids = reloaded.encode(TEXT, add_special_tokens=False)
  assert ids == tok.encode(TEXT, add_special_tokens=False)
  assert reloaded.decode(ids) == TEXT  # byte-level: any text round-trips
  assert len(reloaded) == 512 and reloaded.convert_tokens_to_ids("<image>") == 511
  assert reloaded.decode([1, 511, 2], skip_special_tokens=True) == ""


def test_small_corpus_is_topped_up_to_put_image_last(tmp_path):
  tok = tokenizers_lib.train_bpe(["ab ab"], 300, str(tmp_path))
  assert len(tok) == 300 and tok.convert_tokens_to_ids("<image>") == 299
  # The filler entries are unreachable: no text ever encodes to them.
  filler = {i for t, i in tok.get_vocab().items() if t.startswith("<unused_")}
  assert filler and not filler & set(tok.encode(TEXT + " <unused_0> " + "ab" * 20, add_special_tokens=False))
  reloaded, image_id = tokenizers_lib.load_tokenizer(str(tmp_path))
  assert image_id == 299 and len(reloaded) == 300


def test_vocab_too_small(tmp_path):
  with pytest.raises(ValueError, match="at least 260"):
    tokenizers_lib.train_bpe(CORPUS, 100, str(tmp_path))


def test_load_tokenizer_keeps_existing_image_token(trained, caplog):
  folder, _ = trained
  with caplog.at_level(logging.WARNING):
    tok, image_id = tokenizers_lib.load_tokenizer(folder)
  assert image_id == 511 and len(tok) == 512
  assert not caplog.records


def test_load_tokenizer_adds_missing_image_token(tmp_path, caplog):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    tok, image_id = tokenizers_lib.load_tokenizer(str(tmp_path))
  assert image_id == 300 and len(tok) == 301
  assert tok.encode("x <image>", add_special_tokens=False)[-1] == 300
  assert any("embedding must cover id 300" in r.getMessage() for r in caplog.records)


def test_load_tokenizer_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError):
    tokenizers_lib.load_tokenizer(str(tmp_path / "nope"))


def test_shapes_world_tokenizer_trains_then_reuses(tmp_path):
  folder = str(tmp_path / "sw")
  tok = tokenizers_lib.shapes_world_tokenizer(folder, vocab_size=512, num_examples=300)
  assert len(tok) == 512 and tok.convert_tokens_to_ids("<image>") == 511
  # Trained on the world's words: they are single tokens.
  assert len(tok.tokenize("a large red circle")) == 4
  stamp = os.path.getmtime(os.path.join(folder, "tokenizer.json"))
  again = tokenizers_lib.shapes_world_tokenizer(folder, vocab_size=512)
  assert os.path.getmtime(os.path.join(folder, "tokenizer.json")) == stamp  # reused, not retrained
  assert again.encode(TEXT) == tok.encode(TEXT)


def test_shapes_world_tokenizer_on_given_corpus(tmp_path):
  tok = tokenizers_lib.shapes_world_tokenizer(str(tmp_path), vocab_size=400, corpus=["zebra " * 50])
  assert len(tok) == 400 and tok.convert_tokens_to_ids("<image>") == 399
  assert tok.tokenize("zebra") == ["zebra"]
