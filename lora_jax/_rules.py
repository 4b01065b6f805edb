"""Per-primitive rules for kernels in the interpreter, two tables kept apart:

- ``APPLY_RULES`` run ``lora(fn)``: a ``dot_general`` with a kernel operand becomes the base
  product plus the adapter's factored product, a ``gather`` of whole rows of an embedding
  table ``E[ids] + s·(A[ids] @ B)``, a ``conv_general_dilated`` with a kernel as its filter
  ``conv(x, W) + s·(conv(x, A) @ B)``; casts / transposes / role-preserving reshapes keep a
  kernel a kernel, and the ``Apply`` context merges a kernel (``W + s·A@B``) wherever no rule
  applies, recording the fallback.
- ``ANALYZE_RULES`` run ``analyze``: the same primitives, but they only record which axis
  roles each use implies (the ``Analyze`` context), computing nothing new.

A new primitive is one entry in a table; the ``dot_general`` rule is the adapted product's
(``lora_jax._adapted``), and the higher-order primitives (``jit``, ``scan``, ``checkpoint``,
``cond``) are shared (``lora_jax._higher_order``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax import _adapted, _interpret
from lora_jax._higher_order import HIGHER_ORDER
from lora_jax._interpret import Kernel
from lora_jax.adapters import factor_subscripts


# ----------------------------------------------------------------------- contexts


class Apply:
  """One ``lora(fn)`` evaluation: the dropout key and the merged fallbacks seen."""

  rules: dict = {}  # APPLY_RULES, set below
  keeps_kernel: frozenset = frozenset()  # KEEPS_KERNEL, set below

  def __init__(self, *, key=None, fallbacks=None, product: str = "auto", siblings=True,
               recompute=False):
    self.key, self.product, self.siblings = key, product, siblings
    self.recompute = recompute
    self.fallbacks = [] if fallbacks is None else fallbacks
    self._count = 0

  def with_key(self, key) -> "Apply":
    return Apply(key=key, fallbacks=self.fallbacks, product=self.product,
                 siblings=self.siblings, recompute=self.recompute)

  def look_ahead(self, jaxpr, env):
    """The interpreter's look-ahead over ``jaxpr``: sibling products and recomputed inputs
    (``lora_jax._adapted.Siblings``), or None."""
    return _adapted.Siblings(jaxpr, env, self) if self.siblings or self.recompute else None

  def dots(self, group) -> list:
    """Outputs of sibling ``dot_general``s ``[(eqn, invals), ...]`` (one activation), computed
    together where they can be (``_adapted.apply_dots``); None for each left to its own rule."""
    return _adapted.apply_dots(group, self)

  def next_key(self):
    self._count += 1
    return None if self.key is None else jax.random.fold_in(self.key, self._count)

  def materialize(self, x, consumer: str):
    """``x`` as a plain array: a Kernel becomes its merged value ``W + s·A@B`` (a kernel kind
    with no adapter just its dense value)."""
    if not isinstance(x, Kernel):
      return x
    if x.adapter is None:
      return x.dense()
    self.fallbacks.append((x.path, consumer))
    return x.adapter.merged(x.dense(), axes=x.axes)

  def unstack(self, k: Kernel, consumer: str):
    """``k`` as ``lax.scan`` xs: its leading axis must be the first stacked-layer axis. An
    adapter with per-layer scales has them folded into B first, so each step's slice is an
    adapter of scale 1 (``LoraWeights.folded``)."""
    if isinstance(k.w, _interpret.Lazy) and k.w.ops:  # ops on the stack: not sliceable
      k = k.replace(w=k.dense())
    if k.adapter is None:  # a kernel kind without adapter: sliced like any stacked array
      return k.replace(axes=k.axes[1:])
    stacked = [j for j in k.axes if k.roles[j] == "l"]
    if k.role(0) != "l" or k.axes[0] != min(stacked):
      return self.materialize(k, consumer)
    return k.replace(adapter=k.adapter.folded(), axes=k.axes[1:])  # per-layer scales into B


@dataclasses.dataclass(frozen=True)
class KernelUse:
  """How ``fn`` uses one parameter with two or more axes (see ``lora_jax.analyze``).

  Attributes:
    path: the '/'-joined parameter path.
    axes: inferred axis roles (``l`` stacked layer, ``i`` contracted input, ``o`` output), or
      None when the uses do not determine them.
    route: ``"factored"`` (every use is a matrix product), ``"merged"`` (some use is not, so
      an adapter there runs through the merged kernel), or ``"unused"``.
    consumers: the primitives that consume it, e.g. ``("dot_general",)`` or ``("gather",)``.
  """

  path: str
  axes: str | None
  route: str
  consumers: tuple[str, ...]


@dataclasses.dataclass
class Record:
  """What ``analyze`` saw of one parameter."""

  roles: dict = dataclasses.field(default_factory=dict)  # original axis -> set of roles
  consumers: set = dataclasses.field(default_factory=set)
  merged: bool = False
  lookup: dict = dataclasses.field(default_factory=dict)  # roles a row lookup (gather) gave

  def use(self, path: str, ndim: int) -> KernelUse:
    """The roles all uses agree on; where they differ, a lookup's (an embedding table that
    is also a tied output head, ``x @ E.T``, is (vocab, features): "io")."""
    axes = None
    roles = {j: {self.lookup[j]} if j in self.lookup else r for j, r in self.roles.items()}
    if all(len(roles.get(j, ())) == 1 for j in range(ndim)):
      axes = "".join(next(iter(roles[j])) for j in range(ndim))
      axes = axes if "i" in axes and "o" in axes else None
    route = "unused" if not self.consumers else "merged" if self.merged else "factored"
    return KernelUse(path=path, axes=axes, route=route, consumers=tuple(sorted(self.consumers)))


class Analyze:
  """One ``analyze`` evaluation: a Record per watched parameter; nothing is adapted."""

  rules: dict = {}  # ANALYZE_RULES, set below
  key = None

  def look_ahead(self, jaxpr, env) -> None:
    """``analyze`` looks at one equation at a time."""
    del jaxpr, env

  def __init__(self):
    self.records: dict[str, Record] = {}

  def with_key(self, key) -> "Analyze":
    return self

  def next_key(self):
    return None

  def note(self, k: Kernel, consumer: str, roles=None, merged=False, lookup=False) -> None:
    rec = self.records.setdefault(k.path, Record())
    rec.consumers.add(consumer)
    rec.merged |= merged
    for group, r in (roles or {}).items():  # one axis may stand for several (a reshape)
      for j in _flat(group):
        rec.roles.setdefault(j, set()).add(r)
        if lookup:
          rec.lookup[j] = r

  def materialize(self, x, consumer: str):
    if not isinstance(x, Kernel):
      return x
    self.note(x, consumer, merged=True)
    return x.dense()

  def unstack(self, k: Kernel, consumer: str):
    self.note(k, consumer, roles={k.axes[0]: "l"})
    return k.replace(axes=k.axes[1:])


def _flat(axis) -> tuple[int, ...]:
  return axis if isinstance(axis, tuple) else (axis,)


# ----------------------------------------------------------------------- apply rules


def _blocks(old_shape, new_shape) -> list[tuple[range, range]] | None:
  """The (old dims, new dims) runs of a reshape: the shortest runs with equal sizes."""
  if 0 in old_shape or not old_shape or not new_shape:
    return None
  blocks, i, j = [], 0, 0
  while i < len(old_shape) and j < len(new_shape):
    ii, jj, po, pn = i + 1, j + 1, old_shape[i], new_shape[j]
    while po != pn:
      if po < pn:
        po, ii = po * old_shape[ii], ii + 1
      else:
        pn, jj = pn * new_shape[jj], jj + 1
    blocks.append((range(i, ii), range(j, jj)))
    i, j = ii, jj
  last_old, last_new = blocks[-1]  # trailing size-1 dims join the last run
  blocks[-1] = (range(last_old.start, len(old_shape)), range(last_new.start, len(new_shape)))
  return blocks


def _reshape_roles(old_shape, old_roles: str, new_shape) -> str | None:
  """Roles of ``new_shape`` when the reshape only splits or merges axes of one role."""
  blocks = _blocks(old_shape, new_shape)
  if blocks is None:
    return None
  roles = [""] * len(new_shape)
  for olds, news in blocks:
    role = {old_roles[d] for d in olds}
    if len(role) != 1:
      return None
    for d in news:
      roles[d] = next(iter(role))
  return "".join(roles)


def _apply_reshape(eqn, invals, ctx: Apply):
  """A reshape that splits or merges input, output or stacked axes keeps a kernel factored:
  the adapter is reshaped alike (e.g. (d, heads * head_dim) -> (d, heads, head_dim))."""
  k = invals[0]
  new_shape = eqn.outvars[0].aval.shape
  if k.adapter is None:  # a quantized kernel that is not adapted: reshaped when made dense
    return [k.replace(w=_interpret.Lazy.of(k.w).then(eqn), axes=range(len(new_shape)))]
  current = "".join(k.roles[j] for j in k.axes)
  ordered = list(k.axes) == sorted(k.axes) and eqn.params.get("dimensions") is None
  roles = _reshape_roles(k.dense().shape, current, new_shape) if ordered else None
  if roles is None:
    return _interpret.fallback(eqn, invals, ctx)
  w = _lazy_or_bound(eqn, k)
  return [Kernel(w, k.adapter.reshaped(roles, new_shape), path=k.path,
                 axes=range(len(new_shape)))]


def _lazy_or_bound(eqn, k: Kernel):
  """A unary ``eqn`` on ``k``'s base: deferred for a quantized base, else run now."""
  if _interpret.is_quantized(k.w):
    return _interpret.Lazy.of(k.w).then(eqn)
  return _interpret.bind(eqn, [k.w])[0]


