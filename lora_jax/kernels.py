"""Kernel kinds: what the transform may treat as a frozen kernel W.

A kernel is a dense array leaf (a Flax ``kernel``), or an instance of a registered kernel
kind: a pytree (for example packed 4-bit codes plus block scales, for QLoRA) that stands for a
dense kernel of its ``shape`` and ``dtype`` and knows how to produce it (``to_dense``).

The library treats a kind instance as one leaf of the base tree (for paths, targeting,
counting and checkpoints' base identity), traces the user's function on its dense shape, and
asks for the dense operand only where a matrix product (or the merged fallback) needs it. A
kind whose leaves all carry a leading stacked-layer axis is sliced by ``lax.scan`` like a
dense stacked kernel, so the dense operand is formed one layer at a time inside the scan.

    >>> @jax.tree_util.register_dataclass
    ... @dataclasses.dataclass
    ... class Int8Kernel:
    ...   codes: jax.Array          # int8, the kernel's shape
    ...   scale: jax.Array          # float32, one per output column
    ...   shape = property(lambda self: self.codes.shape)
    ...   dtype = property(lambda self: self.scale.dtype)
    >>> kernels.register(Int8Kernel, to_dense=lambda k: k.codes * k.scale)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

_KINDS: dict[type, Callable[[Any], jax.Array]] = {}
_SHARD: dict[type, Callable[[Any, Any], Any]] = {}


def register(kind: type, *, to_dense: Callable[[Any], jax.Array],
             shard: Callable[[Any, Any], Any] | None = None) -> type:
  """Registers ``kind`` (a pytree node type with ``shape`` and ``dtype`` attributes giving the
  dense kernel's) as a kernel kind whose dense operand is ``to_dense(instance)``.

  ``shard(instance, spec)`` (optional) lays the kind's leaves out like a dense kernel whose
  PartitionSpec is ``spec``: it returns the instance's structure with a PartitionSpec per leaf
  (codes and scales split along the axes W is split along). Without it, a kind's leaves are
  replicated on a mesh.

  Raises:
    TypeError: ``to_dense`` (or ``shard``) is not callable.
  """
  if not callable(to_dense):
    raise TypeError(f"to_dense must be a function of a {kind.__name__} returning the dense "
                    f"kernel, got {to_dense!r}.")
  if shard is not None and not callable(shard):
    raise TypeError(f"shard must be a function (instance, PartitionSpec) -> PartitionSpecs, "
                    f"got {shard!r}.")
  _KINDS[kind] = to_dense
  if shard is not None:
    _SHARD[kind] = shard
  return kind


def unregister(kind: type) -> None:
  """Removes a registered kernel kind (a plug-in's, or a test's).

  Raises:
    ValueError: ``kind`` is not registered.
  """
  if kind not in _KINDS:
    raise ValueError(f"{getattr(kind, '__name__', kind)!r} is not a registered kernel kind; "
                     f"registered: {', '.join(k.__name__ for k in _KINDS)}.")
  del _KINDS[kind]
  _SHARD.pop(kind, None)


def registered() -> tuple[type, ...]:
  """Every registered kernel kind, in registration order."""
  return tuple(_KINDS)


def leaf_specs(x, spec):
  """The PartitionSpecs of a kind instance's leaves for a dense kernel laid out by ``spec``
  (the instance's structure, a PartitionSpec per leaf)."""
  from jax.sharding import PartitionSpec

  shard = _SHARD.get(type(x))
  if shard is not None:
    return shard(x, spec)
  return jax.tree_util.tree_map(lambda _: PartitionSpec(), x)


def is_kind(x) -> bool:
  """Whether ``x`` is an instance of a registered kernel kind (one leaf of a base tree)."""
  return type(x) in _KINDS


def dense(x):
  """The dense kernel of ``x``: ``to_dense(x)`` for a kernel-kind instance, else ``x``."""
  to_dense = _KINDS.get(type(x))
  return x if to_dense is None else to_dense(x)


def abstract(x) -> jax.ShapeDtypeStruct:
  """The dense kernel's shape and dtype, without computing it."""
  return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
