"""The quantized kernel kinds and their codecs: GGUF Q4_1 and Q8_0, NF4 (optionally double-
quantized), int8 (``lora_jax.quant`` is the public API; ``QUANT_FORMATS.md`` has the facts).

Each format is a kernel kind (``lora_jax.kernels``): a pytree of codes and block scales that
stands for a dense kernel of its ``shape`` and ``dtype``, kept as llama.cpp keeps a weight row,
``(..., out, in)``, with the blocks along the input axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import kernels

# The 16 NormalFloat levels (QLoRA, Dettmers et al. 2023, §3 and Appendix E; the same float32
# values as bitsandbytes' NF4 table). tests/core/test_quant.py rebuilds them from normal quantiles.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

GGUF_BLOCK = 32  # Q4_1 and Q8_0 block size (weights along the input axis)
NF4_BLOCK = 64
SCALE_BLOCK = 256  # double quantization: absmax constants per second-level block




# ----------------------------------------------------------------------- packing


def _pack4(q: jax.Array) -> jax.Array:
  """4-bit codes (..., n) (n a multiple of 32) -> bytes (..., n // 2): in each group of 32,
  byte j holds code j in its low nibble and code j + 16 in its high nibble (GGUF's order)."""
  g = q.astype(jnp.uint8).reshape(*q.shape[:-1], q.shape[-1] // 32, 2, 16)
  return (g[..., 0, :] | (g[..., 1, :] << 4)).reshape(*q.shape[:-1], q.shape[-1] // 2)


def _unpack4(packed: jax.Array) -> jax.Array:
  """The inverse of ``_pack4``: bytes (..., n // 2) -> codes (..., n) as uint8."""
  g = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 16, 1, 16)
  both = jnp.concatenate([g & 0x0F, g >> 4], axis=-2)
  return both.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _blocks(x: jax.Array, size: int) -> jax.Array:
  return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _rows_to_kernel(rows: jax.Array, kernel_shape: tuple[int, ...], dtype) -> jax.Array:
  """Dequantized rows (..., out, in) -> the dense kernel (..., *in_axes, *out_axes)."""
  lead = rows.shape[:-2]
  return jnp.swapaxes(rows, -1, -2).astype(dtype).reshape(*lead, *kernel_shape)


# ----------------------------------------------------------------------- the kinds


class _Kind:
  """Shared by the formats: the dense shape (leading stacked axes from the codes, so a slice
  inside ``lax.scan`` is one layer's kernel), bytes and bits per weight."""

  codes: jax.Array
  kernel_shape: tuple[int, ...]  # one layer's dense kernel: its input axes, then output axes
  dtype: Any
  format = ""
  block = 0

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape[:-2]) + tuple(self.kernel_shape)

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

  @property
  def bits_per_weight(self) -> float:
    return 8 * self.nbytes / math.prod(self.shape)

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, "
            f"{self.bits_per_weight:.3f} bits/weight)")


def _shard(k, spec):
  """Codes and scales split like the dense kernel W (``spec``): their rows axis is W's output
  axis, their last axis W's input axis (blocks along it), leading axes W's stacked ones."""
  from jax.sharding import PartitionSpec as P

  lead = len(k.shape) - len(k.kernel_shape)
  axes = tuple(spec) + (None,) * (len(k.shape) - len(tuple(spec)))
  outs = _out_axes(k)
  ins, o_axes = axes[lead:len(k.shape) - outs], axes[len(k.shape) - outs:]
  only = lambda s: s[0] if len(s) == 1 else None  # noqa: E731  (several axes: not split)
  i, o, stacked = only(ins), only(o_axes), axes[:lead]
  rows = P(*stacked, o, i)
  fields = {"codes": rows}
  if isinstance(k, (Q4_1Kernel, Q8_0Kernel)):
    fields["scale"] = rows
  if isinstance(k, Q4_1Kernel):
    fields["minimum"] = rows
  if isinstance(k, Int8Kernel):
    fields["scale"] = P(*stacked, o)
  if isinstance(k, NF4Kernel):
    fields["absmax"] = (ScaleCodes(rows, P(*stacked, None), P(*stacked))
                        if isinstance(k.absmax, ScaleCodes) else rows)
  return dataclasses.replace(k, **fields)


def _register(cls, data: list[str], rows):
  """Registers a format: a dataclass pytree (``kernel_shape``, ``dtype`` static) and a kernel
  kind whose dense kernel is its dequantized ``rows`` (..., out, in) laid out as W."""
  jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=["kernel_shape", "dtype"])
  kernels.register(cls, to_dense=lambda k: _rows_to_kernel(rows(k), k.kernel_shape, k.dtype),
                   shard=_shard)
  return cls


