"""Tokenizers: train a small byte-level BPE, or load any Hugging Face tokenizer folder.

    tok = train_bpe(texts, vocab_size=512, folder="/tmp/tok")     # <image> gets id 511
    tok, image_token_id = load_tokenizer("/tmp/tok")                # any HF folder, offline
    tok = shapes_world_tokenizer("/tmp/tok", vocab_size=512)        # the shapes world's own

Special tokens of a trained tokenizer: `<pad>` = 0, `<s>` = 1 (BOS), `</s>` = 2 (EOS)
and `<image>` = vocab_size - 1, the id the VLM presets use for image tokens
(`configs/models.py`: tiny has vocab 512 and image_token_id 511). The tokenizer
adds no special tokens by itself (no post-processor): the input pipeline places
BOS / EOS where the rendering rules say (`vlm_jax.data.rendering.render`).

How `<image>` lands on vocab_size - 1: the BPE trainer is asked for
vocab_size - 1 entries (3 specials + 256 byte symbols + merges). A small corpus
may not supply that many merges; the vocabulary is then topped up with
`<unused_K>` entries that no merge can ever produce (so they are never emitted
and never match text), until it holds exactly vocab_size - 1 entries. `<image>`
is then added as a special token and takes the next id, vocab_size - 1. The
result is checked, and the folder written by `save_pretrained` (tokenizer.json
+ tokenizer_config.json) reloads with `AutoTokenizer.from_pretrained(folder)`
with no network.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Iterable, Iterator, Optional, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlm_jax.data import shapes_world

IMAGE_TOKEN = "<image>"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)          # ids 0, 1, 2
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256 + 1  # specials + byte alphabet + <image>

log = logging.getLogger(__name__)


def train_bpe(texts: Iterable[str], vocab_size: int, folder: str):
  """Trains a byte-level BPE on `texts` and saves it as a Hugging Face tokenizer folder.

  Returns the `PreTrainedTokenizerFast` (as `AutoTokenizer.from_pretrained(folder)`
  would load it). `<pad>`=0, `<s>`=1, `</s>`=2, `<image>`=vocab_size-1 (see the
  module docstring for how); `len(tokenizer) == vocab_size`.
  """
  if vocab_size < _MIN_VOCAB:
    raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} for a byte-level BPE "
                     f"(3 special tokens + 256 bytes + <image>), got {vocab_size}")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(_strings(texts), trainer)
  tok = _top_up(tok, vocab_size - 1)
  tok.add_special_tokens([IMAGE_TOKEN])
  for token, want in ((PAD, 0), (BOS, 1), (EOS, 2), (IMAGE_TOKEN, vocab_size - 1)):
    got = tok.token_to_id(token)
    if got != want:  # a broken invariant of this function, not a user error
      raise AssertionError(f"{token} got id {got}, expected {want}")
  if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
    raise AssertionError(f"vocabulary holds {tok.get_vocab_size(with_added_tokens=True)} "
                         f"entries, expected {vocab_size}")
  return _save(tok, folder)


def _strings(texts: Iterable[str]) -> Iterator[str]:
  for t in texts:
    if isinstance(t, bytes):
      t = t.decode("utf-8")
    # <image> is a placeholder, never text the model reads.
    yield t.replace(IMAGE_TOKEN, " ")


def _top_up(tok, size: int):
  """Pads a trained BPE vocabulary with unreachable `<unused_K>` entries up to `size`."""
  missing = size - tok.get_vocab_size(with_added_tokens=True)
  if missing <= 0:
    return tok
  spec = json.loads(tok.to_str())
  vocab = spec["model"]["vocab"]
  next_id = max(vocab.values()) + 1
  k = 0
  while missing:
    name = f"<unused_{k}>"
    k += 1
    if name not in vocab:
      vocab[name] = next_id
      next_id += 1
      missing -= 1
  return Tokenizer.from_str(json.dumps(spec))


def _save(tok, folder: str):
  from transformers import PreTrainedTokenizerFast  # heavy: only saving and loading need it

  hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                               additional_special_tokens=[IMAGE_TOKEN])
  os.makedirs(folder, exist_ok=True)
  hf.save_pretrained(folder)
  return hf


def load_tokenizer(folder: str, image_token: str = IMAGE_TOKEN):
  """Loads any Hugging Face tokenizer folder (offline) -> (tokenizer, image_token_id).

  If `image_token` is not in the vocabulary it is added as a special token, with
  a warning: the model's embedding table must cover the new id (resize it, or
  set the model's `image_token_id` >= its vocab size, which the VLM maps to a
  dummy embedding before splicing the image features in).
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
  tokenizer = _from_pretrained(folder)
  image_id = _token_id(tokenizer, image_token)
  if image_id is None:
    try:  # transformers 5
      tokenizer.add_special_tokens({"extra_special_tokens": [image_token]},
                                   replace_extra_special_tokens=False)
    except (TypeError, ValueError, KeyError):  # transformers 4
      tokenizer.add_special_tokens({"additional_special_tokens": [image_token]},
                                   replace_additional_special_tokens=False)
    image_id = _token_id(tokenizer, image_token)
    log.warning("tokenizer in %s had no %r token: added it with id %d (tokenizer size now %d); "
                "the model's embedding must cover id %d", folder, image_token, image_id,
                len(tokenizer), image_id)
  return tokenizer, image_id


