"""Path matching: which kernels a LoraConfig adapts, the plan, and parameter counts.

Patterns match '/'-joined paths, e.g. ``params/layers_0/attn/query/kernel`` for a Flax linen
tree or ``layers/0/kernel`` for an NNX state (the trailing ``.value`` of an NNX variable is
dropped); each ``Target`` and ``Extra`` also keeps its path as a tuple of tree keys
(``keys``), which is what the library indexes trees by (``lora_jax._tree``). Only shapes are
read, so every function here also works on the abstract trees of ``jax.eval_shape``: no
weights need to exist.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _tree, family, kernels, kinds
from lora_jax._tree import listing
from lora_jax.config import ALL_LINEAR, HEAD_PATTERN, LoraConfig, check_roles


def leaves_by_path(tree) -> dict[str, Any]:
  """``{'/'-joined path: leaf}`` for every leaf of ``tree`` (kernel-kind instances are leaves);
  for messages and regular expressions. The library keys trees by ``_tree.flatten``'s tuples."""
  return {_tree.join(p): leaf for p, leaf in base_leaves(tree).items()}


def base_leaves(tree) -> dict[_tree.Path, Any]:
  """``{path tuple: leaf}`` of a base tree, a registered kernel kind being one leaf."""
  return _tree.flatten(tree, is_leaf=kernels.is_kind)


def _shape(leaf) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", ()))


def _ndim(leaf) -> int:
  return len(_shape(leaf))


