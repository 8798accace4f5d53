"""The engine's config: every key a train run reads, with its default.

Experiment configs start from `default_config()` and set what differs; the config
is then locked, so a mistyped key is an error naming it.
"""

import ml_collections

from vlm_jax.parallel.mesh import DEFAULT_RULES


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "train"
  c.seed = 0
  c.total_steps = 100
  c.checkpoint_every = 50
  c.log_every = 1
  c.eval_every = 0
  c.progress = True
  c.init = "scratch"  # | "hf:<folder>" | "checkpoint:<workdir of the previous stage>" (train/init_from.py)
  # {subtree: "checkpoint:<workdir>"}: after `init`, these top-level parameter subtrees come
  # from another run, e.g. {"vision": ...} from a contrastive run (the main job's tower)
  c.init_parts = ml_collections.ConfigDict()
  c.grad_accum = 1
  c.z_loss = 0.0
  # > 0: the next-token loss runs the output head this many positions at a time (never
  # [batch, length, vocab] logits at once); 0: all at once. Same numbers either way.
  c.loss_chunk = 0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.rules = [tuple(r) for r in DEFAULT_RULES]
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, schedule="cosine", warmup_frac=0.03, warmup_steps=0, end_lr_frac=0.0,
      weight_decay=0.0, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8,
      groups=[(".*", 1.0)]))  # (path regex, lr multiplier or None = frozen); first match wins
  # overwrite: a workdir holding another model's checkpoints is refused, unless this is True:
  # then they move to checkpoints.old[.N] (nothing is deleted) and the run starts fresh
  c.checkpoint = ml_collections.ConfigDict(dict(keep=3, asynchronous=True, overwrite=False))
  c.debug = ml_collections.ConfigDict(dict(preempt_at_step=-1, preempt_signal="SIGTERM"))
  return c
