"""The adapted product ``y = x@W + s·(x@A)@B`` with a hand-written backward (``jax.custom_vjp``).

W is frozen; only x, A and B get cotangents. Two forms (``lora(fn, product=...)``):

- ``"factored"``: forward ``t = x@A``, ``y = x@W + s·t@B``. Residuals x and t (N × r).
  Backward: ``dB = s·tᵀ dy``, ``dt = s·dy Bᵀ``, ``dA = xᵀ dt``, ``dx = dy Wᵀ + dt Aᵀ``. The same
  six token-sized products as autodiff's (the base's dx is autodiff's own, outside).
- ``"merged_weight"``: forward ``W' = W + s·A@B`` (from A and B alone), ``y = x@W'``, and
  ``t = x@A``. Backward: W' again, ``dx = dy W'ᵀ``, then dB, dt, dA as above. Four
  token-sized adapter products instead of six, plus ``in·out·r`` twice for W': cheaper when
  ``N·(in + out) > 2·in·out`` (N the activation's rows), which is what ``"auto"`` checks.
  W' is a temporary in the kernel's dtype; it is not kept for the backward pass, and no
  weight gradient is formed. W' is rounded to the kernel's dtype: in bfloat16 a change
  smaller than half a step of W is not seen by the forward pass (A's and B's gradients are
  computed from x, t and dy, unaffected).

Both work in any layout ``lora_jax.adapters.LoraWeights.terms`` describes (``first`` applied
to x, then ``second``: A then B for ``x @ W``, B then A for ``x @ W.T``), with stacked axes
batched.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from lora_jax.adapters import Terms

PRODUCTS = ("auto", "autodiff", "factored", "merged_weight")


@dataclasses.dataclass(frozen=True)
class Member:
  """One adapted product of a group that shares its activation x (a single product is a
  group of one): its terms (``LoraWeights.terms``; its arrays are passed apart), its output
  subscripts and static scale, and, for the W' form, ``base_product(x, w)``: the model's own
  ``dot_general``. A factored member gives only ``s·(x@A)@B``; a W' member the whole y."""

  terms: Terms
  out_sub: str
  scale: float
  base_product: Callable | None = None

  @property
  def merged(self) -> bool:
    return self.base_product is not None


def _einsum(spec: str, *operands, opts: dict, like):
  return jnp.einsum(spec, *operands, **opts).astype(like.dtype)


def _backward_terms(terms: Terms, out_sub: str, scale: float, opts: dict, second, t, dy):
  """dt and d(second) of one member from t = x@first (unscaled) and its output's cotangent
  (d(first) is the group's: one product over every member's dt)."""
  d_second = _einsum(f"{terms.t_sub},{out_sub}->{terms.second_sub}", t * scale, dy,
                     opts=opts, like=second)
  dt = _einsum(f"{out_sub},{terms.second_sub}->{terms.t_sub}", dy, second, opts=opts,
               like=t) * jnp.asarray(scale, t.dtype)
  return dt, d_second


def _merged(member: Member, w, first, second):
  """``W' = W + s·A@B`` in the kernel operand's layout, summed in float32 (at least), in
  w's dtype."""
  t = member.terms
  wide = jnp.promote_types(w.dtype, jnp.float32)
  delta = jnp.einsum(f"{t.first_sub},{t.second_sub}->{t.w_sub}", first.astype(wide),
                     second.astype(wide), precision=jax.lax.Precision.HIGHEST)
  return (w.astype(wide) + member.scale * delta).astype(w.dtype)


def _split(t, widths, axis):
  """``t`` cut along ``axis`` into pieces of ``widths``."""
  cuts = list(itertools.accumulate(widths))[:-1]
  return jnp.split(t, cuts, axis=axis) if cuts else [t]


def _concat(arrays, axis):
  return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=axis)