def size(leaf) -> int:
  return math.prod(_shape(leaf))


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted kernel: where it is, its shape and axis roles, and its adapter's size.

  A stacked kernel whose layers the config gives different ranks or scales (patterns on
  the unrolled layers' paths, ``LoraConfig.rank_pattern``) has ``ranks``, ``alphas`` and
  ``scales``, one per layer; ``rank`` is then the largest (the adapter's padded width) and
  ``alpha`` / ``scale`` are the kernel path's own setting.
  """

  path: str  # '/'-joined, for display and patterns
  shape: tuple[int, ...]
  dtype: Any
  axes: str  # one role per kernel axis: l (stacked layer), i (input), o (output)
  rank: int
  alpha: float
  scale: float
  route: str | None = None  # "factored" or "merged", when the plan was made with analyze()
  keys: tuple[str, ...] = ()  # the path as tree keys (a key may hold a '/')
  kind: str = "lora"  # the adapter kind's registered name (lora_jax.kinds)
  embedding: bool = False  # an embedding table (rows looked up): PEFT's init, no dropout
  ranks: tuple[int, ...] | None = None  # per layer, when the layers differ
  alphas: tuple[float, ...] | None = None
  scales: tuple[float, ...] | None = None

  def _prod(self, role: str) -> int:
    return math.prod(n for n, r in zip(self.shape, self.axes) if r == role)

  @property
  def stack(self) -> int:
    return self._prod("l")

  @property
  def in_features(self) -> int:
    return self._prod("i")

  @property
  def out_features(self) -> int:
    return self._prod("o")

  @property
  def num_params(self) -> int:
    """Trainable parameters of A and B, ``stack * rank * (in + out)`` (per-layer ranks: their
    sum, as PEFT counts each layer's module; the padding is not counted), plus what the
    adapter kind trains beside them (``extra_params``)."""
    ranks = sum(self.ranks) if self.ranks else self.stack * self.rank
    extra = kinds.named(self.kind).extra_params(self)
    return ranks * (self.in_features + self.out_features) + extra

  def layer_paths(self) -> list[str]:
    """The paths in the unrolled model of this stacked kernel's layers (``[]`` unless it has
    one stacked axis in a registered family's scanned layer stack)."""
    if self.axes.count("l") != 1:
      return []
    paths = [family.unrolled_path(self.path, i) for i in range(self.stack)]
    return [] if None in paths else paths


EMBEDDING_NAMES = ("embedding",)
"""Leaf names of embedding tables (Flax's ``nn.Embed`` / ``nnx.Embed``, (vocab, features)):
adapted when a target pattern names them, never by the ``all-linear`` preset."""


def _is_kernel(config: LoraConfig, keys: _tree.Path, leaf) -> bool:
  return bool(keys) and keys[-1] in config.kernel_names and _ndim(leaf) >= 2


def _is_embedding(keys: _tree.Path, leaf) -> bool:
  return bool(keys) and keys[-1] in EMBEDDING_NAMES and _ndim(leaf) == 2


def _module(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else ""


def _match_pattern(config, pattern, leaves, kernels, tables) -> set[str]:
  """The kernels (and embedding ``tables``) ``pattern`` selects. A pattern that matches
  nothing, matches no kernel, or matches a weight matrix that is not a kernel outside any
  selected module is an error; biases and norms beside a selected kernel, or inside a
  selected block, are not. ``all-linear`` selects kernels only, as PEFT's Linear layers."""
  if pattern == ALL_LINEAR:
    return {p for p in kernels if not re.search(HEAD_PATTERN, p)}
  matched = [p for p in leaves if re.search(pattern, p)]
  if not matched:
    raise ValueError(f"target pattern {pattern!r} matched no parameter; available paths "
                     f"include {listing(leaves)}.")
  chosen = {p for p in matched if p in kernels or p in tables}
  modules = {_module(p) for p in chosen}
  for p in matched:
    if p not in chosen and (not chosen or (_ndim(leaves[p]) >= 2 and _module(p) not in modules)):
      raise ValueError(
          f"target pattern {pattern!r} matched {p!r} (shape {_shape(leaves[p])}), which is not "
          f"a matmul kernel (a leaf named one of {config.kernel_names} with 2 or more axes) "
          f"nor an embedding table (a 2-D leaf named one of {EMBEDDING_NAMES}); kernels "
          f"include {listing(kernels)}.")
  return chosen


def _check_pattern_keys(name: str, patterns: Mapping, targeted: list[str]) -> None:
  for pattern in patterns:
    if not any(re.search(pattern, p) for p in targeted):
      raise ValueError(f"{name} pattern {pattern!r} matched no targeted kernel; targeted paths "
                       f"include {listing(targeted)}.")


def _axes_for(config: LoraConfig, path: str, shape, uses) -> str:
  roles = next((r for p, r in config.axes_pattern.items() if re.search(p, path)), None)
  if roles is None and uses is not None and path in uses:
    roles = getattr(uses[path], "axes", uses[path])
  if roles is None and len(shape) == 2:
    roles = "io"
  if roles is None:
    raise ValueError(
        f"kernel {path!r} has shape {tuple(shape)}: which axes are input, output or stacked "
        f"layers is ambiguous; pass uses=lora_jax.analyze(fn, params, *args) or "
        f"LoraConfig(axes_pattern={{pattern: roles}}) with roles such as 'ioo' or 'lio'.")
  check_roles(f"axes for {path!r}", roles)
  if len(roles) != len(shape):
    raise ValueError(f"axes {roles!r} for kernel {path!r} name {len(roles)} axes but the kernel "
                     f"has shape {tuple(shape)}; give one role per axis.")
  return roles


def _target(config, path, leaf, uses, keys) -> Target:
  axes = _axes_for(config, path, leaf.shape, uses)
  consumers = getattr(uses.get(path), "consumers", ()) if uses else ()
  target = Target(path=path, shape=tuple(leaf.shape), dtype=leaf.dtype, axes=axes,
                  rank=config.rank_for(path), alpha=config.alpha_for(path),
                  scale=config.scale_for(path),
                  route=getattr(uses.get(path), "route", None) if uses else None, keys=keys,
                  kind=config.kind,
                  embedding=_is_embedding(keys, leaf) or "gather" in consumers)
  target = _per_layer(config, target)
  limit = min(target.in_features, target.out_features)
  if target.rank > limit:
    raise ValueError(f"rank {target.rank} for kernel {path!r} is larger than min(in, out) = "
                     f"{limit} (in {target.in_features}, out {target.out_features}); use a rank "
                     f"<= {limit} (rank_pattern sets it per path).")
  return target


def _per_layer(config: LoraConfig, target: Target) -> Target:
  """``target`` with the settings its layers' unrolled paths get (one rank, alpha and scale
  when they agree; one per layer, padded to the largest rank, when they do not)."""
  if not (config.rank_pattern or config.alpha_pattern):
    return target
  paths = target.layer_paths()
  settings = [(config.rank_for(target.path, p), config.alpha_for(target.path, p),
               config.scale_for(target.path, p)) for p in paths]
  if not settings:
    return target
  if len(set(settings)) == 1:
    rank, alpha, scale = settings[0]
    return dataclasses.replace(target, rank=rank, alpha=alpha, scale=scale)
  ranks, alphas, scales = (tuple(x) for x in zip(*settings))
  return dataclasses.replace(target, rank=max(ranks), ranks=ranks, alphas=alphas, scales=scales)


def resolve(config: LoraConfig, params, *, uses: Mapping | None = None
            ) -> tuple[list[Target], list["Extra"]]:
  """The kernels of ``params`` that ``config`` adapts and the leaves it trains in full
  (``modules_to_save``, and the biases ``bias`` trains in place), each in tree order.

  Args:
    config: the LoraConfig.
    params: the base parameter pytree, concrete or abstract (``jax.eval_shape``).
    uses: optional ``{path: KernelUse or roles}`` from ``lora_jax.analyze``, which supplies the
      axis roles of kernels with more than two axes and the route each kernel takes.

  Raises:
    ValueError: a pattern matches nothing, selects a leaf that is not a matmul kernel, a rank
      does not fit, a kernel's axis roles are unknown, or a leaf is both adapted and saved.
  """
  flat = base_leaves(params)
  keys = {_tree.join(k): k for k in flat}
  leaves = {p: flat[k] for p, k in keys.items()}
  targets = _targets(config, keys, leaves, uses)
  extras = _extras(config, keys, leaves)
  _check_disjoint(targets, extras)
  extras += _biases(config, keys, leaves, targets)
  order = {p: i for i, p in enumerate(leaves)}
  return targets, sorted(extras, key=lambda e: order[e.path])


def _targets(config: LoraConfig, keys, leaves, uses) -> list[Target]:
  kernels = {p: leaf for p, leaf in leaves.items() if _is_kernel(config, keys[p], leaf)}
  tables = {p for p, leaf in leaves.items() if _is_embedding(keys[p], leaf)}
  chosen: set[str] = set()
  for pattern in config.target_patterns:
    chosen |= _match_pattern(config, pattern, leaves, kernels, tables)
  chosen = {p for p in chosen if not any(re.search(e, p) for e in config.exclude_patterns)}
  targeted = [p for p in leaves if p in chosen]
  if not targeted and config.target_patterns:
    raise ValueError(f"targets {config.targets!r} minus exclude {config.exclude!r} left no "
                     f"kernel to adapt; kernels include {listing(kernels)}.")
  _check_pattern_keys("axes_pattern", config.axes_pattern, targeted)
  targets = [_target(config, p, leaves[p], uses, keys[p]) for p in targeted]
  layers = [p for t in targets for p in t.layer_paths()]  # patterns may name single layers
  for name in ("rank_pattern", "alpha_pattern"):
    _check_pattern_keys(name, getattr(config, name), targeted + layers)
  return targets


@dataclasses.dataclass(frozen=True)
class Extra:
  """One parameter trained in full beside the adapters: a ``LoraConfig.modules_to_save`` leaf
  (PEFT trains a copy: counted twice in the total), or a bias that ``LoraConfig.bias`` trains
  (``in_place``: PEFT trains the original, counted once)."""

  path: str  # '/'-joined, for display
  shape: tuple[int, ...]
  dtype: Any
  keys: tuple[str, ...] = ()
  in_place: bool = False

  @property
  def num_params(self) -> int:
    return math.prod(self.shape)


def _extras(config: LoraConfig, keys, leaves) -> list[Extra]:
  """The leaves ``config.modules_to_save`` trains in full; a pattern matching none is an
  error."""
  chosen = set()
  for pattern in config.save_patterns:
    matched = {p for p in leaves if re.search(pattern, p)}
    if not matched:
      raise ValueError(f"modules_to_save pattern {pattern!r} matched no parameter; available "
                       f"paths include {listing(leaves)}.")
    chosen |= matched
  return [Extra(path=p, shape=_shape(x), dtype=_dtype(x), keys=keys[p])
          for p, x in leaves.items() if p in chosen]


def trains_bias(config: LoraConfig, keys: _tree.Path, targeted) -> bool:
  """Whether ``config.bias`` trains the leaf at ``keys`` in place, as PEFT's
  ``_mark_only_adapters_as_trainable`` does: ``"all"``, every leaf named ``bias`` (PyTorch's
  ``name.endswith(".bias")``); ``"lora_only"``, the ``bias`` in the module of a kernel in
  ``targeted`` (key tuples of adapted kernels). A leaf ``modules_to_save`` selects is not: PEFT
  wraps it whole, and trains its copy."""
  if config.bias == "none" or not keys or keys[-1] != "bias":
    return False
  if any(re.search(p, _tree.join(keys)) for p in config.save_patterns):
    return False
  return config.bias == "all" or any(t[:-1] == keys[:-1] for t in targeted)


def _biases(config: LoraConfig, keys, leaves, targets) -> list[Extra]:
  """The biases ``config.bias`` trains in place (``trains_bias``), floating-point leaves."""
  targeted = {t.keys for t in targets}
  return [Extra(path=p, shape=_shape(x), dtype=_dtype(x), keys=keys[p], in_place=True)
          for p, x in leaves.items() if trains_bias(config, keys[p], targeted)
          and jnp.issubdtype(_dtype(x), jnp.inexact)]


def _check_disjoint(targets, extras) -> None:
  both = sorted({t.path for t in targets} & {e.path for e in extras})
  if both:
    raise ValueError(f"{listing(both)} is both a LoRA target and in modules_to_save; a kernel is "
                     f"either adapted or trained in full: drop it from one (exclude= helps).")


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Trainable and total parameters, with PEFT's ``print_trainable_parameters`` convention:
  total = base parameters + adapter parameters."""

  trainable: int
  total: int

  @property
  def percent(self) -> float:
    return 100.0 * self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
            f"trainable%: {self.percent:.4f}")


def num_params(tree) -> int:
  """Parameters in ``tree`` as PEFT counts them: floating-point leaves only (an NNX state's
  RNG keys and counters are not parameters), and only the ``"params"`` collection of a Flax
  linen variables dict (``batch_stats`` and other collections are buffers, not parameters).
  A kernel-kind leaf (a quantized kernel) counts at its dense size, as PEFT counts 4-bit
  weights at their unquantized size."""
  if isinstance(tree, Mapping) and "params" in tree:
    tree = tree["params"]
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=kernels.is_kind)
  return sum(size(x) for x in leaves if jnp.issubdtype(_dtype(x), jnp.inexact))


def _dtype(leaf):
  return getattr(leaf, "dtype", None) or jnp.result_type(leaf)


def count(base, adapters, *, config: LoraConfig | None = None) -> ParamCount:
  """Trainable (adapter) and total (base + adapter) parameter counts, as PEFT prints them.

  ``adapters`` is the trainable tree: LoraWeights and any trained extras. A ``modules_to_save``
  extra PEFT counts once in the trainable count and twice in the total (the frozen original
  and the trained copy); a bias ``config.bias`` trains PEFT trains in place, so it counts once,
  in the trainable count only. Without ``config`` every extra counts as a ``modules_to_save``
  copy. An adapter counts its true per-layer ranks, not the zero padding of a stacked one
  (``LoraWeights.num_params``). Works on concrete arrays and on ``jax.ShapeDtypeStruct``
  trees alike; see ``num_params`` for what counts as a base parameter.
  """
  flat = _tree.flatten(adapters, is_leaf=kinds.is_adapter)
  trainable = sum(x.num_params if kinds.is_adapter(x) else size(x) for x in flat.values())
  in_place = 0
  if config is not None and config.bias != "none":
    lora = {k: x for k, x in flat.items() if kinds.is_adapter(x)}
    in_place = sum(size(x) for k, x in flat.items()
                   if k not in lora and trains_bias(config, k, lora))
  return ParamCount(trainable=trainable, total=num_params(base) + trainable - in_place)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every adapted kernel with shape, rank, alpha, scale and adapter size, and the totals."""

  targets: tuple[Target, ...]
  base_params: int
  extras: tuple[Extra, ...] = ()

  @property
  def counts(self) -> ParamCount:
    trainable = sum(t.num_params for t in (*self.targets, *self.extras))
    in_place = sum(e.num_params for e in self.extras if e.in_place)
    return ParamCount(trainable=trainable, total=self.base_params + trainable - in_place)

  @property
  def fallbacks(self) -> tuple[Target, ...]:
    """Targets that analyze() saw used outside a matrix product (computed merged)."""
    return tuple(t for t in self.targets if t.route == "merged")

  def __str__(self) -> str:
    routes = any(t.route for t in self.targets)
    header = ("path", "shape", "axes", "rank", "alpha", "scale", "params") + ("route",) * routes
    rows = [header] + [(t.path, "x".join(map(str, t.shape)), t.axes,
                        _per_layer_text(t.ranks, t.rank), _per_layer_text(t.alphas, t.alpha),
                        _per_layer_text(t.scales, t.scale), f"{t.num_params:,d}")
                       + (t.route or "-",) * routes for t in self.targets]
    rows += [(e.path, "x".join(map(str, e.shape)), "-", "-", "-", "-", f"{e.num_params:,d}")
             + ("bias" if e.in_place else "saved",) * routes for e in self.extras]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    saved = sum(not e.in_place for e in self.extras)
    biases = len(self.extras) - saved
    parts = [f"{len(self.targets)} kernels adapted"]
    parts += [f"{saved} parameters trained in full (modules_to_save)"] * bool(saved)
    parts += [f"{biases} biases trained in place (bias)"] * bool(biases)
    summary = f"{', '.join(parts)}; {self.counts}"
    if self.fallbacks:
      summary += f"; {len(self.fallbacks)} used outside a matmul (merged fallback)"
    return "\n".join(lines + [summary])


def _per_layer_text(values, value) -> str:
  """A table cell: ``value``, or per-layer ``values`` as the most common one and the layers
  that differ, e.g. ``8 [0: 4, 3: 2]``."""
  if not values:
    return f"{value:g}"
  common = max(values, key=values.count)
  others = ", ".join(f"{i}: {v:g}" for i, v in enumerate(values) if v != common)
  return f"{common:g} [{others}]" if others else f"{common:g}"


def plan(config: LoraConfig, params, *, uses: Mapping | None = None) -> Plan:
  """The adaptation plan for ``params`` under ``config``, before any weight is created.

  Args:
    config: the LoraConfig.
    params: the base parameter pytree, concrete or abstract.
    uses: optional result of ``lora_jax.analyze`` (axis roles and routes).

  Returns:
    A Plan; ``print(plan)`` shows one row per kernel and the PEFT-style totals.
  """
  targets, extras = resolve(config, params, uses=uses)
  return Plan(targets=tuple(targets), base_params=num_params(params), extras=tuple(extras))
