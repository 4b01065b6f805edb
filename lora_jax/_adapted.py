"""The adapted product, in one home: ``dot_general(x, W)`` with a kernel operand becomes
``x@W + s·((x@A)@B)``.

Behind the ``dot_general`` rule (``APPLY_DOT``, ``ANALYZE_DOT``): the route of each product
(``lora_jax._product``'s hand-written backward, factored or through a temporary
``W' = W + s·A@B``, or autodiff of the adapter's own product), the siblings (products of one
activation computed together) and the recompute of cheap inputs (their elementwise chain run
again in the backward pass). The last two see the jaxpr around the product through the
interpreter's ``Frame`` (``APPLY_DOT`` is a ``FrameRule``).
"""

from __future__ import annotations

import jax
from jax.extend import core

from lora_jax import _interpret, _product
from lora_jax._kernel import AXIS, FREE, Kernel, Lazy, adapted_only, dropout, is_quantized


def _operands(eqn, kernel_is_lhs: bool):
  """(x contracting, kernel contracting), (x batch, kernel batch) dims of a dot_general."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  return ((rc, lc), (rb, lb)) if kernel_is_lhs else ((lc, rc), (lb, rb))


def _subscripts(eqn, x, k: Kernel, kernel_is_lhs: bool):
  """einsum subscripts of x and of the product, and the original kernel axes contracted and
  batched, for ``dot_general(x, W)``: kernel axis j is ``AXIS[j]``, x's own axes lower-case."""
  (xc, kc), (xb, kb) = _operands(eqn, kernel_is_lhs)
  kfree = [d for d in range(len(k.axes)) if d not in kc and d not in kb]
  letters = {xd: AXIS[k.axes[kd]] for xd, kd in (*zip(xc, kc), *zip(xb, kb))}
  free_x = iter(FREE)
  x_sub = "".join(letters.get(d) or next(free_x) for d in range(x.ndim))
  x_free = "".join(x_sub[d] for d in range(x.ndim) if d not in xc and d not in xb)
  k_free = "".join(AXIS[k.axes[d]] for d in kfree)
  batch = "".join(AXIS[k.axes[d]] for d in kb)
  out_sub = batch + (k_free + x_free if kernel_is_lhs else x_free + k_free)
  return x_sub, out_sub, {k.axes[d] for d in kc}, {k.axes[d] for d in kb}


def _opts(eqn) -> dict:
  return dict(precision=eqn.params.get("precision"),
              preferred_element_type=eqn.params.get("preferred_element_type"))


def _factored_dot(eqn, x, k: Kernel, kernel_is_lhs: bool, ctx):
  """The adapter's share of ``dot_general(x, W)``, or None when its axes do not allow it."""
  x_sub, out_sub, contracted, batched = _subscripts(eqn, x, k, kernel_is_lhs)
  if k.adapter.dropout and ctx.key is not None:
    x = dropout(x, k.adapter.dropout, ctx.next_key())
  extra = k.adapter.product(
      x, x_sub=x_sub, out_sub=out_sub, present=k.axes, contracted=contracted, batched=batched,
      dtype=k.dtype, **_opts(eqn))
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
  merged_ok = not dropping and not is_quantized(k.w)  # W' needs a dense W
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
  outs = _product.products(tuple(p[0] for p in parts), x_sub=x_sub, opts=_opts(eqn))(
      x if dropped is None else dropped, [p[1] for p in parts], [p[2] for p in parts],
      [p[3] for p in parts])
  results = []
  for (eqn, k, lhs, route), (member, *_), out in zip(items, parts, outs):
    if not member.merged:
      base = _base_dot(eqn, k, x, lhs)
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


def _apply_dots(group, ctx) -> list:
  """Sibling products (``_dot_in_frame``): those on the hand-written route with the
  same x, subscripts of x, A and t, A's shape but for its rank, factor dtype and precision,
  and no adapter dropout drawn, computed as one group; None for the rest (each then runs on
  its own, in order, so dropout keys are drawn as without grouping)."""
  picked = []
  for eqn, invals in group:
    operand = _kernel_operand(eqn, invals, ctx)
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
  x = _kernel_operand(*group[0], ctx)[1]
  outs = dict(zip(same, _hand_vjp_dots([picked[i] for i in same], x, ctx)))
  return [outs.get(i) for i in range(len(group))]


def _opts_key(eqn) -> tuple:
  return (str(eqn.params.get("precision")), str(eqn.params.get("preferred_element_type")))


