"""A small jaxpr interpreter in which targeted kernels are ``Kernel`` values.

Only equations that a ``Kernel`` flows into get special handling; every other equation is
re-bound unchanged with ``primitive.bind``. Higher-order primitives that a kernel enters
(``jit``, ``scan``, ``checkpoint``, ``cond``) are rebuilt through their public APIs with a
Python body that runs this interpreter on the inner jaxpr. The per-primitive rules for a
kernel itself (``dot_general``, casts, transposes) live in ``lora_jax._rules``, one table for
applying adapters and one for ``analyze``, and come in through ``ctx.rules``; a primitive
with no rule gets the merged kernel (``ctx.materialize``).
"""

from __future__ import annotations

import dataclasses

import jax
from jax import lax
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


def _open(jaxpr):
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
  looks_ahead = getattr(ctx, "siblings", False) or getattr(ctx, "recompute", False)
  ahead = Siblings(jaxpr, env, ctx) if looks_ahead else None
  for i, eqn in enumerate(jaxpr.eqns):
    if ahead is not None and i in ahead.done:
      outvals = ahead.done.pop(i)
    else:
      invals = [read(v) for v in eqn.invars]
      if not any(isinstance(x, Kernel) for x in invals):
        outvals = bind(eqn, invals)
      elif ahead is not None and eqn.primitive.name == "dot_general":
        outvals = ahead.dot(i, eqn, invals)
      else:
        outvals = _rule(eqn.primitive.name, ctx)(eqn, invals, ctx)
    for v, x in zip(eqn.outvars, outvals):
      write(v, x)
  return [read(v) for v in jaxpr.outvars]


_CHEAP = frozenset({"convert_element_type", "transpose", "reshape", "squeeze", "copy",
                    "copy_p", "broadcast_in_dim", "mul", "add", "sub", "div", "neg", "rsqrt",
                    "sqrt", "exp", "log", "logistic", "tanh", "max", "min", "integer_pow",
                    "pow", "square", "abs", "erf", "select_n"})  # layout and elementwise
_CHAIN = 32  # equations at most in a recomputed chain


def _cheap(eqn) -> bool:
  """An elementwise or layout equation, or a jitted helper made of them only (silu)."""
  if eqn.primitive.name in ("jit", "pjit"):
    return all(_cheap(e) for e in _open(eqn.params["jaxpr"])[0].eqns)
  return eqn.primitive.name in _CHEAP and not eqn.effects


