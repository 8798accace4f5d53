"""The shapes world: a procedural, deterministic data set of coloured shapes on a canvas.

Pure Python / NumPy / Pillow (no TensorFlow): `vlm_jax.data.builders.ShapesWorld` stores
these records through TFDS, and tests or notebooks can call the generator directly.

A scene is 1-4 non-overlapping objects on a grey canvas of `image_size` pixels. Each
object has a shape (circle, square, triangle, diamond), a colour (red, green, blue,
yellow, purple, orange) and a size (small, large). Objects keep a gap between them wide
enough for a region box around one object to touch no other object.

    records(task, split, num, seed=0, image_size=64, **options) -> iterator of records

yields plain dicts in the schema of `vlm_jax.data.schema`:

    {"id": "shapes/vqa/train/000123", "kind": "conversation",
     "images": [uint8 (H, W, 3)], "turns": [{"role": ..., "content": ...}],
     "meta": '{"answer": "red", "corrupted": false, "qtype": "color", ...}'}

Tasks and their options (every visual task also takes `antialias` (default True) and,
except `classes`, `min_objects` / `max_objects` (default 1 / 4)):

    caption      kind "caption"; one spatial relation when 2+ objects.
                 corruption_rate=0.0: exactly round(rate * num) records of the set, chosen
                 by a seeded permutation, carry the caption of another scene (meta
                 corrupted=true, caption_objects, true_caption).
    vqa          kind "conversation"; question types count, color, shape, size, spatial,
                 assigned round-robin (balanced exactly); qtypes=(...) restricts them.
    region       kind "conversation"; a white box around one object, drawn on the image
                 and written "[x0, y0, x1, y1]" (inclusive pixel corners) in the question;
                 qtypes region_color / region_shape, alternating.
    interleaved  kind "interleaved"; min_images=2, max_images=3 scenes, one text turn
                 whose sentences describe the images in order, "<image>" inline.
    text_qa      kind "text"; user/assistant exchange about the world and simple facts
                 (families=(...) restricts the question families). No image.
    text_corpus  kind "text"; one text turn of plain sentences about the world.
    classes      kind "caption", single object, 24 classes (4 shapes x 6 colours),
                 meta label / class_name; domain="standard" | "outline" | "palette" |
                 "noise" (noise_std=24.0): the same scenes rendered differently.

  Region-guidance tasks (ground-truth boxes in meta "boxes"; nothing drawn on the image):
    spatial_boxes  kind "conversation"; a spatial question (2+ objects) with both objects'
                 boxes; meta choices (left/right, above/below or yes/no).
    hard_negative  kind "caption"; two objects, "a A <relation> a B." and meta negative, the same
                 caption with exactly one word replaced: qtype attribute (a colour no object
                 has), relation (the opposite) or object (a shape no object has), round-robin.
    refer        kind "caption"; 2-4 objects, the expression "a <size> <colour> <shape>." of a
                 uniquely named one (meta target), every object's box in meta candidates.
    generated    kind "caption"; a two-object prompt and its image, drawn with a controlled
                 error for exactly round(error_rate * num) records (meta misaligned, error:
                 color_binding, relation or missing, round-robin; error_rate=0.5).

Determinism and splits: record `index` of `split` is a function of (seed, split, task,
index) only (plus num for which captions are corrupted). The splits are disjoint by
construction, not by chance: every scene (and every text question / document) is hashed
and belongs to exactly one split (80 % train, 10 % validation, 10 % test of the hash
space); a record only uses scenes of its own split. So no test image is a train image,
for any seed. text_qa test questions are therefore questions never asked in train
(other numbers, other phrasings); text_corpus covers all facts.
"""

import hashlib
import json
import math
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

# --- The world -------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {  # clearly distinct RGB values (closest pair, yellow/orange, is 83 apart)
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
COLOR_NAMES = tuple(COLORS)
SHIFTED_COLORS = {  # the "palette" domain: paler, shifted hues, each still nearest its own name
    "red": (195, 70, 95),
    "green": (75, 155, 105),
    "blue": (75, 115, 205),
    "yellow": (220, 215, 95),
    "purple": (165, 95, 185),
    "orange": (230, 145, 75),
}
SIZES = ("small", "large")
BACKGROUND = (80, 80, 80)
BOX_COLOR = (255, 255, 255)

CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOR_NAMES)  # label = shape * 6 + colour
DOMAINS = ("standard", "outline", "palette", "noise")

SPLITS = ("train", "validation", "test")
_SPLIT_BUCKETS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}  # of 100 hash buckets
# New tasks go at the end: a task's index seeds its records (`_rng`).
TASKS = ("caption", "vqa", "region", "interleaved", "text_qa", "text_corpus", "classes",
         "spatial_boxes", "hard_negative", "refer", "generated")
VQA_QTYPES = ("count", "color", "shape", "size", "spatial")
REGION_QTYPES = ("region_color", "region_shape")
TEXT_FAMILIES = ("sides", "round", "mix", "arithmetic", "bigger", "things", "list_count", "successor",
                 "left_right")

