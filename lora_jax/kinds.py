"""The adapter-kind registry: every adapter kind registers its class; configs name it.

An adapter kind is a frozen dataclass registered with ``jax.tree_util.register_dataclass``
that implements ``AdapterKind``. ``LoraConfig(kind=name)`` picks a kind by its ``name``;
checkpoints rebuild an adapter by its class name. Everything else in lora_jax (init, merge,
the transform, optimizer groups, sharding, counts, checkpoints, PEFT files, banks) handles
adapters only through this protocol.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

BUILTIN = ("lora", "dora")  # the built-in kinds; ``import lora_jax`` registers them

_REGISTERED: list[type] = []


class AdapterKind(Protocol):
  """What an adapter kind provides (``lora_jax.adapters.LoraWeights`` is the reference).

  Class attributes:
    name: the name ``LoraConfig.kind`` uses (set only on a kind a config can pick).
    summary: one line for help texts (``lora-jax train --variant``).
    additive: whether ``W' = W + delta`` with ``delta`` independent of W; only additive
      kinds unmerge, combine, convert and sit in a bank.
    peft: the adapter_config.json flags that select the kind in PEFT's format, ``{}`` for
      plain LoRA; None (or not set on the class itself): no PEFT form, ``export_peft`` refuses.
    peft_vectors: the names of the kind's 1-D tensors per PEFT module, one value per output
      feature (``base_model.model.<module>.<name>``).
  """

  name: ClassVar[str]
  summary: ClassVar[str]
  additive: ClassVar[bool]
  peft: ClassVar[dict | None]
  peft_vectors: ClassVar[tuple[str, ...]]

  @classmethod
  def create(cls, config, target, key, *, base) -> "AdapterKind":
    """A new adapter of this kind for ``target`` (``base``: its kernel, maybe abstract)."""

  @classmethod
  def of_factors(cls, lw, *, base) -> "AdapterKind":
    """This kind built on the LoRA factors ``lw`` of the kernel ``base``."""

  @classmethod
  def extra_params(cls, target) -> int:
    """Trained parameters beyond A and B for ``target`` (``lora_jax.count``)."""

  def merged(self, w, *, axes=None, sign: float = 1.0) -> Any:
    """The adapted kernel ``W'`` of the kernel ``w`` (``sign=-1``: undo it)."""

  def product(self, x, **kwargs) -> Any:
    """The adapter's share of a matrix product with the kernel (the transform)."""

  def rescaled(self, y, **kwargs) -> Any:
    """The adapted product as the kind finally gives it."""

  def peft_tensors(self, at: tuple) -> dict:
    """``{vector name: (out,) float32}`` of the layer ``at`` for PEFT's file."""

  @classmethod
  def from_peft(cls, lw, vectors, *, base) -> "AdapterKind":
    """This kind from PEFT's LoRA factors ``lw`` and ``{layer: {vector name: array}}``."""

  def groups(self) -> "AdapterKind":
    """This adapter with each trained array replaced by its LoRA+ group, "a" or "b"."""

  def laid_out(self, a_spec, b_spec, wrap) -> "AdapterKind":
    """This adapter with every array replaced by its sharding."""

  def reshaped(self, roles: str, shape) -> "AdapterKind":
    """The adapter of the kernel reshaped to ``shape``."""

  def check_fits(self, path: str, w) -> None:
    """Raises ValueError unless the adapter fits the kernel ``w``."""


def register(kind: type) -> type:
  """Registers an adapter kind (usable as a class decorator); returns it.

  Raises:
    ValueError: another registered kind has the same ``name`` or class name.
  """
  if kind in _REGISTERED:
    return kind
  for other in _REGISTERED:
    if other.__name__ == kind.__name__:
      raise ValueError(f"an adapter kind class named {kind.__name__!r} is already registered "
                       f"({other.__module__}); give the new kind another class name.")
    if _own_name(other) is not None and _own_name(other) == _own_name(kind):
      raise ValueError(f"adapter kind name {_own_name(kind)!r} is taken by "
                       f"{other.__name__}; give {kind.__name__} another ``name``.")
  _REGISTERED.append(kind)
  return kind


def unregister(kind: type) -> None:
  """Removes a registered kind (a plug-in's, or a test's); the built-in ones stay.

  Raises:
    ValueError: ``kind`` is built in or not registered.
  """
  if kind not in _REGISTERED or _own_name(kind) in BUILTIN:
    raise ValueError(f"{getattr(kind, '__name__', kind)!r} is not a registered plug-in adapter "
                     f"kind; registered: {', '.join(k.__name__ for k in _REGISTERED)}.")
  _REGISTERED.remove(kind)


def all() -> tuple[type, ...]:  # noqa: A001  (the registry's own namespace)
  """Every registered kind class, in registration order."""
  return tuple(_REGISTERED)


def names() -> tuple[str, ...]:
  """The names a ``LoraConfig.kind`` can take."""
  return tuple(n for n in map(_own_name, _REGISTERED) if n is not None)


def named(name: str) -> type:
  """The kind a config names.

  Raises:
    ValueError: no registered kind has that name (the message lists them).
  """
  for kind in _REGISTERED:
    if _own_name(kind) == name:
      return kind
  raise ValueError(f"unknown adapter kind {name!r}; registered kinds: "
                   f"{', '.join(names())} (register one with lora_jax.kinds.register).")


def by_class_name(class_name: str) -> type:
  """The registered kind whose class is called ``class_name`` (checkpoints store it).

  Raises:
    ValueError: no such kind (the message lists the registered ones).
  """
  for kind in _REGISTERED:
    if kind.__name__ == class_name:
      return kind
  raise ValueError(f"unknown adapter kind {class_name!r}; registered: "
                   f"{', '.join(k.__name__ for k in _REGISTERED)} (import the module that "
                   f"registers it before restoring).")


def peft_form(kind: type) -> dict | None:
  """The adapter_config.json flags of ``kind``'s PEFT form (set on the class itself), or None."""
  return vars(kind).get("peft")


def is_adapter(x) -> bool:
  """Whether ``x`` is an adapter (an instance of a registered kind): a trainable-tree leaf."""
  return isinstance(x, tuple(_REGISTERED))


def _own_name(kind: type) -> str | None:
  """``kind.name`` when the class sets it itself (a subclass does not inherit a config name)."""
  return vars(kind).get("name")
