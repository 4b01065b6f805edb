"""The adapted product, in one home: ``dot_general(x, W)`` with a kernel operand becomes
``x@W + s·((x@A)@B)``.

Behind the ``dot_general`` rule: the route of each product (``lora_jax._product``'s
hand-written backward, factored or through a temporary ``W' = W + s·A@B``, or autodiff), the
siblings (products of one activation computed together) and the recompute of cheap inputs
(their elementwise chain run again in the backward pass). The interpreter reaches the last
two through its generic look-ahead hook (``Apply.look_ahead`` returns a ``Siblings``).
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
from jax.extend import core

from lora_jax import _interpret, _product
from lora_jax._interpret import Kernel

FREE = [c for c in string.ascii_lowercase if c != "r"]  # subscripts of the activation's axes


AXIS = string.ascii_uppercase  # subscripts of kernel axes, as in adapters.factor_subscripts


def dropout(x, rate: float, key):
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def operands(eqn, kernel_is_lhs: bool):
  """(x contracting, kernel contracting), (x batch, kernel batch) dims of a dot_general."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  return ((rc, lc), (rb, lb)) if kernel_is_lhs else ((lc, rc), (lb, rb))


def _subscripts(eqn, x, k: Kernel, kernel_is_lhs: bool):
  """einsum subscripts of x and of the product, and the original kernel axes contracted and
  batched, for ``dot_general(x, W)``: kernel axis j is ``AXIS[j]``, x's own axes lower-case."""
  (xc, kc), (xb, kb) = operands(eqn, kernel_is_lhs)
  kfree = [d for d in range(len(k.axes)) if d not in kc and d not in kb]
  letters = {xd: AXIS[k.axes[kd]] for xd, kd in (*zip(xc, kc), *zip(xb, kb))}
  free_x = iter(FREE)
  x_sub = "".join(letters.get(d) or next(free_x) for d in range(x.ndim))
  x_free = "".join(x_sub[d] for d in range(x.ndim) if d not in xc and d not in xb)
  k_free = "".join(AXIS[k.axes[d]] for d in kfree)
  batch = "".join(AXIS[k.axes[d]] for d in kb)
  out_sub = batch + (k_free + x_free if kernel_is_lhs else x_free + k_free)
  return x_sub, out_sub, {k.axes[d] for d in kc}, {k.axes[d] for d in kb}


def opts(eqn) -> dict:
  return dict(precision=eqn.params.get("precision"),
              preferred_element_type=eqn.params.get("preferred_element_type"))


def _factored_dot(eqn, x, k: Kernel, kernel_is_lhs: bool, ctx):
  """The adapter's share of ``dot_general(x, W)``, or None when its axes do not allow it."""
  x_sub, out_sub, contracted, batched = _subscripts(eqn, x, k, kernel_is_lhs)
  if k.adapter.dropout and ctx.key is not None:
    x = dropout(x, k.adapter.dropout, ctx.next_key())
  extra = k.adapter.product(
      x, x_sub=x_sub, out_sub=out_sub, present=k.axes, contracted=contracted, batched=batched,
      dtype=k.dtype, **opts(eqn))
  return extra, out_sub


def _route(eqn, x, k: Kernel, kernel_is_lhs: bool, ctx):
  """(route, terms, x_sub, out_sub) of the hand-written backward (``lora_jax._product``) for
  this product, or None for autodiff of ``adapter.product``: asked for with
  ``product="autodiff"``, and taken for adapters whose scale is not one static float (a
  bank's; per-layer scales are folded into B before a scan slices them) or a contraction the
  adapter's terms do not cover."""
  lw = k.adapter
  if ctx.product == "autodiff" or not isinstance(lw.scale, (int, float)):
    return None
  x_sub, out_sub, contracted, batched = _subscripts(eqn, x, k, kernel_is_lhs)
  terms = lw.terms(x_sub=x_sub, present=k.axes, contracted=contracted, batched=batched)
  if terms is None:
    return None
  dropping = bool(lw.dropout) and ctx.key is not None
  merged_ok = not dropping and _product.dense_base(k)
  route = ctx.product
  if route == "auto":
    cheaper = merged_ok and _product.cheaper_merged(x.shape, k.w.shape, x_sub=x_sub,
                                                    terms=terms)
    route = "merged_weight" if cheaper else "factored"
  if route == "merged_weight" and not merged_ok:
    route = "factored"  # adapter dropout, or a quantized base: W' cannot hold them
  return route, terms, x_sub, out_sub


