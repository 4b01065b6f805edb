"""Rules for the row lookups and convolutions of a kernel: ``gather`` of whole rows of an
embedding table, ``E[ids] + s·(A[ids] @ B)``, and ``conv_general_dilated`` with a kernel as
its filter, ``conv(x, W) + s·(conv(x, A) @ B)``; and what ``analyze`` records of them.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lora_jax import _interpret
from lora_jax._kernel import AXIS, FREE, Kernel, dropout
from lora_jax.adapters import factor_subscripts


def _whole_rows(eqn) -> tuple[int, ...] | None:
  """The operand dims a ``gather`` indexes when it takes whole rows (each indexed dim sliced
  to size 1 and collapsed, every other dim taken whole, no batching dims), else None."""
  dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  shape = eqn.invars[0].aval.shape
  indexed = tuple(dn.start_index_map)
  if (dn.operand_batching_dims or sorted(dn.collapsed_slice_dims) != sorted(indexed)
      or any(sizes[d] != (1 if d in indexed else shape[d]) for d in range(len(shape)))):
    return None
  return indexed


def _lookup_roles(eqn, k: Kernel) -> tuple[int, ...] | None:
  """The indexed dims of a whole-row ``gather`` of ``k`` when they are all of its input axes
  and the other dims its output axes (an embedding table, roles "io"), else None."""
  rows = _whole_rows(eqn)
  roles = [k.role(d) for d in range(len(k.axes))]
  if rows is None or sorted(roles[d] for d in rows) != sorted(r for r in roles if r != "o"):
    return None
  return rows if all(r in "io" for r in roles) and "i" in roles else None


def apply_gather(eqn, invals, ctx):
  """``E[ids] + s·(A[ids] @ B)``: the rows of A taken by the same gather (slices of width r),
  then one product with B; no vocab × features array is formed."""
  k, ids = invals
  usable = isinstance(k, Kernel) and k.adapter is not None and not isinstance(ids, Kernel)
  rows = _lookup_roles(eqn, k) if usable else None
  factors = k.adapter.factors() if rows is not None else None
  if factors is None:
    return _interpret.fallback(eqn, invals, ctx)
  a, b, scale = factors
  w = k.dense()
  (base,) = _interpret.bind(eqn, [w, ids])
  lw, dtype = k.adapter, w.dtype
  a_sub, b_sub = factor_subscripts(lw.axes, k.axes)  # a: (*in, r), b: (r, *out)
  at = {d: a_sub.index(AXIS[k.axes[d]]) for d in rows}  # A's dim of each indexed dim
  dn = eqn.params["dimension_numbers"]
  batch = ids.ndim - 1  # the ids' dims in the output (their last dim indexes the table)
  dims = lax.GatherDimensionNumbers(
      offset_dims=(batch,), collapsed_slice_dims=tuple(sorted(at.values())),
      start_index_map=tuple(at[d] for d in dn.start_index_map))
  t = lax.gather(a.astype(dtype), ids, dims, tuple(1 if c != "r" else a.shape[-1] for c in a_sub),
                 mode=eqn.params["mode"], fill_value=eqn.params["fill_value"],
                 indices_are_sorted=eqn.params["indices_are_sorted"],
                 unique_indices=eqn.params["unique_indices"])  # (*ids, r)
  t_sub = "".join(FREE[:batch]) + "r"
  kept = iter(AXIS[k.axes[d]] for d in range(len(k.axes)) if d not in rows)  # W's offsets
  looked_up = iter(t_sub[:batch])
  out_sub = "".join(next(kept) if d in dn.offset_dims else next(looked_up)
                    for d in range(base.ndim))
  extra = jnp.einsum(f"{t_sub},{b_sub}->{out_sub}", t * jnp.asarray(scale, dtype),
                     b.astype(dtype))
  return [lw.rescaled(base + extra.astype(base.dtype), w=k.dense, present=k.axes,
                      out_sub=out_sub)]


def _conv_filter(eqn, invals) -> Kernel | None:
  """The kernel that is a ``conv_general_dilated``'s filter (rhs), with the image (lhs) not a
  kernel, one group, and roles "o" on the filter's output-feature dim and "i" elsewhere."""
  x, k = invals
  p = eqn.params
  if (isinstance(x, Kernel) or not isinstance(k, Kernel) or p["feature_group_count"] != 1
      or p["batch_group_count"] != 1):
    return None
  out_dim = p["dimension_numbers"].rhs_spec[0]
  ok = all(k.role(d) == ("o" if d == out_dim else "i") for d in range(len(k.axes)))
  return k if ok else None


