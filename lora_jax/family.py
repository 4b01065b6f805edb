"""Model-family records: what the core needs to know of a family, declared by the family.

The core (``peft``, ``sharding``, ``targets``) names no model family. A family's module (for
the reference models, ``lora_jax/models/<family>.py``) declares one ``Family`` record and
registers it; the PEFT name rule, the partition helpers and the ``lora-jax count`` command read
the registered records. Adding a family is one new file plus one ``register`` call.

    >>> TOY = family.register(family.Family(
    ...     name="toy", layer_stack="blocks", target_aliases={"up": "up", "down": "down"},
    ...     partition_rules=((r"up/kernel$", "column"), (r"down/kernel$", "row"))))
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

from lora_jax.config import ALL_LINEAR


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
  """One model family's record.

  Attributes:
    name: the family's name (``"llama"``).
    layer_stack: the Flax module path of its layer stack (``"model/layers"``): a scanned stack
      keeps its layers along a leading axis of every kernel under this path; an unrolled one
      names them ``{layer_stack}_{i}``. PEFT and Hugging Face name layer i ``...layers.i...``.
    target_aliases: short LoRA target names (``{"q": "q_proj"}``) to path regexes.
    partition_rules: ``(regex, "row" | "column")`` tensor-parallel rules for
      ``lora_jax.sharding.tensor_parallel_specs``.
    conv1d: transformers stores the family's linear layers as GPT-2 ``Conv1D`` (weight (in,
      out); PEFT's ``fan_in_fan_out``).
    weight_table: ``(Flax path, checkpoint name with {i} for the layer, is a Linear weight)``
      rows mapping a Hugging Face checkpoint onto the Flax tree.
    configs: named configurations, ``{name: (model class, model config)}``.
    check_targets: optional ``(model config, alias) -> error message or None``, for aliases a
      configuration lacks (e.g. ``q`` on a fused ``c_attn``).
    variants: named config overrides offered by the command line (``{"separate_qkv":
      {"fused_qkv": False}}``).
    default_targets: PEFT's usual default for the family (the query and value projections), a
      spec for ``targets``, or a function of the model config giving one.
  """

  name: str
  layer_stack: str
  target_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  partition_rules: tuple[tuple[str, str], ...] = ()
  conv1d: bool = False
  weight_table: tuple[tuple[str, str, bool], ...] = ()
  configs: Mapping[str, tuple[type, Any]] = dataclasses.field(default_factory=dict)
  check_targets: Callable[[Any, str], str | None] | None = None
  variants: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  default_targets: str | Callable[[Any], str] = "q,v"

  def default_spec(self, model_config=None) -> str:
    """The default ``targets`` spec for a configuration of this family."""
    spec = self.default_targets
    return spec(model_config) if callable(spec) else spec

  def targets(self, spec: str, model_config=None, *, name: str | None = None) -> tuple[str, ...]:
    """Comma-separated target names to ``LoraConfig.targets``: aliases (``q,v``), module names,
    ``all-linear`` or regular expressions; e.g. ``"q,v"`` -> ``("q_proj", "v_proj")``.

    Raises:
      ValueError: the spec names nothing, or an alias the configuration lacks.
    """
    items = [t.strip() for t in spec.split(",") if t.strip()]
    name = name or self.name
    if not items:
      aliases = ", ".join(self.target_aliases)
      raise ValueError(f"targets {spec!r} name nothing; use e.g. "
                       f"{self.default_spec(model_config)} or {ALL_LINEAR} (aliases for {name}: "
                       f"{aliases}).")
    for t in items:
      problem = self.check_targets(model_config, t) if self.check_targets else None
      if problem:
        raise ValueError(f"{name} {problem}")
    return tuple(self.target_aliases.get(t, t) for t in items)


_REGISTRY: dict[str, Family] = {}


def register(record: Family) -> Family:
  """Registers ``record`` (replacing a record of the same name); returns it."""
  if not isinstance(record, Family):
    raise TypeError(f"register takes a lora_jax.family.Family, got {type(record).__name__}.")
  _REGISTRY[record.name] = record
  return record


def unregister(name: str) -> None:
  """Removes the family ``name`` from the registry (no error if absent)."""
  _REGISTRY.pop(name, None)


def registered() -> dict[str, Family]:
  """The registered families by name."""
  return dict(_REGISTRY)


def get(name: str) -> Family:
  """The registered family ``name``.

  Raises:
    ValueError: unknown name (the message lists the registered ones).
  """
  if name not in _REGISTRY:
    known = ", ".join(_REGISTRY) or "none"
    raise ValueError(f"unknown model family {name!r}; registered: {known} (import "
                     f"lora_jax.models for the reference families).")
  return _REGISTRY[name]


def stack_re() -> re.Pattern:
  """Matches the layer-stack module of any registered family in a '/'-joined module path:
  group ``stack`` the stack's name, group ``index`` the layer of an unrolled stack
  (``model/layers_3``) or None in a scanned one (``model/layers``)."""
  return _stack_pattern(frozenset(f.layer_stack for f in _REGISTRY.values()))


@functools.lru_cache(maxsize=8)
def _stack_pattern(stacks: frozenset) -> re.Pattern:
  names = sorted((re.escape(s) for s in stacks), key=len, reverse=True) or ["(?!)"]
  return re.compile(r"(?:^|(?<=/))(?P<stack>" + "|".join(names) + r")(?:_(?P<index>\d+))?(?=/)")


def unrolled_path(path: str, layer: int) -> str | None:
  """The path that layer ``layer`` of the stacked kernel at ``path`` has in the same model
  built unrolled (``scan_layers=False``), or None when ``path`` is not in the scanned layer
  stack of a registered family.

  Example: ``params/model/layers/self_attn/q_proj/kernel`` and 3 give
  ``params/model/layers_3/self_attn/q_proj/kernel``.
  """
  module, _, leaf = path.rpartition("/")
  m = stack_re().search(module)
  if m is None or m["index"] is not None:
    return None
  return f"{module[:m.end()]}_{layer}{module[m.end():]}/{leaf}"
