"""The two rule tables of the interpreter and the contexts they run in, kept apart:

- ``APPLY_RULES`` run ``lora(fn)`` (the ``Apply`` context): a ``dot_general`` with a kernel
  operand is the adapted product (``lora_jax._adapted``), a whole-row ``gather`` or a
  convolution filter keep the adapter factored (``lora_jax._rules_gather_conv``), casts,
  transposes and role-preserving reshapes keep a kernel a kernel (``lora_jax._rules_layout``),
  and ``Apply`` merges a kernel (``W + s·A@B``) wherever no rule applies, recording the
  fallback.
- ``ANALYZE_RULES`` run ``analyze`` (the ``Analyze`` context): the same primitives, but they
  only record which axis roles each use implies, computing nothing new.

A new primitive is one entry in a table; the higher-order primitives (``jit``, ``scan``,
``checkpoint``, ``cond``) are in both (``lora_jax._higher_order``).
"""

from __future__ import annotations

import dataclasses

import jax

from lora_jax import _adapted, _rules_gather_conv, _rules_layout
from lora_jax._higher_order import HIGHER_ORDER
from lora_jax._kernel import Kernel, Lazy, adapted_only, is_kernel
from lora_jax._rules_layout import flat


# ----------------------------------------------------------------------- contexts


class Apply:
  """One ``lora(fn)`` evaluation: the dropout key and the merged fallbacks seen."""

  rules: dict = {}  # APPLY_RULES, set below
  keeps_kernel: frozenset = frozenset()  # set below: what keeps a kernel a kernel
  tracks = staticmethod(is_kernel)  # the values the interpreter hands to the rules

  def __init__(self, *, key=None, fallbacks=None, product: str = "auto", siblings=True,
               recompute=False):
    self.key, self.product, self.siblings = key, product, siblings
    self.recompute = recompute
    self.fallbacks = [] if fallbacks is None else fallbacks
    self._count = 0

  def with_key(self, key) -> "Apply":
    return Apply(key=key, fallbacks=self.fallbacks, product=self.product,
                 siblings=self.siblings, recompute=self.recompute)

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
    if isinstance(k.w, Lazy) and k.w.ops:  # ops on the stack: not sliceable
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
  tracks = staticmethod(is_kernel)

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
      for j in flat(group):
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


# ----------------------------------------------------------------------- tables

_KEEP_FACTORED = {**_rules_layout.UNARY, "reshape": _rules_layout.apply_reshape,
                  "squeeze": _rules_layout.apply_reshape,
                  "gather": _rules_gather_conv.apply_gather,
                  "conv_general_dilated": _rules_gather_conv.apply_conv}
APPLY_RULES = {name: adapted_only(rule) for name, rule in _KEEP_FACTORED.items()}
APPLY_RULES["dot_general"] = _adapted.APPLY_DOT  # adapted_only inside: see _adapted
ANALYZE_RULES = {**_rules_layout.UNARY, "dot_general": _adapted.ANALYZE_DOT,
                 "reshape": _rules_layout.analyze_reshape,
                 "squeeze": _rules_layout.analyze_reshape,
                 "gather": _rules_gather_conv.analyze_gather,
                 "conv_general_dilated": _rules_gather_conv.analyze_conv}

Apply.rules = {**APPLY_RULES, **HIGHER_ORDER}
Apply.keeps_kernel = frozenset(_rules_layout.UNARY) | {"reshape", "squeeze"}
Analyze.rules = {**ANALYZE_RULES, **HIGHER_ORDER}