def _kernel_operand(eqn, invals, ctx):
  """(kernel, x, kernel_is_lhs), or None when both operands are kernels."""
  lhs, rhs = invals
  if isinstance(lhs, Kernel) and isinstance(rhs, Kernel):
    return None
  return (lhs, rhs, True) if isinstance(lhs, Kernel) else (rhs, lhs, False)


def _base_dot(eqn, k: Kernel, x, kernel_is_lhs: bool):
  """``dot_general(x, W)``. A quantized W is made dense inside a ``jax.checkpoint`` that saves
  nothing: the backward pass dequantizes it again rather than keeping every layer's dense
  kernel as a residual (which would undo the memory the format saves)."""
  def product(x, w):
    w = w.dense() if isinstance(w, Lazy) else w
    return _interpret.bind(eqn, [w, x] if kernel_is_lhs else [x, w])[0]

  if is_quantized(k.w):
    policy = jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint(product, policy=policy)(x, Lazy.of(k.w))
  return product(x, k.dense())


def _apply_dot(eqn, invals, ctx):
  """One adapted ``dot_general``: the hand-written route where ``_route`` gives one, else the
  base product plus the adapter's own (autodiff), else the merged kernel."""
  operand = _kernel_operand(eqn, invals, ctx)
  if operand is None:
    return _interpret.bind(eqn, [ctx.materialize(v, "dot_general of two kernels") for v in invals])
  k, x, kernel_is_lhs = operand
  if k.adapter is None:  # a quantized kernel that is not adapted
    return [_base_dot(eqn, k, x, kernel_is_lhs)]
  route = _route(eqn, x, k, kernel_is_lhs, ctx)
  if route is not None:
    return _hand_vjp_dot(eqn, x, k, kernel_is_lhs, ctx, route)
  extra, out_sub = _factored_dot(eqn, x, k, kernel_is_lhs, ctx)
  if extra is None:
    return _interpret.bind(eqn, [ctx.materialize(v, "dot_general over mixed axes") for v in invals])
  base = _base_dot(eqn, k, x, kernel_is_lhs)
  out = base + extra.astype(base.dtype)
  return [k.adapter.rescaled(out, w=k.dense, present=k.axes, out_sub=out_sub)]


def _analyze_dot(eqn, invals, ctx):
  """``analyze``: contracted kernel axes are inputs, batched ones stacked layers, the rest
  outputs."""
  operand = _kernel_operand(eqn, invals, ctx)
  if operand is None:
    return _interpret.bind(eqn, [ctx.materialize(v, "dot_general of two kernels") for v in invals])
  k, x, kernel_is_lhs = operand
  (_, kc), (_, kb) = _operands(eqn, kernel_is_lhs)
  roles = {k.axes[d]: "i" if d in kc else "l" if d in kb else "o" for d in range(len(k.axes))}
  ctx.note(k, "dot_general", roles=roles)
  return [_base_dot(eqn, k, x, kernel_is_lhs)]


# ----------------------------------------------------------------------- siblings, recompute

_CHEAP = frozenset({"convert_element_type", "transpose", "reshape", "squeeze", "copy",
                    "copy_p", "broadcast_in_dim", "mul", "add", "sub", "div", "neg", "rsqrt",
                    "sqrt", "exp", "log", "logistic", "tanh", "max", "min", "integer_pow",
                    "pow", "square", "abs", "erf", "select_n"})  # layout and elementwise
_CHAIN = 32  # equations at most in a recomputed chain
_UNKNOWN = object()


def _cheap(eqn) -> bool:
  """An elementwise or layout equation, or a jitted helper made of them only (silu)."""
  if eqn.primitive.name in ("jit", "pjit"):
    return all(_cheap(e) for e in _interpret.open_jaxpr(eqn.params["jaxpr"])[0].eqns)
  return eqn.primitive.name in _CHEAP and not eqn.effects


_apply_one = adapted_only(_apply_dot)  # one product, alone


