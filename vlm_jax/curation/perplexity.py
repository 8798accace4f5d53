r"""Perplexity data filtering (METHODS §2; POINTS, arXiv 2409.04828, Sec. 3.2).

Score every record of a data set with an off-the-shelf VLM, then keep the records the
model finds most predictable:

    PPL(s) = exp( -(1/N) Σ_{i=1..N} log P(w_i | w_<i, image, prompt) )

over the N target tokens of the record (the pipeline's `loss_mask`: a caption with its
end token, or the answer span(s) of a conversation with their end tokens), conditioned
on the image(s) and a fixed prompt (`chat_template.caption_prompt`, by default
"please generate a caption for this image.", placed after the image and never a target).
Sort ascending and keep the lowest `keep_fraction` (POINTS keeps 0.2: 1M of 5M), or every
record with PPL <= `threshold`.

    score(config, workdir)                      the `score` job -> <workdir>/scores.jsonl
    filter_scores(path, keep_fraction=None, threshold=None) -> set of kept ids
    select(scores, keep_fraction=None, threshold=None) -> (kept records, threshold used)
    read_scores(path) -> [{"id", "ppl", "nll", "tokens"}, ...]
    build_filtered(source, kept_ids, data_dir) -> TFDS builder of the kept records
    filter_data(config, workdir)                the `filter` job
    record_nll(logits, batch, logprob_dtype="float32") -> (nll_sum [B], tokens [B])
    make_score_fn(model, logprob_dtype) -> (params, batch) -> {"nll_sum", "tokens"}

Precision. Log-probabilities are computed in float32 from the model's logits (the
log-softmax, the gather and the per-record sums). `logprob_dtype="bfloat16"` reproduces the
published reference script instead, which casts the logits to bfloat16 first and takes the
log-softmax there: a known flaw (METHODS §2) — with a 32k vocabulary a bfloat16 log-prob
near -10 is only resolved to ±0.03, which reorders records whose PPLs are close. The model's
own compute dtype (`model.text.dtype`) is the config's business; for float32 scores end to
end keep it float32.

Scoring (`score`, job "score"). Reads the config's `data` block through the input
pipeline with one pass (`num_epochs=1`), no shuffling and no packing: each row is one
record (a packing=True config is refused: a packed row mixes records). One data source
per run. Records the pipeline skips (too long, bad image, ...) get no score and are
counted in the summary. Batches of `data.global_batch_size` rows are sharded over the
mesh (batch over `data` x `fsdp`, parameters by the config's `rules`) and scored by one
jitted function; each host reads and scores its own shard of the records and writes
`<workdir>/scores.<process>.jsonl`, one line per record:

    {"id": "coco/1/10", "ppl": 12.41, "nll": 2.5185, "tokens": 11}

(`nll` is the mean negative log-likelihood per target token, `tokens` is N). The rows that
pad the last batch (and the empty batches of a host that ran out of records before the
others) are never written. At the end process 0 merges the host files into
`<workdir>/scores.jsonl` (hosts in turn, each host's records in source order) and writes
`<workdir>/score.json` (counts, PPL statistics, throughput, skipped records).

Resume. After each batch is written and fsynced, `progress.<process>.json` is replaced
atomically with the number of lines (and bytes) written and the pipeline iterator's state
after that batch. A restarted job truncates its JSONL file to that length (dropping the
lines of a batch whose progress never landed) and restores the iterator, so every record
is scored and written exactly once, with the same PPL as an uninterrupted run. A progress
file written by a different scoring setup (model, init, prompt, data, dtype) is refused:
use a new workdir. `max_batches` (config) stops a run after that many batches, e.g. to
score in pieces.

Filtering (`filter_data`, job "filter"): reads `scores.jsonl`, keeps the lowest
`filter.keep_fraction` (floor(fraction x n), at least 1) or PPL <= `filter.threshold`
(threshold wins when set); ties in PPL are broken by id, so the selection is
deterministic. It writes a new TFDS array_record data set, `filtered_records/<name>`,
holding the kept records copied byte for byte from the source, in source order, which the
pipeline reads like any other source:

    data.sources = [dict(name="filtered_records/<name>", split="train")]
    data.data_dir = "<filter.output_dir, default <workdir>/data>"

It prints a text histogram of PPL, the records of both tails (id, PPL, text: high PPL is
often rare knowledge rather than noise, look before you drop), a summary, and writes
`<workdir>/filter.json` (kept, total, threshold used, the data set's name and folder) and
`<workdir>/kept_ids.txt`.
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "please generate a caption for this image."
LOGPROB_DTYPES = ("float32", "bfloat16")
SCORES_FILE = "scores.jsonl"
PROGRESS_VERSION = 1


def _dtype_ok(logprob_dtype: str) -> str:
  if logprob_dtype not in LOGPROB_DTYPES:
    raise ValueError(f"logprob_dtype must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")
  return logprob_dtype


def _ppl(nll: float) -> float:
  """exp(nll) without OverflowError (inf past float64's range)."""
  return math.exp(nll) if nll < 709.0 else float("inf")


# --- Per-record negative log-likelihood (pure, jittable) ----------------------------------


def record_nll(logits, batch: Mapping[str, Any], logprob_dtype: str = "float32"):
  """Per-row summed NLL of the target tokens and their number, both float32 [B].

  Token t is predicted from tokens < t and counts where `loss_mask[t]` is 1 (as in
  training: `vlm_jax.train.step.token_losses`). With logprob_dtype "float32" the
  log-softmax runs in float32; "bfloat16" emulates the reference script (logits cast to
  bfloat16, log-softmax in bfloat16; see the module docstring).
  """
  import jax
  import jax.numpy as jnp
  from vlm_jax.train.step import token_losses

  if _dtype_ok(logprob_dtype) == "float32":
    ce, _, weights = token_losses(logits, batch)
  else:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.bfloat16), axis=-1)
    targets = batch["input_ids"][:, 1:]
    ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
  return jnp.sum(ce * weights, axis=-1), jnp.sum(weights, axis=-1)