_VISUAL = ("antialias",)
_SCENES = _VISUAL + ("min_objects", "max_objects")
_OPTIONS = {
    "caption": _SCENES + ("corruption_rate",),
    "vqa": _SCENES + ("qtypes",),
    "region": _SCENES + ("qtypes",),
    "interleaved": _SCENES + ("min_images", "max_images"),
    "text_qa": ("families",),
    "text_corpus": (),
    "classes": _VISUAL + ("domain", "noise_std"),
    "spatial_boxes": _SCENES,
    "hard_negative": _VISUAL,
    "refer": _SCENES,
    "generated": _VISUAL + ("error_rate",),
}
DEFAULT_OPTIONS = {
    "antialias": True, "min_objects": 1, "max_objects": 4, "corruption_rate": 0.0,
    "qtypes": None, "min_images": 2, "max_images": 3, "families": None, "domain": "standard",
    "noise_std": 24.0, "error_rate": 0.5,
}

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
_ORDINALS = ("first", "second", "third", "fourth")
_SUPERSAMPLE = 4


def object_sizes(image_size: int) -> dict:
  """Side (pixels) of an object's bounding box per size name."""
  small = max(4, round(0.15 * image_size))
  return {"small": small, "large": max(small + 3, round(0.30 * image_size))}


def box_pad(image_size: int) -> int:
  """Pixels between an object's bounding box and the region box drawn around it."""
  return max(2, round(image_size / 32))


# --- Determinism --------------------------------------------------------------------


def _rng(seed: int, split: str, task: str, index: int, stream: int = 0) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task), index, stream])


def _bucket(key: str) -> int:
  return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % 100


def split_of(key: str) -> str:
  """The split a scene key / text key belongs to (hash partition: splits never share one)."""
  b = _bucket(key)
  return next(s for s, (lo, hi) in _SPLIT_BUCKETS.items() if lo <= b < hi)


def scene_key(objects, image_size: int) -> str:
  parts = sorted(f"{o['shape']}:{o['color']}:{o['size']}:{o['box'][0]}:{o['box'][1]}" for o in objects)
  return f"{image_size}|" + ",".join(parts)