def _passthrough(axes_of):
  """A rule for a unary op that keeps a kernel a kernel (cast, transpose, copy)."""

  def rule(eqn, invals, ctx):
    (k,) = invals
    return [k.replace(w=_lazy_or_bound(eqn, k), axes=axes_of(eqn, k))]

  return rule


_same_axes = _passthrough(lambda eqn, k: k.axes)
_transpose = _passthrough(lambda eqn, k: [k.axes[p] for p in eqn.params["permutation"]])
_UNARY = {
    "convert_element_type": _same_axes,
    "copy": _same_axes,
    "copy_p": _same_axes,
    "sharding_constraint": _same_axes,
    "transpose": _transpose,
}
def _adapted_only(rule):
  """A kernel-kind operand without an adapter is only made dense where it is used."""

  def checked(eqn, invals, ctx):
    if all(x.adapter is None and not _interpret.is_quantized(x.w)
           for x in invals if isinstance(x, Kernel)):
      return _interpret.fallback(eqn, invals, ctx)
    return rule(eqn, invals, ctx)

  return checked


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


def _apply_gather(eqn, invals, ctx: Apply):
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
  at = {d: a_sub.index(_adapted.AXIS[k.axes[d]]) for d in rows}  # A's dim of each indexed dim
  dn = eqn.params["dimension_numbers"]
  batch = ids.ndim - 1  # the ids' dims in the output (their last dim indexes the table)
  dims = lax.GatherDimensionNumbers(
      offset_dims=(batch,), collapsed_slice_dims=tuple(sorted(at.values())),
      start_index_map=tuple(at[d] for d in dn.start_index_map))
  t = lax.gather(a.astype(dtype), ids, dims, tuple(1 if c != "r" else a.shape[-1] for c in a_sub),
                 mode=eqn.params["mode"], fill_value=eqn.params["fill_value"],
                 indices_are_sorted=eqn.params["indices_are_sorted"],
                 unique_indices=eqn.params["unique_indices"])  # (*ids, r)
  t_sub = "".join(_adapted.FREE[:batch]) + "r"
  kept = iter(_adapted.AXIS[k.axes[d]] for d in range(len(k.axes)) if d not in rows)  # W's offsets
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


