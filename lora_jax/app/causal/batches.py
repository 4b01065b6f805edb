"""Batches of examples and the masked loss.

Batches are padded to a few bucketed lengths, or examples are packed into rows of
``max_length`` tokens with segment ids and restarting positions, so packed examples never
attend to each other and no loss crosses their boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.app.causal.data import Example

BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _bucket(n: int, max_length: int) -> int:
  return next((b for b in BUCKETS if n <= b <= max_length), max_length)


def padded_batch(examples: list[Example], max_length: int) -> dict:
  """Right-padded rows (length bucketed): input ids, attention mask and target mask."""
  length = _bucket(max(len(e.ids) for e in examples), max_length)
  ids = np.zeros((len(examples), length), np.int32)
  mask = np.zeros((len(examples), length), np.int32)
  targets = np.zeros((len(examples), length), bool)
  for row, e in enumerate(examples):
    ids[row, :len(e.ids)] = e.ids
    mask[row, :len(e.ids)] = 1
    targets[row, :len(e.ids)] = e.targets
  return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def pack(examples: list[Example], max_length: int) -> list[list[Example]]:
  """Examples in order into rows of at most ``max_length`` tokens (a new row when the next
  does not fit)."""
  rows, row, used = [], [], 0
  for e in examples:
    if row and used + len(e.ids) > max_length:
      rows.append(row)
      row, used = [], 0
    row.append(e)
    used += len(e.ids)
  return rows + ([row] if row else [])


def packed_batch(rows: list[list[Example]], max_length: int) -> dict:
  """Packed rows: ids, segment ids (1, 2, ... per example; 0 is padding), positions that
  restart at each example, and the target mask (an example's first token never is one)."""
  shape = (len(rows), max_length)
  ids, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  positions, targets = np.zeros(shape, np.int32), np.zeros(shape, bool)
  for r, row in enumerate(rows):
    at = 0
    for s, e in enumerate(row, 1):
      n = len(e.ids)
      ids[r, at:at + n], segments[r, at:at + n] = e.ids, s
      positions[r, at:at + n] = np.arange(n)
      targets[r, at:at + n] = e.targets
      targets[r, at] = False
      at += n
  return {"input_ids": ids, "segment_ids": segments, "positions": positions,
          "attention_mask": (segments > 0).astype(np.int32), "targets": targets}


def masked_loss(logits, batch):
  """Mean next-token cross-entropy over the target tokens: the logits at position t predict
  token t+1, counted where token t+1 is a target."""
  logits = logits[:, :-1].astype(jnp.float32)
  labels, weights = batch["input_ids"][:, 1:], batch["targets"][:, 1:].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def select_targets(batch: dict) -> dict:
  """Adds ``select`` (batch, k): the positions whose next token is a target, with their
  ``select_labels`` and ``select_weights`` (k rounded up to a multiple of 8), when they are at
  most half the positions; the loss then runs the head on those positions only."""
  follows = batch["targets"][:, 1:]
  k = -(-int(follows.sum(1).max()) // 8) * 8
  if k > follows.shape[1] // 2:
    return batch
  shape = (len(follows), k)
  select, labels = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  weights = np.zeros(shape, np.float32)
  for row, flags in enumerate(follows):
    at = np.flatnonzero(flags)
    select[row, :len(at)], weights[row, :len(at)] = at, 1.0
    labels[row, :len(at)] = batch["input_ids"][row, at + 1]
  return {**batch, "select": select, "select_labels": labels, "select_weights": weights}


def share_prefix(batch: dict, *, multiple: int = 8) -> dict:
  """Splits a padded batch's shared start off: the tokens every row begins with (a system
  prompt, an instruction), rounded down to a multiple of ``multiple`` and ending before any
  target. ``loss_of`` then runs them once (batch 1) into a key-value cache that every row's
  remaining tokens attend to: the same loss, for a fraction of the token-FLOPs. The rest is
  re-padded to its longest row (a multiple of ``multiple``). Batches without such a start (or
  packed ones) come back unchanged."""
  ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
  if "segment_ids" in batch or "select" in batch:
    return batch
  same = np.all(ids == ids[:1], axis=0) & np.all(mask > 0, axis=0)
  shared = len(same) if same.all() else int(np.argmin(same))
  first_target = int(np.argmax(targets.any(0))) if targets.any() else len(same)
  shared = min(shared, first_target - 1)
  shared -= shared % multiple
  if shared < multiple:
    return batch
  rest = int(mask.sum(1).max()) - shared
  rest = -(-rest // multiple) * multiple
  cut = slice(shared, shared + rest)
  return {"prefix_ids": ids[:1, :shared], "input_ids": ids[:, cut], "targets": targets[:, cut],
          "attention_mask": np.concatenate([mask[:, :shared], mask[:, cut]], 1)}


def _with_prefix(apply, params, batch, init_cache, kw):
  """``kw`` for the rows' pass over the cache of their shared prefix (``share_prefix``)."""
  prefix, ids = batch["prefix_ids"], batch["input_ids"]
  shared, (rows, length) = prefix.shape[1], ids.shape
  _, cache = apply(params, prefix, cache=init_cache(1, shared + length), cache_index=0,
                   logits_at=jnp.zeros((1, 1), jnp.int32))
  cache = jax.tree.map(lambda a: jnp.broadcast_to(a, (a.shape[0], rows) + a.shape[2:]), cache)
  positions = jnp.broadcast_to(shared + jnp.arange(length, dtype=jnp.int32), (rows, length))
  return dict(kw, positions=positions, cache=cache, cache_index=shared)


def loss_of(apply, params, batch, *, init_cache=None):
  """The task's loss: ``masked_loss`` of ``apply``'s logits; the same value computed at the
  selected positions only when the batch has a ``select`` (``select_targets``), and over the
  cache of a shared prefix when it has ``prefix_ids`` (``share_prefix``; needs
  ``init_cache(batch, length)``)."""
  kw = dict(positions=batch.get("positions"), attention_mask=batch["attention_mask"],
            segment_ids=batch.get("segment_ids"))
  if "prefix_ids" in batch:
    kw = _with_prefix(apply, params, batch, init_cache, kw)
  if "select" not in batch:
    logits = apply(params, batch["input_ids"], **kw)
    return masked_loss(logits[0] if "cache" in kw else logits, batch)
  logits = apply(params, batch["input_ids"], logits_at=batch["select"], **kw)
  logits = logits[0] if "cache" in kw else logits
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["select_labels"])
  weights = batch["select_weights"]
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)