def _member(eqn, x, k: Kernel, kernel_is_lhs: bool, route):
  """``route``'s ``_product.Member`` and its arrays: (member, w or None, first, second)."""
  name, terms, _, out_sub = route
  base_product = None
  if name == "merged_weight":
    def base_product(x, w):
      return _interpret.bind(eqn, [w, x] if kernel_is_lhs else [x, w])[0]
  member = _product.Member(terms, out_sub, float(k.adapter.scale), base_product)
  return (member, k.dense() if member.merged else None, terms.first.astype(k.dtype),
          terms.second.astype(k.dtype))


def _hand_vjp_dots(items, x, ctx, *, dropped=None) -> list:
  """Adapted ``dot_general``s ``[(eqn, k, kernel_is_lhs, route), ...]`` that share x (and
  the subscripts of x, A and t), through one ``_product.products``: their A factors are
  applied to x as one product. ``dropped``: x after adapter dropout, the adapters' input
  (one factored member; the base product keeps x)."""
  parts = [_member(eqn, x, k, lhs, route) for eqn, k, lhs, route in items]
  eqn, _, _, (_, _, x_sub, _) = items[0]
  outs = _product.products(tuple(p[0] for p in parts), x_sub=x_sub, opts=opts(eqn))(
      x if dropped is None else dropped, [p[1] for p in parts], [p[2] for p in parts],
      [p[3] for p in parts])
  results = []
  for (eqn, k, lhs, route), (member, *_), out in zip(items, parts, outs):
    if not member.merged:
      base = base_dot(eqn, k, x, lhs)
      out = base + out.astype(base.dtype)
    results.append([k.adapter.rescaled(out, w=k.dense, present=k.axes, out_sub=route[3])])
  return results


def _hand_vjp_dot(eqn, x, k: Kernel, kernel_is_lhs: bool, ctx, route):
  """One adapted ``dot_general(x, W)`` through ``lora_jax._product``'s backward; adapter
  dropout (factored only: ``_route``) applies to the adapter's x, not the base product's."""
  dropped = None
  if k.adapter.dropout and ctx.key is not None:
    dropped = dropout(x, k.adapter.dropout, ctx.next_key())
  return _hand_vjp_dots([(eqn, k, kernel_is_lhs, route)], x, ctx, dropped=dropped)[0]


def apply_dots(group, ctx) -> list:
  """Sibling products (``_interpret.Siblings``): those on the hand-written route with the
  same x, subscripts of x, A and t, A's shape but for its rank, factor dtype and precision,
  and no adapter dropout drawn, computed as one group; None for the rest (each then runs on
  its own, in order, so dropout keys are drawn as without grouping)."""
  picked = []
  for eqn, invals in group:
    operand = kernel_operand(eqn, invals, ctx)
    k, x, lhs = operand if operand is not None else (None, None, None)
    route = None
    if k is not None and k.adapter is not None:
      route = _route(eqn, x, k, lhs, ctx)
    dropping = route is not None and bool(k.adapter.dropout) and ctx.key is not None
    picked.append(None if route is None or dropping else (eqn, k, lhs, route))

  def key(item):
    eqn, k, _, (_, terms, x_sub, _) = item
    r = terms.first_sub.index("r")  # the first factors are concatenated along r: alike elsewhere
    shape = terms.first.shape[:r] + terms.first.shape[r + 1:]
    return (x_sub, terms.first_sub, terms.t_sub, shape, k.dtype, _opts_key(eqn))

  first = picked[0]
  if first is None:
    return [None] * len(group)
  same = [i for i, item in enumerate(picked) if item is not None and key(item) == key(first)]
  if len(same) < 2:
    return [None] * len(group)
  x = kernel_operand(*group[0], ctx)[1]
  outs = dict(zip(same, _hand_vjp_dots([picked[i] for i in same], x, ctx)))
  return [outs.get(i) for i in range(len(group))]


