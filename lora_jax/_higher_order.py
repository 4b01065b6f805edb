"""Rules for the higher-order primitives a kernel enters, shared by every rule table.

``jit`` / ``closed_call`` bodies are evaluated in place; ``lax.scan`` is rebuilt with each
stacked kernel sliced together with its adapter; ``jax.checkpoint`` and ``cond`` are rebuilt
through their public APIs with bodies that run the interpreter (``lora_jax._interpret``).
"""

from __future__ import annotations

import dataclasses

import jax
from jax import lax

from lora_jax._interpret import eval_jaxpr, open_jaxpr
from lora_jax._kernel import Kernel


def _inline(param: str):
  """jit / closed_call: evaluate the inner jaxpr in place, so kernels flow through it."""

  def rule(eqn, invals, ctx):
    jaxpr, consts = open_jaxpr(eqn.params[param])
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
  jaxpr, inner_consts = open_jaxpr(p["jaxpr"])

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
  jaxpr, consts = open_jaxpr(eqn.params["jaxpr"])

  def body(key, *args):
    return _body(jaxpr, consts, ctx.with_key(key), "checkpoint output")(*args)

  remat = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"],
                         policy=eqn.params["policy"])
  return remat(ctx.next_key(), *invals)


def _cond(eqn, invals, ctx) -> list:
  """lax.cond / lax.switch: every branch runs in the interpreter."""
  index = ctx.materialize(invals[0], "cond index")
  branches = [_body(*open_jaxpr(br), ctx, "cond output") for br in eqn.params["branches"]]
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