# Folders these classes saved load without AutoTokenizer (whose import pulls in torch).
_PLAIN_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _from_pretrained(folder: str):
  config_path = os.path.join(folder, "tokenizer_config.json")
  tokenizer_class = None
  if os.path.isfile(config_path) and os.path.isfile(os.path.join(folder, "tokenizer.json")):
    with open(config_path) as f:
      tokenizer_class = json.load(f).get("tokenizer_class")
  if tokenizer_class in _PLAIN_FAST:
    from transformers import PreTrainedTokenizerFast  # heavy: only loading needs it
    return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
  from transformers import AutoTokenizer  # heavy (pulls in torch): only other folders need it
  return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _token_id(tokenizer, token: str) -> Optional[int]:
  """The id of `token` if it is a single vocabulary entry, else None."""
  vocab = tokenizer.get_vocab()
  return vocab.get(token)


# --- The shapes world's tokenizer -------------------------------------------


def shapes_world_tokenizer(folder: str, vocab_size: int = 512, corpus: Optional[Iterable[str]] = None,
                           num_examples: int = 2000, seed: int = 0):
  """The tokenizer for the shapes world, trained once and then reused from `folder`.

  If `folder` already holds a tokenizer of `vocab_size` whose `<image>` is
  vocab_size - 1, it is loaded. Otherwise a byte-level BPE is trained on
  `corpus` if given, else on the text of `num_examples` records of the shapes
  world generator (`vlm_jax.data.shapes_world.records`, spread over its caption,
  vqa, region, interleaved, text_qa and text_corpus tasks, train split).
  """
  if os.path.isfile(os.path.join(folder, "tokenizer.json")):
    tokenizer, image_id = load_tokenizer(folder)
    if len(tokenizer) == vocab_size and image_id == vocab_size - 1:
      return tokenizer
    log.warning("tokenizer in %s has size %d / image id %d, not %d / %d: retraining",
                folder, len(tokenizer), image_id, vocab_size, vocab_size - 1)
  if corpus is None:
    corpus = _shapes_world_texts(num_examples, seed)
  return train_bpe(corpus, vocab_size, folder)


def _record_texts(record) -> list[str]:
  """The turn contents of a record (schema dict: turns as a list of dicts or a dict of lists)."""
  turns = record.get("turns", []) if isinstance(record, dict) else []
  if isinstance(turns, dict):
    contents = list(turns.get("content", []))
  else:
    contents = [t.get("content", "") for t in turns]
  return [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in contents]


SHAPES_WORLD_TEXT_TASKS = ("caption", "vqa", "region", "interleaved", "text_qa", "text_corpus")


def _shapes_world_texts(num_examples: int, seed: int) -> list[str]:
  """Turn texts of `num_examples` train records of the shapes world, spread over its text-bearing
  tasks (`shapes_world.records(task, "train", n, seed=seed)`)."""
  per_task = max(1, num_examples // len(SHAPES_WORLD_TEXT_TASKS))
  texts = []
  for task in SHAPES_WORLD_TEXT_TASKS:
    texts.extend(t for r in shapes_world.records(task, "train", per_task, seed=seed) for t in _record_texts(r))
  return texts


def builtin_corpus(n: int = 3000, seed: int = 0) -> list[str]:
  """Sentences about coloured shapes on a canvas (captions, questions, answers, facts)."""
  rng = random.Random(seed)
  colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink",
             "brown", "gray"]
  shapes = ["circle", "square", "triangle", "star", "rectangle", "ellipse", "diamond", "cross",
            "hexagon", "heart"]
  sizes = ["small", "large", "medium", "tiny", "big"]
  relations = ["left of", "right of", "above", "below", "next to", "far from"]
  numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
  out = []
  for _ in range(n):
    c1, c2 = rng.choice(colours), rng.choice(colours)
    s1, s2 = rng.choice(shapes), rng.choice(shapes)
    k = rng.randrange(len(numbers))
    form = rng.randrange(9)
    if form == 0:
      out.append(f"A {rng.choice(sizes)} {c1} {s1} is {rng.choice(relations)} a {c2} {s2}.")
    elif form == 1:
      out.append(f"How many {s1}s are there? {numbers[k].capitalize()}. There are {k} {s1}s.")
    elif form == 2:
      out.append(f"What colour is the {s1}? It is {c1}.")
    elif form == 3:
      out.append(f"What shape is {rng.choice(relations)} the {c1} {s1}? The {s2}.")
    elif form == 4:
      out.append(f"Is the {c1} {s1} {rng.choice(relations)} the {c2} {s2}? {rng.choice(['Yes', 'No'])}.")
    elif form == 5:
      x0, y0 = rng.randrange(100), rng.randrange(100)
      out.append(f"The {c1} {s1} in the box [{x0}, {y0}, {x0 + rng.randrange(1, 30)}, "
                 f"{y0 + rng.randrange(1, 30)}] is {rng.choice(sizes)}.")
    elif form == 6:
      out.append(f"A {s1} has {rng.randrange(3, 9)} corners. {k} plus {k} is {2 * k}.")
    elif form == 7:
      out.append(f"The picture shows {numbers[k]} {c1} {s1}s and a {c2} {s2} on a "
                 f"{rng.choice(colours)} background.")
    else:
      out.append(f"In the first image the {s1} is {c1}; in the second image it is {c2}.")
  return out


def special_ids(tokenizer) -> dict[str, Optional[int]]:
  """{'pad', 'bos', 'eos'} ids of a Hugging Face tokenizer (None where it has none)."""
  return {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}


__all__: Sequence[str] = ("IMAGE_TOKEN", "train_bpe", "load_tokenizer", "shapes_world_tokenizer",
                          "builtin_corpus", "special_ids")