def _apply_conv(eqn, invals, ctx: Apply):
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
  at = [a_sub.index(_adapted.AXIS[k.axes[d]]) for d in p["dimension_numbers"].rhs_spec[1:]]
  dims = p["dimension_numbers"]._replace(rhs_spec=(len(a_sub) - 1, *at))
  if lw.dropout and ctx.key is not None:
    x = _adapted.dropout(x, lw.dropout, ctx.next_key())
  t = lax.conv_general_dilated(
      x, a.astype(w.dtype), p["window_strides"], p["padding"], p["lhs_dilation"],
      p["rhs_dilation"], dims, precision=p["precision"],
      preferred_element_type=p["preferred_element_type"])  # features: r
  channel = dims.out_spec[1]
  free = iter(_adapted.FREE)
  t_sub = "".join("r" if d == channel else next(free) for d in range(t.ndim))
  out_sub = t_sub.replace("r", b_sub[1:])
  extra = jnp.einsum(f"{t_sub},{b_sub}->{out_sub}", t * jnp.asarray(scale, t.dtype),
                     b.astype(t.dtype), precision=p["precision"],
                     preferred_element_type=p["preferred_element_type"])
  return [lw.rescaled(base + extra.astype(base.dtype), w=k.dense, present=k.axes,
                      out_sub=out_sub)]