def _opts_key(eqn) -> tuple:
  return (str(eqn.params.get("precision")), str(eqn.params.get("preferred_element_type")))


def kernel_operand(eqn, invals, ctx):
  """(kernel, x, kernel_is_lhs), or None when both operands are kernels."""
  lhs, rhs = invals
  if isinstance(lhs, Kernel) and isinstance(rhs, Kernel):
    return None
  return (lhs, rhs, True) if isinstance(lhs, Kernel) else (rhs, lhs, False)


def base_dot(eqn, k: Kernel, x, kernel_is_lhs: bool):
  """``dot_general(x, W)``. A quantized W is made dense inside a ``jax.checkpoint`` that saves
  nothing: the backward pass dequantizes it again rather than keeping every layer's dense
  kernel as a residual (which would undo the memory the format saves)."""
  def product(x, w):
    w = w.dense() if isinstance(w, _interpret.Lazy) else w
    return _interpret.bind(eqn, [w, x] if kernel_is_lhs else [x, w])[0]

  if _interpret.is_quantized(k.w):
    policy = jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint(product, policy=policy)(x, _interpret.Lazy.of(k.w))
  return product(x, k.dense())


def apply_dot(eqn, invals, ctx):
  operand = kernel_operand(eqn, invals, ctx)
  if operand is None:
    return _interpret.bind(eqn, [ctx.materialize(v, "dot_general of two kernels") for v in invals])
  k, x, kernel_is_lhs = operand
  if k.adapter is None:  # a quantized kernel that is not adapted
    return [base_dot(eqn, k, x, kernel_is_lhs)]
  route = _route(eqn, x, k, kernel_is_lhs, ctx)
  if route is not None:
    return _hand_vjp_dot(eqn, x, k, kernel_is_lhs, ctx, route)
  extra, out_sub = _factored_dot(eqn, x, k, kernel_is_lhs, ctx)
  if extra is None:
    return _interpret.bind(eqn, [ctx.materialize(v, "dot_general over mixed axes") for v in invals])
  base = base_dot(eqn, k, x, kernel_is_lhs)
  out = base + extra.astype(base.dtype)
  return [k.adapter.rescaled(out, w=k.dense, present=k.axes, out_sub=out_sub)]


# ----------------------------------------------------------------------- siblings

_CHEAP = frozenset({"convert_element_type", "transpose", "reshape", "squeeze", "copy",
                    "copy_p", "broadcast_in_dim", "mul", "add", "sub", "div", "neg", "rsqrt",
                    "sqrt", "exp", "log", "logistic", "tanh", "max", "min", "integer_pow",
                    "pow", "square", "abs", "erf", "select_n"})  # layout and elementwise


_CHAIN = 32  # equations at most in a recomputed chain


def _cheap(eqn) -> bool:
  """An elementwise or layout equation, or a jitted helper made of them only (silu)."""
  if eqn.primitive.name in ("jit", "pjit"):
    return all(_cheap(e) for e in _interpret.open_jaxpr(eqn.params["jaxpr"])[0].eqns)
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

  def run(self, i: int, eqn, invals) -> list | None:
    """The outputs of the ``i``-th equation (a ``dot_general``: with its siblings, or its
    input recomputed), or None to leave it to its rule."""
    return self.dot(i, eqn, invals) if eqn.primitive.name == "dot_general" else None

  def dot(self, i: int, eqn, invals) -> list:
    rule = _interpret.rule("dot_general", self.ctx)
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
        outs = _interpret.bind(eqn, [u.val if isinstance(u, core.Literal) else env[u] for u in eqn.invars])
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
    outs = _interpret.rule(eqn.primitive.name, self.ctx)(eqn, [k], self.ctx)
    self.done[i] = outs
    for out_v, out in zip(eqn.outvars, outs):
      self.env[out_v] = out
    return self.env[v]