def corrupted_indices(num: int, rate: float, seed: int, split: str) -> set:
  """Which of `num` caption records get another scene's caption: exactly round(rate*num)."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"corruption_rate must be in [0, 1], got {rate}")
  k = math.floor(rate * num + 0.5)
  perm = _rng(seed, split, "caption", 0, stream=7).permutation(num)
  return set(int(i) for i in perm[:k])


# --- Scenes ------------------------------------------------------------------------


def _make_object(shape, color, size, x0, y0, side):
  return {"shape": shape, "color": color, "size": size, "box": [x0, y0, x0 + side - 1, y0 + side - 1],
          "center": [x0 + side // 2, y0 + side // 2]}


def _apart(a, b, gap):
  (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
  return ax1 + gap < bx0 or bx1 + gap < ax0 or ay1 + gap < by0 or by1 + gap < ay0


def _sample_objects(rng, image_size, n):
  """Place n random objects without overlap; fewer when they do not fit."""
  sides, pad = object_sizes(image_size), box_pad(image_size)
  gap = pad + 2
  for n_try in range(n, 0, -1):
    for _ in range(20):
      objects = []
      for _ in range(n_try):
        shape, color = SHAPES[rng.integers(4)], COLOR_NAMES[rng.integers(6)]
        size = SIZES[rng.integers(2)]
        side = sides[size]
        hi = image_size - pad - side  # box x0 - pad >= 0, x1 + pad <= image_size - 1
        for _ in range(30):
          x0, y0 = (int(v) for v in rng.integers(pad, hi + 1, size=2))
          candidate = _make_object(shape, color, size, x0, y0, side)
          if all(_apart(candidate, o, gap) for o in objects):
            objects.append(candidate)
            break
        else:
          break
      if len(objects) == n_try:
        return objects
  raise RuntimeError(f"cannot place an object on a {image_size} px canvas")


def _scene(rng, split, image_size, min_objects=1, max_objects=4):
  """A scene whose hash belongs to `split`."""
  if not 1 <= min_objects <= max_objects:
    raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
  while True:
    objects = _sample_objects(rng, image_size, int(rng.integers(min_objects, max_objects + 1)))
    if split_of(scene_key(objects, image_size)) == split:
      return objects


# --- Rendering -----------------------------------------------------------------------


def render(objects, image_size: int = 64, *, antialias: bool = True, palette: dict = COLORS,
           outline: bool = False, boxes=()) -> np.ndarray:
  """Draw objects (and thin white boxes) on a grey canvas -> uint8 (image_size, image_size, 3).

  With antialias the shapes are drawn 4x larger and box-filtered down, so pixels wholly
  inside an object keep its exact colour. Boxes are drawn 1 px wide at the final size.
  """
  a = _SUPERSAMPLE if antialias else 1
  canvas = Image.new("RGB", (image_size * a, image_size * a), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  width = max(1, round(image_size / 24)) * a
  for o in objects:
    x0, y0, x1, y1 = o["box"]
    lx, ly, hx, hy = x0 * a, y0 * a, (x1 + 1) * a - 1, (y1 + 1) * a - 1
    mx, my = (lx + hx) / 2, (ly + hy) / 2
    rgb = palette[o["color"]]
    style = {"outline": rgb, "width": width} if outline else {"fill": rgb}
    if o["shape"] == "circle":
      draw.ellipse([lx, ly, hx, hy], **style)
    elif o["shape"] == "square":
      draw.rectangle([lx, ly, hx, hy], **style)
    elif o["shape"] == "triangle":
      draw.polygon([(lx, hy), (hx, hy), (mx, ly)], **style)
    elif o["shape"] == "diamond":
      draw.polygon([(mx, ly), (hx, my), (mx, hy), (lx, my)], **style)
    else:
      raise ValueError(f"unknown shape {o['shape']!r}")
  if a > 1:
    canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
  if boxes:
    draw = ImageDraw.Draw(canvas)
    for box in boxes:
      draw.rectangle(list(box), outline=BOX_COLOR, width=1)
  return np.asarray(canvas, dtype=np.uint8).copy()


def mask_boxes(image: np.ndarray, boxes) -> np.ndarray:
  """A copy of `image` with every [x0, y0, x1, y1] box (inclusive corners) set to black."""
  out = np.array(image, copy=True)
  h, w = out.shape[:2]
  for x0, y0, x1, y1 in boxes:
    x0, y0 = max(0, int(x0)), max(0, int(y0))
    out[y0:min(h, int(y1) + 1), x0:min(w, int(x1) + 1)] = 0
  return out


# --- Language ------------------------------------------------------------------------


def _name(o) -> str:
  return f"{o['size']} {o['color']} {o['shape']}"


def _join(items) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _relations(a, b) -> list:
  """The spatial relations that hold unambiguously of a with respect to b (boxes disjoint on that axis)."""
  rels = []
  if a["box"][2] < b["box"][0]:
    rels.append("left")
  if b["box"][2] < a["box"][0]:
    rels.append("right")
  if a["box"][3] < b["box"][1]:
    rels.append("above")
  if b["box"][3] < a["box"][1]:
    rels.append("below")
  return rels


_REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _relation(rng, objects):
  """(i, j, relation) with object i `relation` object j, preferring objects named uniquely."""
  names = [_name(o) for o in objects]
  idx = [i for i in range(len(objects)) if names.count(names[i]) == 1]
  if len(idx) < 2:
    idx = list(range(len(objects)))
  i, j = (int(v) for v in rng.choice(idx, size=2, replace=False))
  rels = _relations(objects[i], objects[j])
  return i, j, rels[rng.integers(len(rels))]


def _describe(rng, objects) -> str:
  """'a large red circle to the left of a small blue square' (no final period)."""
  names = [_name(o) for o in objects]
  if len(objects) == 1:
    return f"a {names[0]}"
  if len(objects) == 2:
    i, j, rel = _relation(rng, objects)
    other = "another" if names[i] == names[j] else "a"
    return f"a {names[i]} {_REL_PHRASE[rel]} {other} {names[j]}"
  order = rng.permutation(len(objects))
  return _join([f"a {names[k]}" for k in order])


def caption_text(rng, objects) -> str:
  """A caption naming every object (size, colour, shape) and, for 2+ objects, one relation."""
  names = [_name(o) for o in objects]
  n = len(objects)
  if n == 1:
    t = ("a {}.", "a picture of a {}.", "a single {}.", "a {} on a grey background.")
    return t[rng.integers(len(t))].format(names[0])
  i, j, rel = _relation(rng, objects)
  same = names[i] == names[j]
  if n == 2:
    b = ("another " if same else "a ") + names[j]
    t = ("a {a} {r} {b}.", "there is a {a} {r} {b}.", "two shapes: a {a} {r} {b}.")
    return t[rng.integers(len(t))].format(a=names[i], b=b, r=_REL_PHRASE[rel])
  listed = _join([f"a {names[k]}" for k in rng.permutation(n)])
  a, b = (f"one {names[i]}", "the other") if same else (f"the {names[i]}", f"the {names[j]}")
  t = ("{w} shapes: {l}. {a} is {r} {b}.", "a picture of {l}; {a} is {r} {b}.",
       "there are {w} shapes, {l}. {a} is {r} {b}.")
  return t[rng.integers(len(t))].format(w=_NUMBER_WORDS[n], l=listed, a=a, b=b, r=_REL_PHRASE[rel])


_ATTR_SUBSETS = (("shape",), ("color",), ("size",), ("color", "shape"), ("size", "shape"), ("size", "color"),
                 ("size", "color", "shape"))


def _refer(rng, objects, i, exclude=()):
  """A phrase naming object i uniquely without the attributes in `exclude` ('the red shape'), or None."""
  o = objects[i]
  for length in (1, 2, 3):
    subsets = [s for s in _ATTR_SUBSETS if len(s) == length and not set(s) & set(exclude)
               and sum(all(p[k] == o[k] for k in s) for p in objects) == 1]
    if subsets:
      s = subsets[rng.integers(len(subsets))]
      words = [o[k] for k in ("size", "color") if k in s] + [o["shape"] if "shape" in s else "shape"]
      return "the " + " ".join(words)
  return None


# --- Tasks ---------------------------------------------------------------------------


def _record(task, split, index, kind, images, turns, meta):
  meta = {"task": task, "split": split, "index": index, "corrupted": False, **meta}
  return {"id": f"shapes/{task}/{split}/{index:06d}", "kind": kind, "images": images, "turns": turns,
          "meta": json.dumps(meta, sort_keys=True)}


def _caption(split, index, num, seed, image_size, opts, corrupted):
  rng = _rng(seed, split, "caption", index)
  objects = _scene(rng, split, image_size, opts["min_objects"], opts["max_objects"])
  image = render(objects, image_size, antialias=opts["antialias"])
  caption = caption_text(rng, objects)
  meta = {"objects": objects, "caption": caption}
  if index in corrupted:  # the caption of another scene (not the same objects)
    true_names = sorted(_name(o) for o in objects)
    while True:
      other = _sample_objects(rng, image_size, int(rng.integers(opts["min_objects"], opts["max_objects"] + 1)))
      if sorted(_name(o) for o in other) != true_names:
        break
    caption = caption_text(rng, other)
    meta.update(corrupted=True, caption=caption, caption_objects=other, true_caption=meta["caption"])
  turns = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": caption}]
  return _record("caption", split, index, "caption", [image], turns, meta)


def _vqa_question(rng, objects, qtype, want=0):
  """(question, answer, target indices) or None when the scene cannot answer it unambiguously."""
  n = len(objects)
  if qtype == "count":  # the answer `want` is drawn first, so answers 0..4 are balanced
    forms = [[(q, list(range(n))) for q in ("how many shapes are there?", "how many objects are in the image?")],
             [(f"how many {s}s are there?", [k for k, o in enumerate(objects) if o["shape"] == s]) for s in SHAPES],
             [(f"how many {c} shapes are there?", [k for k, o in enumerate(objects) if o["color"] == c])
              for c in COLOR_NAMES]]
    forms = [[(q, t) for q, t in form if len(t) == want] for form in forms]
    forms = [form for form in forms if form]
    if not forms:
      return None
    form = forms[rng.integers(len(forms))]
    q, targets = form[rng.integers(len(form))]
    return q, str(want), targets
  if qtype in ("color", "shape", "size"):
    order = rng.permutation(n)
    for i in (int(k) for k in order):
      ref = _refer(rng, objects, i, exclude=(qtype,))
      if ref is None:
        continue
      if qtype == "color":
        q = (f"what color is {ref}?", f"what is the color of {ref}?")[rng.integers(2)]
      elif qtype == "shape":
        q = (f"what shape is {ref}?", f"which shape is {ref}?")[rng.integers(2)]
      else:
        q = (f"what size is {ref}?", f"is {ref} small or large?")[rng.integers(2)]
      return q, objects[i][qtype], [i]
    return None
  if qtype == "spatial":
    if n < 2:
      return None
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    for p in rng.permutation(len(pairs)):
      i, j = pairs[int(p)]
      a, b = _refer(rng, objects, i), _refer(rng, objects, j)
      rels = _relations(objects[i], objects[j])
      if a is None or b is None or not rels:
        continue
      rel = rels[rng.integers(len(rels))]
      horizontal = rel in ("left", "right")
      if rng.random() < 0.5:  # a choice question
        q = (f"is {a} to the left or to the right of {b}?" if horizontal else f"is {a} above or below {b}?")
        return q, rel, [i, j]
      asked = rel if rng.random() < 0.5 else _OPPOSITE[rel]  # yes / no balanced
      return f"is {a} {_REL_PHRASE[asked]} {b}?", "yes" if asked == rel else "no", [i, j]
    return None
  raise ValueError(f"unknown vqa question type {qtype!r}; known: {VQA_QTYPES}")


def _vqa(split, index, num, seed, image_size, opts, qtypes):
  rng = _rng(seed, split, "vqa", index)
  qtype = qtypes[index % len(qtypes)]
  lo, hi = (0, opts["max_objects"]) if qtype == "count" else (0, 0)
  want = int(rng.integers(lo, hi + 1))  # the count answer
  while True:
    objects = _scene(rng, split, image_size, opts["min_objects"], opts["max_objects"])
    qa = _vqa_question(rng, objects, qtype, want)
    if qa is not None:
      break
  question, answer, targets = qa
  image = render(objects, image_size, antialias=opts["antialias"])
  turns = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}]
  meta = {"qtype": qtype, "question": question, "answer": answer, "targets": targets, "objects": objects}
  return _record("vqa", split, index, "conversation", [image], turns, meta)


def _region(split, index, num, seed, image_size, opts, qtypes):
  rng = _rng(seed, split, "region", index)
  qtype = qtypes[index % len(qtypes)]
  objects = _scene(rng, split, image_size, opts["min_objects"], opts["max_objects"])
  i = int(rng.integers(len(objects)))
  pad = box_pad(image_size)
  x0, y0, x1, y1 = objects[i]["box"]
  box = [x0 - pad, y0 - pad, x1 + pad, y1 + pad]
  image = render(objects, image_size, antialias=opts["antialias"], boxes=[box])
  where = "[{}, {}, {}, {}]".format(*box)
  if qtype == "region_color":
    q = (f"what color is the object in {where}?", f"what is the color of the shape in the box {where}?")
    answer = objects[i]["color"]
  elif qtype == "region_shape":
    q = (f"what shape is in {where}?", f"what shape is the object in the box {where}?")
    answer = objects[i]["shape"]
  else:
    raise ValueError(f"unknown region question type {qtype!r}; known: {REGION_QTYPES}")
  question = q[rng.integers(2)]
  turns = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}]
  meta = {"qtype": qtype, "question": question, "answer": answer, "boxes": [box], "target": i,
          "objects": objects}
  return _record("region", split, index, "conversation", [image], turns, meta)


def _interleaved(split, index, num, seed, image_size, opts):
  rng = _rng(seed, split, "interleaved", index)
  lo, hi = opts["min_images"], opts["max_images"]
  if not 1 <= lo <= hi <= len(_ORDINALS):
    raise ValueError(f"need 1 <= min_images <= max_images <= {len(_ORDINALS)}, got {lo}, {hi}")
  k = int(rng.integers(lo, hi + 1))
  scenes = [_scene(rng, split, image_size, opts["min_objects"], opts["max_objects"]) for _ in range(k)]
  images = [render(s, image_size, antialias=opts["antialias"]) for s in scenes]
  sentences = []
  for m, objects in enumerate(scenes):
    desc = _describe(rng, objects)
    if m == 0:
      lead = ("The first picture shows {}.", "In the first picture there is {}.", "First, we see {}.")
    elif m == k - 1 and k > 2:
      lead = ("Finally, the last picture shows {}.", "In the last picture there is {}.")
    else:
      lead = (f"Next, the {_ORDINALS[m]} picture shows {{}}.", f"In the {_ORDINALS[m]} picture there is {{}}.")
    sentences.append("<image> " + lead[rng.integers(len(lead))].format(desc))
  counts = [len(s) for s in scenes]
  if counts.count(max(counts)) == 1:
    sentences.append(f"The {_ORDINALS[counts.index(max(counts))]} picture has the most shapes.")
  else:
    sentences.append(f"Together the pictures show {sum(counts)} shapes.")
  text = " ".join(sentences)
  meta = {"num_images": k, "scenes": scenes, "counts": counts}
  return _record("interleaved", split, index, "interleaved", images, [{"role": "text", "content": text}], meta)


# Text-only knowledge of the world.
_SIDES = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4}
_MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
_THINGS = {"banana": "yellow", "lemon": "yellow", "grass": "green", "leaf": "green", "sky": "blue",
           "ocean": "blue", "strawberry": "red", "tomato": "red", "carrot": "orange", "pumpkin": "orange",
           "grape": "purple", "plum": "purple"}


def _text_question(rng, family):
  """(question, answer) of a text-only family."""
  if family == "sides":
    shape = SHAPES[rng.integers(4)]
    part = ("sides", "corners", "edges")[rng.integers(3)] if shape != "circle" else "corners"
    t = ("how many {p} does a {s} have?", "a {s} has how many {p}?", "how many {p} are there on a {s}?")
    return t[rng.integers(3)].format(p=part, s=shape), str(_SIDES[shape])
  if family == "round":
    shape = SHAPES[rng.integers(4)]
    if rng.random() < 0.5:
      return f"is a {shape} round?", "yes" if shape == "circle" else "no"
    return f"does a {shape} have corners?", "no" if shape == "circle" else "yes"
  if family == "mix":
    pair = list(_MIXES)[rng.integers(len(_MIXES))]
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    t = ("what color do you get when you mix {} and {}?", "mixing {} and {} gives which color?",
         "{} and {} make what color?", "if you mix {} and {}, what color do you get?",
         "what color comes from mixing {} and {}?", "which color is made by mixing {} and {} paint?")
    return t[rng.integers(len(t))].format(a, b), _MIXES[pair]
  if family == "arithmetic":
    a, b = (int(v) for v in rng.integers(0, 10, size=2))
    if rng.random() < 0.5:
      return f"what is {a} plus {b}?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"what is {a} minus {b}?", str(a - b)
  if family == "bigger":
    sa, sb = SHAPES[rng.integers(4)], SHAPES[rng.integers(4)]
    ca, cb = COLOR_NAMES[rng.integers(6)], COLOR_NAMES[rng.integers(6)]
    with_color = rng.random() < 0.5
    small = f"{ca} {sa}" if with_color else sa
    large = f"{cb} {sb}" if with_color else sb
    items = [f"a small {small}", f"a large {large}"]
    if rng.random() < 0.5:
      items = items[::-1]
    ask_bigger = rng.random() < 0.5
    q = f"which is {'bigger' if ask_bigger else 'smaller'}, {items[0]} or {items[1]}?"
    (wc, ws), (oc, os_) = ((cb, sb), (ca, sa)) if ask_bigger else ((ca, sa), (cb, sb))
    if ws != os_:
      return q, ws
    if with_color and wc != oc:
      return q, wc
    return q, "large" if ask_bigger else "small"
  if family == "things":
    thing = list(_THINGS)[rng.integers(len(_THINGS))]
    t = ("what color is a {}?", "what is the color of a {}?", "a {} is usually what color?")
    return t[rng.integers(3)].format(thing), _THINGS[thing]
  if family == "list_count":
    items = [SHAPES[rng.integers(4)] for _ in range(int(rng.integers(2, 7)))]
    shape = items[rng.integers(len(items))] if rng.random() < 0.8 else SHAPES[rng.integers(4)]
    return f"how many {shape}s are in this list: {', '.join(items)}?", str(items.count(shape))
  if family == "successor":
    n = int(rng.integers(1, 20))
    if rng.random() < 0.5:
      return f"what number comes after {n}?", str(n + 1)
    return f"what number comes before {n}?", str(n - 1)
  if family == "left_right":
    (sa, sb) = rng.choice(4, size=2, replace=False)
    ca, cb = COLOR_NAMES[rng.integers(6)], COLOR_NAMES[rng.integers(6)]
    a, b = f"{ca} {SHAPES[sa]}", f"{cb} {SHAPES[sb]}"
    if rng.random() < 0.5:
      side = ("left", "right")[rng.integers(2)]
      where = {"left": a, "right": b}[side]
      return (f"a {a} is to the left of a {b}. which shape is on the {side}?", where.split()[1])
    side = ("top", "bottom")[rng.integers(2)]
    where = {"top": a, "bottom": b}[side]
    return f"a {a} is above a {b}. which shape is at the {side}?", where.split()[1]
  raise ValueError(f"unknown text family {family!r}; known: {TEXT_FAMILIES}")


def _text_qa(split, index, num, seed, image_size, opts, families):
  rng = _rng(seed, split, "text_qa", index)
  found = None
  for _ in range(100):  # a family first (uniform), then one of its questions that lies in this split
    family = families[rng.integers(len(families))]
    for _ in range(300):
      question, answer = _text_question(rng, family)
      if split_of("text_qa|" + question) == split:
        found = question, answer
        break
    if found:
      break
  else:
    raise ValueError(f"text_qa families {families} have no question in split {split!r}")
  question, answer = found
  turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
  meta = {"qtype": "text_qa", "family": family, "question": question, "answer": answer}
  return _record("text_qa", split, index, "text", [], turns, meta)


def _fact(rng) -> str:
  kind = rng.integers(7)
  if kind == 0:
    shape = SHAPES[1 + rng.integers(3)]
    return f"a {shape} has {_SIDES[shape]} sides and {_SIDES[shape]} corners."
  if kind == 1:
    (a, b), c = list(_MIXES.items())[rng.integers(len(_MIXES))]
    return f"mixing {a} and {b} makes {c}."
  if kind == 2:
    a, b = (int(v) for v in rng.integers(0, 10, size=2))
    return f"{a} plus {b} is {a + b}." if rng.random() < 0.5 else f"{max(a, b)} minus {min(a, b)} is {abs(a - b)}."
  if kind == 3:
    thing = list(_THINGS)[rng.integers(len(_THINGS))]
    return f"a {thing} is {_THINGS[thing]}."
  if kind == 4:
    s, c = SHAPES[rng.integers(4)], COLOR_NAMES[rng.integers(6)]
    return f"a large {c} {s} is bigger than a small {c} {s}."
  if kind == 5:
    return ("a circle is round and has no corners.", "a diamond is a square turned on its corner.",
            "a triangle has a point at the top.", "small shapes are smaller than large shapes.")[rng.integers(4)]
  objects = [{"shape": SHAPES[rng.integers(4)], "color": COLOR_NAMES[rng.integers(6)],
              "size": SIZES[rng.integers(2)]} for _ in range(2)]
  rel = ("to the left of", "to the right of", "above", "below")[rng.integers(4)]
  return f"there is a {_name(objects[0])} {rel} a {_name(objects[1])}."


def _text_corpus(split, index, num, seed, image_size, opts):
  rng = _rng(seed, split, "text_corpus", index)
  while True:
    text = " ".join(_fact(rng) for _ in range(int(rng.integers(3, 7))))
    if split_of("text_corpus|" + text) == split:
      break
  meta = {"num_sentences": text.count(".")}
  return _record("text_corpus", split, index, "text", [], [{"role": "text", "content": text}], meta)


def _classes(split, index, num, seed, image_size, opts):
  domain = opts["domain"]
  if domain not in DOMAINS:
    raise ValueError(f"unknown domain {domain!r}; known: {DOMAINS}")
  rng = _rng(seed, split, "classes", index)  # not the domain: every domain renders the same scenes
  objects = _scene(rng, split, image_size, 1, 1)
  o = objects[0]
  noise_rng = _rng(seed, split, "classes", index, stream=1)
  image = render(objects, image_size, antialias=opts["antialias"],
                 palette=SHIFTED_COLORS if domain == "palette" else COLORS, outline=domain == "outline")
  if domain == "noise":
    noisy = image.astype(np.float32) + noise_rng.normal(0.0, opts["noise_std"], image.shape)
    image = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
  class_name = f"{o['color']} {o['shape']}"
  caption = f"a photo of a {class_name}."
  turns = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": caption}]
  meta = {"label": CLASS_NAMES.index(class_name), "class_name": class_name, "domain": domain,
          "objects": objects, "answer": class_name}
  return _record("classes", split, index, "caption", [image], turns, meta)


def _options(task, options) -> dict:
  if task not in TASKS:
    raise ValueError(f"unknown shapes-world task {task!r}; known: {TASKS}")
  unknown = sorted(set(options) - set(_OPTIONS[task]))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for task {task!r}; it takes {sorted(_OPTIONS[task])}")
  return {**DEFAULT_OPTIONS, **options}


def records(task: str, split: str, num: int, seed: int = 0, image_size: int = 64,
            **options) -> Iterator[dict]:
  """Yields `num` records (indices 0..num-1) of one task and split; see the module docstring."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  opts = _options(task, options)
  if task == "caption":
    corrupted = corrupted_indices(num, float(opts["corruption_rate"]), seed, split)
    make = lambda i: _caption(split, i, num, seed, image_size, opts, corrupted)
  elif task in ("vqa", "region"):
    known = VQA_QTYPES if task == "vqa" else REGION_QTYPES
    qtypes = tuple(opts["qtypes"] or known)
    bad = [q for q in qtypes if q not in known]
    if bad or not qtypes:
      raise ValueError(f"unknown {task} question type(s) {bad}; known: {known}")
    fn = _vqa if task == "vqa" else _region
    make = lambda i: fn(split, i, num, seed, image_size, opts, qtypes)
  elif task == "text_qa":
    families = tuple(opts["families"] or TEXT_FAMILIES)
    bad = [f for f in families if f not in TEXT_FAMILIES]
    if bad or not families:
      raise ValueError(f"unknown text_qa family(ies) {bad}; known: {TEXT_FAMILIES}")
    make = lambda i: _text_qa(split, i, num, seed, image_size, opts, families)
  elif task == "generated":
    misaligned = erroneous_indices(num, float(opts["error_rate"]), seed, split)
    make = lambda i: _generated(split, i, num, seed, image_size, opts, misaligned)
  else:
    fn = {"interleaved": _interleaved, "text_corpus": _text_corpus, "classes": _classes, **_GUIDANCE_TASKS}[task]
    make = lambda i: fn(split, i, num, seed, image_size, opts)
  for i in range(num):
    yield make(i)


