"""How a record becomes tokens: the chat template, text encoding and rendering.

    from vlm_jax.data import rendering
    rec = rendering.parse_record(tfds_record)   # bytes / turns as a dict of lists -> Record
    ids, mask, n_images = rendering.render(rec, tok, tokens_per_image=16, image_token_id=511)
    ids, mask, n_images = rendering.truncate_tokens(ids, mask, 256, 511, 16)  # cut to 256

Rendering (`render`; see schema.py for the record kinds):
  - BOS first (when the tokenizer has one); then, by role:
  - user       `template.user` with {content} replaced ("USER: {content}\\nASSISTANT:");
               not a target. Every "<image>" in it becomes `tokens_per_image` image tokens.
  - assistant  `template.assistant` with {content} (" {content}"), then EOS: all targets.
               A user turn that follows an assistant turn is preceded by `template.separator`.
  - text       the content, every token a target except image tokens; EOS (a target)
               closes a record that ends with a text turn (interleaved documents, corpora).
  - caption    kind "caption" uses no chat template: BOS, the user content (normally just
               "<image>"), `template.caption_prompt` (optional fixed prompt, not a target),
               then the caption and EOS as targets.
  - `template.system` (optional) follows BOS in non-caption records, not a target.
  EOS is the tokenizer's eos id (never the text "</s>"); image tokens are never targets.

An image given as a code grid (a record's `codes`, schema.py) stands where its "<image>"
does, exactly like an encoded one.

A record that must not be trained on raises `BadRecord` (vlm_jax.data.preprocess) with
the reason the input pipeline counts it under: malformed_record (also: images and codes
in one record), empty_target, image_count_mismatch, missing_image (a caption without an
image), and too_long from `truncate_tokens` when no target token survives the cut.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence, Union

import numpy as np
from tokenizers import Tokenizer

from vlm_jax.data import schema
from vlm_jax.data.preprocess import BadRecord


# --- Chat template and text encoding -----------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How conversation turns become text (see the module docstring)."""
  user: str = "USER: {content}\nASSISTANT:"
  assistant: str = " {content}"
  separator: str = "\n"
  system: str = ""
  caption_prompt: str = ""

  def __post_init__(self):
    for name in ("user", "assistant"):
      if getattr(self, name).count("{content}") != 1:
        raise ValueError(f"chat template `{name}` must hold '{{content}}' exactly once, "
                         f"got {getattr(self, name)!r}")

  @classmethod
  def make(cls, template: Union[None, "ChatTemplate", Mapping[str, str]]) -> "ChatTemplate":
    if template is None:
      return cls()
    if isinstance(template, cls):
      return template
    fields = template.to_dict() if hasattr(template, "to_dict") else dict(template)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"unknown chat template key(s) {unknown}; known: {sorted(known)}")
    return cls(**fields)


