"""Autoregressive decoding with a key-value cache: a batch of prompts, greedy or sampled.

Model-agnostic: any ``apply_fn(params, tokens, *, positions, attention_mask, cache,
cache_index) -> (logits, cache)`` decodes, the reference Llama's ``apply`` among them, plain or
through ``lora_jax.lora`` (unmerged adapters: pass ``lora(model.apply)`` with ``params=(base,
adapters)`` and ``adapted=True``) or on merged parameters.

Prompts are left-padded to a common length (rounded up to a multiple of 16, so a few compiled
shapes serve many prompt lengths); each row's positions count its own tokens only, and the
attention mask hides the padding. One jitted call fills the cache with the prompts (prefill);
then one jitted call per new token (decode) writes one slot of the cache. When the prompts of a
batch begin alike (a system prompt, an instruction), that shared start (whole multiples of 16
tokens) runs once, at batch 1, into the cache that every row's remaining tokens then attend to:
the same tokens, for a fraction of the prefill's work (``share_prefix``). Rows stop at a stop
token (end of sequence, ``<|im_end|>``) or at ``max_new_tokens``; the loop ends when all have
stopped. ``on_tokens`` sees every step's tokens as they come (streaming).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Generation", "Sampling", "generate", "sample", "shared_start"]

PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
  """How the next token is chosen: ``temperature`` 0 is greedy (argmax); otherwise logits are
  divided by the temperature, cut to the ``top_k`` most likely tokens and to the smallest set
  whose probability reaches ``top_p`` (nucleus), and sampled with an explicit PRNG key."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}.")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be a positive integer or None, got {self.top_k}.")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = Sampling()


def sample(logits, key, sampling: Sampling):
  """Next tokens (batch,) from the last logits (batch, vocab)."""
  if sampling.greedy:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None and sampling.top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, -1)
    before = jnp.cumsum(jax.nn.softmax(ranked, -1), -1) - jax.nn.softmax(ranked, -1)
    ranked = jnp.where(before < sampling.top_p, ranked, -jnp.inf)  # the first always stays
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(ranked)
  return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Generation:
  """New tokens per prompt (up to and including a stop token), and timings.

  ``prefill_s`` covers the prompt pass, ``decode_s`` the token-by-token loop (compilation
  included the first time a shape is seen); ``tokens_per_s`` counts the new tokens of all rows
  over both.
  """

  tokens: list[list[int]]
  prompt_tokens: int
  prefill_s: float
  decode_s: float

  @property
  def new_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int, bucket: int = PROMPT_BUCKET):
  """``(tokens, mask)`` int32 (batch, length): prompts right-aligned, the length rounded up to a
  multiple of ``bucket``."""
  longest = max(len(p) for p in prompts)
  length = -(-longest // bucket) * bucket
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, p in enumerate(prompts):
    if len(p):
      tokens[row, length - len(p):] = p
      mask[row, length - len(p):] = 1
  return tokens, mask


def _check(prompts, max_new_tokens, context):
  if isinstance(prompts, (str, bytes)) or not len(prompts):
    raise ValueError("prompts must be a non-empty list of token-id lists (one per prompt).")
  for i, p in enumerate(prompts):
    if not len(p):
      raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  longest = max(len(p) for p in prompts)
  if context is not None and longest + max_new_tokens > context:
    raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                     f"exceeds the model's context of {context} tokens; shorten the prompt or "
                     f"ask for fewer new tokens.")


@dataclasses.dataclass(frozen=True)
class _Steps:
  """The jitted prefill and decode step for one ``apply_fn`` and sampling."""

  prefix: Callable
  prefill: Callable
  decode: Callable


_STEPS: dict = {}


