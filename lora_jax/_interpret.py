"""A small table-driven jaxpr interpreter in which targeted kernels are ``Kernel`` values.

Equations no ``Kernel`` flows into are re-bound unchanged with ``primitive.bind``; every other
equation runs the context's rule for its primitive (``ctx.rules``: ``lora_jax._rules``'s
tables, with ``lora_jax._higher_order``'s for jit, scan, checkpoint and cond), or
``fallback``, the merged kernel. A context may look ahead (``ctx.look_ahead``: the adapted
product's siblings and recomputed inputs, ``lora_jax._adapted``). This module names no
primitive.
"""

from __future__ import annotations

import jax
from jax.extend import core

from lora_jax import kernels

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
      (w,) = bind(eqn, [w])
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


def bind(eqn, invals) -> list:
  """Re-binds ``eqn``'s primitive on ``invals``; always returns a list of outputs."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # JAX < 0.7 returned (subfuns, params)
    subfuns, params = params
  out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def open_jaxpr(jaxpr):
  """``(jaxpr, consts)`` of a jaxpr or a closed one."""
  if isinstance(jaxpr, core.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


def eval_jaxpr(jaxpr, consts, args, ctx) -> list:
  """Evaluates ``jaxpr`` on ``args``, which may hold ``Kernel`` values."""
  env = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  def write(v, x):
    if not isinstance(v, core.DropVar):
      env[v] = x

  for v, x in zip(jaxpr.constvars, consts):
    write(v, x)
  for v, x in zip(jaxpr.invars, args):
    write(v, x)
  ahead = ctx.look_ahead(jaxpr, env)
  for i, eqn in enumerate(jaxpr.eqns):
    if ahead is not None and i in ahead.done:
      outvals = ahead.done.pop(i)
    else:
      invals = [read(v) for v in eqn.invars]
      if not any(isinstance(x, Kernel) for x in invals):
        outvals = bind(eqn, invals)
      else:
        outvals = None if ahead is None else ahead.run(i, eqn, invals)
        if outvals is None:
          outvals = rule(eqn.primitive.name, ctx)(eqn, invals, ctx)
    for v, x in zip(eqn.outvars, outvals):
      write(v, x)
  return [read(v) for v in jaxpr.outvars]


def run(closed, args, ctx) -> list:
  """Evaluates a closed jaxpr; kernels that reach the outputs are returned merged."""
  jaxpr, consts = open_jaxpr(closed)
  return [ctx.materialize(x, "output") for x in eval_jaxpr(jaxpr, consts, args, ctx)]


def rule(name: str, ctx):
  """The context's rule for the primitive ``name``; ``fallback`` where it has none."""
  return ctx.rules.get(name) or fallback


def fallback(eqn, invals, ctx) -> list:
  """The merged kernel for a use with no rule: correct, reported as a fallback."""
  return bind(eqn, [ctx.materialize(x, eqn.primitive.name) for x in invals])


