"""The transform ``lora(fn)``: run ``fn`` with every targeted kernel acting as W + s·A@B.

How it works, with public APIs only: ``fn`` is traced to a jaxpr (``jax.make_jaxpr``) on the
base shapes, then that jaxpr is evaluated by a small interpreter (``lora_jax._interpret``) in
which every targeted kernel is a ``Kernel`` value: the base array plus its adapter. Casts and
transposes of a ``Kernel`` stay ``Kernel``s; a ``dot_general`` with a ``Kernel`` operand becomes
the adapted product ``x@W + s·((x@A)@B)`` with a hand-written backward pass that builds no
weight gradient (``lora_jax._product``: factored, or through a temporary ``W' = W + s·A@B``
where that costs fewer multiplies; products sharing an activation are grouped, and cheap
inputs are recomputed rather than kept); any other use falls back to the merged kernel
``W + s·A@B``, with a ``LoraFallbackWarning``. Equations no kernel flows into are re-bound
unchanged.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _interpret, _product, _rules, _tree, kernels
from lora_jax._kernel import Kernel
from lora_jax._rules import KernelUse
from lora_jax.adapters import match
from lora_jax.targets import base_leaves

__all__ = ["KernelUse", "LoraFallbackWarning", "analyze", "lora", "register_container",
           "unregister_container"]

# Adapter containers other than one trainable tree (``lora_jax.bank.AdapterBank``): how
# ``lora(fn)`` runs each, and the keyword arguments that are the container's.
_CONTAINERS: dict[type, tuple[Callable, tuple[str, ...]]] = {}


def register_container(cls: type, call: Callable, *, keywords: Sequence[str] = ()) -> None:
  """Makes ``lora(fn)(base, x, *args, **kwargs)``, ``x`` an instance of ``cls``, return
  ``call(adapted, base, x, args, kwargs, lora_dropout_key)`` (``adapted``: ``lora(fn)``).

  Args:
    cls: the container type (a bank of adapters).
    call: runs ``adapted`` once or more with adapter trees taken from the container.
    keywords: ``call``'s own keyword arguments, refused when ``adapters`` is not a ``cls``.
  """
  _CONTAINERS[cls] = (call, tuple(keywords))


def unregister_container(cls: type) -> None:
  """Removes ``cls``'s registration (a plug-in's, or a test's).

  Raises:
    ValueError: ``cls`` is not registered.
  """
  if cls not in _CONTAINERS:
    raise ValueError(f"{getattr(cls, '__name__', cls)!r} is not a registered adapter container; "
                     f"registered: {', '.join(c.__name__ for c in _CONTAINERS)}.")
  del _CONTAINERS[cls]


def _container(adapters, kwargs) -> Callable | None:
  """The registered call for ``adapters``; raises ValueError for a container's keyword
  argument without the container."""
  if type(adapters) in _CONTAINERS:
    return _CONTAINERS[type(adapters)][0]
  for cls, (_, keywords) in _CONTAINERS.items():
    given = [k for k in keywords if k in kwargs]
    if given:
      raise ValueError(f"{given[0]}= needs an {cls.__name__} as adapters "
                       f"({cls.__module__}); for one adapter tree leave {given[0]} out.")
  return None


class LoraFallbackWarning(UserWarning):
  """A targeted kernel was used outside a matrix product and was merged (W + s·A@B) there."""


def _is_dynamic(x) -> bool:
  """Arrays (and abstract arrays) are traced; Python and NumPy scalars, strings, flags and
  other objects are closed over as static, as they are when ``fn`` is called directly."""
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _abstract(x):
  if kernels.is_kind(x):
    return kernels.abstract(x)
  return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def _trace(fn, base, args, kwargs):
  """``fn``'s jaxpr with the base leaves (kernel kinds as their dense shapes) and the array
  leaves of the arguments as inputs."""
  leaves, base_def = jax.tree_util.tree_flatten(base, is_leaf=kernels.is_kind)
  arg_leaves, arg_def = jax.tree_util.tree_flatten((args, kwargs))
  dynamic = [i for i, x in enumerate(arg_leaves) if _is_dynamic(x)]

  def flat_fn(base_values, dyn):
    leaves = list(arg_leaves)
    for i, v in zip(dynamic, dyn):
      leaves[i] = v
    a, kw = jax.tree_util.tree_unflatten(arg_def, leaves)
    return fn(jax.tree_util.tree_unflatten(base_def, base_values), *a, **kw)

  dyn = [arg_leaves[i] for i in dynamic]
  shapes = [_abstract(x) if kernels.is_kind(x) else x for x in leaves]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(shapes, dyn)
  return closed, jax.tree_util.tree_structure(out_shape), dyn


def _warn(fallbacks) -> None:
  if fallbacks:
    uses = sorted({f"{path} ({consumer})" for path, consumer in fallbacks})
    warnings.warn(f"{len(uses)} use(s) of adapted kernels are not matrix products and ran through "
                  f"the merged kernel W + s*A@B (correct, but it builds full-size weight "
                  f"gradients): {', '.join(uses)}.", LoraFallbackWarning, stacklevel=3)


def _inputs(base, trainable) -> list:
  """The interpreter's inputs for the base leaves: a Kernel at each adapted kernel, the trained
  copy at each ``modules_to_save`` leaf (in the base leaf's dtype), an adapter-less Kernel at
  every other kernel-kind leaf (made dense only where it is used, so one layer at a time
  inside a scan), and the base leaf itself elsewhere."""
  adapters, extras = match(base, trainable)
  inputs = []
  for path, w in base_leaves(base).items():
    if path in adapters:
      inputs.append(Kernel(w, adapters[path], path=_tree.join(path), axes=range(len(w.shape))))
    elif path in extras:
      inputs.append(extras[path].astype(w.dtype))
    elif kernels.is_kind(w):
      inputs.append(Kernel(w, None, path=_tree.join(path), axes=range(len(w.shape))))
    else:
      inputs.append(w)
  return inputs


def lora(fn, *, product: str = "auto", siblings: bool = True,
         recompute_inputs: bool = True):
  """Transforms ``fn(params, *args, **kwargs)`` to ``adapted(base, adapters, *args, **kwargs)``.

  The result equals ``fn(lora_jax.merge(base, adapters), *args, **kwargs)``, but every matrix
  product with a targeted kernel is computed as ``x@W + s·((x@A)@B)``: no W-sized array is
  formed, so gradients with respect to the adapters never build a full weight gradient.
  Trained extras in ``adapters`` (``modules_to_save``) replace their base leaves. Works
  with Flax linen ``apply``, NNX (``lambda state, x: nnx.merge(graphdef, state)(x)``) and
  plain JAX functions, under jit, grad, vmap, lax.scan, jax.checkpoint and cond.

  Args:
    fn: a function whose first argument is the parameter pytree. Array arguments are traced;
      other arguments (Python scalars, strings, flags) are treated as static.
    product: how each adapted product and its backward pass are computed (the same values
      either way, up to rounding): ``"factored"``, ``x@W + s·(x@A)@B`` with a hand-written
      backward that keeps only x and x@A; ``"merged_weight"``, ``x@W'`` with ``W' = W +
      s·A@B`` formed from A and B in the forward pass and again for dx (four token-sized
      adapter products instead of six; no weight gradient; W' rounded to the kernel's dtype);
      ``"autodiff"``, JAX's autodiff of the factored form; ``"auto"`` (default), per product,
      ``"merged_weight"`` where it costs fewer multiplies (N·(in + out) > 2·in·out for N
      activation rows), else ``"factored"``. Adapter dropout, a quantized base and a
      non-additive kind's transposed uses keep the factored form; banks use autodiff (``lora_jax._product``).
      The hand-written forms are reverse-mode only (``jax.custom_vjp``): for ``jax.jvp``,
      ``jacfwd`` or ``hessian`` of the adapted function pass ``product="autodiff"``.
    siblings: with a hand-written ``product``, compute the adapted products that share one
      activation (q, k and v; gate and up) together: ``x @ [A_q|A_k|A_v]`` as one product,
      and in the backward pass their A gradients and share of dx as one product each.
      Adapters with dropout drawn run on their own.
    recompute_inputs: (default on) keep out of the backward pass's memory the adapted
      products' inputs that are cheap to compute again (elementwise results: a norm's
      output, silu(g)·u), which the frozen model's own backward pass does not keep: the
      products of such an input run inside a ``jax.checkpoint`` that keeps only products'
      outputs (``dots_saveable``), starting from its elementwise chain's inputs, so the
      backward pass computes the input again. A product's output (attention's, the input
      of o_proj) is kept as it is.

  Returns:
    ``adapted(base, adapters, *args, lora_dropout_key=None, **kwargs)``. With a
    ``lora_dropout_key``, adapters whose config set ``dropout`` drop inputs of their branch.
    A registered container as ``adapters`` (``register_container``: an ``AdapterBank`` of
    ``lora_jax.bank``, with ``adapter_index=``) runs as that container says.

  Example:
    >>> adapted = lora_jax.lora(model.apply)
    >>> y = adapted(params, adapters, x)   # == model.apply(merge(params, adapters), x)
  """

  if product not in _product.PRODUCTS:
    raise ValueError(f"product must be one of {_product.PRODUCTS}, got {product!r}.")

  def adapted(base, adapters, *args, lora_dropout_key=None, **kwargs):
    container = _container(adapters, kwargs)
    if container is not None:
      return container(adapted, base, adapters, args, kwargs, lora_dropout_key)
    closed, out_def, dyn = _trace(fn, base, args, kwargs)
    ctx = _rules.Apply(key=lora_dropout_key, product=product,
                       siblings=siblings and product != "autodiff", recompute=recompute_inputs)
    outs = _interpret.run(closed, _inputs(base, adapters) + dyn, ctx)
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
  reports, per '/'-joined path, the axis roles the uses imply (contracted axes are inputs,
  ``lax.scan`` slices are stacked layers) and whether every use is a matrix product. Pass the
  result as ``uses=`` to ``lora_jax.init`` or ``lora_jax.plan``.
  """
  flat = base_leaves(params)
  leaves = [_abstract(x) for x in flat.values()]
  watched = {_tree.join(p): i for i, p in enumerate(flat) if len(leaves[i].shape) >= 2}
  closed, _, dyn = _trace(fn, params, args, kwargs)
  ctx = _rules.Analyze()

  def run(leaves, dyn):
    inputs = list(leaves)
    for p, i in watched.items():
      inputs[i] = Kernel(leaves[i], None, path=p, axes=range(leaves[i].ndim))
    return _interpret.run(closed, inputs + list(dyn), ctx)

  jax.eval_shape(run, leaves, [_abstract(x) for x in dyn])
  return {p: ctx.records.get(p, _rules.Record()).use(p, len(leaves[i].shape))
          for p, i in watched.items()}