def _steps(apply_fn, sampling: Sampling, adapted: bool, cache_axes=None) -> _Steps:
  """``cache_axes``: the cache's batch axis per leaf, ``(leaves, treedef)``, for a mixed batch
  (``adapter_index``: each row its own adapter of a bank), None otherwise."""
  key = (apply_fn, sampling, adapted, cache_axes)
  if key in _STEPS:
    return _STEPS[key]

  def call(params, tokens, index, **kw):
    if not adapted:
      return apply_fn(params, tokens, **kw)
    if index is None:
      return apply_fn(*params, tokens, **kw)
    axes = jax.tree_util.tree_unflatten(cache_axes[1], cache_axes[0])
    return apply_fn(*params, tokens, adapter_index=index, example_axes={"cache": axes},
                    example_out_axes=(0, axes), **kw)

  def prefix(params, tokens, mask, cache):  # one row: the batch's shared start, slots 0..
    return call(params, tokens, None, attention_mask=mask, cache=cache,
                cache_index=jnp.int32(0))[1]

  def prefill(params, tokens, positions, mask, cache, index, key, rows):
    logits, cache = call(params, tokens, rows, positions=positions, attention_mask=mask,
                         cache=cache, cache_index=index)
    return sample(logits[:, -1], key, sampling), cache

  def decode(params, token, position, mask, cache, index, key, rows):
    logits, cache = call(params, token[:, None], rows, positions=position[:, None],
                         attention_mask=mask, cache=cache, cache_index=index)
    return sample(logits[:, -1], key, sampling), cache

  steps = _Steps(jax.jit(prefix, donate_argnums=3), jax.jit(prefill, donate_argnums=4),
                 jax.jit(decode, donate_argnums=4))
  if len(_STEPS) > 32:
    _STEPS.clear()
  _STEPS[key] = steps
  return steps


def shared_start(prompts: Sequence[Sequence[int]], *, multiple: int = PROMPT_BUCKET) -> int:
  """The tokens every prompt begins with, in whole ``multiple``s, leaving each prompt at least
  one token of its own (0 for a single prompt: nothing to share)."""
  if len(prompts) < 2:
    return 0
  shortest = min(len(p) for p in prompts)
  first, same = prompts[0], 0
  while same < shortest - 1 and all(p[same] == first[same] for p in prompts):
    same += 1
  return same - same % multiple


def _batch_axes(init_cache):
  """Per leaf of ``init_cache(batch, length)``: its batch axis (where batch 1 and 2 differ)."""
  one, two = (jax.eval_shape(lambda: init_cache(batch, 1)) for batch in (1, 2))
  return jax.tree.map(lambda a, b: [x != y for x, y in zip(a.shape, b.shape)].index(True),
                      one, two)


def _shared_cache(steps, params, prefix, init_cache, *, batch: int, slots: int):
  """The cache of ``batch`` rows whose slots 0..len(prefix)-1 hold ``prefix`` (run once)."""
  one = steps.prefix(params, jnp.asarray([prefix], jnp.int32),
                     jnp.ones((1, slots), jnp.int32), init_cache(1, slots))
  return jax.tree.map(lambda a, axis: jnp.repeat(a, batch, axis=axis), one,
                      _batch_axes(init_cache))


def _rows(adapter_index, batch: int, adapted: bool):
  if not adapted:
    raise ValueError("adapter_index needs adapted=True and params=(base, bank): the rows' "
                     "adapters come from an AdapterBank (lora_jax.bank.stack).")
  rows = np.asarray(adapter_index)
  if rows.shape != (batch,) or not np.issubdtype(rows.dtype, np.integer):
    raise ValueError(f"adapter_index must hold one integer slot per prompt ({batch}), got "
                     f"{rows.dtype} of shape {rows.shape}.")
  return jnp.asarray(rows, jnp.int32)