class TextEncoder:
  """Encodes text pieces with no special tokens added; safe to call from several threads.

  Wraps a Hugging Face tokenizer: a fast one is used through its `tokenizers`
  backend (a copy without truncation or padding if the original has any).
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.bos_id = tokenizer.bos_token_id
    self.eos_id = tokenizer.eos_token_id
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if self.eos_id is None:
      raise ValueError("the tokenizer has no EOS token; the pipeline needs one to end targets")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and (backend.truncation is not None or backend.padding is not None):
      backend = Tokenizer.from_str(backend.to_str())
      backend.no_truncation()
      backend.no_padding()
    self._backend = backend

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    if self._backend is not None:
      return [self._backend.encode(t, add_special_tokens=False).ids if t else [] for t in texts]
    return [self.tokenizer.encode(t, add_special_tokens=False) if t else [] for t in texts]


# --- Records ----------------------------------------------------------------


@dataclasses.dataclass
class Record:
  """A schema record with text decoded: turns as (role, content) pairs, images still encoded
  (or given as code grids, `codes`: int32 [T] arrays)."""
  id: str
  kind: str
  images: list
  turns: list[tuple[str, str]]
  meta: str = ""
  codes: list = dataclasses.field(default_factory=list)

  @property
  def num_images(self) -> int:
    """The images the text refers to, given as pixels or as codes."""
    return len(self.images) + len(self.codes)


def _text(x) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return _text(x.item())
  return "" if x is None else str(x)


def parse_record(record: Union[Record, Mapping[str, Any]]) -> Record:
  """A record as TFDS decodes it (bytes, turns as a dict of lists) or as plain Python
  (str, turns as a list of {role, content}) -> Record."""
  if isinstance(record, Record):
    return record
  turns = record.get("turns", [])
  if isinstance(turns, Mapping):
    roles, contents = list(turns.get("role", [])), list(turns.get("content", []))
    if len(roles) != len(contents):
      raise BadRecord("malformed_record", f"{len(roles)} roles but {len(contents)} contents")
    pairs = [(_text(r), _text(c)) for r, c in zip(roles, contents)]
  else:
    pairs = [(_text(t["role"]), _text(t["content"])) for t in turns]
  images = record.get("images", [])
  images = [] if images is None else list(images)
  codes = record.get("codes", [])
  codes = [] if codes is None else [np.asarray(c) for c in codes]
  return Record(id=_text(record.get("id", "")), kind=_text(record.get("kind", "")), images=images,
                turns=pairs, meta=_text(record.get("meta", "")), codes=codes)


# --- Rendering --------------------------------------------------------------

_BOS, _EOS, _IMG, _TXT = range(4)


def _with_images(segments: list, text: str, target: bool) -> int:
  """Appends `text` split at "<image>" placeholders; returns the number of placeholders."""
  parts = text.split(schema.IMAGE_PLACEHOLDER)
  for j, part in enumerate(parts):
    if j:
      segments.append((_IMG, None, False))
    if part:
      segments.append((_TXT, part, target))
  return len(parts) - 1


def _segments(rec: Record, template: ChatTemplate) -> tuple[list, int]:
  """Record -> [(kind, text, is_target)], number of image placeholders."""
  if rec.kind not in schema.KINDS:
    raise BadRecord("malformed_record", f"unknown kind {rec.kind!r}")
  if not rec.turns:
    raise BadRecord("malformed_record", "no turns")
  for role, content in rec.turns:
    if role not in schema.ROLES:
      raise BadRecord("malformed_record", f"unknown role {role!r}")
    if role == "assistant" and schema.IMAGE_PLACEHOLDER in content:
      raise BadRecord("malformed_record", "<image> in an assistant turn")
    if role == "assistant" and not content.strip():
      raise BadRecord("empty_target", "empty assistant turn" if rec.kind != "caption" else "empty caption")
    if role == "text" and not content.replace(schema.IMAGE_PLACEHOLDER, "").strip():
      raise BadRecord("empty_target", "text turn without text")

  segs: list = [(_BOS, None, False)]
  n = 0
  if rec.kind == "caption":
    answers = [c for r, c in rec.turns if r == "assistant"]
    if len(answers) != 1 or any(r == "text" for r, _ in rec.turns):
      raise BadRecord("malformed_record", "a caption record needs user turn(s) and one assistant turn")
    for role, content in rec.turns:
      if role == "user":
        n += _with_images(segs, content, False)
      else:
        if template.caption_prompt:
          segs.append((_TXT, template.caption_prompt, False))
        segs.append((_TXT, content, True))
        segs.append((_EOS, None, True))
    return segs, n

  if template.system:
    segs.append((_TXT, template.system, False))
  u_before, u_after = template.user.split("{content}")
  a_before, a_after = template.assistant.split("{content}")
  previous = None
  for role, content in rec.turns:
    if role == "user":
      if previous == "assistant" and template.separator:
        segs.append((_TXT, template.separator, False))
      if u_before:
        segs.append((_TXT, u_before, False))
      n += _with_images(segs, content, False)
      if u_after:
        segs.append((_TXT, u_after, False))
    elif role == "assistant":
      segs.append((_TXT, a_before + content + a_after, True))
      segs.append((_EOS, None, True))
    else:  # text
      n += _with_images(segs, content, True)
    previous = role
  if previous == "text":
    segs.append((_EOS, None, True))
  return segs, n


def render(record, tokenizer, tokens_per_image: int, image_token_id: int,
           chat_template: Union[None, ChatTemplate, Mapping[str, str]] = None
           ) -> tuple[np.ndarray, np.ndarray, int]:
  """One record -> (input_ids int32 [n], loss_mask float32 [n], num_images).

  `tokenizer`: a Hugging Face tokenizer (or a TextEncoder). Placeholders are
  expanded to `tokens_per_image` copies of `image_token_id`; loss_mask is 1
  exactly on target tokens (see the module docstring). Raises BadRecord when
  the record is malformed, has an empty target, or its placeholders do not match
  its images.
  """
  rec = parse_record(record)
  enc = tokenizer if isinstance(tokenizer, TextEncoder) else TextEncoder(tokenizer)
  segs, n_placeholders = _segments(rec, ChatTemplate.make(chat_template))
  if rec.images and rec.codes:
    raise BadRecord("malformed_record", "a record holds images or codes, not both")
  if rec.kind == "caption" and not rec.num_images:
    raise BadRecord("missing_image", "caption record without an image")
  if n_placeholders != rec.num_images:
    raise BadRecord("image_count_mismatch",
                    f"{n_placeholders} <image> placeholder(s) but {rec.num_images} image(s)")
  encoded = iter(enc.encode([text for kind, text, _ in segs if kind == _TXT]))
  ids: list[int] = []
  mask: list[float] = []
  for kind, _, target in segs:
    if kind == _TXT:
      piece = next(encoded)
    elif kind == _IMG:
      ids.extend([image_token_id] * tokens_per_image)
      mask.extend([0.0] * tokens_per_image)
      continue
    elif kind == _BOS:
      if enc.bos_id is None:
        continue
      piece = [enc.bos_id]
    else:
      piece = [enc.eos_id]
    ids.extend(piece)
    mask.extend([1.0 if target else 0.0] * len(piece))
  if not any(mask):
    raise BadRecord("empty_target", "no target tokens")
  return np.asarray(ids, np.int32), np.asarray(mask, np.float32), n_placeholders


def truncate_tokens(ids: np.ndarray, mask: np.ndarray, seq_len: int, image_token_id: int,
                    tokens_per_image: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Cuts a rendered record to at most seq_len tokens, never inside an image's token run.

  Returns (ids, mask, images kept). Raises BadRecord("too_long") if no target survives.
  """
  cut = seq_len
  starts = np.flatnonzero(ids == image_token_id)[::tokens_per_image]  # image k starts here
  inside = starts[(starts < cut) & (starts + tokens_per_image > cut)]
  if inside.size:
    cut = int(inside[0])
  ids, mask = ids[:cut], mask[:cut]
  if not mask.any():
    raise BadRecord("too_long", f"no target token in the first {seq_len} tokens")
  return ids, mask, int(np.sum(starts + tokens_per_image <= cut))