# --- Region-guidance tasks (contrastive region guidance, vlm_jax/guidance) ---------------
# Every record carries the ground-truth boxes of the objects its text names (meta "boxes",
# each object's box widened by `box_pad`, like the region task's): the renderer plays the
# role of the grounding detector. No box is drawn on these images.

ERRORS = ("color_binding", "relation", "missing")  # the "generated" task's controlled errors
NEGATIVES = ("attribute", "relation", "object")  # the "hard_negative" task's categories


def padded_box(o, image_size: int) -> list:
  """An object's box widened by `box_pad` (stays inside the image by construction)."""
  pad = box_pad(image_size)
  x0, y0, x1, y1 = o["box"]
  return [x0 - pad, y0 - pad, x1 + pad, y1 + pad]


def _pair(rng, split, image_size, distinct_colors=False):
  """A two-object scene of `split` whose objects have different names (and colours)."""
  while True:
    objects = _scene(rng, split, image_size, 2, 2)
    if len(objects) == 2 and _name(objects[0]) != _name(objects[1]) and \
        (not distinct_colors or objects[0]["color"] != objects[1]["color"]):
      return objects


def pair_caption(a, b, rel) -> str:
  """'a large red circle to the left of a small blue square.' (what caption_text says of two objects)."""
  return f"a {_name(a)} {_REL_PHRASE[rel]} a {_name(b)}."


