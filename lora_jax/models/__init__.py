"""Reference Flax models and the named configs of published checkpoints.

``lora_jax.models.get("llama-2-7b")`` returns the Flax module; ``abstract_params(name)``
its parameter tree as ``jax.ShapeDtypeStruct``s (``jax.eval_shape``: no weights allocated),
which is all ``lora_jax.plan`` needs to count a LoRA configuration on a 175B model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lora_jax.config import ALL_LINEAR, LoraConfig
from lora_jax.targets import Plan, plan
from lora_jax.transform import analyze

from lora_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM


@dataclasses.dataclass(frozen=True)
class Spec:
  """A named configuration: the family's model class, its config, and LoRA target aliases."""

  family: str
  model: type
  config: object


def _llama(vocab, d, ffn, layers, heads, kv, *, theta=10000.0, tied=False):
  return Spec("llama", LlamaForCausalLM, LlamaConfig(
      vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv, rope_theta=theta,
      tie_word_embeddings=tied))


def _gpt2(d, layers, heads, *, positions=1024, fused=True):
  return Spec("gpt2", GPT2LMHeadModel, GPT2Config(n_positions=positions, n_embd=d, n_layer=layers,
                                                  n_head=heads, fused_qkv=fused))


def _bert(vocab, d, layers, heads, ffn, *, roberta=False):
  extra = dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
               position_offset=2) if roberta else {}
  return Spec("bert", BertModel, BertConfig(vocab_size=vocab, hidden_size=d,
                                            num_hidden_layers=layers, num_attention_heads=heads,
                                            intermediate_size=ffn, **extra))


CONFIGS: dict[str, Spec] = {
    "llama-2-7b": _llama(32000, 4096, 11008, 32, 32, 32),
    "llama-2-13b": _llama(32000, 5120, 13824, 40, 40, 40),
    "llama-2-70b": _llama(32000, 8192, 28672, 80, 64, 8),
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, 8, theta=500000.0),
    "llama-3-70b": _llama(128256, 8192, 28672, 80, 64, 8, theta=500000.0),
    "llama-3.2-1b": _llama(128256, 2048, 8192, 16, 32, 8, theta=500000.0, tied=True),
    "llama-3.2-3b": _llama(128256, 3072, 8192, 28, 24, 8, theta=500000.0, tied=True),
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    # Brown et al. 2020, Table 2.1; separate Wq, Wk, Wv as in the LoRA paper's GPT-3 experiments.
    "gpt-3-175b": _gpt2(12288, 96, 96, positions=2048, fused=False),
    "roberta-base": _bert(50265, 768, 12, 12, 3072, roberta=True),
    "roberta-large": _bert(50265, 1024, 24, 16, 4096, roberta=True),
    "bert-base-uncased": _bert(30522, 768, 12, 12, 3072),
    "minilm-l6-h384": _bert(30522, 384, 6, 12, 1536),  # all-MiniLM-L6-v2
}

# Short LoRA target names per family (PEFT users write "q,v"), as path regexes.
TARGET_ALIASES: dict[str, dict[str, str]] = {
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "gpt2": {"qkv": "attn/c_attn", "q": "attn/q_proj", "k": "attn/k_proj", "v": "attn/v_proj",
             "o": "attn/c_proj", "up": "mlp/c_fc", "down": "mlp/c_proj"},
    "bert": {"q": "self/query", "k": "self/key", "v": "self/value", "o": "attention/output/dense",
             "up": "intermediate/dense", "down": r"(?<!attention/)output/dense"},
}


def get(name: str, **overrides):
  """The Flax module of a named config; ``overrides`` replace config fields (``scan_layers``,
  ``dtype``, ...).

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  return spec_of(name).model(_config(name, **overrides))


def spec_of(name: str) -> Spec:
  if name not in CONFIGS:
    raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(CONFIGS)}.")
  return CONFIGS[name]


def example_input(seq: int = 8):
  return jnp.zeros((1, seq), jnp.int32)


def abstract_params(name: str, **overrides):
  """The parameter tree of a named config as ShapeDtypeStructs; nothing is allocated."""
  model = get(name, **overrides)
  return jax.eval_shape(model.init, jax.random.key(0), example_input())


def _config(name: str, **overrides):
  return dataclasses.replace(spec_of(name).config, **overrides)


def targets_for(name: str, spec: str, **overrides) -> tuple[str, ...]:
  """Comma-separated target names for a named config: family aliases (``q,v``), module names
  (``q_proj``), ``all-linear``, or regular expressions, e.g. ``"q,v"`` -> ``("q_proj",
  "v_proj")`` for Llama."""
  aliases = TARGET_ALIASES[spec_of(name).family]
  items = [t.strip() for t in spec.split(",") if t.strip()]
  if not items:
    example = default_targets(name, **overrides)
    raise ValueError(f"targets {spec!r} name nothing; use e.g. {example} or all-linear "
                     f"(aliases for this model: {', '.join(aliases)}).")
  fused = getattr(_config(name, **overrides), "fused_qkv", None)
  for t in items:
    if (fused is True and t in ("q", "k", "v")) or (fused is False and t == "qkv"):
      layout = ("a fused c_attn projection (separate ones: --separate-qkv)" if fused
                else "separate q, k, v projections")
      raise ValueError(f"{name} has {layout}: use {'qkv' if fused else 'q,k,v'} instead of "
                       f"{t!r}.")
  return tuple(ALL_LINEAR if t == ALL_LINEAR else aliases.get(t, t) for t in items)


def default_targets(name: str, **overrides) -> str:
  """PEFT's usual default: the query and value projections (GPT-2's fused c_attn)."""
  return "qkv" if getattr(_config(name, **overrides), "fused_qkv", False) else "q,v"


def plan_model(name: str, config: LoraConfig, **overrides) -> Plan:
  """``lora_jax.plan`` for a named config, from abstract shapes (no weights allocated); axis
  roles of stacked kernels come from ``lora_jax.analyze`` of the model's ``apply``."""
  model = get(name, **overrides)
  params = jax.eval_shape(model.init, jax.random.key(0), example_input())
  return plan(config, params, uses=analyze(model.apply, params, example_input()))


__all__ = ["BertConfig", "BertForSequenceClassification", "BertModel", "CONFIGS", "GPT2Config",
           "GPT2LMHeadModel", "LlamaConfig", "LlamaForCausalLM", "Spec", "TARGET_ALIASES",
           "abstract_params", "default_targets", "example_input", "get", "plan_model", "spec_of",
           "targets_for"]