APPLY_RULES = {name: _adapted_only(rule) for name, rule in {
    **_UNARY, "dot_general": _adapted.apply_dot, "reshape": _apply_reshape,
    "squeeze": _apply_reshape, "gather": _apply_gather,
    "conv_general_dilated": _apply_conv}.items()}


# ----------------------------------------------------------------------- analyze rules


def _analyze_dot(eqn, invals, ctx: Analyze):
  operand = _adapted.kernel_operand(eqn, invals, ctx)
  if operand is None:
    return _interpret.bind(eqn, [ctx.materialize(v, "dot_general of two kernels") for v in invals])
  k, x, kernel_is_lhs = operand
  (_, kc), (_, kb) = _adapted.operands(eqn, kernel_is_lhs)
  roles = {k.axes[d]: "i" if d in kc else "l" if d in kb else "o" for d in range(len(k.axes))}
  ctx.note(k, "dot_general", roles=roles)
  return [_adapted.base_dot(eqn, k, x, kernel_is_lhs)]


def _analyze_reshape(eqn, invals, ctx: Analyze):
  """After a reshape, each new axis stands for the original axes of its run, and a role seen
  on it is recorded for all of them (so (d, h*k) -> (d, h, k) still infers "io")."""
  k = invals[0]
  new_shape = eqn.outvars[0].aval.shape
  (w,) = _interpret.bind(eqn, [k.dense()])
  blocks = _blocks(k.dense().shape, new_shape)
  if blocks is None:
    ctx.note(k, "reshape", merged=True)
    return [w]
  axes = [None] * len(new_shape)
  for olds, news in blocks:
    group = tuple(j for d in olds for j in _flat(k.axes[d]))
    for d in news:
      axes[d] = group[0] if len(group) == 1 else group
  return [k.replace(w=w, axes=axes)]


def _analyze_gather(eqn, invals, ctx: Analyze):
  """A whole-row lookup makes the indexed dims inputs and the others outputs (an embedding
  table: "io"); any other gather of a parameter is a merged use."""
  k, ids = invals
  rows = None if isinstance(ids, Kernel) else _whole_rows(eqn)
  if rows is None:
    return _interpret.fallback(eqn, invals, ctx)
  roles = {k.axes[d]: "i" if d in rows else "o" for d in range(len(k.axes))}
  ctx.note(k, "gather", roles=roles, lookup=True)
  return _interpret.bind(eqn, [k.dense(), ids])


def _analyze_conv(eqn, invals, ctx: Analyze):
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


ANALYZE_RULES = {**_UNARY, "dot_general": _analyze_dot, "reshape": _analyze_reshape,
                 "squeeze": _analyze_reshape, "gather": _analyze_gather,
                 "conv_general_dilated": _analyze_conv}

Apply.rules = {**APPLY_RULES, **HIGHER_ORDER}
Apply.keeps_kernel = frozenset(_UNARY) | {"reshape", "squeeze"}  # a kernel stays a kernel
Analyze.rules = {**ANALYZE_RULES, **HIGHER_ORDER}