def _spatial_boxes(split, index, num, seed, image_size, opts):
  """What'sUp-like: a spatial question about two objects, both objects' boxes in meta."""
  rng = _rng(seed, split, "spatial_boxes", index)
  while True:
    objects = _scene(rng, split, image_size, max(2, opts["min_objects"]), max(2, opts["max_objects"]))
    qa = _vqa_question(rng, objects, "spatial")
    if qa is not None:
      break
  question, answer, targets = qa
  choices = ["yes", "no"] if answer in ("yes", "no") else \
      ["left", "right"] if answer in ("left", "right") else ["above", "below"]
  image = render(objects, image_size, antialias=opts["antialias"])
  turns = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}]
  meta = {"qtype": "spatial_" + ("yesno" if choices[0] == "yes" else "choice"), "question": question,
          "answer": answer, "choices": choices, "targets": targets,
          "boxes": [padded_box(objects[k], image_size) for k in targets], "objects": objects}
  return _record("spatial_boxes", split, index, "conversation", [image], turns, meta)


def _hard_negative(split, index, num, seed, image_size, opts):
  """SugarCrepe-like: the true caption and a hard negative differing in exactly one word."""
  rng = _rng(seed, split, "hard_negative", index)
  category = NEGATIVES[index % len(NEGATIVES)]
  objects = _pair(rng, split, image_size)
  i, j, rel = _relation(rng, objects)
  a, b = objects[i], objects[j]
  positive = pair_caption(a, b, rel)
  if category == "relation":
    negative = pair_caption(a, b, _OPPOSITE[rel])
  else:  # replace one object's colour (attribute) or shape (object) by one no object of the scene has
    key = "color" if category == "attribute" else "shape"
    pool = [v for v in (COLOR_NAMES if key == "color" else SHAPES) if v not in {o[key] for o in objects}]
    which = int(rng.integers(2))
    new = [dict(a), dict(b)]
    new[which][key] = pool[rng.integers(len(pool))]
    negative = pair_caption(new[0], new[1], rel)
  image = render(objects, image_size, antialias=opts["antialias"])
  turns = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": positive}]
  meta = {"qtype": category, "caption": positive, "negative": negative, "relation": rel,
          "boxes": [padded_box(a, image_size), padded_box(b, image_size)], "objects": objects}
  return _record("hard_negative", split, index, "caption", [image], turns, meta)


