"""Contrastive region guidance (CRG, METHODS §7) for generation and for scoring.

Per step, with ℓ the next-token logits given the image and ℓ_m given the image with the
regions of interest blacked out (`masking`):

    guided = (1 + α)·ℓ − α·ℓ_m

Both branches run as ONE doubled batch: rows 0..b-1 see the images, rows b..2b-1 the
masked images, each row with its own slots of one KV cache, and both are fed the same
chosen token. The contrast branch sees an image (the masked one), unlike the reference
code, whose second branch sees no image at all. Rows without boxes decode plainly
(their masked image equals the image, and the rule is not applied to them). α = 0 gives
plain decoding's tokens bit for bit ((1 + 0)·ℓ − 0·ℓ_m == ℓ exactly in floating point; the
image rows of a doubled batch gave the same tokens as `generate` in every CPU test, their
logits agreeing to ~5e-7: a backend may order a 2b-row matmul differently from a b-row
one). α is a traced argument: sweeping it compiles once.

    guided_generate(model, params, input_ids, images=..., boxes=..., alpha=1.0)
    guided_score(model, params, input_ids, target_mask, images=..., boxes=..., alphas=(0, 1))

Images take either layout of `VLM.__call__`: [n, h, w, 3] consumed in order by the
image tokens of the whole batch (boxes[i]: image i's boxes), or [b, m, h, w, 3], m slots
per row (boxes[r][j]: the boxes of row r's image j). Both layouts double along axis 0.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.data.pipeline import vision_settings
from vlm_jax.guidance import masking
from vlm_jax.models.generate import decode_loop
from vlm_jax.models.lm import KVCache
from vlm_jax.models.vlm import VLM


def combine(logits: jax.Array, masked_logits: jax.Array, alpha, guided_rows: jax.Array) -> jax.Array:
  """(1 + α)·ℓ − α·ℓ_m on the rows of `guided_rows` [b], ℓ elsewhere; logits [b, ..., vocab]."""
  guided = (1.0 + alpha) * logits - alpha * masked_logits
  rows = guided_rows.reshape(guided_rows.shape + (1,) * (logits.ndim - 1))
  return jnp.where(rows, guided, logits)


def _rows_of_images(input_ids: np.ndarray, image_token_id: int, tokens_per_image: int) -> np.ndarray:
  """For the [n, ...] layout: the batch row each image belongs to."""
  per_row = (np.asarray(input_ids) == image_token_id).sum(axis=1) // tokens_per_image
  return np.repeat(np.arange(len(per_row)), per_row)


def contrast_inputs(model: VLM, params, input_ids, images, boxes: Optional[Sequence] = None,
                    masked_images=None, mode: str = "pixel"):
  """(kwargs for the image branch, kwargs for the masked branch, guided rows bool [b]).

  Give `boxes` (in the model's input pixels) or `masked_images` (already blacked out,
  e.g. in the raw image before preprocessing; then every row with an image is guided
  unless `boxes` also says which rows have boxes).
  """
  if not isinstance(model, VLM):
    raise TypeError(f"region guidance needs a VLM, got {type(model).__name__}")
  if mode not in masking.MODES:
    raise ValueError(f"unknown masking mode {mode!r}; one of {masking.MODES}")
  images = jnp.asarray(images)
  if images.ndim not in (4, 5):
    raise ValueError(f"images must be [n, h, w, 3] or [b, m, h, w, 3], got shape {images.shape}")
  b = np.shape(input_ids)[0]
  lead, (h, w) = images.shape[:-3], images.shape[-3:-1]
  if boxes is not None:
    masks = masking.region_masks(boxes, lead, h, w)
    per_image = masks.any(axis=(-2, -1))
  else:
    if masked_images is None:
      raise ValueError("give boxes or masked_images")
    masks, per_image = None, np.ones(lead, bool)
  if images.ndim == 5:
    guided_rows = per_image.any(axis=1)
  else:
    c = model.config
    guided_rows = np.zeros(b, bool)
    owner = _rows_of_images(input_ids, c.image_token_id, c.tokens_per_image)
    if len(owner) != lead[0]:
      raise ValueError(f"input_ids hold image tokens for {len(owner)} images, {lead[0]} were given")
    np.logical_or.at(guided_rows, owner, per_image)
  black = masking.black_pixel(vision_settings(model.config)["normalization"])
  if mode == "pixel":
    if masked_images is None:
      masked_images = masking.mask_pixels(images, masks, black)
    return dict(images=images), dict(images=jnp.asarray(masked_images, images.dtype)), guided_rows
  if masks is None:
    raise ValueError("mode='tokens' needs boxes")
  embeds, masked = masking.mask_tokens(model, params, images, masks, black)
  return dict(image_embeds=embeds), dict(image_embeds=masked), guided_rows


def _doubled(plain: dict, masked: dict) -> tuple[str, jax.Array]:
  (key, a), = plain.items()
  return key, jnp.concatenate([a, masked[key]], axis=0)


@functools.lru_cache(maxsize=32)
def _compiled_generate(config, key: str, max_new_tokens: int, temperature: float, top_p: float,
                       eos_token_id: Optional[int], pad_token_id: int):
  model = VLM(config)

  def run(params, input_ids, attention_mask, visual, guided_rows, alpha, rng):
    b, p = input_ids.shape
    ids = jnp.concatenate([input_ids, input_ids])
    mask = jnp.concatenate([attention_mask, attention_mask])
    cache = KVCache.empty(config.text, 2 * b, p + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    out = model.apply({"params": params}, ids, attention_mask=mask, positions=positions, cache=cache,
                      **{key: visual})

    def guide(logits):  # [2b, vocab] -> [b, vocab]
      return combine(logits[:b], logits[b:], alpha, guided_rows)

    def next_logits(token, cache, pos):  # both branches take the token chosen from the guided logits
      out = model.apply({"params": params}, jnp.concatenate([token, token])[:, None],
                        attention_mask=jnp.ones((2 * b, 1), bool), positions=pos[:, None], cache=cache)
      return out.cache, guide(out.logits[:, -1])

    return decode_loop(guide(out.logits[:, -1]), out.cache, positions[:, -1], next_logits, max_new_tokens,
                       temperature, top_p, eos_token_id, pad_token_id, rng)

  return jax.jit(run)


def guided_generate(model: VLM, params, input_ids, *, images, boxes: Optional[Sequence] = None,
                    masked_images=None, alpha: float = 1.0, mode: str = "pixel", attention_mask=None,
                    max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                    rng: Optional[jax.Array] = None, eos_token_id: Optional[int] = None,
                    pad_token_id: int = 0) -> jax.Array:
  """`[batch, max_new_tokens]` new tokens, decoded with region guidance (left-padded prompts).

  Same contract as `vlm_jax.models.generate.generate` (greedy when temperature == 0, else
  nucleus sampling; after `eos_token_id`, `pad_token_id`), plus the regions: `boxes`
  nested like the images' leading axes (see the module docstring), or `masked_images`.
  """
  input_ids, attention_mask, key, visual, guided_rows = _branch_inputs(
      model, params, input_ids, attention_mask, images, boxes, masked_images, mode)
  fn = _compiled_generate(model.config, key, max_new_tokens, float(temperature), float(top_p),
                          eos_token_id, pad_token_id)
  rng = jax.random.key(0) if rng is None else rng
  return fn(params, input_ids, attention_mask, visual, jnp.asarray(guided_rows),
            jnp.float32(alpha), rng)


def _branch_inputs(model, params, input_ids, attention_mask, images, boxes, masked_images, mode):
  """(ids, int32 mask, image argument name, both branches' visual inputs doubled, guided rows)."""
  input_ids = jnp.asarray(input_ids)
  attention_mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
  plain, masked, guided_rows = contrast_inputs(model, params, np.asarray(input_ids), images, boxes,
                                               masked_images, mode)
  key, visual = _doubled(plain, masked)
  return input_ids, jnp.asarray(attention_mask, jnp.int32), key, visual, guided_rows


@functools.lru_cache(maxsize=32)
def _compiled_logits(config, key: str):
  model = VLM(config)

  def run(params, input_ids, attention_mask, visual):
    ids = jnp.concatenate([input_ids, input_ids])
    mask = jnp.concatenate([attention_mask, attention_mask])
    logits = model.apply({"params": params}, ids, attention_mask=mask, **{key: visual}).logits
    b = input_ids.shape[0]
    return logits[:b], logits[b:]

  return jax.jit(run)


def branch_logits(model: VLM, params, input_ids, *, images, boxes=None, masked_images=None,
                  mode: str = "pixel", attention_mask=None) -> tuple[jax.Array, jax.Array, np.ndarray]:
  """Teacher-forced (ℓ, ℓ_m, guided rows): both branches' logits [b, length, vocab], one doubled pass."""
  input_ids, attention_mask, key, visual, guided_rows = _branch_inputs(
      model, params, input_ids, attention_mask, images, boxes, masked_images, mode)
  logits, masked_logits = _compiled_logits(model.config, key)(params, input_ids, attention_mask, visual)
  return logits, masked_logits, guided_rows


@jax.jit
def _sequence_scores(logits, masked_logits, guided_rows, alphas, input_ids, target_mask):
  targets = input_ids[:, 1:]
  weight = target_mask[:, 1:].astype(jnp.float32)

  def total(lg):  # sum over the target tokens of log p(token | everything before it)
    logp = jax.nn.log_softmax(lg[:, :-1], axis=-1)
    return (jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weight).sum(-1)

  guided = jax.vmap(lambda a: total(combine(logits, masked_logits, a, guided_rows)))(alphas)
  return guided, total(logits), total(masked_logits)


def guided_score(model: VLM, params, input_ids, target_mask, *, images, boxes=None, masked_images=None,
                 alphas: Sequence[float] = (1.0,), mode: str = "pixel", attention_mask=None) -> dict:
  """Teacher-forced log-probabilities of the continuation tokens (`target_mask` [b, length] = 1).

  Returns numpy arrays: "guided" [len(alphas), b], the sum over target tokens of
  log softmax((1 + α)·ℓ − α·ℓ_m) (ℓ alone on rows without boxes); "plain" [b] and
  "masked" [b], the same under each branch alone. Rows may be right- or left-padded
  (`attention_mask`); one doubled forward pass serves every α.
  """
  logits, masked_logits, rows = branch_logits(model, params, input_ids, images=images, boxes=boxes,
                                              masked_images=masked_images, mode=mode,
                                              attention_mask=attention_mask)
  guided, plain, masked = _sequence_scores(logits, masked_logits, jnp.asarray(rows),
                                           jnp.asarray(alphas, jnp.float32), jnp.asarray(input_ids),
                                           jnp.asarray(target_mask))
  return {"guided": np.asarray(guided), "plain": np.asarray(plain), "masked": np.asarray(masked),
          "alphas": np.asarray(alphas, np.float32), "guided_rows": rows}


def rerank_boxes(model: VLM, params, input_ids, target_mask, *, image, candidates: Sequence,
                 image_index: int = 0, mode: str = "pixel") -> dict:
  """Ranks candidate boxes by how much masking each lowers the continuation's log-probability.

  input_ids / target_mask: ONE row [length] (the prompt and the referring expression);
  image: that row's images [m, h, w, 3]; candidates: boxes on image `image_index`. All
  candidates run as one batch (a row per box). Returns {"drop" [k] = log p(expr | I) −
  log p(expr | I with box k black), "order" (best first), "best"}.
  """
  k = len(candidates)
  if k == 0:
    raise ValueError("rerank_boxes needs at least one candidate box")
  image = jnp.asarray(image)
  ids = np.repeat(np.asarray(input_ids)[None], k, axis=0)
  mask = np.repeat(np.asarray(target_mask)[None], k, axis=0)
  images = jnp.broadcast_to(image[None], (k, *image.shape))
  boxes = [[[] for _ in range(image_index)] + [[list(box)]] for box in candidates]
  scores = guided_score(model, params, ids, mask, images=images, boxes=boxes, alphas=(0.0,), mode=mode)
  drop = scores["plain"] - scores["masked"]
  order = np.argsort(-drop, kind="stable")
  return {"drop": drop, "order": order, "best": int(order[0])}
