"""The transform ``lora(fn)``: run ``fn`` with every targeted kernel acting as W + s·A@B.

How it works, with public APIs only: ``fn`` is traced to a jaxpr (``jax.make_jaxpr``) on the
base shapes, then that jaxpr is evaluated by a small interpreter (``lora_jax._interpret``) in
which every targeted kernel is a ``Kernel`` value: the base array plus its adapter. Casts and
transposes of a ``Kernel`` stay ``Kernel``s; a ``dot_general`` with a ``Kernel`` operand becomes
the factored product ``x@W + s·((x@A)@B)`` (no W-sized array is ever formed, so the backward
pass builds no weight gradient); any other use falls back to the merged kernel ``W + s·A@B``,
with a ``LoraFallbackWarning``. Equations no kernel flows into are re-bound unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import string
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _interpret
from lora_jax._interpret import Kernel
from lora_jax.adapters import add_delta, factor_subscripts, match
from lora_jax.targets import path_keys

_FREE = [c for c in string.ascii_lowercase if c != "r"]  # subscripts of the activation's axes
_AXIS = string.ascii_uppercase  # subscripts of kernel axes, as in adapters.factor_subscripts


class LoraFallbackWarning(UserWarning):
  """A targeted kernel was used outside a matrix product and was merged (W + s·A@B) there."""


@dataclasses.dataclass(frozen=True)
class KernelUse:
  """How ``fn`` uses one parameter with two or more axes (see ``analyze``).

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
class _Record:
  roles: dict = dataclasses.field(default_factory=dict)  # original axis -> set of roles
  consumers: set = dataclasses.field(default_factory=set)
  merged: bool = False
  ndim: int = 0

  def use(self, path: str) -> KernelUse:
    axes = None
    if all(len(self.roles.get(j, ())) == 1 for j in range(self.ndim)):
      axes = "".join(next(iter(self.roles[j])) for j in range(self.ndim))
      axes = axes if "i" in axes and "o" in axes else None
    route = "unused" if not self.consumers else "merged" if self.merged else "factored"
    return KernelUse(path=path, axes=axes, route=route, consumers=tuple(sorted(self.consumers)))


class _Context:
  """What one interpretation shares: analysis records, fallbacks, the dropout key."""

  def __init__(self, *, analyze: bool, key=None, records=None, fallbacks=None):
    self.analyze, self.key = analyze, key
    self.records = {} if records is None else records
    self.fallbacks = [] if fallbacks is None else fallbacks
    self.rules = RULES
    self._count = 0

  def with_key(self, key) -> "_Context":
    return _Context(analyze=self.analyze, key=key, records=self.records, fallbacks=self.fallbacks)

  def next_key(self):
    self._count += 1
    return None if self.key is None else jax.random.fold_in(self.key, self._count)

  def note(self, k: Kernel, consumer: str, roles=None, merged=False) -> None:
    rec = self.records.setdefault(k.path, _Record())
    rec.consumers.add(consumer)
    rec.merged |= merged
    for group, r in (roles or {}).items():  # analyze() may see one axis for several (reshape)
      for j in _flat(group):
        rec.roles.setdefault(j, set()).add(r)
    if merged and not self.analyze:
      self.fallbacks.append((k.path, consumer))

  def materialize(self, x, consumer: str):
    """``x`` as a plain array: a Kernel becomes its merged value ``W + s·A@B``."""
    if not isinstance(x, Kernel):
      return x
    self.note(x, consumer, merged=True)
    if x.a is None:
      return x.w
    return add_delta(x.w, x.a, x.b, scale=x.scale, roles=x.roles, axes=x.axes)

  def unstack(self, k: Kernel, consumer: str):
    """``k`` as ``lax.scan`` xs: its leading axis must be the first stacked-layer axis."""
    if self.analyze:
      self.note(k, consumer, roles={k.axes[0]: "l"})
      return k.replace(axes=k.axes[1:])
    stacked = [j for j in k.axes if k.roles[j] == "l"]
    if k.role(0) != "l" or k.axes[0] != min(stacked):
      return self.materialize(k, consumer)
    return k.replace(axes=k.axes[1:])


