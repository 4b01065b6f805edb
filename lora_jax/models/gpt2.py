"""GPT-2 (Radford et al. 2019) and the GPT-3 shape (Brown et al. 2020), read top to bottom.

Learned positions, pre-LayerNorm blocks, one fused projection ``c_attn`` for q, k and v, a
GELU (tanh) MLP, and the head tied to the token embedding. Module names follow the Hugging
Face checkpoints (``transformer.h.N.attn.c_attn``); GPT-2's ``Conv1D`` weights are already
(in, out), so ``transformer/h/attn/c_attn/kernel`` is ``transformer.h.{N}.attn.c_attn.weight``
stacked over N. GPT-3's alternating locally banded sparse attention changes no parameter;
``fused_qkv=False`` gives separate ``q_proj``/``k_proj``/``v_proj`` (the LoRA paper's Wq, Wk,
Wv) with the same parameter count.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from lora_jax.family import Family
from lora_jax.models._layers import attention, gelu_tanh, layer_stack, positions


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  layer_norm_epsilon: float = 1e-5
  fused_qkv: bool = True  # GPT-2's c_attn; False: q_proj, k_proj, v_proj (same parameters)
  scan_layers: bool = True
  remat: bool = False
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32


def _dense(c: GPT2Config, features: int, name: str):
  return nn.Dense(features, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


def _norm(c: GPT2Config, name: str):
  return nn.LayerNorm(c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


class GPT2Attention(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, t, d = x.shape
    if c.fused_qkv:
      qkv = jnp.split(_dense(c, 3 * d, "c_attn")(x), 3, axis=-1)  # q, k, v side by side
    else:  # the LoRA paper's separate Wq, Wk, Wv (e.g. for GPT-3)
      qkv = [_dense(c, d, name)(x) for name in ("q_proj", "k_proj", "v_proj")]
    q, k, v = (y.reshape(b, t, c.n_head, d // c.n_head) for y in qkv)
    return _dense(c, d, "c_proj")(attention(q, k, v, is_causal=True).reshape(b, t, d))


class GPT2MLP(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    return _dense(c, c.n_embd, "c_proj")(gelu_tanh(_dense(c, 4 * c.n_embd, "c_fc")(x)))


class GPT2Block(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = x + GPT2Attention(c, name="attn")(_norm(c, "ln_1")(x))
    return x + GPT2MLP(c, name="mlp")(_norm(c, "ln_2")(x))


class GPT2Model(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    opts = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    wte = nn.Embed(c.vocab_size, c.n_embd, name="wte", **opts)
    wpe = nn.Embed(c.n_positions, c.n_embd, name="wpe", **opts)
    x = wte(input_ids) + wpe(positions(*input_ids.shape))
    x = layer_stack(GPT2Block, c, c.n_layer, "h", x)
    return _norm(c, "ln_f")(x), wte


class GPT2LMHeadModel(nn.Module):
  """``input_ids (batch, seq) -> logits (batch, seq, vocab)``, head tied to ``wte``."""

  config: GPT2Config

  @nn.compact
  def __call__(self, input_ids):
    x, wte = GPT2Model(self.config, name="transformer")(input_ids)
    return wte.attend(x)


def _named(d, layers, heads, *, positions=1024, fused=True):
  return GPT2LMHeadModel, GPT2Config(n_positions=positions, n_embd=d, n_layer=layers,
                                     n_head=heads, fused_qkv=fused)


CONFIGS = {
    "gpt2": _named(768, 12, 12),
    "gpt2-medium": _named(1024, 24, 16),
    "gpt2-large": _named(1280, 36, 20),
    "gpt2-xl": _named(1600, 48, 25),
    # Brown et al. 2020, Table 2.1; separate Wq, Wk, Wv as in the LoRA paper's GPT-3 experiments.
    "gpt-3-175b": _named(12288, 96, 96, positions=2048, fused=False),
}


def check_targets(config: GPT2Config | None, alias: str) -> str | None:
  """``q``/``k``/``v`` need separate projections, ``qkv`` the fused ``c_attn``."""
  fused = getattr(config, "fused_qkv", None)
  if fused is True and alias in ("q", "k", "v"):
    return (f"has a fused c_attn projection (separate ones: --separate-qkv): use qkv instead of "
            f"{alias!r}.")
  if fused is False and alias == "qkv":
    return f"has separate q, k, v projections: use q,k,v instead of {alias!r}."
  return None


FAMILY = Family(
    name="gpt2",
    layer_stack="transformer/h",
    target_aliases={"qkv": "attn/c_attn", "q": "attn/q_proj", "k": "attn/k_proj",
                    "v": "attn/v_proj", "o": "attn/c_proj", "up": "mlp/c_fc",
                    "down": "mlp/c_proj"},
    conv1d=True,  # transformers' GPT-2 stores its layers as Conv1D, weight (in, out)
    configs=CONFIGS,
    check_targets=check_targets,
    default_targets=lambda c: "qkv" if getattr(c, "fused_qkv", True) else "q,v",
    variants={"separate_qkv": {"fused_qkv": False}},  # the LoRA paper's separate Wq, Wk, Wv
)
