"""The ``AdapterBank``: named adapter trees stacked over one base, picked by index, put in
slots, and read from PEFT and lora_jax checkpoint folders."""


from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _tree, checkpoint, peft
from lora_jax._tree import listing
from lora_jax.adapters import LoraWeights, match
from lora_jax.bank.slots import NO_ADAPTER, LoraArrays, Slots
from lora_jax.targets import base_leaves

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
    if other:  # a kind with more than its factors (a magnitude, a gain): not a slot's
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
  (``adapter_config.json``) or a ``lora_jax.checkpoint`` folder (its newest intact step).

  Raises:
    ValueError: ``path`` is neither, or its adapters do not fit ``base``.
  """
  folder = pathlib.Path(path)
  if (folder / peft.CONFIG_FILE).is_file():
    return peft.import_peft(folder, base, uses=uses)[1]
  if folder.is_dir() and checkpoint.steps(folder):
    return checkpoint.restore(folder, base=base).adapters
  raise ValueError(f"{str(path)!r} holds no adapter: expected a PEFT folder "
                   f"({peft.CONFIG_FILE}) or a lora_jax checkpoint folder.")


def load(paths: Mapping[str, object], base, *, uses: Mapping | None = None,
         rank: int | None = None, capacity: int | None = None) -> AdapterBank:
  """``stack`` of the adapters ``read`` from ``{name: path}`` (options as for ``stack``)."""
  return stack({name: read(p, base, uses=uses) for name, p in paths.items()}, base, rank=rank,
               capacity=capacity)

