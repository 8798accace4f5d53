"""Output plumbing every job shares: plain-text tables, key-value summaries, atomic JSON result files."""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

_MISSING = "-"
_GAP = "  "


def _is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_percent_column(name: str) -> bool:
  return str(name).strip().lower().endswith(("acc", "%"))


def format_number(v: Any) -> str:
  """Integers as they are; floats with 4 decimals below 1, 3 below 10, else 2.

  0.123456 -> "0.1235", 3.14159 -> "3.142", 12.3456 -> "12.35",
  1234.567 -> "1234.57"; nonzero magnitudes below 1e-4 or from 1e6 up use
  3 significant digits in exponent form ("1.23e-05").
  """
  if isinstance(v, numbers.Integral):
    return str(int(v))
  x = float(v)
  if math.isnan(x) or math.isinf(x):
    return str(x)
  a = abs(x)
  if a != 0 and (a < 1e-4 or a >= 1e6):
    return f"{x:.2e}"
  decimals = 4 if a < 1 else 3 if a < 10 else 2
  return f"{x:.{decimals}f}"


def format_percent(v: Any) -> str:
  """A fraction as a percentage with one decimal: 0.834 -> "83.4%"."""
  x = float(v)
  if math.isnan(x) or math.isinf(x):
    return str(x)
  return f"{100.0 * x:.1f}%"


def _cell(column: str, v: Any) -> str:
  if v is None:
    return _MISSING
  if _is_number(v):
    return format_percent(v) if _is_percent_column(column) else format_number(v)
  return str(v)


def print_table(rows: list[dict], title: str, columns: Optional[Sequence[str]] = None) -> str:
  """Print `rows` as an aligned plain-text table under `title`; return the printed text.

  `columns` default to every key of the rows, in first-seen order; a key
  missing from a row (or None) shows as "-". Numbers go through
  `format_number`, except in columns whose name ends with "acc" or "%"
  (case-insensitive), which hold fractions and show as percentages
  (0.834 -> "83.4%"). Columns whose values are all numbers are right-aligned,
  the others left-aligned; the header follows its column.
  """
  if columns is None:
    columns = []
    for row in rows:
      for key in row:
        if key not in columns:
          columns.append(key)
  columns = list(columns)
  cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
  right = [
      any(_is_number(row.get(c)) for row in rows)
      and all(_is_number(row.get(c)) or row.get(c) is None for row in rows)
      for c in columns
  ]
  widths = [max([len(str(c))] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]

  def line(values: Sequence[str]) -> str:
    parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
    return _GAP.join(parts).rstrip()

  body = [line([str(c) for c in columns]), line(["-" * w for w in widths])]
  body += [line(r) for r in cells]
  width = max([len(title)] + [len(b) for b in body])
  text = "\n".join([title, "=" * width] + body)
  print(text)
  return text


def print_rows(title: str, rows: Sequence[tuple[str, Any]]) -> str:
  """Print `(key, value)` rows as an aligned two-column summary under `title` (floats to 4 places)."""
  width = max(len(k) for k, _ in rows)
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  text = title + "\n" + "\n".join(f"  {k:<{width}}  {fmt(v)}" for k, v in rows)
  print(text, flush=True)
  return text


def _json_default(obj: Any) -> Any:
  # NumPy scalars and arrays without importing NumPy here.
  if hasattr(obj, "tolist"):
    return obj.tolist()
  if hasattr(obj, "item"):
    return obj.item()
  if isinstance(obj, Path):
    return str(obj)
  if isinstance(obj, (set, frozenset)):
    return sorted(obj)
  raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path, obj: Any) -> Path:
  """Write `obj` as indented JSON to `path` atomically; return the path.

  Parent directories are created; the text goes to a temporary file in the
  same directory, is flushed to disk and renamed over `path`, so a reader
  never sees a partial file. NumPy scalars/arrays, sets and paths are
  converted to plain JSON values.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(obj, indent=2, default=_json_default) + "\n"
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  return path


def cached(path, key: str, compute) -> Any:
  """`compute()` stored under `key` in the JSON file `path`, or the stored value if there.

  What makes a multi-step demonstration resume-friendly: a re-run skips every sub-step
  whose result was written (delete the entry, or the file, to redo it). The value comes
  back as JSON reads it (tuples become lists), the same on the first run and the next.
  """
  path = Path(path)
  done = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
  if key not in done:
    done[key] = json.loads(json.dumps(compute(), default=_json_default))
    if path.exists():  # keep entries another sub-step wrote meanwhile
      done = {**json.loads(path.read_text(encoding="utf-8")), key: done[key]}
    write_json(path, done)
  return done[key]


def pin_config(path, config: dict, ignore: Sequence[str] = ("progress",)) -> None:
  """Writes `config` (a plain dict) to `path`, or checks it equals the one written there.

  A cache of results (`cached`) is only valid for the config that produced it: a re-run
  with another config in the same folder is refused, naming the keys that differ.
  """
  path = Path(path)
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flat(v, f"{prefix}{k}."))
      elif f"{prefix}{k}" not in ignore:
        out[f"{prefix}{k}"] = v
    return out
  new = flat(json.loads(json.dumps(config, default=_json_default)))
  if path.exists():
    old = flat(json.loads(path.read_text(encoding="utf-8")))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
      raise ValueError(f"{path.parent} holds results of another config (differs in: {', '.join(differ[:8])}"
                       f"{' ...' if len(differ) > 8 else ''}); use a new workdir, or delete {path} and "
                       f"the results to redo them")
    return
  write_json(path, config)