def generate(apply_fn, params, prompts: Sequence[Sequence[int]], *,
             init_cache: Callable[[int, int], object], max_new_tokens: int,
             stop_ids: Sequence[int] = (), pad_id: int = 0, sampling: Sampling = GREEDY,
             key=None, context: int | None = None, adapted: bool = False,
             share_prefix: bool = True, adapter_index=None,
             on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Generation:
  """Decodes up to ``max_new_tokens`` tokens after each prompt.

  Args:
    apply_fn: ``apply_fn(params, tokens, *, positions, attention_mask, cache, cache_index) ->
      (logits, cache)``; with ``adapted=True``, ``apply_fn(*params, tokens, ...)`` (for
      ``lora(model.apply)`` with ``params=(base, adapters)``).
    params: the parameters (a pytree, passed to the jitted steps as an argument).
    prompts: token ids per prompt (any lengths; they are left-padded).
    init_cache: ``(batch, length) -> empty cache`` (for Llama:
      ``functools.partial(lora_jax.models.llama.init_cache, config)``).
    max_new_tokens: the most new tokens per prompt.
    stop_ids: tokens that end a row (kept as its last token).
    pad_id: the token id that fills padding.
    sampling: greedy (default) or ``Sampling(temperature=..., top_k=..., top_p=...)``.
    key: a ``jax.random`` key, required when sampling.
    context: the model's context length; a longer prompt plus ``max_new_tokens`` is refused.
    share_prefix: run the prompts' shared start (``shared_start``) once, at batch 1, into the
      cache every row attends to (the same tokens; False: every row runs its whole prompt).
    adapter_index: a mixed batch: with ``adapted=True`` and ``params=(base, bank)`` (an
      ``AdapterBank``), row i decodes with adapter slot ``adapter_index[i]`` (-1: the base
      alone), exactly as if alone (no shared start: each adapter has its own cache).
    on_tokens: called after each step with the step's tokens (batch,) and which rows were
      still running before it (batch,) bool: stream them to a terminal.

  Raises:
    ValueError: empty prompts, ``max_new_tokens < 1``, a prompt too long for ``context``, or
      sampling without a key.
  """
  _check(prompts, max_new_tokens, context)
  if not sampling.greedy and key is None:
    raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: pass "
                     "key=jax.random.key(seed).")
  key = jax.random.key(0) if key is None else key
  params = jax.device_put(params)  # once: host (NumPy) leaves would be copied at every step
  rows, cache_axes = None, None
  if adapter_index is not None:
    rows = _rows(adapter_index, len(prompts), adapted)
    if hasattr(params[1], "check_index"):  # an AdapterBank: every slot named must exist
      params[1].check_index(rows)
    leaves, treedef = jax.tree_util.tree_flatten(_batch_axes(init_cache))
    cache_axes = (tuple(leaves), treedef)
    share_prefix = False  # a shared start's keys and values differ per adapter
  steps = _steps(apply_fn, sampling, adapted, cache_axes)
  shared = shared_start(prompts) if share_prefix else 0
  tokens, prompt_mask = left_pad([p[shared:] for p in prompts], pad_id=pad_id)
  batch, length = tokens.shape
  slots = shared + length + max_new_tokens
  mask = np.concatenate([np.ones((batch, shared), np.int32), prompt_mask,
                         np.ones((batch, max_new_tokens), np.int32)], 1)
  positions = (shared + np.maximum(np.cumsum(prompt_mask, 1) - 1, 0)).astype(np.int32)
  start = time.perf_counter()
  if shared:
    cache = _shared_cache(steps, params, list(prompts[0][:shared]), init_cache, batch=batch,
                          slots=slots)
  else:
    cache = init_cache(batch, slots)
  key, sub = jax.random.split(key)
  token, cache = steps.prefill(params, jnp.asarray(tokens), jnp.asarray(positions),
                               jnp.asarray(mask), cache, jnp.int32(shared), sub, rows)
  token = np.asarray(token)
  prefill_s = time.perf_counter() - start
  stops = np.asarray(list(stop_ids), np.int32)
  running = np.ones(batch, bool)
  out = [[] for _ in range(batch)]
  position = positions[:, -1] + 1
  start = time.perf_counter()
  for step in range(max_new_tokens):
    for row in np.flatnonzero(running):
      out[row].append(int(token[row]))
    if on_tokens is not None:
      on_tokens(token, running.copy())
    running &= ~np.isin(token, stops)
    if step + 1 == max_new_tokens or not running.any():
      break
    key, sub = jax.random.split(key)
    token, cache = steps.decode(params, jnp.asarray(np.where(running, token, pad_id)),
                                jnp.asarray(position + step), jnp.asarray(mask), cache,
                                jnp.int32(shared + length + step), sub, rows)
    token = np.asarray(token)
  return Generation(out, sum(len(p) for p in prompts), prefill_s, time.perf_counter() - start)