def _dot_in_frame(eqn, invals, ctx, frame) -> list:
  """``lora(fn)``'s ``dot_general``: with ``ctx.siblings``, the later products in the jaxpr
  that take the same activation (the same variable, on the same side) with another kernel,
  such as q, k and v of one attention layer, are computed with this one (``_apply_dots``) and
  their outputs claimed in ``frame``; with ``ctx.recompute``, the group of an activation that
  is an elementwise result runs inside ``_recomputing``'s ``jax.checkpoint``."""
  if not (ctx.siblings or ctx.recompute):
    return _apply_one(eqn, invals, ctx)
  tracked = [isinstance(x, Kernel) for x in invals]
  side = tracked.index(False) if tracked.count(True) == 1 else None
  if side is None or isinstance(eqn.invars[side], core.Literal):
    return _apply_one(eqn, invals, ctx)
  x = eqn.invars[side]
  group, at = [(eqn, invals)], [frame.index]
  if ctx.siblings:
    for j, other, k in _siblings(frame, x, side):
      group.append((other, [invals[side], k] if side == 0 else [k, invals[side]]))
      at.append(j)

  def compute(x_value):
    members = [(e, [x_value if d == side else v for d, v in enumerate(vals)])
               for e, vals in group]
    outs = _apply_dots(members, ctx) if len(members) > 1 else [None]
    if outs[0] is None:
      outs = [_apply_one(*members[0], ctx), *outs[1:]]
    return outs

  found = _chain(frame, x) if ctx.recompute else None
  outs = compute(invals[side]) if found is None else _recomputing(frame, compute, x, *found)
  for j, out in zip(at[1:], outs[1:]):
    if out is not None:
      frame.claim(j, out)
  return outs[0]


def _siblings(frame, x, side: int) -> list:
  """``(index, eqn, kernel)`` of each later ``dot_general`` of ``frame`` taking ``x`` on
  ``side`` and a kernel on the other; the kernel's casts, transposes and reshapes (pure
  equations on a kernel) are run early (``_force``)."""
  found = []
  later = [j for j in frame.users(x) if j > frame.index and not frame.done(j)
           and frame.jaxpr.eqns[j].primitive.name == "dot_general"]
  for j in later:
    other = frame.jaxpr.eqns[j]
    if other.invars[side] is x and not isinstance(other.invars[1 - side], core.Literal):
      k = _force(frame, other.invars[1 - side])
      if isinstance(k, Kernel):
        found.append((j, other, k))
  return found


def _chain(frame, v) -> tuple[list, list] | None:
  """The elementwise equations ``v`` comes from (through layout changes and jitted
  elementwise helpers such as silu), in order, and the values they start from; None when
  ``v`` is not such a result (a product's output, attention's, or a jaxpr input)."""
  eqns, starts, seen, todo = {}, [], set(), [v]
  while todo:
    u = todo.pop()
    if isinstance(u, core.Literal) or u in seen:
      continue
    seen.add(u)
    i = frame.producer(u)
    if i is None or not _cheap(frame.jaxpr.eqns[i]) or len(eqns) >= _CHAIN:
      starts.append(u)
      continue
    eqns[i] = frame.jaxpr.eqns[i]
    todo.extend(eqns[i].invars)
  if not eqns or any(isinstance(frame.value(u), Kernel) for u in starts):
    return None
  return [eqns[i] for i in sorted(eqns)], starts


def _recomputing(frame, compute, v, eqns, starts):
  """``compute(v)`` (the products of ``v``) inside a ``jax.checkpoint`` whose policy keeps
  only products' outputs: the backward pass computes ``v`` again from the start of its
  elementwise chain (a norm's input and mean square, g and u: values the frozen model's
  own backward pass keeps) instead of keeping it."""
  def run(*values):
    env = dict(zip(starts, values))
    for eqn in eqns:
      invals = [u.val if isinstance(u, core.Literal) else env[u] for u in eqn.invars]
      env.update(zip(eqn.outvars, _interpret.bind(eqn, invals)))
    return compute(env[v])

  policy = jax.checkpoint_policies.dots_saveable
  return jax.checkpoint(run, policy=policy)(*[frame.read(u) for u in starts])


def _force(frame, v, depth: int = 0):
  """``v``'s value, running now the kernel-keeping unary equations (``ctx.keeps_kernel``)
  it comes from; None when it comes from anything else."""
  known = frame.value(v, _UNKNOWN)
  if known is not _UNKNOWN:
    return known
  i = frame.producer(v)
  if i is None or depth > 8:
    return None
  eqn = frame.jaxpr.eqns[i]
  if eqn.primitive.name not in frame.ctx.keeps_kernel or len(eqn.invars) != 1:
    return None
  if not isinstance(_force(frame, eqn.invars[0], depth + 1), Kernel):
    return None
  frame.evaluate(i)
  return frame.read(v)


APPLY_DOT = _interpret.FrameRule(_dot_in_frame)  # lora_jax._rules.APPLY_RULES["dot_general"]
ANALYZE_DOT = _analyze_dot  # lora_jax._rules.ANALYZE_RULES["dot_general"]