@dataclasses.dataclass(frozen=True, repr=False)
class Q4_1Kernel(_Kind):
  """GGUF Q4_1: packed codes uint8 (..., out, in // 2), float16 ``scale`` and ``minimum``
  (..., out, in // 32)."""

  codes: jax.Array
  scale: jax.Array
  minimum: jax.Array
  kernel_shape: tuple[int, ...]
  dtype: Any
  format = "q4_1"
  block = GGUF_BLOCK


def _q4_1_rows(k: Q4_1Kernel) -> jax.Array:
  q = _blocks(_unpack4(k.codes), GGUF_BLOCK).astype(jnp.float32)
  w = k.scale.astype(jnp.float32)[..., None] * q + k.minimum.astype(jnp.float32)[..., None]
  return w.reshape(*k.codes.shape[:-1], -1)


_register(Q4_1Kernel, ["codes", "scale", "minimum"], _q4_1_rows)


@dataclasses.dataclass(frozen=True, repr=False)
class Q8_0Kernel(_Kind):
  """GGUF Q8_0: int8 codes (..., out, in), float16 ``scale`` (..., out, in // 32)."""

  codes: jax.Array
  scale: jax.Array
  kernel_shape: tuple[int, ...]
  dtype: Any
  format = "q8_0"
  block = GGUF_BLOCK


def _q8_0_rows(k: Q8_0Kernel) -> jax.Array:
  q = _blocks(k.codes, GGUF_BLOCK).astype(jnp.float32)
  return (q * k.scale.astype(jnp.float32)[..., None]).reshape(k.codes.shape)


_register(Q8_0Kernel, ["codes", "scale"], _q8_0_rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleCodes:
  """Double-quantized NF4 absmax constants: int8 ``codes`` (..., out, in // 64) of their
  deviation from ``offset`` (..., one per kernel), ``scale`` (..., one per 256 constants)."""

  codes: jax.Array
  scale: jax.Array
  offset: jax.Array


@dataclasses.dataclass(frozen=True, repr=False)
class NF4Kernel(_Kind):
  """QLoRA NF4: packed codes uint8 (..., out, in // 2) indexing ``NF4``; ``absmax`` float32
  (..., out, in // 64), or ``ScaleCodes`` when double-quantized."""

  codes: jax.Array
  absmax: Any
  kernel_shape: tuple[int, ...]
  dtype: Any
  format = "nf4"
  block = NF4_BLOCK


def _absmax(k: NF4Kernel) -> jax.Array:
  a = k.absmax
  if not isinstance(a, ScaleCodes):
    return a
  lead, n = a.codes.shape[:-2], math.prod(a.codes.shape[-2:])
  flat = _padded(a.codes.reshape(*lead, n).astype(jnp.float32), SCALE_BLOCK)
  values = _blocks(flat, SCALE_BLOCK) * a.scale[..., None] + a.offset[..., None, None]
  return values.reshape(*lead, -1)[..., :n].reshape(a.codes.shape)


def _nf4_rows(k: NF4Kernel) -> jax.Array:
  q = _blocks(jnp.asarray(NF4)[_unpack4(k.codes)], NF4_BLOCK)
  return (q * _absmax(k)[..., None]).reshape(*k.codes.shape[:-1], -1)


_register(NF4Kernel, ["codes", "absmax"], _nf4_rows)


@dataclasses.dataclass(frozen=True, repr=False)
class Int8Kernel(_Kind):
  """int8 codes (..., out, in) with one float32 ``scale`` per output channel (..., out)."""

  codes: jax.Array
  scale: jax.Array
  kernel_shape: tuple[int, ...]
  dtype: Any
  format = "int8"
  block = 1


def _int8_rows(k: Int8Kernel) -> jax.Array:
  return k.codes.astype(jnp.float32) * k.scale[..., None]


_register(Int8Kernel, ["codes", "scale"], _int8_rows)


FORMATS = {"q4_1": Q4_1Kernel, "q8_0": Q8_0Kernel, "nf4": NF4Kernel, "int8": Int8Kernel}
"""Format name -> kernel kind."""


# ----------------------------------------------------------------------- quantizing one kernel


def _padded(x: jax.Array, multiple: int) -> jax.Array:
  pad = -x.shape[-1] % multiple
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def _q4_1(rows: jax.Array) -> dict:
  """llama.cpp's Q4_1 rounding (gguf.quants.Q4_1.quantize_blocks), in JAX."""
  b = _blocks(rows, GGUF_BLOCK)
  lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
  d = (hi - lo) / 15
  inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
  q = jnp.clip(jnp.trunc((b - lo) * inv + 0.5), 0, 15).astype(jnp.uint8)
  return {"codes": _pack4(q.reshape(rows.shape)), "scale": d[..., 0].astype(jnp.float16),
          "minimum": lo[..., 0].astype(jnp.float16)}


def _q8_0(rows: jax.Array) -> dict:
  """llama.cpp's Q8_0 rounding (round half away from zero)."""
  b = _blocks(rows, GGUF_BLOCK)
  d = jnp.abs(b).max(axis=-1, keepdims=True) / 127
  inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
  v = b * inv
  q = jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)
  return {"codes": q.astype(jnp.int8).reshape(rows.shape), "scale": d[..., 0].astype(jnp.float16)}


