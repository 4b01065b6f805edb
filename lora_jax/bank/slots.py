"""A bank's layout: the factors of every slot stacked per kernel (``Slots``), one slot's
adapter (``LoraArrays``) and a slot picked per row where a product runs (``SlotLora``)."""


from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lora_jax import adapters as adapters_lib
from lora_jax.adapters import LoraWeights
from lora_jax.kinds import register as register_kind

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