def _dropout(x, rate: float, key):
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _factor_order(k: Kernel, kc, kb, kfree):
  """(first, second) factor and subscripts for a product contracting kernel dims ``kc``.

  Contracting all input axes gives ``(x@A)@B``; all output axes (``x @ W.T``) gives
  ``(x@Bᵀ)@Aᵀ``. Stacked axes may be batch dims (``lax.scan`` bodies, ``vmap`` over x too) or
  free dims (``vmap`` over the kernel alone). Anything else returns None.
  """
  contracted, free = {k.role(d) for d in kc}, {k.role(d) for d in kfree}
  if not {k.role(d) for d in kb} <= {"l"}:
    return None
  a_sub, b_sub = factor_subscripts(k.roles, k.axes)
  if contracted == {"i"} and free - {"l"} == {"o"} and len(kc) == k.roles.count("i"):
    return (k.a, a_sub), (k.b, b_sub)
  if contracted == {"o"} and free - {"l"} == {"i"} and len(kc) == k.roles.count("o"):
    return (k.b, b_sub), (k.a, a_sub)
  return None


def _factored_dot(eqn, x, k: Kernel, kernel_is_lhs: bool, ctx: _Context):
  """``dot_general(x, W)`` as ``x@W + s·((x@A)@B)``, or None when the roles do not allow it."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  (xc, kc), (xb, kb) = ((rc, lc), (rb, lb)) if kernel_is_lhs else ((lc, rc), (lb, rb))
  kfree = [d for d in range(k.w.ndim) if d not in kc and d not in kb]
  order = _factor_order(k, kc, kb, kfree)
  if order is None:
    return None
  (first, first_sub), (second, second_sub) = order
  letters = {xd: _AXIS[k.axes[kd]] for xd, kd in (*zip(xc, kc), *zip(xb, kb))}
  free_x = iter(_FREE)
  x_sub = "".join(letters.get(d) or next(free_x) for d in range(x.ndim))
  batch = "".join(_AXIS[k.axes[d]] for d in kb)
  x_free = "".join(x_sub[d] for d in range(x.ndim) if d not in xc and d not in xb)
  k_free = "".join(_AXIS[k.axes[d]] for d in kfree)
  t_sub = batch + x_free + "".join(_AXIS[k.axes[d]] for d in kfree if k.role(d) == "l") + "r"
  out_sub = batch + (k_free + x_free if kernel_is_lhs else x_free + k_free)
  opts = dict(precision=eqn.params.get("precision"),
              preferred_element_type=eqn.params.get("preferred_element_type"))
  if k.dropout and ctx.key is not None:
    x = _dropout(x, k.dropout, ctx.next_key())
  dtype = k.w.dtype
  t = jnp.einsum(f"{x_sub},{first_sub}->{t_sub}", x, first.astype(dtype), **opts)
  t = t * jnp.asarray(k.scale, t.dtype)
  return jnp.einsum(f"{t_sub},{second_sub}->{out_sub}", t, second.astype(dtype), **opts)


def _dot_general(eqn, invals, ctx: _Context):
  lhs, rhs = invals
  if isinstance(lhs, Kernel) and isinstance(rhs, Kernel):
    return _interpret.bind(eqn, [ctx.materialize(v, "dot_general of two kernels") for v in invals])
  kernel_is_lhs = isinstance(lhs, Kernel)
  k, x = (lhs, rhs) if kernel_is_lhs else (rhs, lhs)
  base = _interpret.bind(eqn, [k.w, x] if kernel_is_lhs else [x, k.w])[0]
  if ctx.analyze:
    ctx.note(k, "dot_general", roles=_roles_of_dot(eqn, k, kernel_is_lhs))
    return [base]
  extra = _factored_dot(eqn, x, k, kernel_is_lhs, ctx)
  if extra is None:
    return _interpret.bind(eqn, [ctx.materialize(v, "dot_general over mixed axes") for v in invals])
  ctx.note(k, "dot_general")
  return [base + extra.astype(base.dtype)]


def _roles_of_dot(eqn, k: Kernel, kernel_is_lhs: bool) -> dict:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  kc, kb = (lc, lb) if kernel_is_lhs else (rc, rb)
  return {k.axes[d]: "i" if d in kc else "l" if d in kb else "o" for d in range(k.w.ndim)}


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


def _reshape(eqn, invals, ctx):
  """A reshape that splits or merges input, output or stacked axes keeps a kernel factored:
  A and B are reshaped the same way (e.g. (d, heads * head_dim) -> (d, heads, head_dim))."""
  k = invals[0]
  new_shape = eqn.outvars[0].aval.shape
  if ctx.analyze:
    return _reshape_watched(eqn, k, new_shape, ctx)
  current = "".join(k.roles[j] for j in k.axes)
  ordered = list(k.axes) == sorted(k.axes) and eqn.params.get("dimensions") is None
  roles = _reshape_roles(k.w.shape, current, new_shape) if ordered else None
  if roles is None:
    return _interpret.fallback(eqn, invals, ctx)
  (w,) = _interpret.bind(eqn, [k.w])
  dims = {r: tuple(n for n, q in zip(new_shape, roles) if q == r) for r in "lio"}
  rank = k.a.shape[-1]
  a = k.a.reshape(*dims["l"], *dims["i"], rank)
  b = k.b.reshape(*dims["l"], rank, *dims["o"])
  return [Kernel(w, a, b, path=k.path, axes=range(len(new_shape)), roles=roles, scale=k.scale,
                 dropout=k.dropout)]


def _reshape_watched(eqn, k: Kernel, new_shape, ctx):
  """analyze(): after a reshape, each new axis stands for the original axes of its run, and a
  role seen on it is recorded for all of them (so (d, h*k) -> (d, h, k) still infers "io")."""
  (w,) = _interpret.bind(eqn, [k.w])
  blocks = _blocks(k.w.shape, new_shape)
  if blocks is None:
    ctx.note(k, "reshape", merged=True)
    return [w]
  axes = [None] * len(new_shape)
  for olds, news in blocks:
    group = tuple(j for d in olds for j in _flat(k.axes[d]))
    for d in news:
      axes[d] = group[0] if len(group) == 1 else group
  return [k.replace(w=w, axes=axes)]


def _flat(axis) -> tuple[int, ...]:
  return axis if isinstance(axis, tuple) else (axis,)


def _passthrough(axes_of):
  """A rule for a unary op that keeps a kernel a kernel (cast, transpose, copy)."""

  def rule(eqn, invals, ctx):
    (k,) = invals
    (w,) = _interpret.bind(eqn, [k.w])
    return [k.replace(w=w, axes=axes_of(eqn, k))]

  return rule


_same_axes = _passthrough(lambda eqn, k: k.axes)
RULES = {
    "dot_general": _dot_general,
    "convert_element_type": _same_axes,
    "copy": _same_axes,
    "copy_p": _same_axes,
    "sharding_constraint": _same_axes,
    "transpose": _passthrough(lambda eqn, k: [k.axes[p] for p in eqn.params["permutation"]]),
    "reshape": _reshape,
    "squeeze": _reshape,
}


def _is_dynamic(x) -> bool:
  """Arrays (and abstract arrays) are traced; Python and NumPy scalars, strings, flags and
  other objects are closed over as static, as they are when ``fn`` is called directly."""
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _abstract(x):
  return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def _trace(fn, base, args, kwargs):
  """``fn``'s jaxpr with the base leaves and the array leaves of the arguments as inputs."""
  base_leaves, base_def = jax.tree_util.tree_flatten(base)
  arg_leaves, arg_def = jax.tree_util.tree_flatten((args, kwargs))
  dynamic = [i for i, x in enumerate(arg_leaves) if _is_dynamic(x)]

  def flat_fn(base_leaves, dyn):
    leaves = list(arg_leaves)
    for i, v in zip(dynamic, dyn):
      leaves[i] = v
    a, kw = jax.tree_util.tree_unflatten(arg_def, leaves)
    return fn(jax.tree_util.tree_unflatten(base_def, base_leaves), *a, **kw)

  dyn = [arg_leaves[i] for i in dynamic]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(base_leaves, dyn)
  return closed, jax.tree_util.tree_structure(out_shape), dyn