def apply_conv(eqn, invals, ctx):
  """``conv(x, W) + s·(conv(x, A) @ B)``: A (*window, in, r) is the filter of a convolution
  with r output features and the base's strides, padding, dilations and layouts; B (r, out)
  maps its features (a 1×1 convolution). Together they are ``conv(x, W + s·A@B)``."""
  k = _conv_filter(eqn, invals)
  factors = None if k is None else k.adapter.factors()
  if factors is None:
    return _interpret.fallback(eqn, invals, ctx)
  (x, _), p, lw, (a, b, scale) = invals, eqn.params, k.adapter, factors
  w = k.dense()
  (base,) = _interpret.bind(eqn, [x, w])
  a_sub, b_sub = factor_subscripts(lw.axes, k.axes)
  at = [a_sub.index(AXIS[k.axes[d]]) for d in p["dimension_numbers"].rhs_spec[1:]]
  dims = p["dimension_numbers"]._replace(rhs_spec=(len(a_sub) - 1, *at))
  if lw.dropout and ctx.key is not None:
    x = dropout(x, lw.dropout, ctx.next_key())
  t = lax.conv_general_dilated(
      x, a.astype(w.dtype), p["window_strides"], p["padding"], p["lhs_dilation"],
      p["rhs_dilation"], dims, precision=p["precision"],
      preferred_element_type=p["preferred_element_type"])  # features: r
  channel = dims.out_spec[1]
  free = iter(FREE)
  t_sub = "".join("r" if d == channel else next(free) for d in range(t.ndim))
  out_sub = t_sub.replace("r", b_sub[1:])
  extra = jnp.einsum(f"{t_sub},{b_sub}->{out_sub}", t * jnp.asarray(scale, t.dtype),
                     b.astype(t.dtype), precision=p["precision"],
                     preferred_element_type=p["preferred_element_type"])
  return [lw.rescaled(base + extra.astype(base.dtype), w=k.dense, present=k.axes,
                      out_sub=out_sub)]


def analyze_gather(eqn, invals, ctx):
  """A whole-row lookup makes the indexed dims inputs and the others outputs (an embedding
  table: "io"); any other gather of a parameter is a merged use."""
  k, ids = invals
  rows = None if isinstance(ids, Kernel) else _whole_rows(eqn)
  if rows is None:
    return _interpret.fallback(eqn, invals, ctx)
  roles = {k.axes[d]: "i" if d in rows else "o" for d in range(len(k.axes))}
  ctx.note(k, "gather", roles=roles, lookup=True)
  return _interpret.bind(eqn, [k.dense(), ids])


def analyze_conv(eqn, invals, ctx):
  """A filter's output-feature dim is its output axis, the window and input-feature dims its
  input axes ("iiio" for a 2-D Flax kernel (kh, kw, in, out)); a grouped or depthwise
  convolution's filter has the same roles but is a merged use, as is a parameter image."""
  x, k = invals
  p = eqn.params
  if isinstance(x, Kernel) or not isinstance(k, Kernel):
    return _interpret.fallback(eqn, invals, ctx)
  grouped = p["feature_group_count"] != 1 or p["batch_group_count"] != 1
  out_dim = p["dimension_numbers"].rhs_spec[0]
  roles = {k.axes[d]: "o" if d == out_dim else "i" for d in range(len(k.axes))}
  ctx.note(k, "conv_general_dilated", roles=roles, merged=grouped)
  return _interpret.bind(eqn, [x, k.dense()])
