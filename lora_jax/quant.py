"""Quantized frozen kernels (QLoRA): GGUF Q4_1 and Q8_0, NF4 (optionally double-quantized), int8.

Each format is a kernel kind (``lora_jax.kernels``): a pytree of codes and block scales that
stands for a dense kernel of its ``shape`` and ``dtype``. ``lora(fn)`` computes the base product
with the block dequantized inside the jitted function (inside ``lax.scan``, one layer at a time)
and the adapter path as ``s·((x@A)@B)``; the codes are integer leaves, so no gradient reaches
them. The formats' blocks, scales and bit widths are specified in ``docs/formats.md``
(``QUANT_FORMATS.md`` has the facts); their codecs live in ``lora_jax._quant_formats``.

``quantize(params, format, targets=...)`` selects kernels with ``LoraConfig``'s patterns
(default ``"all-linear"``: every matmul kernel but the output head); ``dequantize`` is its
inverse up to rounding; ``requantize`` puts a merged base back into its formats and warns with
the rounding error measured against the adapters' change.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _tree, kernels
from lora_jax._quant_formats import (FORMATS, NF4, Int8Kernel, NF4Kernel,
                                     Q4_1Kernel, Q8_0Kernel, ScaleCodes, _out_axes,
                                     check_format, from_gguf, quantize_kernel, stack)
from lora_jax.config import LoraConfig
from lora_jax.targets import resolve

__all__ = ["FORMATS", "NF4", "Int8Kernel", "NF4Kernel", "Q4_1Kernel", "Q8_0Kernel",
           "QuantizationWarning", "ScaleCodes", "base_bytes", "check_format", "dequantize",
           "from_gguf", "quantize", "quantize_kernel", "requantize", "stack"]

class QuantizationWarning(UserWarning):
  """Re-quantizing merged kernels rounded away part of the adapters' change."""


CHOICES = ("none", "q4_1", "q8_0", "nf4", "nf4-dq", "int8")
"""The command line's ``--quantize`` values: a format, ``nf4-dq`` (NF4 with double
quantization) or ``none``."""


def parse_choice(name: str) -> tuple[str | None, bool]:
  """``(format or None, double_quant)`` of a ``CHOICES`` value."""
  return (None, False) if name == "none" else (name.removesuffix("-dq"), name.endswith("-dq"))


# ----------------------------------------------------------------------- trees


def quantize(params, format: str, *, targets: Any = "all-linear", exclude: Any = (),
             double_quant: bool = False, uses=None):
  """``params`` with the kernels ``targets`` selects replaced by ``format`` kinds.

  Args:
    params: the base parameter pytree (dense kernels).
    format: ``"q4_1"``, ``"q8_0"``, ``"nf4"`` or ``"int8"``.
    targets, exclude: patterns as in ``LoraConfig`` (default: every matmul kernel but the
      output head, as PEFT's ``"all-linear"``). Embeddings, norms and biases stay dense.
    double_quant: ``nf4`` only: quantize the absmax constants too (~4.127 bits per weight).
    uses: ``lora_jax.analyze(fn, params, ...)``, for kernels with more than two axes.

  Raises:
    ValueError: an unknown format, a pattern that selects nothing, ``double_quant`` with a format
      other than nf4, or a kernel whose input size is not a multiple of the format's block.
  """
  check_format(format)
  if double_quant and format != "nf4":
    raise ValueError(f"double_quant applies to nf4's absmax constants; format {format!r} has "
                     f"none: drop double_quant or use format='nf4'.")
  chosen, _ = resolve(LoraConfig(targets=targets, exclude=exclude, rank=1), params, uses=uses)
  by_keys = {t.keys: t for t in chosen}
  flat = _tree.flatten(params, is_leaf=kernels.is_kind)
  done = [t.path for t in chosen if kernels.is_kind(flat[t.keys])]
  if done:
    raise ValueError(f"kernels {', '.join(done[:3])} are already quantized; dequantize first or "
                     f"leave them out of targets.")

  def one(keys, w):
    t = by_keys.get(keys)
    if t is None:
      return w
    return quantize_kernel(w, format, roles=t.axes, double_quant=double_quant, path=t.path)

  return _tree.map_with_path(one, params, is_leaf=kernels.is_kind)


def dequantize(params):
  """``params`` with every kernel-kind leaf replaced by its dense kernel."""
  return jax.tree_util.tree_map(kernels.dense, params, is_leaf=kernels.is_kind)


def base_bytes(params) -> dict[str, float]:
  """Resident bytes of a base tree: ``{"kernels": bytes of quantized kernels, "dense": bytes of
  every other leaf, "total": ..., "quantized_weights": weights the kinds stand for,
  "bits_per_weight": of the quantized kernels (0 if none)}``. Works on ``jax.eval_shape``
  trees."""
  q, d, n = 0, 0, 0
  for leaf in jax.tree_util.tree_leaves(params, is_leaf=kernels.is_kind):
    if kernels.is_kind(leaf):
      q += sum(_nbytes(x) for x in jax.tree_util.tree_leaves(leaf))
      n += math.prod(leaf.shape)
    else:
      d += _nbytes(leaf)
  return {"kernels": q, "dense": d, "total": q + d, "quantized_weights": n,
          "bits_per_weight": 8 * q / n if n else 0.0}


def _nbytes(x) -> int:
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def requantize(merged, like):
  """``merged`` (``lora_jax.merge(base, adapters)`` of a quantized base: dense kernels) put back
  into the formats of ``like`` (that base), leaf by leaf. Rounding loses part of the adapters'
  change: a ``QuantizationWarning`` gives the measured size of the error against that change.

  Raises:
    ValueError: ``merged`` and ``like`` are not the same tree.
  """
  m = _tree.flatten(merged, is_leaf=kernels.is_kind)
  q = _tree.flatten(like, is_leaf=kernels.is_kind)
  if m.keys() != q.keys():
    raise ValueError("merged and like must be the same tree (merge(like, adapters)); their "
                     f"paths differ at {sorted(set(m) ^ set(q))[:3]}.")
  err2, delta2 = 0.0, 0.0
  out = {}
  for keys, leaf in q.items():
    if not kernels.is_kind(leaf):
      out[keys] = m[keys]
      continue
    new = _requantize_like(m[keys], leaf)
    before, after, exact = kernels.dense(leaf), kernels.dense(new), jnp.asarray(m[keys])
    err2 += float(jnp.sum((after.astype(jnp.float32) - exact.astype(jnp.float32)) ** 2))
    delta2 += float(jnp.sum((exact.astype(jnp.float32) - before.astype(jnp.float32)) ** 2))
    out[keys] = new
  if delta2 > 0:
    warnings.warn(f"re-quantizing the merged kernels rounds them: the rounding error's norm is "
                  f"{math.sqrt(err2 / delta2):.2f}x the norm of the adapters' change (so their "
                  f"effect is partly lost); keep the merged base dense, or serve the adapter "
                  f"unmerged on the quantized base.", QuantizationWarning, stacklevel=2)
  return _tree.map_with_path(lambda keys, _: out[keys], like, is_leaf=kernels.is_kind)


def _requantize_like(w, like):
  layers, outputs = len(like.shape) - len(like.kernel_shape), _out_axes(like)
  roles = "l" * layers + "i" * (len(like.kernel_shape) - outputs) + "o" * outputs
  double = isinstance(getattr(like, "absmax", None), ScaleCodes)
  return quantize_kernel(w, like.format, roles=roles, double_quant=double, dtype=like.dtype)
