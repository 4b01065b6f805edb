"""Rules for the layout equations on a kernel: casts, copies, transposes and reshapes.

They keep a kernel a ``Kernel`` (an adapted one with its adapter reshaped alike, a quantized
one with the equation deferred, ``Lazy``); for ``analyze``, a reshape's new axes stand for the
original axes of their runs.
"""

from __future__ import annotations

from lora_jax import _interpret
from lora_jax._kernel import Kernel, Lazy, is_quantized


def flat(axis) -> tuple[int, ...]:
  """The original kernel axes an axis of ``Kernel.axes`` stands for (a tuple after a merging
  reshape in ``analyze``)."""
  return axis if isinstance(axis, tuple) else (axis,)


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


def apply_reshape(eqn, invals, ctx):
  """A reshape that splits or merges input, output or stacked axes keeps a kernel factored:
  the adapter is reshaped alike (e.g. (d, heads * head_dim) -> (d, heads, head_dim))."""
  k = invals[0]
  new_shape = eqn.outvars[0].aval.shape
  if k.adapter is None:  # a quantized kernel that is not adapted: reshaped when made dense
    return [k.replace(w=Lazy.of(k.w).then(eqn), axes=range(len(new_shape)))]
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
  if is_quantized(k.w):
    return Lazy.of(k.w).then(eqn)
  return _interpret.bind(eqn, [k.w])[0]


def _passthrough(axes_of):
  """A rule for a unary op that keeps a kernel a kernel (cast, transpose, copy)."""

  def rule(eqn, invals, ctx):
    (k,) = invals
    return [k.replace(w=_lazy_or_bound(eqn, k), axes=axes_of(eqn, k))]

  return rule


_same_axes = _passthrough(lambda eqn, k: k.axes)
_transpose = _passthrough(lambda eqn, k: [k.axes[p] for p in eqn.params["permutation"]])
UNARY = {  # unary equations that keep a kernel a kernel, both tables
    "convert_element_type": _same_axes,
    "copy": _same_axes,
    "copy_p": _same_axes,
    "sharding_constraint": _same_axes,
    "transpose": _transpose,
}


def analyze_reshape(eqn, invals, ctx):
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
    group = tuple(j for d in olds for j in flat(k.axes[d]))
    for d in news:
      axes[d] = group[0] if len(group) == 1 else group
  return [k.replace(w=w, axes=axes)]
