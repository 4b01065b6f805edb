"""Mixed batches (each example with its own adapter of a bank) and multi-task training."""


from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.bank.slots import Slots
from lora_jax.bank.store import AdapterBank
from lora_jax.train import StepOutput, train_step
from lora_jax.transform import register_container

# ----------------------------------------------------------------------- mixed batches


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def _example_axes(args, kwargs, given: Mapping) -> list:
  """Per leaf of ``(args, kwargs)``: the axis that runs over examples, or None (shared).
  Arrays split on axis 0 by default, scalars are shared; ``given`` sets a keyword argument's
  axis (one int or None for all its leaves, or a tree of them shaped like the argument)."""
  unknown = sorted(set(given) - set(kwargs))
  if unknown:
    raise ValueError(f"example_axes names {unknown}, which are not keyword arguments of this "
                     f"call (given: {sorted(kwargs)}).")
  default = lambda x: 0 if _is_array(x) and np.ndim(x) >= 1 else None  # noqa: E731
  axes = [default(x) for x in jax.tree_util.tree_leaves(args)]
  for name in sorted(kwargs):  # the order jax.tree_util flattens a dict in
    leaves = jax.tree_util.tree_leaves(kwargs[name])
    if name not in given:
      axes += [default(x) for x in leaves]
    elif given[name] is None or isinstance(given[name], int):
      axes += [given[name] if _is_array(x) else None for x in leaves]
    else:
      spec = jax.tree_util.tree_leaves(given[name], is_leaf=lambda x: x is None)
      if len(spec) != len(leaves):
        raise ValueError(f"example_axes[{name!r}] has {len(spec)} entries but {name} has "
                         f"{len(leaves)} arrays; give one axis (or None) per array, or one int.")
      axes += list(spec)
  return axes


def mixed(call: Callable, bank: AdapterBank, adapter_index, args, kwargs, *,
          example_axes: Mapping | None = None, example_out_axes=0, per_example: bool = False):
  """``call(adapters, *args, **kwargs)`` with each example run with its own adapter.

  A bank of adapters alone (no trained extras) runs the batch as one (``AdapterBank.lazy``):
  each adapted product gathers every row's own factors where it runs (inside a ``lax.scan``
  over layers, one layer's at a time), S-LoRA's and Punica's batched gather, so the batch
  reads the factors of the slots it uses and the base product ``x @ W`` and everything else
  (attention, a key-value cache) stay batched. This needs the examples on the leading axis
  of every adapted product's activation (Flax's Dense on (batch, ..., features) inputs);
  ``example_axes`` and ``example_out_axes`` are then unused.

  A bank with trained extras (a classifier head per task) runs ``jax.vmap`` over the
  examples (``adapter_index[e]`` picks example e's slot): each example's arrays keep a size-1
  batch axis, so ``call`` sees a batch of one, as when it runs alone, with its own extras and
  its factors gathered where its products use them (``AdapterBank.lazy``).
  ``lora(fn)`` calls this when its adapters are an ``AdapterBank`` (``register_container``).

  Args:
    call: ``call(adapters, *args, **kwargs)``, e.g. a ``lora(fn)`` with its base bound.
    bank: the adapters.
    adapter_index: (examples,) int slots of the bank, ``NO_ADAPTER`` (-1) for the base alone.
    example_axes: ``{keyword: axis}`` where an argument's example axis is not 0 (a key-value
      cache of shape (layers, batch, ...): 1), or None for an array every example shares.
    example_out_axes: the outputs' example axes (a prefix of the output tree, as ``jax.vmap``'s
      ``out_axes``).
    per_example: run each example on its own (``jax.vmap``) even for a bank of adapters
      alone: for functions whose adapted products do not have the examples first.

  Raises:
    ValueError: ``adapter_index`` is not one int per example (or names no slot), or an
      argument's example axis does not have one entry per example.
  """
  index = jnp.asarray(adapter_index)
  if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(f"adapter_index must be a 1-D integer array (one bank slot per example, "
                     f"-1 for no adapter), got {index.dtype} of shape {index.shape}.")
  bank.check_index(index)
  if not bank.has_extras and not per_example:  # each product picks its rows' factors
    return call(bank._select(index, Slots.lazy), *args, **kwargs)
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  axes = _example_axes(args, kwargs, example_axes or {})
  mapped = [i for i, ax in enumerate(axes) if ax is not None]
  for i in mapped:
    if np.shape(leaves[i])[axes[i]] != index.shape[0]:
      raise ValueError(f"argument leaf {i} has shape {np.shape(leaves[i])}: axis {axes[i]} "
                       f"should hold the {index.shape[0]} examples of adapter_index; pass "
                       f"example_axes={{name: axis}} for an argument batched elsewhere.")
  common = [i for i, x in enumerate(leaves) if axes[i] is None and _is_array(x)]

  def one(i, mine, shared_values):
    values = list(leaves)
    for pos, v in zip(mapped, mine):
      values[pos] = jnp.expand_dims(v, axes[pos])
    for pos, v in zip(common, shared_values):
      values[pos] = v
    a, kw = jax.tree_util.tree_unflatten(treedef, values)
    out = call(bank._select(i, Slots.lazy), *a, **kw)
    return jax.tree_util.tree_map(
        lambda ax, sub: jax.tree_util.tree_map(lambda y: jnp.squeeze(y, ax), sub),
        example_out_axes, out)

  return jax.vmap(one, in_axes=(0, [axes[i] for i in mapped], None),
                  out_axes=example_out_axes)(
      index, [leaves[i] for i in mapped], [leaves[i] for i in common])