class Siblings:
  """Sibling products of one jaxpr: ``dot_general``s later in it that take the same
  activation (the same variable, on the same side) with another kernel, such as q, k and v
  of one attention layer. At the first of them, the later ones' kernels are brought forward
  (the casts, transposes and reshapes that make them run early: pure equations on a kernel)
  and ``ctx.dots`` computes the group at once; what it computed is kept in ``done`` for the
  loop to take when it reaches those equations. With ``ctx.recompute``, a group whose
  activation is an elementwise result runs inside ``recomputing``'s ``jax.checkpoint``."""

  def __init__(self, jaxpr, env: dict, ctx):
    self.jaxpr, self.env, self.ctx = jaxpr, env, ctx
    self.done: dict[int, list] = {}
    self.producer, self.users = {}, {}
    for i, eqn in enumerate(jaxpr.eqns):
      for v in eqn.outvars:
        self.producer[v] = i
      if eqn.primitive.name == "dot_general":
        for v in eqn.invars:
          if not isinstance(v, core.Literal):
            self.users.setdefault(v, []).append(i)

  def dot(self, i: int, eqn, invals) -> list:
    rule = _rule("dot_general", self.ctx)
    kernels = [isinstance(x, Kernel) for x in invals]
    side = kernels.index(False) if kernels.count(True) == 1 else None
    if side is None or isinstance(eqn.invars[side], core.Literal):
      return rule(eqn, invals, self.ctx)
    x = eqn.invars[side]
    group, at = [(eqn, invals)], [i]
    if getattr(self.ctx, "siblings", False):
      for j in [j for j in self.users.get(x, ()) if j > i and j not in self.done]:
        other = self.jaxpr.eqns[j]
        if other.invars[side] is x and not isinstance(other.invars[1 - side], core.Literal):
          k = self.force(other.invars[1 - side])
          if isinstance(k, Kernel):
            group.append((other, [invals[side], k] if side == 0 else [k, invals[side]]))
            at.append(j)

    def compute(x_value):
      members = [(e, [x_value if d == side else v for d, v in enumerate(vals)])
                 for e, vals in group]
      outs = self.ctx.dots(members) if len(members) > 1 else [None]
      if outs[0] is None:
        outs = [rule(*members[0], self.ctx), *outs[1:]]
      return outs

    found = self.chain(x) if getattr(self.ctx, "recompute", False) else None
    if found is None:
      outs = compute(invals[side])
    else:
      outs = self.recomputing(compute, x, *found)
    for j, out in zip(at[1:], outs[1:]):
      if out is not None:
        self.done[j] = out
    return outs[0]

  def chain(self, v) -> tuple[list, list] | None:
    """The elementwise equations ``v`` comes from (through layout changes and jitted
    elementwise helpers such as silu), in order, and the values they start from; None when
    ``v`` is not such a result (a product's output, attention's, or a jaxpr input)."""
    eqns, starts, seen, todo = {}, [], set(), [v]
    while todo:
      u = todo.pop()
      if isinstance(u, core.Literal) or u in seen:
        continue
      seen.add(u)
      i = self.producer.get(u)
      if i is None or not _cheap(self.jaxpr.eqns[i]) or len(eqns) >= _CHAIN:
        starts.append(u)
        continue
      eqns[i] = self.jaxpr.eqns[i]
      todo.extend(eqns[i].invars)
    if not eqns or any(isinstance(self.env.get(u), Kernel) for u in starts):
      return None
    return [eqns[i] for i in sorted(eqns)], starts

  def recomputing(self, compute, v, eqns, starts):
    """``compute(v)`` (the products of ``v``) inside a ``jax.checkpoint`` whose policy keeps
    only products' outputs: the backward pass computes ``v`` again from the start of its
    elementwise chain (a norm's input and mean square, g and u: values the frozen model's
    own backward pass keeps) instead of keeping it."""
    def run(*values):
      env = dict(zip(starts, values))
      for eqn in eqns:
        outs = bind(eqn, [u.val if isinstance(u, core.Literal) else env[u] for u in eqn.invars])
        env.update(zip(eqn.outvars, outs))
      return compute(env[v])

    policy = jax.checkpoint_policies.dots_saveable
    return jax.checkpoint(run, policy=policy)(*[self.env[u] for u in starts])

  def force(self, v, depth: int = 0):
    """``v``'s value, computing the kernel-keeping unary equations it comes from now (None
    when it comes from anything else)."""
    if v in self.env:
      return self.env[v]
    i = self.producer.get(v)
    if i is None or depth > 8:
      return None
    eqn = self.jaxpr.eqns[i]
    if eqn.primitive.name not in self.ctx.keeps_kernel or len(eqn.invars) != 1:
      return None
    k = self.force(eqn.invars[0], depth + 1)
    if not isinstance(k, Kernel):
      return None
    outs = _rule(eqn.primitive.name, self.ctx)(eqn, [k], self.ctx)
    self.done[i] = outs
    for out_v, out in zip(eqn.outvars, outs):
      self.env[out_v] = out
    return self.env[v]


def run(closed, args, ctx) -> list:
  """Evaluates a closed jaxpr; kernels that reach the outputs are returned merged."""
  jaxpr, consts = _open(closed)
  return [ctx.materialize(x, "output") for x in eval_jaxpr(jaxpr, consts, args, ctx)]