def _refer_task(split, index, num, seed, image_size, opts):
  """Referring expressions: 'a large red circle.' names one object; every object's box is a candidate."""
  rng = _rng(seed, split, "refer", index)
  while True:
    objects = _scene(rng, split, image_size, max(2, opts["min_objects"]), max(2, opts["max_objects"]))
    names = [_name(o) for o in objects]
    unique = [k for k, n in enumerate(names) if names.count(n) == 1]
    if len(objects) >= 2 and unique:
      break
  target = unique[rng.integers(len(unique))]
  expression = f"a {names[target]}."
  image = render(objects, image_size, antialias=opts["antialias"])
  turns = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": expression}]
  meta = {"qtype": f"refer_{len(objects)}", "expression": expression, "target": target,
          "candidates": [padded_box(o, image_size) for o in objects], "objects": objects}
  return _record("refer", split, index, "caption", [image], turns, meta)


def erroneous_indices(num: int, rate: float, seed: int, split: str) -> set:
  """Which of `num` "generated" records are drawn with an error: exactly round(rate * num)."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"error_rate must be in [0, 1], got {rate}")
  k = math.floor(rate * num + 0.5)
  perm = _rng(seed, split, "generated", 0, stream=8).permutation(num)
  return set(int(i) for i in perm[:k])


def _mirror(objects, rel, image_size):
  """The scene mirrored on the relation's axis (which flips that relation), shapes upright."""
  out = []
  for o in objects:
    x0, y0, x1, y1 = o["box"]
    if rel in ("left", "right"):
      x0, x1 = image_size - 1 - x1, image_size - 1 - x0
    else:
      y0, y1 = image_size - 1 - y1, image_size - 1 - y0
    out.append(_make_object(o["shape"], o["color"], o["size"], x0, y0, x1 - x0 + 1))
  return out


