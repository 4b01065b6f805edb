"""Many adapters on one frozen base: an adapter bank, selection by index, mixed batches and
multi-task training.

An ``AdapterBank`` stacks named adapter trees (different targets, ranks and alphas, over one
base) to common shapes: every adapted path of any adapter is in the bank; ranks are zero-padded
to the largest (zero columns of A and rows of B add exact zeros); an adapter that does not
target a path has zero factors there; each adapter's scale is an array, not a static field.
Trained extras (``modules_to_save``, such as a classifier head) are stacked whole, the base
leaf standing in where an adapter has none. One more slot, ``NO_ADAPTER`` (-1), is the base
model itself: zero factors, scale 0, the base leaves.

Since every choice is data of fixed shapes, choosing another adapter, changing an alpha or
putting a new adapter of the same shapes into a slot never retraces a jitted function:

    bank = lora_jax.bank.stack({"sst2": sst2, "vader": vader}, base)
    adapted = lora_jax.lora(model.apply)
    y = adapted(base, bank.pick(bank.index("sst2")), x)       # one adapter for the batch
    y = adapted(base, bank, x, adapter_index=jnp.array([0, 1, -1]))  # one per example

With ``adapter_index`` each example runs with its own adapter, as if alone (``mixed``): a
bank of adapters alone runs the batch as one, each adapted product gathering every row's own
factors where it runs (S-LoRA's and Punica's batched gather: ``x @ W`` stays one product for
all rows); a bank with trained extras (a head per task) runs ``jax.vmap`` over the examples,
each with its own extras.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _tree
from lora_jax._tree import listing
from lora_jax import adapters as adapters_lib
from lora_jax.adapters import LoraWeights, match
from lora_jax.kinds import register as register_kind
from lora_jax.targets import base_leaves

__all__ = ["NO_ADAPTER", "AdapterBank", "LoraArrays", "SlotLora", "Slots", "load", "mixed",
           "multi_task_step", "read", "stack", "traced_scales"]

NO_ADAPTER = -1  # the adapter index of the base model alone


@dataclasses.dataclass(frozen=True)
class LoraArrays(LoraWeights):
  """``LoraWeights`` whose ``scale`` is an array (data, not a static field): what a bank hands
  out, so a changed alpha is a changed value. Not for training (optax would update the scale):
  train ``LoraWeights`` and stack them into a bank."""

  UNSTACKED_FIELDS = ("scale",)  # no stacked-layer axis: lax.scan does not slice it


jax.tree_util.register_dataclass(
    LoraArrays, data_fields=["a", "b", "scale"], meta_fields=["axes", "dropout", "ranks"])
register_kind(LoraArrays)  # a picked adapter saves and restores like any other


@dataclasses.dataclass(frozen=True)
class Slots:
  """One kernel's factors in every slot of a bank, laid out as one LoRA of rank
  ``slots * rank``: slot s holds rank columns ``s * rank ... (s + 1) * rank - 1``.

  Attributes:
    a: (*stack, *in, slots * rank).
    b: (*stack, slots * rank, *out).
    scale: (slots,), each slot's alpha / rank (0 in free slots and the base slot).
    axes: the kernel's axis roles; rank: the rank of one slot.
  """

  a: jax.Array
  b: jax.Array
  scale: jax.Array
  axes: str
  rank: int

  @property
  def count(self) -> int:
    return self.scale.shape[0]

  def _split(self):
    """``a`` as (*stack, *in, slots, rank) and ``b`` as (*stack, slots, rank, *out), with the
    stacked axes still there (a ``lax.scan`` slices them off)."""
    n = self.b.ndim - 1 - self.axes.count("o")
    a = self.a.reshape(*self.a.shape[:-1], self.count, self.rank)
    b = self.b.reshape(*self.b.shape[:n], self.count, self.rank, *self.b.shape[n + 1:])
    return a, b, n

  def slot(self, i) -> LoraArrays:
    """Slot ``i`` as an adapter of rank ``rank`` (its factors gathered)."""
    a, b, n = self._split()
    return LoraArrays(a=jnp.take(a, i, axis=a.ndim - 2), b=jnp.take(b, i, axis=n),
                      scale=self.scale[i], axes=self.axes)

  def lazy(self, i) -> "SlotLora":
    """Slot ``i`` as an adapter that gathers its factors only where a product uses them."""
    return SlotLora(a=self.a, b=self.b, scale=self.scale, slot=i, axes=self.axes,
                    slot_rank=self.rank)

  def with_slot(self, i: int, entry: LoraArrays) -> "Slots":
    a, b, n = self._split()
    a = a.at[..., i, :].set(entry.a.astype(a.dtype))
    b = b.at[(slice(None),) * n + (i,)].set(entry.b.astype(b.dtype))
    return dataclasses.replace(self, a=a.reshape(self.a.shape), b=b.reshape(self.b.shape),
                               scale=self.scale.at[i].set(entry.scale))

  def one_slot(self) -> LoraArrays:
    """The shapes of one slot's adapter."""
    return jax.eval_shape(lambda s: s.slot(0), self)

  @classmethod
  def of(cls, entries: Sequence[LoraArrays]) -> "Slots":
    """Per-slot adapters of equal shapes, stacked."""
    first = entries[0]
    n = first.axes.count("l")
    a = jnp.stack([e.a for e in entries], axis=first.a.ndim - 1)
    b = jnp.stack([e.b for e in entries], axis=n)
    return cls(a=a.reshape(*a.shape[:-2], -1),
               b=b.reshape(*b.shape[:n], -1, *b.shape[n + 2:]),
               scale=jnp.stack([jnp.asarray(e.scale, jnp.float32) for e in entries]),
               axes=first.axes, rank=first.rank)