def products(members: tuple[Member, ...], *, x_sub: str, opts: dict):
  """``f(x, ws, firsts, seconds) -> outputs``, one per member, with the hand-written backward.

  The members share x and the subscripts of their first factor and of t, so their first
  factors are concatenated along the rank axis: ``t = x @ [A₁|A₂|…]`` is one product, and in
  the backward pass ``d[A₁|A₂|…] = xᵀ [dt₁|dt₂|…]`` and the factored members' share of dx,
  ``[dt₁|…] [A₁|…]ᵀ``, are one product each. ``ws[i]`` is member i's dense kernel for a W'
  member and None otherwise (a factored member's base product is the caller's).
  Residuals: x, t, the factors and the kernels (inputs of the step already)."""
  first_sub, t_sub = members[0].terms.first_sub, members[0].terms.t_sub
  r_first = first_sub.index("r")
  t_spec = f"{x_sub},{first_sub}->{t_sub}"

  needs = {}  # which inputs are differentiated, as fwd learns it (symbolic zeros)

  def forward(x, ws, firsts, seconds):
    widths = [a.shape[r_first] for a in firsts]
    t = jnp.einsum(t_spec, x, _concat(firsts, r_first), **opts)
    outs = []
    for m, w, first, second, t_m in zip(members, ws, firsts, seconds, _split(t, widths, -1)):
      if m.merged:
        outs.append(m.base_product(x, _merged(m, w, first, second)))
      else:
        outs.append(jnp.einsum(f"{t_sub},{m.terms.second_sub}->{m.out_sub}",
                               t_m * jnp.asarray(m.scale, t_m.dtype), second, **opts))
    return outs, (x, ws, firsts, seconds, t)

  @jax.custom_vjp
  def f(x, ws, firsts, seconds):
    return forward(x, ws, firsts, seconds)[0]

  def fwd(x, ws, firsts, seconds):
    needs["x"] = x.perturbed and jnp.issubdtype(x.value.dtype, jnp.inexact)
    needs["w"] = [w is not None and w.perturbed for w in ws]
    value = lambda p: None if p is None else p.value  # noqa: E731
    return forward(x.value, [value(w) for w in ws], [a.value for a in firsts],
                   [b.value for b in seconds])

  def bwd(res, dys):
    x, ws, firsts, seconds, t = res
    dys = [jnp.zeros(dy.shape, dy.dtype) if isinstance(dy, SymbolicZero) else dy for dy in dys]
    widths = [a.shape[r_first] for a in firsts]
    dts, d_seconds = [], []
    for m, second, t_m, dy in zip(members, seconds, _split(t, widths, -1), dys):
      dt, d_second = _backward_terms(m.terms, m.out_sub, m.scale, opts, second, t_m, dy)
      dts.append(dt)
      d_seconds.append(d_second)
    d_first = _einsum(f"{x_sub},{t_sub}->{first_sub}", x, _concat(dts, -1), opts=opts,
                      like=firsts[0])
    dws = [_weight_cotangent(m, x, w, dy) if need else None
           for m, w, dy, need in zip(members, ws, dys, needs["w"])]
    dx = _dx(members, x, ws, firsts, seconds, dts, dys, x_sub=x_sub, opts=opts)
    return (dx if needs["x"] else None), dws, _split(d_first, widths, r_first), d_seconds

  f.defvjp(fwd, bwd, symbolic_zeros=True)
  return f


def _weight_cotangent(member: Member, x, w, dy):
  """dW for a W' member whose base kernel is itself differentiated (not in LoRA training,
  where W is frozen and this is never formed): y = x@W' and dW'/dW = 1."""
  (dw,) = jax.linear_transpose(lambda w_: member.base_product(x, w_), w)(dy)
  return dw


def _dx(members, x, ws, firsts, seconds, dts, dys, *, x_sub: str, opts: dict):
  """x's cotangent: the factored members' share in one product, plus ``dy W'ᵀ`` for each W'
  member (its kernel formed again); None for an integer x (token ids)."""
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return None
  dx = _factored_dx(members, firsts, dts, x_sub=x_sub, opts=opts, like=x)
  for m, w, first, second, dy in zip(members, ws, firsts, seconds, dys):
    if m.merged:
      w_prime = _merged(m, w, first, second)
      (d,) = jax.linear_transpose(lambda x, w_prime=w_prime, m=m: m.base_product(x, w_prime),
                                  x)(dy)
      dx = d if dx is None else dx + d
  return dx


def _factored_dx(members, firsts, dts, *, x_sub: str, opts: dict, like):
  """The factored members' share of dx, ``[dt₁|…] [A₁|…]ᵀ`` (one product), or None."""
  picked = [(a, dt) for m, a, dt in zip(members, firsts, dts) if not m.merged]
  if not picked:
    return None
  terms = members[0].terms
  r_first = terms.first_sub.index("r")
  return _einsum(f"{terms.t_sub},{terms.first_sub}->{x_sub}",
                 _concat([dt for _, dt in picked], -1),
                 _concat([a for a, _ in picked], r_first), opts=opts, like=like)


def cheaper_merged(x_shape, w_shape, *, x_sub: str, terms: Terms) -> bool:
  """Whether W' (formed twice, ``in·out·r`` each) costs fewer multiplies than the two
  token-sized products it saves (``N·r·(in + out)``), for a product whose stacked axes
  are batched alike on both sides."""
  sizes = dict(zip(x_sub, x_shape)) | dict(zip(terms.w_sub, w_shape))
  rows = _size(sizes, {c for c in x_sub if c.islower()})
  ins = _size(sizes, set(x_sub) & set(terms.w_sub) - set(terms.t_sub))
  outs = _size(sizes, set(terms.w_sub) - set(x_sub))
  return rows * (ins + outs) > 2 * ins * outs


def _size(sizes: dict, letters) -> int:
  n = 1
  for c in letters:
    n *= sizes[c]
  return n