def _generated(split, index, num, seed, image_size, opts, misaligned):
  """SeeTRUE-like: a prompt and the image "generated" for it, with a controlled error for a known
  fraction of records (meta misaligned, error). The prompt's scene belongs to the split."""
  rng = _rng(seed, split, "generated", index)
  objects = _pair(rng, split, image_size, distinct_colors=True)
  i, j, rel = _relation(rng, objects)
  caption = pair_caption(objects[i], objects[j], rel)
  drawn, error = objects, None
  if index in misaligned:
    error = ERRORS[sorted(misaligned).index(index) % len(ERRORS)]
    if error == "color_binding":  # the colours swapped between the two objects
      drawn = [dict(objects[0], color=objects[1]["color"]), dict(objects[1], color=objects[0]["color"])]
    elif error == "relation":
      drawn = _mirror(objects, rel, image_size)
    else:  # one named object missing
      drawn = [objects[int(rng.integers(2))]]
  image = render(drawn, image_size, antialias=opts["antialias"])
  turns = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": caption}]
  meta = {"qtype": error or "aligned", "caption": caption, "misaligned": error is not None, "error": error,
          "caption_objects": objects, "objects": drawn, "boxes": [padded_box(o, image_size) for o in drawn]}
  return _record("generated", split, index, "caption", [image], turns, meta)


_GUIDANCE_TASKS = {"spatial_boxes": _spatial_boxes, "hard_negative": _hard_negative, "refer": _refer_task}