def _paths(tree) -> list[str]:
  return ["/".join(path_keys(p)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _warn(fallbacks) -> None:
  if fallbacks:
    uses = sorted({f"{path} ({consumer})" for path, consumer in fallbacks})
    warnings.warn(f"{len(uses)} use(s) of adapted kernels are not matrix products and ran through "
                  f"the merged kernel W + s*A@B (correct, but it builds full-size weight "
                  f"gradients): {', '.join(uses)}.", LoraFallbackWarning, stacklevel=3)


def lora(fn):
  """Transforms ``fn(params, *args, **kwargs)`` to ``adapted(base, adapters, *args, **kwargs)``.

  The result equals ``fn(lora_jax.merge(base, adapters), *args, **kwargs)``, but every matrix
  product with a targeted kernel is computed as ``x@W + s·((x@A)@B)``: no W-sized array is
  formed, so gradients with respect to the adapters never build a full weight gradient. Works
  with Flax linen ``apply``, NNX (``lambda state, x: nnx.merge(graphdef, state)(x)``) and
  plain JAX functions, under jit, grad, vmap, lax.scan, jax.checkpoint and cond.

  Args:
    fn: a function whose first argument is the parameter pytree. Array arguments are traced;
      other arguments (Python scalars, strings, flags) are treated as static.

  Returns:
    ``adapted(base, adapters, *args, lora_dropout_key=None, **kwargs)``. With a
    ``lora_dropout_key``, adapters whose config set ``dropout`` drop inputs of their branch.

  Example:
    >>> adapted = lora_jax.lora(model.apply)
    >>> y = adapted(params, adapters, x)   # == model.apply(merge(params, adapters), x)
  """

  def adapted(base, adapters, *args, lora_dropout_key=None, **kwargs):
    flat = match(base, adapters)
    closed, out_def, dyn = _trace(fn, base, args, kwargs)
    inputs = []
    for path, w in zip(_paths(base), jax.tree_util.tree_leaves(base)):
      lw = flat.get(path)
      inputs.append(w if lw is None else Kernel(
          w, lw.a, lw.b, path=path, axes=range(w.ndim), roles=lw.axes, scale=lw.scale,
          dropout=lw.dropout))
    ctx = _Context(analyze=False, key=lora_dropout_key)
    outs = _interpret.run(closed, inputs + dyn, ctx)
    _warn(ctx.fallbacks)
    return jax.tree_util.tree_unflatten(out_def, outs)

  # Name and docs from fn, but not its signature: jax.jit's static_argnames and
  # donate_argnames must see (base, adapters, *args, ...), so no __wrapped__.
  functools.update_wrapper(adapted, fn, updated=())
  del adapted.__wrapped__
  return adapted


def analyze(fn, params, *args, **kwargs) -> dict[str, KernelUse]:
  """How ``fn(params, *args, **kwargs)`` uses each parameter with two or more axes.

  Traces ``fn`` abstractly (no computation; ``params`` may be ``jax.eval_shape`` output) and
  reports, per path, the axis roles the uses imply (contracted axes are inputs, ``lax.scan``
  slices are stacked layers) and whether every use is a matrix product. Pass the result as
  ``uses=`` to ``lora_jax.init`` or ``lora_jax.plan``.
  """
  leaves = jax.tree_util.tree_leaves(params)
  watched = {p: i for i, (p, w) in enumerate(zip(_paths(params), leaves)) if np.ndim(w) >= 2}
  closed, _, dyn = _trace(fn, params, args, kwargs)
  ctx = _Context(analyze=True)

  def run(leaves, dyn):
    inputs = list(leaves)
    for p, i in watched.items():
      inputs[i] = Kernel(leaves[i], None, None, path=p, axes=range(leaves[i].ndim), roles=None,
                         scale=0.0, dropout=0.0)
    return _interpret.run(closed, inputs + list(dyn), ctx)

  jax.eval_shape(run, [_abstract(x) for x in leaves], [_abstract(x) for x in dyn])
  uses = {}
  for p, i in watched.items():
    rec = ctx.records.get(p, _Record())
    rec.ndim = np.ndim(leaves[i])
    uses[p] = rec.use(p)
  return uses