def _nearest_nf4(v: jax.Array) -> jax.Array:
  """Index of the nearest NF4 level of each value in [-1, 1]."""
  mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
  return jnp.searchsorted(mids, v).astype(jnp.uint8)


def _scale_codes(absmax: jax.Array) -> ScaleCodes:
  lead, n = absmax.shape[:-2], math.prod(absmax.shape[-2:])
  offset = absmax.reshape(*lead, n).mean(axis=-1)
  centred = _blocks(_padded(absmax.reshape(*lead, n) - offset[..., None], SCALE_BLOCK),
                    SCALE_BLOCK)
  scale = jnp.abs(centred).max(axis=-1) / 127
  q = jnp.round(centred / jnp.where(scale == 0, 1.0, scale)[..., None]).astype(jnp.int8)
  return ScaleCodes(q.reshape(*lead, -1)[..., :n].reshape(absmax.shape), scale, offset)


def _nf4(rows: jax.Array, *, double_quant: bool) -> dict:
  b = _blocks(rows, NF4_BLOCK)
  absmax = jnp.abs(b).max(axis=-1)
  v = b / jnp.where(absmax == 0, 1.0, absmax)[..., None]
  q = _nearest_nf4(v).reshape(rows.shape)
  return {"codes": _pack4(q), "absmax": _scale_codes(absmax) if double_quant else absmax}


def _int8(rows: jax.Array) -> dict:
  scale = jnp.abs(rows).max(axis=-1) / 127
  q = jnp.round(rows / jnp.where(scale == 0, 1.0, scale)[..., None])
  return {"codes": q.astype(jnp.int8), "scale": scale}


def _rows(w: jax.Array, layers: int, inputs: int) -> jax.Array:
  """A dense kernel (*layer_axes, *in_axes, *out_axes) as float32 rows (..., out, in)."""
  lead = w.shape[:layers]
  fan_in = math.prod(w.shape[layers:layers + inputs])
  m = jnp.asarray(w, jnp.float32).reshape(*lead, fan_in, -1)
  return jnp.swapaxes(m, -1, -2)


