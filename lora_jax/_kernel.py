"""The value a targeted kernel is inside the interpreter (``Kernel``), and what rules share.

A ``Kernel`` holds the base kernel (dense, a kernel kind of ``lora_jax.kernels``, or a
``Lazy`` kind with pending unary equations) and its adapter. The contexts of
``lora_jax._rules`` track ``Kernel`` values; the rules of ``lora_jax._rules``,
``lora_jax._adapted`` and ``lora_jax._higher_order`` take them apart.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

from lora_jax import _interpret, kernels

FREE = [c for c in string.ascii_lowercase if c != "r"]  # subscripts of the activation's axes
AXIS = string.ascii_uppercase  # subscripts of kernel axes, as in adapters.factor_subscripts


@jax.tree_util.register_pytree_node_class
class Lazy:
  """A kernel-kind instance and the unary equations (casts, transposes, reshapes) ``fn``
  applied to it, not yet run: they run on its dense value only where a product needs it, so a
  quantized kernel stays quantized until then (and the product can recompute it)."""

  def __init__(self, kind, ops=()):
    self.kind, self.ops = kind, tuple(ops)

  @classmethod
  def of(cls, w) -> "Lazy":
    return w if isinstance(w, Lazy) else cls(w)

  def then(self, eqn) -> "Lazy":
    return Lazy(self.kind, self.ops + (eqn,))

  def dense(self):
    w = kernels.dense(self.kind)
    for eqn in self.ops:
      (w,) = _interpret.bind(eqn, [w])
    return w

  def tree_flatten(self):
    return (self.kind,), self.ops

  @classmethod
  def tree_unflatten(cls, ops, children):
    return cls(children[0], ops)


def is_quantized(w) -> bool:
  """Whether ``w`` (a ``Kernel``'s base) is a kernel kind, possibly with pending unary ops."""
  return isinstance(w, Lazy) or kernels.is_kind(w)


@jax.tree_util.register_pytree_node_class
class Kernel:
  """A targeted kernel inside the interpreter.

  ``w`` is the base kernel as ``fn`` currently sees it (after casts and transposes): a dense
  array, or a kernel-kind instance (``lora_jax.kernels``) until a rule needs its dense
  operand. ``axes[k]`` is the original kernel axis that axis k of ``w`` is. ``adapter`` is the
  adapter kind (``LoraWeights``) with the stacked axes that a ``lax.scan`` sliced off removed;
  it is None while ``analyze`` only watches how kernels are used.
  """

  def __init__(self, w, adapter, *, path: str, axes):
    self.w, self.adapter, self.path, self.axes = w, adapter, path, tuple(axes)

  @property
  def roles(self) -> str | None:
    return None if self.adapter is None else self.adapter.axes

  @property
  def dtype(self):
    """The dtype of ``dense()``, without forming it."""
    if isinstance(self.w, Lazy):
      return self.w.ops[-1].outvars[0].aval.dtype if self.w.ops else self.w.kind.dtype
    return self.w.dtype

  def dense(self):
    """The base kernel as a dense array."""
    return self.w.dense() if isinstance(self.w, Lazy) else kernels.dense(self.w)

  def replace(self, **changes) -> "Kernel":
    fields = dict(w=self.w, adapter=self.adapter, path=self.path, axes=self.axes) | changes
    return Kernel(fields.pop("w"), fields.pop("adapter"), **fields)

  def role(self, dim: int) -> str | None:
    return self.roles[self.axes[dim]] if self.roles else None

  def tree_flatten(self):
    return (self.w, self.adapter), (self.path, self.axes)

  @classmethod
  def tree_unflatten(cls, aux, children):
    path, axes = aux
    return cls(*children, path=path, axes=axes)


def is_kernel(x) -> bool:
  """Whether ``x`` is a ``Kernel`` (what the contexts track)."""
  return isinstance(x, Kernel)


def adapted_only(rule):
  """``rule``, but a kernel that is neither adapted nor quantized is made dense and used as
  it is (``_interpret.fallback``)."""

  def checked(eqn, invals, ctx):
    if all(x.adapter is None and not is_quantized(x.w) for x in invals if isinstance(x, Kernel)):
      return _interpret.fallback(eqn, invals, ctx)
    return rule(eqn, invals, ctx)

  return checked


def dropout(x, rate: float, key):
  """Inverted dropout of ``x`` at ``rate`` with ``key``."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