@functools.lru_cache(maxsize=16)
def make_score_fn(model, logprob_dtype: str = "float32") -> Callable:
  """`(params, batch) -> {"nll_sum": [B], "tokens": [B]}` for `model` (VLM or DecoderLM).

  Cached per (model, dtype): jitting the same function again reuses JAX's compilation.
  """
  from vlm_jax.train.step import forward
  _dtype_ok(logprob_dtype)

  def score_fn(params, batch):
    nll_sum, tokens = record_nll(forward(model, params, batch), batch, logprob_dtype)
    return {"nll_sum": nll_sum, "tokens": tokens}

  return score_fn


# --- The scoring job ------------------------------------------------------------------------


def scoring_data_config(config) -> dict:
  """The config's `data` block as the scoring pipeline reads it (a plain dict).

  Refuses packing and anything but one pipeline source; forces one unshuffled epoch;
  puts `config.prompt` (when set) into `chat_template.caption_prompt`; takes the
  tokenizer from the Hugging Face folder of `init="hf:<folder>"` when `data.tokenizer`
  is empty.
  """
  data = config.data.to_dict() if hasattr(config.data, "to_dict") else dict(config.data)
  if data.pop("source", "pipeline") != "pipeline":
    raise ValueError("perplexity scoring reads real records: data.source must be 'pipeline'")
  if data.get("packing"):
    raise ValueError("perplexity scoring needs one record per row, but data.packing=True: a packed row "
                     "mixes several records, so its loss is not one record's perplexity. "
                     "Set data.packing=False (--config.data.packing=False).")
  sources = list(data.get("sources") or [])
  if len(sources) != 1:
    raise ValueError(f"perplexity scoring reads one data set per run, got {len(sources)} sources in "
                     f"data.sources; score each in its own workdir")
  if data.get("num_epochs") not in (None, 1):
    log.warning("scoring reads each record once: data.num_epochs=%s ignored", data["num_epochs"])
  if data.get("shuffle"):
    log.info("scoring reads records in source order: data.shuffle ignored")
  data.update(num_epochs=1, shuffle=False, packing=False)
  prompt = config.get("prompt")
  if prompt is not None:
    data["chat_template"] = {**(data.get("chat_template") or {}), "caption_prompt": prompt}
  kind, _, path = str(config.get("init", "")).partition(":")
  if not data.get("tokenizer") and kind == "hf":
    data["tokenizer"] = path
  return data


def _model_and_params(config, mesh, rules, params=None):
  """(model, params placed with their shardings, shardings) from config.model / config.init."""
  import jax
  from vlm_jax.train.loop import initial_params, param_shapes_and_shardings

  if config.get("model") is None:  # the model config comes from the Hugging Face folder
    kind, _, path = str(config.get("init", "")).partition(":")
    if kind != "hf":
      raise ValueError("config.model is None: the model can only come from init='hf:<folder>', "
                       f"got init={config.get('init')!r}")
    from vlm_jax.interop import from_hf
    model, host_params = from_hf(path)
    _, shardings = param_shapes_and_shardings(model, mesh, rules)
    return model, jax.device_put(host_params if params is None else params, shardings), shardings
  from vlm_jax.models.build import build_model
  model = build_model(config.model)
  abstract, shardings = param_shapes_and_shardings(model, mesh, rules)
  if params is None:
    params = initial_params(config.init, model, abstract, shardings, config.seed)
  else:
    params = jax.device_put(params, shardings)
  return model, params, shardings