def quantize_kernel(w, format: str, *, roles: str, double_quant: bool = False,
                    dtype=None, path: str = "kernel"):
  """One dense kernel as a ``format`` kind. ``roles`` names each axis: ``l`` stacked layer,
  ``i`` input, ``o`` output, in the order ``l*i+o+``; ``dtype`` is the dense kernel's dtype
  (default: ``w``'s).

  Raises:
    ValueError: an unknown format, roles not in that order, or an input size that is not a
      multiple of the format's block.
  """
  kind = check_format(format)
  layers, inputs = _split_roles(roles, path)
  fan_in = math.prod(w.shape[layers:layers + inputs])
  if fan_in % kind.block:
    raise ValueError(f"kernel {path!r} (shape {tuple(w.shape)}) has input size {fan_in}, not "
                     f"a multiple of {format}'s block of {kind.block}; leave it out of targets "
                     f"(exclude=...) or use int8, which has no blocks.")
  rows = _rows(w, layers, inputs)
  fields = {"q4_1": _q4_1, "q8_0": _q8_0, "int8": _int8,
            "nf4": lambda r: _nf4(r, double_quant=double_quant)}[format](rows)
  return kind(**fields, kernel_shape=tuple(w.shape[layers:]),
              dtype=jnp.dtype(dtype or w.dtype))


def _out_axes(like) -> int:
  """How many trailing axes of ``like``'s kernel are outputs (their product is the rows)."""
  rows = like.codes.shape[-2]
  n, size = 0, 1
  for dim in reversed(like.kernel_shape):
    if size == rows:
      break
    size *= dim
    n += 1
  return n


def check_format(format: str) -> type:
  """The kind of ``format``.

  Raises:
    ValueError: an unknown format (the message lists them).
  """
  if format not in FORMATS:
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
  return FORMATS[format]


def _split_roles(roles: str, path: str) -> tuple[int, int]:
  """(stacked layer axes, input axes) of roles such as 'lio' or 'ioo'."""
  layers = len(roles) - len(roles.lstrip("l"))
  rest = roles[layers:]
  inputs = len(rest) - len(rest.lstrip("i"))
  if not inputs or not rest[inputs:] or set(rest[inputs:]) != {"o"}:
    raise ValueError(f"kernel {path!r} has axis roles {roles!r}; quantizing needs stacked "
                     f"layers first, then input axes, then output axes (such as 'lio'); leave "
                     f"it out of targets (exclude=...).")
  return layers, inputs


# ----------------------------------------------------------------------- GGUF blocks as stored


def from_gguf(data: np.ndarray, type_name: str, *, dtype=jnp.float32):
  """A GGUF tensor's raw blocks (``reader.tensors[i].data``: uint8 rows (out, bytes per row))
  as a ``Q4_1Kernel`` or ``Q8_0Kernel`` of the dense kernel (in, out), bytes copied unchanged
  (no dequantization). ``from_gguf(...)`` dequantizes to exactly what
  ``gguf.quants.dequantize`` gives, transposed.

  Raises:
    ValueError: a type other than Q4_1 and Q8_0.
  """
  data = np.asarray(data, np.uint8)
  out = data.shape[0]
  if type_name == "Q4_1":
    b = data.reshape(out, -1, 20)
    d, m, qs = b[..., 0:2], b[..., 2:4], b[..., 4:]
    return Q4_1Kernel(qs.reshape(out, -1).copy(), _f16(d), _f16(m),
                      kernel_shape=(qs.shape[1] * GGUF_BLOCK, out), dtype=jnp.dtype(dtype))
  if type_name == "Q8_0":
    b = data.reshape(out, -1, 34)
    d, qs = b[..., 0:2], b[..., 2:]
    return Q8_0Kernel(qs.reshape(out, -1).view(np.int8).copy(), _f16(d),
                      kernel_shape=(qs.shape[1] * GGUF_BLOCK, out), dtype=jnp.dtype(dtype))
  raise ValueError(f"GGUF tensor type {type_name} is not kept quantized; Q4_1 and Q8_0 are "
                   f"(other types are dequantized, then quantized with quantize()).")


def _f16(two_bytes: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(two_bytes).view(np.float16)[..., 0]


def stack(kinds: list):
  """Per-layer kernels of one kind, stacked along a new leading (scanned layer) axis."""
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *kinds)