jax.tree_util.register_dataclass(Slots, data_fields=["a", "b", "scale"],
                                 meta_fields=["axes", "rank"])


@dataclasses.dataclass(frozen=True)
class SlotLora(LoraWeights):
  """Every slot's factors of one kernel (``Slots``' layout: rank ``slots * slot_rank``) and
  the slot to use, gathered only inside its products: under ``jax.vmap`` over examples with
  a per-example ``slot``, each product gathers each example's factors of that layer alone."""

  slot: jax.Array = None
  slot_rank: int = 0

  UNSTACKED_FIELDS = ("scale", "slot")

  def own(self) -> LoraArrays:
    """This slot's adapter (rank ``slot_rank``), with whatever stacked axes are left."""
    return Slots(a=self.a, b=self.b, scale=self.scale, axes=self.axes,
                 rank=self.slot_rank).slot(self.slot)

  def delta(self, *, axes=None, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    if jnp.ndim(self.slot):
      raise ValueError("a kernel with one adapter per example was used other than as x @ W "
                       "(the examples on the activation's leading axis), so there is no one "
                       "kernel to merge; pass per_example=True, which runs each example on its "
                       "own.")
    return self.own().delta(axes=axes, precision=precision)

  def factors(self):
    return None if jnp.ndim(self.slot) else self.own().factors()

  def product(self, x, *, x_sub: str, out_sub: str, present, contracted, batched, **kwargs):
    if not jnp.ndim(self.slot):
      return self.own().product(x, x_sub=x_sub, out_sub=out_sub, present=present,
                                contracted=contracted, batched=batched, **kwargs)
    return self._rows(x, x_sub, out_sub, present, contracted, batched, **kwargs)

  def _rows(self, x, x_sub, out_sub, present, contracted, batched, *, dtype, **opts):
    """``slot`` (examples,) picks an adapter per row of ``x``'s leading axis, which must hold
    the examples: each row's factors gathered, Punica's batched gather; None (the merged
    fallback, an error) unless this is ``x @ W``."""
    roles = self.axes
    first = x_sub[0]
    if (batched or {roles[j] for j in contracted} != {"i"}
        or len(contracted) != roles.count("i") or not first.islower()):
      return None
    if x.shape[0] != self.slot.shape[0]:
      raise ValueError(f"a product's activation has {x.shape[0]} rows on its leading axis for "
                       f"{self.slot.shape[0]} examples; a bank of adapters alone needs the "
                       f"examples first in every adapted product: pass per_example=True, which "
                       f"runs each example on its own.")
    own = self.own()  # a (.., *in, rows, r), b (.., rows, r, ..)
    a_sub, b_sub = adapters_lib.factor_subscripts(roles, present)
    a_sub = a_sub[:-1] + first + "r"
    stack = b_sub[:b_sub.index("r")]
    b_sub = stack + first + b_sub[len(stack):]
    t_sub = "".join(c for c in x_sub if c.islower()) + stack + "r"
    t = jnp.einsum(f"{x_sub},{a_sub}->{t_sub}", x, own.a.astype(dtype), **opts)
    scale = own.scale.astype(t.dtype).reshape((-1,) + (1,) * (t.ndim - 1))
    return jnp.einsum(f"{t_sub},{b_sub}->{out_sub}", t * scale, own.b.astype(dtype), **opts)


jax.tree_util.register_dataclass(SlotLora, data_fields=["a", "b", "scale", "slot"],
                                 meta_fields=["axes", "dropout", "slot_rank", "ranks"])


def traced_scales(adapters):
  """``adapters`` with every ``LoraWeights`` made a ``LoraArrays`` (its scale an array), so a
  jitted function taking them retraces for new shapes only, not for a new alpha."""
  def convert(x):
    if isinstance(x, LoraWeights) and not isinstance(x, LoraArrays):
      x = x.folded()  # per-layer scales into B: one scale left
      return LoraArrays(a=x.a, b=x.b, scale=jnp.asarray(x.scale, jnp.float32), axes=x.axes,
                        ranks=x.ranks)
    return x

  return jax.tree_util.tree_map(convert, adapters, is_leaf=lambda x: isinstance(x, LoraWeights))


@dataclasses.dataclass(frozen=True)
class AdapterBank:
  """Named adapters stacked over one base (build with ``stack``).

  Attributes:
    slots: a tree mirroring the base's paths: at each adapted kernel a ``Slots`` (every
      slot's factors as one LoRA of rank slots * rank), at each trained extra its values
      stacked on a leading slot axis. Slots: one per name, then free slots, then the base.
    names: the adapter of each named slot, in order; ``None`` marks a free slot (``put``
      fills it without changing any shape). Names are host-side only: they are not part of
      the pytree (so a new name is not a new trace), and a bank rebuilt inside a JAX
      transformation has ``names=None``: look slots up outside (``index`` gives plain ints).
  """

  slots: dict
  names: tuple | None

  @property
  def size(self) -> int:
    """Slots for adapters (named and free); the base slot is one more."""
    first = jax.tree_util.tree_leaves(self.slots, is_leaf=_is_slots)[0]
    return (first.count if _is_slots(first) else first.shape[0]) - 1

  def index(self, name: str) -> int:
    """The slot of adapter ``name`` (``NO_ADAPTER`` for ``None``)."""
    if name is None:
      return NO_ADAPTER
    self._check_named()
    if name not in self.names:
      known = ", ".join(n for n in self.names if n is not None)
      raise ValueError(f"no adapter named {name!r} in the bank; it holds: {known or 'none'}.")
    return self.names.index(name)

  def _check_named(self) -> None:
    if self.names is None:
      raise ValueError("this bank came through a JAX transformation, which does not carry "
                       "adapter names; look slots up with bank.index(name) outside it and pass "
                       "the int in.")

  def check_index(self, index) -> None:
    """Raises ValueError for a concrete index outside ``-1 .. size - 1`` (a traced one cannot
    be checked: outside that range it selects the base alone)."""
    if isinstance(index, jax.core.Tracer):
      return
    bad = np.asarray(index)
    bad = bad[(bad < NO_ADAPTER) | (bad >= self.size)]
    if bad.size:
      raise ValueError(f"adapter index {int(bad.flat[0])} is outside the bank's slots: use 0 .. "
                       f"{self.size - 1}, or {NO_ADAPTER} for the base alone.")

  def indices(self, names: Sequence) -> np.ndarray:
    """``index`` of each name, int32: the ``adapter_index`` of a mixed batch."""
    return np.asarray([self.index(n) for n in names], np.int32)

  def pick(self, index):
    """The adapter tree in slot ``index`` (an int or a traced int; ``NO_ADAPTER`` gives the
    base model: zero factors and the base's own extras), usable wherever an adapter tree is:
    ``lora(fn)(base, bank.pick(i), x)``, ``merge(base, bank.pick(i))``."""
    self.check_index(index)
    return self._select(index, Slots.slot)

  def lazy(self, index):
    """Like ``pick``, but each kernel's adapter (a ``SlotLora``) holds every slot's factors
    and gathers its own slot's only where a product uses them: inside a ``lax.scan`` over
    layers, one layer's at a time. With ``index`` (examples,), every row of a product's
    activation gathers its own (``mixed``; a bank with trained extras needs one example at
    a time: their leaves are whole)."""
    self.check_index(index)
    return self._select(index, Slots.lazy)

  @property
  def has_extras(self) -> bool:
    """Whether any adapter trains a parameter in full (``modules_to_save``)."""
    return not all(_is_slots(x) for x in
                   jax.tree_util.tree_leaves(self.slots, is_leaf=_is_slots))

  def _select(self, index, kernel):
    index = jnp.asarray(index, jnp.int32)
    slot = jnp.where((index < 0) | (index >= self.size), self.size, index)
    return jax.tree_util.tree_map(
        lambda x: kernel(x, slot) if isinstance(x, Slots) else x[slot], self.slots,
        is_leaf=_is_slots)

  def put(self, name: str, adapters, base) -> "AdapterBank":
    """A bank with ``adapters`` in the slot of ``name`` (replacing it) or in the first free
    slot. The shapes stay (no retrace): its ranks must fit the bank's, its paths be the bank's.

    Raises:
      ValueError: no free slot, a path the bank lacks, or a rank above the bank's.
    """
    self._check_named()
    if not isinstance(name, str) or not name:
      raise ValueError(f"name must be a non-empty string, got {name!r}.")
    if name in self.names:
      slot = self.names.index(name)
    elif None in self.names:
      slot = self.names.index(None)
    else:
      raise ValueError(f"the bank has no slot for {name!r} (its {self.size} slots are named); "
                       f"replace one by its name or stack a bank with more capacity=.")
    adapters_, extras = match(base, adapters)
    flat = _tree.flatten(self.slots, is_leaf=_is_slots)
    unknown = [p for p in (*adapters_, *extras) if p not in flat]
    unknown += [p for p in adapters_ if p in flat and not _is_slots(flat[p])]
    unknown += [p for p in extras if p in flat and _is_slots(flat[p])]
    if unknown:
      raise ValueError(f"adapter {name!r} has paths the bank lacks (or holds as the other of "
                       f"factors / a whole trained leaf): {listing(unknown)}; stack a new bank "
                       f"that includes it.")
    leaves = base_leaves(base)
    out = {}
    for path, stacked in flat.items():
      like = stacked.one_slot() if _is_slots(stacked) else jax.ShapeDtypeStruct(
          stacked.shape[1:], stacked.dtype)
      entry = _entry(path, adapters_.get(path), extras.get(path), leaves[path], like, name)
      out[path] = (stacked.with_slot(slot, entry) if _is_slots(stacked)
                   else stacked.at[slot].set(entry))
    names = list(self.names)
    names[slot] = name
    return AdapterBank(_tree.nest(out), tuple(names))


jax.tree_util.register_pytree_with_keys(
    AdapterBank,
    lambda bank: (((jax.tree_util.GetAttrKey("slots"), bank.slots),), None),
    lambda _, children: AdapterBank(children[0], None),
    flatten_func=lambda bank: ((bank.slots,), None))


def _is_lora(x) -> bool:
  return isinstance(x, LoraWeights)


def _is_slots(x) -> bool:
  return isinstance(x, Slots)


def _padded(lw: LoraWeights, rank: int, path, name) -> LoraWeights:
  """``lw`` with rank ``rank``: zero columns of A, zero rows of B."""
  if isinstance(lw.scale, tuple):
    raise ValueError(f"adapter {name!r} has one scale per layer at {_tree.join(path)!r} (layers "
                     f"with their own alpha or rank), which a bank does not hold (one scale per "
                     f"slot); serve it merged or on its own.")
  extra = rank - lw.rank
  if extra < 0:
    raise ValueError(f"adapter {name!r} has rank {lw.rank} at {_tree.join(path)!r}, above the "
                     f"bank's {rank}; stack a bank with rank >= {lw.rank}.")
  stack_dims = lw.axes.count("l")
  pad_a = [(0, 0)] * (lw.a.ndim - 1) + [(0, extra)]
  pad_b = [(0, 0)] * lw.b.ndim
  pad_b[stack_dims] = (0, extra)
  return LoraArrays(a=jnp.pad(lw.a, pad_a), b=jnp.pad(lw.b, pad_b),
                    scale=jnp.asarray(lw.scale, jnp.float32), axes=lw.axes)


def _entry(path, lw, extra, base_leaf, like, name):
  """One adapter's values at ``path`` shaped like ``like`` (one slot of the bank's entry;
  arrays or shapes): zero factors where it has no adapter, the base leaf where no extra."""
  if _is_lora(like):
    if lw is None:
      zero = lambda x: jnp.zeros(x.shape, x.dtype)  # noqa: E731
      return LoraArrays(a=zero(like.a), b=zero(like.b), scale=jnp.float32(0), axes=like.axes)
    if lw.axes != like.axes:
      raise ValueError(f"adapter {name!r} has axes {lw.axes!r} at {_tree.join(path)!r} where "
                       f"the bank's adapters have {like.axes!r}; build them on the same base.")
    padded = _padded(lw, like.a.shape[-1], path, name)
    return jax.tree_util.tree_map(lambda x, s: x.astype(s.dtype), padded, like)
  value = base_leaf if extra is None else extra
  return jnp.asarray(value, like.dtype)


def _layout(trees: Mapping[str, tuple], base, rank):
  """Per bank path: an empty slot entry (zero factors of the largest rank, or the extra)."""
  leaves = base_leaves(base)
  lws, extras = {}, {}
  for name, (adapters, trained) in trees.items():
    for path, lw in adapters.items():
      lws.setdefault(path, []).append((name, lw))
    for path, x in trained.items():
      extras.setdefault(path, []).append(x)
  both = sorted(set(lws) & set(extras))
  if both:
    path = both[0]
    raise ValueError(f"{_tree.join(path)!r} is adapted by {lws[path][0][0]!r} but trained in "
                     f"full by another adapter: a bank holds either factors or a whole leaf "
                     f"per path; serve those adapters from separate banks (or merged).")
  layout = {}
  for path, found in lws.items():
    r = rank or max(lw.rank for _, lw in found)
    name, first = found[0]
    dtype = jnp.result_type(*[lw.a for _, lw in found])
    padded = _padded(first, r, path, name)
    layout[path] = LoraArrays(a=jnp.zeros(padded.a.shape, dtype),
                              b=jnp.zeros(padded.b.shape, dtype), scale=jnp.float32(0),
                              axes=first.axes)
  for path, found in extras.items():
    dtype = jnp.result_type(leaves[path], *found)
    layout[path] = jnp.asarray(leaves[path], dtype)
  return layout


def stack(adapters: Mapping[str, object], base, *, rank: int | None = None,
          capacity: int | None = None) -> AdapterBank:
  """Stacks named adapter trees over ``base`` into an ``AdapterBank``.

  Args:
    adapters: ``{name: trainable tree}`` (``lora_jax.init`` layout: from training, a
      checkpoint, a run or ``lora_jax.peft.import_peft``); targets, ranks and alphas may differ.
    base: the frozen base they were trained on (concrete or abstract).
    rank: the bank's rank at every path (default: the largest adapter rank there); fixing it
      lets later adapters of other ranks be ``put`` in without a retrace.
    capacity: slots in all (default: one per adapter); free slots take adapters later.

  Raises:
    ValueError: no adapters, a name that is not a string, an adapter that does not fit
      ``base``, two adapters with different axis roles on one kernel, or too small a capacity.
  """
  if not adapters:
    raise ValueError("adapters must name at least one adapter tree: {name: adapters}.")
  bad = [n for n in adapters if not isinstance(n, str) or not n]
  if bad:
    raise ValueError(f"adapter names must be non-empty strings, got {bad!r}.")
  capacity = len(adapters) if capacity is None else capacity
  if capacity < len(adapters):
    raise ValueError(f"capacity={capacity} is below the {len(adapters)} adapters given; pass "
                     f"capacity >= {len(adapters)} (or leave it out).")
  trees = {name: match(base, tree) for name, tree in adapters.items()}
  for name, (lws, _) in trees.items():
    other = [lw for lw in lws.values() if type(lw) not in (LoraWeights, LoraArrays)]
    if other:  # DoRA's magnitudes rescale W itself: not factors a slot can hold
      raise ValueError(f"adapter {name!r} holds {type(other[0]).__name__} adapters, which a "
                       f"bank does not hold (only LoRA's); serve it merged or on its own.")
  layout = _layout(trees, base, rank)
  leaves = base_leaves(base)
  names = list(adapters)
  slots = {}
  for path, like in layout.items():
    entries = [_entry(path, trees[n][0].get(path), trees[n][1].get(path), leaves[path], like, n)
               for n in names]
    empty = _entry(path, None, None, leaves[path], like, None)  # free slots and the base slot
    entries += [empty] * (capacity - len(names) + 1)
    slots[path] = Slots.of(entries) if _is_lora(like) else jnp.stack(entries)
  return AdapterBank(_tree.nest(slots), tuple(names) + (None,) * (capacity - len(names)))


def read(path, base, *, uses: Mapping | None = None):
  """The adapter tree saved at ``path`` for ``base``: a Hugging Face PEFT folder
  (``adapter_config.json``), a ``lora_jax.checkpoint`` folder (its newest intact step), or a
  ``lora-jax train`` run folder (its ``checkpoints/``).

  Raises:
    ValueError: ``path`` is none of those, or its adapters do not fit ``base``.
  """
  from lora_jax import checkpoint, peft  # checkpoint imports orbax: only when reading

  folder = pathlib.Path(path)
  if (folder / "adapter_config.json").is_file():
    return peft.import_peft(folder, base, uses=uses)[1]
  if (folder / "config.json").is_file() and (folder / "checkpoints").is_dir():
    _check_original_base(folder)
    folder = folder / "checkpoints"
  if folder.is_dir() and checkpoint.steps(folder):
    return checkpoint.restore(folder, base=base).adapters
  raise ValueError(f"{str(path)!r} holds no adapter: expected a PEFT folder "
                   f"(adapter_config.json), a lora_jax checkpoint folder or a lora-jax train run "
                   f"folder.")


def _check_original_base(run: pathlib.Path) -> None:
  """Raises ValueError for a run trained on a residual base (PiSSA / OLoRA)."""
  import json

  init = json.loads((run / "config.json").read_text()).get("options", {}).get("init", "")
  if init.startswith(("pissa", "olora")):
    raise ValueError(f"{str(run)!r} is a run with init {init!r}: its adapters act on a residual "
                     f"base, not the base given; export it with lora-jax export-peft (which "
                     f"converts it to LoRA on the original base) and read that folder.")


def load(paths: Mapping[str, object], base, *, uses: Mapping | None = None,
         rank: int | None = None, capacity: int | None = None) -> AdapterBank:
  """``stack`` of the adapters ``read`` from ``{name: path}`` (options as for ``stack``)."""
  return stack({name: read(p, base, uses=uses) for name, p in paths.items()}, base, rank=rank,
               capacity=capacity)


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
  ``lora(fn)`` calls this when its adapters are an ``AdapterBank``.

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
  from lora_jax.train import StepOutput, train_step  # train imports transform, which imports us

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
