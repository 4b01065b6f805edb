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

import jax
import jax.numpy as jnp

from lora_jax import _interpret
from lora_jax.adapters import Terms

PRODUCTS = ("auto", "autodiff", "factored", "merged_weight")


def _einsum(spec: str, *operands, opts: dict, like):
  return jnp.einsum(spec, *operands, **opts).astype(like.dtype)


def _backward_terms(terms: Terms, x_sub: str, out_sub: str, scale: float, opts: dict,
                    x, first, second, t, dy):
  """dt, d(first), d(second) from t = x@first (unscaled) and the output's cotangent."""
  d_second = _einsum(f"{terms.t_sub},{out_sub}->{terms.second_sub}", t * scale, dy,
                     opts=opts, like=second)
  dt = _einsum(f"{out_sub},{terms.second_sub}->{terms.t_sub}", dy, second, opts=opts,
               like=t) * jnp.asarray(scale, t.dtype)
  d_first = _einsum(f"{x_sub},{terms.t_sub}->{terms.first_sub}", x, dt, opts=opts, like=first)
  return dt, d_first, d_second


def factored(terms: Terms, *, x_sub: str, out_sub: str, scale: float, opts: dict):
  """``f(x, first, second) = s·(x@first)@second`` (the factors in the kernel's dtype), with
  the backward above: residuals x and t."""
  t_spec = f"{x_sub},{terms.first_sub}->{terms.t_sub}"
  y_spec = f"{terms.t_sub},{terms.second_sub}->{out_sub}"

  @jax.custom_vjp
  def f(x, first, second):
    return fwd(x, first, second)[0]

  def fwd(x, first, second):
    t = jnp.einsum(t_spec, x, first, **opts)
    y = jnp.einsum(y_spec, t * jnp.asarray(scale, t.dtype), second, **opts)
    return y, (x, first, second, t)

  def bwd(res, dy):
    x, first, second, t = res
    dt, d_first, d_second = _backward_terms(terms, x_sub, out_sub, scale, opts, x, first,
                                            second, t, dy)
    dx = _einsum(f"{terms.t_sub},{terms.first_sub}->{x_sub}", dt, first, opts=opts, like=x)
    return dx, d_first, d_second

  f.defvjp(fwd, bwd)
  return f


def merged_weight(terms: Terms, *, x_sub: str, out_sub: str, scale: float, opts: dict,
                  base_product):
  """``f(x, w, first, second) = base_product(x, W + s·A@B)`` (``base_product(x, w)`` the
  model's own ``dot_general``), with the backward above: residuals x and t, W' formed again
  for dx; w gets no cotangent (it is frozen)."""
  t_spec = f"{x_sub},{terms.first_sub}->{terms.t_sub}"
  w_spec = f"{terms.first_sub},{terms.second_sub}->{terms.w_sub}"

  def merged(w, first, second):
    wide = jnp.promote_types(w.dtype, jnp.float32)
    delta = jnp.einsum(w_spec, first.astype(wide), second.astype(wide),
                       precision=jax.lax.Precision.HIGHEST)
    return (w.astype(wide) + scale * delta).astype(w.dtype)

  @jax.custom_vjp
  def f(x, w, first, second):
    return fwd(x, w, first, second)[0]

  def fwd(x, w, first, second):
    y = base_product(x, merged(w, first, second))
    return y, (x, w, first, second, jnp.einsum(t_spec, x, first, **opts))

  def bwd(res, dy):
    x, w, first, second, t = res
    w_prime = merged(w, first, second)
    (dx,) = jax.linear_transpose(lambda x: base_product(x, w_prime), x)(dy)
    _, d_first, d_second = _backward_terms(terms, x_sub, out_sub, scale, opts, x, first,
                                           second, t, dy)
    return dx, None, d_first, d_second

  f.defvjp(fwd, bwd)
  return f


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


def dense_base(k) -> bool:
  """Whether a ``Kernel``'s base is a plain array (not a quantized kind): W' needs it."""
  return not _interpret.is_quantized(k.w)