def _local_rows(x) -> np.ndarray:
  """This host's rows of a global array sharded on its leading axis, in order."""
  import jax
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = {}
  for s in x.addressable_shards:  # replicas (over non-batch mesh axes) collapse by start index
    shards.setdefault(s.index[0].start or 0, s.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def _any_process(flag: bool) -> bool:
  import jax
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _sum_over_processes(values: np.ndarray) -> np.ndarray:
  import jax
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(values)).reshape(-1, *values.shape).sum(0)


def _barrier(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _empty_batch(pipe) -> dict:
  batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in pipe.batch_spec().items()}
  batch["input_ids"][:] = pipe.encoder.pad_id
  return batch


def _truncate_to(path: str, size: int, lines: int) -> None:
  """Cuts the JSONL file back to `size` bytes, which must hold exactly `lines` lines."""
  have = os.path.getsize(path) if os.path.exists(path) else 0
  if have < size:
    raise RuntimeError(f"{path} holds {have} bytes but its progress file says {size} were written: "
                       f"the scores file was changed or lost; delete the workdir's scores.* and "
                       f"progress.* files to rescore from the start")
  if have > size:
    log.info("%s: dropping %d bytes written after the last saved progress", path, have - size)
  with open(path, "r+b") as f:
    f.truncate(size)
    count = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
  if count != lines:
    raise RuntimeError(f"{path} holds {count} lines in its first {size} bytes, its progress file says "
                       f"{lines}: delete the workdir's scores.* and progress.* files to rescore")


class _Writer:
  """Appends score lines and saves the progress (iterator state + lines) after each batch."""

  def __init__(self, workdir: str, process: int, fingerprint: dict):
    from vlm_jax import report
    self._write_json = report.write_json
    self.scores_path = os.path.join(workdir, f"scores.{process}.jsonl")
    self.progress_path = os.path.join(workdir, f"progress.{process}.json")
    self.fingerprint = fingerprint
    self.lines = self.bytes = 0
    self.data_state = None
    self.resumed = False
    if os.path.exists(self.progress_path):
      with open(self.progress_path) as f:
        progress = json.load(f)
      if progress.get("version") != PROGRESS_VERSION:
        raise ValueError(f"{self.progress_path}: progress version {progress.get('version')!r}, "
                         f"this code writes {PROGRESS_VERSION}")
      saved = progress.get("fingerprint", {})
      differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
      if differ:
        raise ValueError(f"{workdir} holds scores of a different scoring setup (differs in: "
                         f"{', '.join(differ)}); score into a new workdir")
      self.lines, self.bytes = int(progress["lines"]), int(progress["bytes"])
      self.data_state = progress["data_state"]
      _truncate_to(self.scores_path, self.bytes, self.lines)
      self.resumed = True
    elif os.path.exists(self.scores_path):  # killed before its first batch was saved
      os.truncate(self.scores_path, 0)
    self._file = open(self.scores_path, "ab")

  def write(self, ids: Sequence[str], nll_sum: np.ndarray, tokens: np.ndarray, data_state: dict) -> None:
    out = []
    for r, rid in enumerate(ids):
      n = float(tokens[r])
      nll = float(nll_sum[r]) / n if n > 0 else float("nan")
      out.append(json.dumps({"id": rid, "ppl": _ppl(nll) if n > 0 else float("nan"), "nll": nll,
                             "tokens": int(n)}) + "\n")
    self._file.write("".join(out).encode("utf-8"))
    self._file.flush()
    os.fsync(self._file.fileno())
    self.lines += len(ids)
    self.bytes = self._file.tell()
    self.data_state = data_state
    self._write_json(self.progress_path, {
        "version": PROGRESS_VERSION, "lines": self.lines, "bytes": self.bytes,
        "data_state": data_state, "fingerprint": self.fingerprint})

  def close(self) -> None:
    self._file.close()