def _rule(name: str, ctx):
  return HIGHER_ORDER.get(name) or ctx.rules.get(name) or fallback


def fallback(eqn, invals, ctx) -> list:
  """The merged kernel for a use with no rule: correct, reported as a fallback."""
  return bind(eqn, [ctx.materialize(x, eqn.primitive.name) for x in invals])


def _inline(param: str):
  """jit / closed_call: evaluate the inner jaxpr in place, so kernels flow through it."""

  def rule(eqn, invals, ctx):
    jaxpr, consts = _open(eqn.params[param])
    return eval_jaxpr(jaxpr, consts, invals, ctx)

  return rule


def _body(jaxpr, consts, ctx, name: str):
  """A Python function running ``jaxpr`` in the interpreter, merging kernels it outputs."""

  def body(*args):
    return [ctx.materialize(x, name) for x in eval_jaxpr(jaxpr, consts, list(args), ctx)]

  return body


def _scan(eqn, invals, ctx) -> list:
  """lax.scan: a stacked kernel in ``xs`` is sliced together with its stacked A and B."""
  p = eqn.params
  nc, nk = p["num_consts"], p["num_carry"]
  consts, xs = invals[:nc], invals[nc + nk:]
  carry = [ctx.materialize(x, "scan carry") for x in invals[nc:nc + nk]]
  xs = [ctx.unstack(x, "scan") if isinstance(x, Kernel) else x for x in xs]
  xs, fixed = _per_step(xs)
  keys = None if ctx.key is None else jax.random.split(ctx.next_key(), p["length"])
  jaxpr, inner_consts = _open(p["jaxpr"])

  def body(carry, xs_and_key):
    xs, key = xs_and_key
    xs = fixed(xs)
    inner = _body(jaxpr, inner_consts, ctx.with_key(key), "scan output")
    outs = inner(*consts, *carry, *xs)
    return outs[:nk], outs[nk:]

  carry, ys = lax.scan(body, carry, (xs, keys), length=p["length"], reverse=p["reverse"],
                       unroll=p["unroll"])
  return [*carry, *ys]


def _per_step(xs):
  """``xs`` without the adapter fields that have no stacked-layer axis (an adapter kind's
  ``UNSTACKED_FIELDS``, such as an array scale), and a function that puts them back into a
  step's slice: they are the same at every step."""
  fixed = {}
  out = []
  for j, x in enumerate(xs):
    names = getattr(x.adapter, "UNSTACKED_FIELDS", ()) if isinstance(x, Kernel) else ()
    if names:
      fixed[j] = {n: getattr(x.adapter, n) for n in names}
      x = x.replace(adapter=dataclasses.replace(x.adapter, **{n: None for n in names}))
    out.append(x)

  def restore(sliced):
    return [x.replace(adapter=dataclasses.replace(x.adapter, **fixed[j])) if j in fixed else x
            for j, x in enumerate(sliced)]

  return out, restore


def _remat(eqn, invals, ctx) -> list:
  """jax.checkpoint: rebuilt with the same policy, kernels passed in as (w, a, b)."""
  jaxpr, consts = _open(eqn.params["jaxpr"])

  def body(key, *args):
    return _body(jaxpr, consts, ctx.with_key(key), "checkpoint output")(*args)

  remat = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"],
                         policy=eqn.params["policy"])
  return remat(ctx.next_key(), *invals)


def _cond(eqn, invals, ctx) -> list:
  """lax.cond / lax.switch: every branch runs in the interpreter."""
  index = ctx.materialize(invals[0], "cond index")
  branches = [_body(*_open(br), ctx, "cond output") for br in eqn.params["branches"]]
  return lax.switch(index, branches, *invals[1:])


HIGHER_ORDER = {
    "jit": _inline("jaxpr"),
    "pjit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "core_call": _inline("call_jaxpr"),
    "scan": _scan,
    "remat2": _remat,
    "checkpoint": _remat,
    "cond": _cond,
}