def _run_bank(adapted, base, bank: AdapterBank, args, kwargs, key):
  """``lora(fn)(base, bank, *args, adapter_index=..., **kwargs)``: ``mixed`` over the bank."""
  kwargs = dict(kwargs)
  index = kwargs.pop("adapter_index", None)
  options = {k: kwargs.pop(k) for k in ("example_axes", "example_out_axes", "per_example")
             if k in kwargs}
  if index is None:
    raise ValueError("adapters is an AdapterBank: pass adapter_index= (one slot per example, "
                     "-1 for the base alone), or bank.pick(i) as adapters for the whole batch.")
  if key is not None:
    raise ValueError("lora_dropout_key is not applied to a bank's adapters (serving holds no "
                     "dropout); train each adapter on its own or with bank.multi_task_step.")

  def call(picked, *a, **kw):
    return adapted(base, picked, *a, **kw)

  return mixed(call, bank, index, args, kwargs, **options)


register_container(AdapterBank, _run_bank, keywords=("adapter_index", "example_axes",
                                                     "example_out_axes", "per_example"))


# ----------------------------------------------------------------------- multi-task training


def multi_task_step(loss_fn: Callable, optimizer, *, has_aux: bool = False,
                    donate: bool = False, jit: bool = True) -> Callable:
  """One step that trains several adapters on one base, each on its own task's examples.

  Every adapter's gradient comes from its own examples only and its optimizer state is its
  own, so the step equals separate ``lora_jax.train_step`` steps on the same data (bit for bit
  on CPU: the same operations, compiled into one program and dispatched once).

  Args:
    loss_fn: ``loss_fn(params, batch)`` as for ``lora_jax.train_step``.
    optimizer: one optax transformation for every adapter, or ``{name: transformation}``.
    has_aux, donate, jit: as for ``lora_jax.train_step``.

  Returns:
    ``step(base, adapters, opt_states, batches, *, keys=None) -> StepOutput`` where
    ``adapters``, ``opt_states`` and ``batches`` (a mixed batch grouped by task) are
    ``{name: ...}`` with the same names, and so are the output's adapters, states, losses and
    aux; ``keys`` is ``{name: dropout key}`` or None.
  """
  one = functools.partial(train_step, loss_fn, has_aux=has_aux, jit=False)
  shared = None if isinstance(optimizer, Mapping) else one(optimizer)
  own = {n: one(o) for n, o in optimizer.items()} if isinstance(optimizer, Mapping) else {}

  def step(base, adapters, opt_states, batches, *, keys=None) -> StepOutput:
    names = list(adapters)
    given = [("opt_states", opt_states), ("batches", batches)]
    for what, tree in given + ([("optimizer", own)] if own else []):
      if sorted(tree) != sorted(names):
        raise ValueError(f"{what} must have the adapters' names {sorted(names)}, got "
                         f"{sorted(tree)}.")
    out = {n: own.get(n, shared)(base, adapters[n], opt_states[n], batches[n],
                                 key=None if keys is None else keys[n]) for n in names}
    return StepOutput(*({n: o[k] for n, o in out.items()} for k in range(4)))

  if not jit:
    return step
  return jax.jit(step, donate_argnames=("adapters", "opt_states") if donate else ())