def read_scores(path: str) -> list[dict]:
  """The records of a scores JSONL file ({"id", "ppl", "nll", "tokens"} each)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def merge_scores(workdir: str, process_count: int) -> tuple[str, int]:
  """Concatenates `scores.<p>.jsonl` (p = 0..count-1) into `scores.jsonl` atomically;
  returns (path, lines). Duplicate ids (two source records sharing an id) are logged."""
  out = os.path.join(workdir, SCORES_FILE)
  tmp = out + ".tmp"
  seen, dupes, n = set(), [], 0
  with open(tmp, "w", encoding="utf-8") as dst:
    for p in range(process_count):
      with open(os.path.join(workdir, f"scores.{p}.jsonl"), encoding="utf-8") as src:
        for line in src:
          rid = json.loads(line)["id"]
          if rid in seen:
            dupes.append(rid)
          seen.add(rid)
          dst.write(line)
          n += 1
    dst.flush()
    os.fsync(dst.fileno())
  os.replace(tmp, out)
  if dupes:
    log.warning("%d record id(s) occur more than once in the data set (e.g. %s); filtering by id "
                "needs unique ids", len(dupes), dupes[:3])
  return out, n


def _stats(scores: Sequence[Mapping[str, Any]]) -> dict:
  ppl = np.asarray([s["ppl"] for s in scores], np.float64)
  nll = np.asarray([s["nll"] for s in scores], np.float64)
  tok = np.asarray([s["tokens"] for s in scores], np.float64)
  if not len(ppl):
    return {"records": 0}
  ok = np.isfinite(nll)
  return {"records": len(ppl), "target tokens": int(tok.sum()),
          "ppl mean": float(np.mean(ppl[ok])) if ok.any() else None,
          "ppl median": float(np.median(ppl[ok])) if ok.any() else None,
          "ppl p10 / p90": (f"{np.percentile(ppl[ok], 10):.4g} / {np.percentile(ppl[ok], 90):.4g}"
                            if ok.any() else None),
          "corpus ppl (token-weighted)": _ppl(float((nll[ok] * tok[ok]).sum() / max(tok[ok].sum(), 1)))}


def _print_rows(title: str, rows: list[tuple[str, Any]]) -> str:
  width = max(len(k) for k, _ in rows)
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  text = title + "\n" + "\n".join(f"  {k:<{width}}  {fmt(v)}" for k, v in rows)
  print(text, flush=True)
  return text


def score(config, workdir: str, *, params: Any = None, devices: Optional[Sequence[Any]] = None,
          hook: Optional[Callable[[dict], None]] = None) -> dict:
  """The `score` job: per-record perplexity of `config.data` under the model of `config.init`.

  config: `configs/score_perplexity.py` (seed, model (None: from init "hf:<folder>"), init
    "hf:<folder>" | "checkpoint:<workdir>" | "scratch", mesh, rules, data, prompt,
    logprob_dtype, max_batches, progress).
  params: parameters to use instead of loading `config.init` (tests, notebooks).
  devices: the mesh's devices (default: all).
  hook: called after every written batch with {"batches" (written in this run), "lines"
    (in this host's file), "data_state"} (tests raise inside it to simulate a kill).
  Returns the summary (also `<workdir>/score.json` on process 0).
  """
  import flax.linen as nn
  import jax
  from tqdm.auto import tqdm
  from vlm_jax.data import pipeline, schema
  from vlm_jax import report
  from vlm_jax.parallel import mesh as mesh_lib
  from vlm_jax.parallel.distributed import global_batch

  os.makedirs(workdir, exist_ok=True)
  process, processes = jax.process_index(), jax.process_count()
  data_cfg = scoring_data_config(config)
  logprob_dtype = _dtype_ok(config.get("logprob_dtype", "float32"))
  max_batches = int(config.get("max_batches", 0) or 0)
  if process == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
              else json.dumps(config, indent=2, default=str))

  # --- Mesh, model, parameters.
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  rules = [tuple(r) for r in config.rules]
  model, params, param_shardings = _model_and_params(config, mesh, rules, params)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)

  # --- Data: one pass, source order, one record per row.
  pipe = pipeline.Pipeline.from_config(data_cfg, model=model.config, seed=config.seed)
  batch_axes = batch_sharding.spec[0] if len(batch_sharding.spec) else None
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  batch_devices = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
  if pipe.global_batch_size % batch_devices:
    raise ValueError(f"data.global_batch_size {pipe.global_batch_size} must be a multiple of the "
                     f"{batch_devices} devices the batch is split over (mesh axes {batch_axes})")
  fingerprint = json.loads(json.dumps({
      "init": str(config.init), "model": config.model.to_dict() if config.get("model") is not None else None,
      "logprob_dtype": logprob_dtype, "data": pipe.fingerprint}, default=str))
  writer = _Writer(workdir, process, fingerprint)
  it = pipe.iterator(writer.data_state)
  host_records = sum(len(range(process, len(ds), processes)) for ds in pipe.data_sources)
  if writer.resumed:
    log.info("resuming: %d record(s) already scored, continuing at record %d",
             writer.lines, writer.data_state["next_index"])

  # --- The jitted scorer: parameters as they are sharded, the batch over data x fsdp.
  jitted = jax.jit(make_score_fn(model, logprob_dtype), in_shardings=(param_shardings, batch_sharding),
                   out_shardings=batch_sharding)

  bar = tqdm(total=host_records, initial=it.get_state()["next_index"], desc="score", unit="rec",
             dynamic_ncols=True, disable=process != 0 or not config.get("progress", True))
  lines_at_start = writer.lines
  seen = {"tokens": 0, "target": 0, "batches": 0, "written": 0, "first": None}
  t0 = time.perf_counter()

  def flush(pending) -> None:
    out, ids, data_state = pending
    nll_sum, tokens = _local_rows(out["nll_sum"]), _local_rows(out["tokens"])
    writer.write(ids, nll_sum[:len(ids)], tokens[:len(ids)], data_state)
    seen["target"] += int(tokens[:len(ids)].sum())
    if seen["first"] is None:
      seen["first"] = time.perf_counter() - t0
    bar.update(data_state["next_index"] - bar.n)
    dt = max(time.perf_counter() - t0, 1e-9)
    bar.set_postfix(rec_s=f"{(writer.lines - lines_at_start) / dt:.1f}", tok_s=f"{seen['target'] / dt:.0f}")
    seen["written"] += 1
    if hook is not None:
      hook({"batches": seen["written"], "lines": writer.lines, "data_state": data_state})

  exhausted = False
  pending = None
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      while not (max_batches and seen["batches"] >= max_batches):
        batch = None
        if not exhausted:
          batch = next(it, None)
          exhausted = batch is None
        if not _any_process(not exhausted):  # every host is done
          break
        if batch is None:  # this host is done, others are not: it joins with an empty batch
          batch, ids = _empty_batch(pipe), []
        else:  # rows past the records are padding (id ""), always at the end
          ids = [str(i) for i in batch["id"] if i]
        data_state = it.get_state()
        out = jitted(params, global_batch(schema.device_batch(batch), batch_sharding))
        if pending is not None:
          flush(pending)
        pending = (out, ids, data_state)
        seen["batches"] += 1
        seen["tokens"] += int(np.asarray(batch["attention_mask"]).sum())
      if pending is not None:
        flush(pending)
        pending = None
  finally:
    bar.close()
    writer.close()
    it.close()
  wall = time.perf_counter() - t0
  scored_now = writer.lines - lines_at_start

  skipped_local = it.skipped()
  counts = _sum_over_processes(np.asarray(
      [scored_now, seen["tokens"], seen["target"]] + [skipped_local.get(r, 0) for r in pipeline.SKIP_REASONS],
      np.int64))
  scored_now, all_tokens, target_tokens = (int(x) for x in counts[:3])
  skipped = {r: int(c) for r, c in zip(pipeline.SKIP_REASONS, counts[3:]) if c}
  finished = not _any_process(not exhausted)
  _barrier("vlm_jax.curation.score.done")
  summary = {"status": "finished" if finished else f"stopped after max_batches={max_batches}: run again "
             f"to continue", "workdir": workdir}
  if process == 0:
    if finished:
      path, n = merge_scores(workdir, processes)
      summary.update(scores=path, **_stats(read_scores(path)))
    else:
      summary.update(scores=f"{workdir}/scores.<process>.jsonl (partial)", records=writer.lines)
    summary.update({
        "scored in this run": scored_now,
        "skipped records": skipped or "none",
        "wall (s)": round(wall, 2),
        "first batch incl. compile (s)": round(seen["first"], 2) if seen["first"] is not None else None,
        "samples/s": scored_now / wall if scored_now else None,
        "tokens/s (all)": all_tokens / wall if scored_now else None,
        "target tokens/s": target_tokens / wall if scored_now else None,
        "logprob dtype": logprob_dtype,
        "prompt": pipe.chat_template.caption_prompt,
    })
    report.write_json(os.path.join(workdir, "score.json"), summary)
    _print_rows("\nperplexity scoring", list(summary.items()))
  return summary


# --- Selection -----------------------------------------------------------------------------


def _sort_key(s: Mapping[str, Any]):
  ppl = float(s["ppl"])
  return (ppl if not math.isnan(ppl) else math.inf, str(s["id"]))


def keep_count(keep_fraction: float, n: int) -> int:
  """floor(keep_fraction x n), at least 1 (0 when n is 0); exact for decimal fractions (0.29 x 100 = 29)."""
  f = float(keep_fraction)
  if not 0.0 < f <= 1.0:
    raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
  if n == 0:
    return 0
  return max(1, math.floor(fractions.Fraction(repr(f)) * n))


def select(scores: Sequence[Mapping[str, Any]], keep_fraction: Optional[float] = None,
           threshold: Optional[float] = None) -> tuple[list[Mapping[str, Any]], Optional[float]]:
  """The kept records, lowest PPL first (ties by id), and the PPL threshold that keeps them.

  Exactly one of keep_fraction (keep floor(fraction x n), at least 1) and threshold
  (keep PPL <= threshold). A NaN PPL sorts last and is never kept by a threshold.
  """
  if (keep_fraction is None) == (threshold is None):
    raise ValueError("give exactly one of keep_fraction and threshold")
  ids = [s["id"] for s in scores]
  if len(set(ids)) != len(ids):
    dupes = sorted(i for i, c in collections.Counter(ids).items() if c > 1)[:5]
    raise ValueError(f"the scores hold duplicate ids {dupes}: a scores file must hold each id once")
  ordered = sorted(scores, key=_sort_key)
  if keep_fraction is not None:
    kept = ordered[:keep_count(keep_fraction, len(ordered))]
    return kept, (float(kept[-1]["ppl"]) if kept else None)
  threshold = float(threshold)
  return [s for s in ordered if float(s["ppl"]) <= threshold], threshold


def filter_scores(scores_path: str, keep_fraction: Optional[float] = None,
                  threshold: Optional[float] = None) -> set:
  """The ids kept from a scores JSONL file: the lowest-PPL `keep_fraction` (round down, at
  least 1) or those with PPL <= `threshold`; ties broken by id."""
  kept, _ = select(read_scores(scores_path), keep_fraction, threshold)
  return {s["id"] for s in kept}


def ppl_histogram(ppls: Iterable[float], bins: int = 20, width: int = 40,
                  threshold: Optional[float] = None) -> str:
  """A text histogram of PPL values; log-spaced bins when they span a factor of 10 or more.

  With `threshold`, the last column says which bins are kept ("kept") or cut ("part").
  """
  values = np.asarray(list(ppls), np.float64)
  bad = int(np.sum(~np.isfinite(values)))
  values = values[np.isfinite(values)]
  if not len(values):
    return f"(no finite PPL values; {bad} non-finite)"
  lo, hi = float(values.min()), float(values.max())
  log_bins = lo > 0 and hi / lo >= 10
  if hi == lo:
    edges = np.asarray([lo, hi])
  elif log_bins:
    edges = np.geomspace(lo, hi, bins + 1)
  else:
    edges = np.linspace(lo, hi, bins + 1)
  counts, edges = np.histogram(values, bins=edges) if hi > lo else (np.asarray([len(values)]), edges)
  top = max(int(counts.max()), 1)
  lines = [f"PPL histogram: {len(values)} records, {'log-spaced' if log_bins else 'linear'} bins"
           + (f", kept: PPL <= {threshold:.4g}" if threshold is not None else "")]
  for a, b, c in zip(edges[:-1], edges[1:], counts):
    mark = ""
    if threshold is not None:
      mark = "kept" if b <= threshold else ("part" if a <= threshold else "")
    bar = "#" * int(round(width * c / top)) if c else ""
    lines.append(f"  {a:>10.4g} - {b:<10.4g} {bar:<{width}} {int(c):>8d}  {mark}".rstrip())
  if bad:
    lines.append(f"  {'non-finite':>23} {'':<{width}} {bad:>8d}")
  return "\n".join(lines)


# --- The filtered data set (TFDS, array_record) ---------------------------------------------


def record_text(record) -> str:
  """The target text of a record: its caption / answers (" | "-joined) or its text turns."""
  from vlm_jax.data import pipeline
  rec = pipeline.parse_record(record)
  parts = [c for r, c in rec.turns if r == "assistant"] or [c for r, c in rec.turns if r == "text"]
  return " | ".join(p.strip() for p in parts)


def _as_source(source, data_dir: Optional[str] = None):
  from vlm_jax.data import pipeline
  if isinstance(source, pipeline.Source):
    return source if source.data_dir or not data_dir else dataclasses.replace(source, data_dir=data_dir)
  src = pipeline.Source(**dict(source))
  return src if src.data_dir or not data_dir else dataclasses.replace(src, data_dir=data_dir)


def _raw_id(raw) -> str:
  rid = raw["id"] if isinstance(raw, Mapping) else raw.id
  if isinstance(rid, np.ndarray):
    rid = rid.item()
  return rid.decode("utf-8") if isinstance(rid, bytes) else str(rid)


def _schema_dict(record) -> dict:
  """A record (as the pipeline reads it, images still encoded) as TFDS encodes it."""
  from vlm_jax.data import pipeline
  rec = pipeline.parse_record(record)
  return {"id": rec.id, "kind": rec.kind, "images": [bytes(im) for im in rec.images],
          "turns": [{"role": r, "content": c} for r, c in rec.turns], "meta": rec.meta}


@functools.cache
def _filtered_classes():
  """(FilteredConfig, FilteredRecords), defined on first use: TFDS is heavy to import.

  A prepared `filtered_records/<name>` reopens from its files with `tfds.builder` (or a
  pipeline source of that name) even in a process that never defined the class.
  """
  import tensorflow_datasets as tfds
  from etils import epath
  from vlm_jax.data import builders, pipeline

  @dataclasses.dataclass(eq=False)
  class FilteredConfig(tfds.core.BuilderConfig):
    """The source data set and the file of kept ids (one a line)."""
    source: str = ""
    split: str = "train"
    source_data_dir: Optional[str] = None
    ids_path: str = ""

  class FilteredRecords(builders._Builder):  # pylint: disable=protected-access
    """The kept records of a source data set (perplexity filtering), in source order,
    copied unchanged (images stay encoded as they were)."""

    code_path = epath.Path(__file__)

    def __init__(self, *, watch: Iterable[str] = (), **kwargs):
      super().__init__(**kwargs)
      self.watch = set(watch)
      self.watched: dict[str, str] = {}  # id -> target text, for records in `watch` (seen while copying)
      self.missing = 0

    def _split_generators(self, dl_manager):
      cfg = self.builder_config
      if not cfg or not getattr(cfg, "ids_path", ""):
        raise ValueError(f"{self.name}: no source; use vlm_jax.curation.perplexity.build_filtered")
      return {cfg.split: self._generate_examples()}

    def _generate_examples(self):
      cfg = self.builder_config
      with open(cfg.ids_path, encoding="utf-8") as f:
        wanted = {line.rstrip("\n") for line in f if line.strip()}
      src = pipeline.open_source(pipeline.Source(name=cfg.source, split=cfg.split,
                                                 data_dir=cfg.source_data_dir))
      found = set()
      for i in range(len(src)):
        raw = src[i]
        rid = _raw_id(raw)
        if rid in self.watch:
          self.watched[rid] = record_text(raw)
        if rid not in wanted or rid in found:
          continue
        found.add(rid)
        yield rid, _schema_dict(raw)
      self.missing = len(wanted - found)
      if self.missing:
        log.warning("%d kept id(s) are not in %s:%s (e.g. %s)", self.missing, cfg.source, cfg.split,
                    sorted(wanted - found)[:3])

  return FilteredConfig, FilteredRecords


def filtered_config_name(source, kept_ids: Iterable[str]) -> str:
  """`<source slug>_keep<n>_<digest of source and ids>`: equal selections share a name."""
  src = _as_source(source)
  ids = sorted(set(kept_ids))
  digest = hashlib.blake2b(digest_size=5)
  digest.update(json.dumps([src.name, src.split, src.data_dir and os.path.abspath(src.data_dir)]).encode())
  for rid in ids:
    digest.update(rid.encode("utf-8") + b"\n")
  slug = re.sub(r"[^a-z0-9]+", "_", src.name.lower()).strip("_")[:40]
  return f"{slug}_keep{len(ids)}_{digest.hexdigest()}"


def build_filtered(source, kept_ids: Iterable[str], data_dir: str, *, ids_path: Optional[str] = None,
                   source_data_dir: Optional[str] = None, watch: Iterable[str] = ()):
  """Prepares (or reuses) `filtered_records/<name>` in `data_dir`: the records of `source`
  ({name, split[, data_dir]} or a pipeline Source naming a TFDS data set) whose id is in
  `kept_ids`, in source order. Returns the builder (`builder.watched`: the target texts of the
  `watch` ids met while copying; empty when the data set was already prepared)."""
  src = _as_source(source, source_data_dir)
  if not src.name:
    raise ValueError("build_filtered copies from a TFDS data set: the source needs a name")
  ids = sorted(set(kept_ids))
  name = filtered_config_name(src, ids)
  ids_path = ids_path or os.path.join(data_dir, f"{name}.ids.txt")
  os.makedirs(os.path.dirname(os.path.abspath(ids_path)), exist_ok=True)
  with open(ids_path, "w", encoding="utf-8") as f:
    f.writelines(rid + "\n" for rid in ids)
  FilteredConfig, FilteredRecords = _filtered_classes()  # pylint: disable=invalid-name
  from vlm_jax.data import builders
  config = FilteredConfig(name=name, version=builders._VERSION,  # pylint: disable=protected-access
                          description=f"{len(ids)} records of {src.label} kept by perplexity filtering",
                          source=src.name, split=src.split,
                          source_data_dir=src.data_dir and os.path.abspath(src.data_dir),
                          ids_path=os.path.abspath(ids_path))
  builder = FilteredRecords(config=config, data_dir=data_dir, watch=watch)
  builder.download_and_prepare()
  return builder


def _texts_by_id(source, ids: set) -> dict[str, str]:
  """Target texts of `ids`, scanning the source until all are found."""
  from vlm_jax.data import pipeline
  src = pipeline.open_source(_as_source(source))
  out = {}
  for i in range(len(src)):
    if len(out) == len(ids):
      break
    raw = src[i]
    rid = _raw_id(raw)
    if rid in ids:
      out[rid] = record_text(raw)
  return out


def _shorten(text: str, n: int = 90) -> str:
  text = " ".join(text.split())
  return text if len(text) <= n else text[:n - 3] + "..."


def filter_data(config, workdir: str) -> dict:
  """The `filter` job: select from `<workdir>/scores.jsonl` (or `filter.scores`), write the
  filtered TFDS data set, print the histogram, both tails and a summary, write filter.json."""
  import jax
  from vlm_jax import report

  if jax.process_index() != 0:
    return {}
  fc = config.filter
  scores_path = fc.get("scores") or os.path.join(workdir, SCORES_FILE)
  if not os.path.exists(scores_path):
    raise FileNotFoundError(f"{scores_path} does not exist: run the `score` job first (same config, "
                            f"--config.job=score) or set filter.scores")
  scores = read_scores(scores_path)
  threshold = fc.get("threshold")
  keep_fraction = None if threshold is not None else fc.get("keep_fraction")
  if threshold is not None and fc.get("keep_fraction") is not None:
    log.info("filter.threshold=%s given: keeping PPL <= threshold (filter.keep_fraction ignored)", threshold)
  kept, used = select(scores, keep_fraction, threshold)
  kept_ids = [s["id"] for s in kept]

  data_cfg = scoring_data_config(config)
  source = _as_source(data_cfg["sources"][0], data_cfg.get("data_dir"))
  out_dir = fc.get("output_dir") or os.path.join(workdir, "data")
  ordered = sorted(scores, key=_sort_key)
  k = int(fc.get("tails", 5))
  low, high = ordered[:k], ordered[::-1][:k]
  tail_ids = {s["id"] for s in low + high}
  ids_path = os.path.join(workdir, "kept_ids.txt")
  builder = build_filtered(source, kept_ids, out_dir, ids_path=ids_path, watch=tail_ids)
  texts = dict(builder.watched) or _texts_by_id(source, tail_ids)
  name = f"{builder.name}/{builder.builder_config.name}"
  written = builder.info.splits[source.split].num_examples

  print(ppl_histogram([s["ppl"] for s in scores], bins=int(fc.get("bins", 20)), threshold=used), flush=True)
  for title, rows in ((f"\nlowest PPL (the {len(low)} most predictable records)", low),
                      (f"\nhighest PPL (the {len(high)} least predictable: noise, or rare knowledge?)", high)):
    report.print_table([{"id": s["id"], "ppl": float(s["ppl"]), "tokens": s["tokens"],
                         "text": _shorten(texts.get(s["id"], "?"))} for s in rows], title,
                       columns=["id", "ppl", "tokens", "text"])
  summary = {
      "kept": len(kept_ids), "total": len(scores),
      "kept %": f"{100.0 * len(kept_ids) / max(len(scores), 1):.1f}%",
      "mode": f"threshold {threshold}" if threshold is not None else f"keep_fraction {keep_fraction}",
      "threshold": used, "written": written, "source": source.label,
      "dataset": name, "data_dir": os.path.abspath(out_dir), "split": source.split,
      "scores": scores_path, "kept_ids": ids_path,
  }
  _print_rows("\nperplexity filtering", list(summary.items()))
  print(f"\nuse it: data.sources=[dict(name={name!r}, split={source.split!r})], "
        f"data.data_dir={os.path.abspath(out_dir)!r}", flush=True)
  report.write_json(os.path.join(workdir, "filter.json"),
                    {**summary, "keep_fraction": keep_fraction, "threshold_given": threshold})
  return summary


def run(config, workdir: str) -> dict:
  """`config.job`: "score" or "filter"."""
  job = config.get("job", "score")
  if job == "score":
    return score(config, workdir)
  if job == "filter":
    return filter_data(config, workdir)
  raise ValueError(f"unknown curation job {job!r}; known: score, filter")
