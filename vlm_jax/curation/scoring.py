r"""The resumable, sharded scoring loop: `perplexity.make_score_fn` over a whole data set.

    score(config, workdir, *, params=None, devices=None, hook=None) -> summary

Reads the config's `data` block through the input pipeline with one pass (`num_epochs=1`),
no shuffling and no packing: each row is one record (a packing=True config is refused: a
packed row mixes records). One data source per run. Records the pipeline skips (too long,
bad image, ...) get no score and are counted in the summary. The model and its weights come
from `config.model` / `config.init` (`vlm_jax.train.init_from.load_model`). Batches of
`data.global_batch_size` rows are sharded over the mesh (batch over `data` x `fsdp`,
parameters by the config's `rules`) and scored by one jitted function; each host reads and
scores its own shard of the records and writes `<workdir>/scores.<process>.jsonl`, one line
per record:

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
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

from vlm_jax import report
from vlm_jax.curation import perplexity
from vlm_jax.data import pipeline, schema
from vlm_jax.parallel import distributed
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.train import init_from

log = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
PROGRESS_VERSION = 1


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
  kind, path = init_from.parse(config.init)
  if not data.get("tokenizer") and kind == "hf":
    data["tokenizer"] = path
  return data


# --- The scores files: appended per batch, resumable ----------------------------------------


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
      out.append(json.dumps({"id": rid, "ppl": perplexity.ppl_of(nll) if n > 0 else float("nan"),
                             "nll": nll, "tokens": int(n)}) + "\n")
    self._file.write("".join(out).encode("utf-8"))
    self._file.flush()
    os.fsync(self._file.fileno())
    self.lines += len(ids)
    self.bytes = self._file.tell()
    self.data_state = data_state
    report.write_json(self.progress_path, {
        "version": PROGRESS_VERSION, "lines": self.lines, "bytes": self.bytes,
        "data_state": data_state, "fingerprint": self.fingerprint})

  def close(self) -> None:
    self._file.close()


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
  """PPL statistics of a scores file for the summary (NaN records left out)."""
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
          "corpus ppl (token-weighted)": perplexity.ppl_of(
              float((nll[ok] * tok[ok]).sum() / max(tok[ok].sum(), 1)))}


# --- The loop ------------------------------------------------------------------------------


def _empty_batch(pipe) -> dict:
  """An all-padding batch: what a host that ran out of records feeds while others finish."""
  batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in pipe.batch_spec().items()}
  batch["input_ids"][:] = pipe.encoder.pad_id
  return batch


def score(config, workdir: str, *, params: Any = None, devices: Optional[Sequence[Any]] = None,
          hook: Optional[Callable[[dict], None]] = None) -> dict:
  """Per-record perplexity of `config.data` under the model of `config.init` (see the module docstring).

  config: `vlm_jax.curation.jobs.default_config()` (seed, model (None: from init
    "hf:<folder>"), init "hf:<folder>" | "checkpoint:<workdir>" | "scratch", mesh, rules,
    data, prompt, logprob_dtype, max_batches, progress).
  params: parameters to use instead of loading `config.init` (tests, notebooks).
  devices: the mesh's devices (default: all).
  hook: called after every written batch with {"batches" (written in this run), "lines"
    (in this host's file), "data_state"} (tests raise inside it to simulate a kill).
  Returns the summary (also `<workdir>/score.json` on process 0).
  """
  os.makedirs(workdir, exist_ok=True)
  process, processes = jax.process_index(), jax.process_count()
  data_cfg = scoring_data_config(config)
  logprob_dtype = perplexity.check_logprob_dtype(config.get("logprob_dtype", "float32"))
  max_batches = int(config.get("max_batches", 0) or 0)
  if process == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
              else json.dumps(config, indent=2, default=str))

  # --- Mesh, model, parameters.
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  rules = [tuple(r) for r in config.rules]
  model, params, param_shardings = init_from.load_model(config, mesh, rules, params)
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
  jitted = jax.jit(perplexity.make_score_fn(model, logprob_dtype),
                   in_shardings=(param_shardings, batch_sharding), out_shardings=batch_sharding)

  bar = tqdm(total=host_records, initial=it.get_state()["next_index"], desc="score", unit="rec",
             dynamic_ncols=True, disable=process != 0 or not config.get("progress", True))
  lines_at_start = writer.lines
  seen = {"tokens": 0, "target": 0, "batches": 0, "written": 0, "first": None}
  t0 = time.perf_counter()

  def flush(pending) -> None:
    out, ids, data_state = pending
    nll_sum, tokens = distributed.local_rows(out["nll_sum"]), distributed.local_rows(out["tokens"])
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

  # The batch of step n+1 is dispatched before the results of step n are written, so the
  # device never waits on the host's file writes.
  exhausted = False
  pending = None
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      while not (max_batches and seen["batches"] >= max_batches):
        batch = None
        if not exhausted:
          batch = next(it, None)
          exhausted = batch is None
        if not distributed.any_process(not exhausted):  # every host is done
          break
        if batch is None:  # this host is done, others are not: it joins with an empty batch
          batch, ids = _empty_batch(pipe), []
        else:  # rows past the records are padding (id ""), always at the end
          ids = [str(i) for i in batch["id"] if i]
        data_state = it.get_state()
        out = jitted(params, distributed.global_batch(schema.device_batch(batch), batch_sharding))
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
  counts = distributed.sum_over_processes(np.asarray(
      [scored_now, seen["tokens"], seen["target"]] + [skipped_local.get(r, 0) for r in pipeline.SKIP_REASONS],
      np.int64))
  scored_now, all_tokens, target_tokens = (int(x) for x in counts[:3])
  skipped = {r: int(c) for r, c in zip(pipeline.SKIP_REASONS, counts[3:]) if c}
  finished = not distributed.any_process(not exhausted)
  distributed.barrier("vlm_jax.curation.score.done")
  summary = {"status": "finished" if finished else f"stopped after max_batches={max_batches}: run again "
             f"to continue", "workdir": workdir}
  if process == 0:
    if finished:
      path, _ = merge_scores(workdir, processes)
      summary.update(scores=path, **_stats(perplexity.read_scores(path)))
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
    report.print_rows("\nperplexity scoring", list(summary.items()))
  return summary
