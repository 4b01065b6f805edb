"""LoraConfig: what to adapt and how (Hu et al. 2021, "LoRA", arXiv:2106.09685).

Every targeted kernel ``W`` acts as ``W + scale * A @ B`` with ``A: (in, rank)``,
``B: (rank, out)`` and ``scale = alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA,
Kalajdzievski 2023, arXiv:2312.03732).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import kinds

ALL_LINEAR = "all-linear"
"""Preset target: every matmul kernel except the output head (as PEFT's ``"all-linear"``)."""

HEAD_PATTERN = r"(^|/)(lm_head|head|output_head|classifier|score|qa_outputs)(/|$)"
"""Module names treated as the output head and left out by the ``all-linear`` preset."""

INITS = ("kaiming_uniform", "gaussian", "pissa", "olora")  # and "pissa_niter_<N>"
_PISSA_NITER = re.compile(r"pissa_niter_[1-9]\d*")
BIASES = ("none", "all", "lora_only")  # PEFT's LoraConfig.bias
AXIS_ROLES = "lio"  # l: stacked-layer axis, i: input (contracted) axis, o: output axis


class Serializable:
  """``to_dict`` / ``from_dict`` for a dataclass of options: the one serializer of
  ``LoraConfig`` and the application's run options. Values become JSON (and YAML) types:
  dtypes their names, tuples lists, mappings dicts; ``from_dict`` turns them back by the
  field's annotation and refuses unknown fields by name."""

  def to_dict(self) -> dict:
    return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, data: Mapping):
    if not isinstance(data, Mapping):
      raise ValueError(f"{cls.__name__} options must be a mapping of field names to values, got "
                       f"{type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
      raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; known fields: "
                       f"{', '.join(fields)}.")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(hints.get(k), v) for k, v in data.items()})


def _plain(value):
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):  # a NumPy scalar: its Python value
    return value.item()
  if value is None or isinstance(value, (bool, numbers.Number, str)):
    return value
  try:
    return jnp.dtype(value).name  # a dtype, or a type such as jnp.float32
  except TypeError:
    return str(value)


def _typed(hint, value):
  """A JSON / YAML ``value`` back to the field's type: lists to tuples where the field holds
  tuples, and numbers written as text (YAML reads ``1e-3`` as a string) to numbers where the
  field holds numbers and not text. A value that does not convert is left for the field's
  own check, which names the field."""
  if isinstance(value, list) and _allows(hint, (tuple, Sequence)):
    return tuple(value)
  if isinstance(value, str) and not _allows(hint, (str,)):
    for kind in (int, float):
      if _allows(hint, (kind,)):
        try:
          return kind(value)
        except ValueError:
          continue
  return value


def _allows(hint, kinds) -> bool:
  if hint is None:
    return False
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return any(_allows(h, kinds) for h in typing.get_args(hint))
  return origin in kinds or hint in kinds


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(Serializable):
  """Which kernels get low-rank adapters, and with which rank, alpha and init.

  Args:
    targets: a regular expression, or a sequence of them, searched (``re.search``) in
      '/'-joined parameter paths such as ``layers_3/attn/query/kernel``; or ``"all-linear"``.
      A pattern selects the matmul kernels on matching paths; a pattern that matches
      nothing, or only leaves that are not kernels, is an error. May be empty (``()``) when
      ``modules_to_save`` names what to train.
    rank: r, the inner dimension of A (in, r) and B (r, out).
    alpha: the numerator of the scale ``alpha / rank``.
    rank_pattern: ``{pattern: rank}`` overrides per path; the first matching pattern wins.
      For a kernel in the scanned layer stack of a registered model family
      (``lora_jax.family``), a pattern is also matched against each layer's path in the
      unrolled model (``model/layers_3/...`` for layer 3 of ``model/layers/...``): layers
      given different ranks share one stacked adapter, padded to the largest rank.
    alpha_pattern: ``{pattern: alpha}`` overrides per path, matched as ``rank_pattern``; the
      first matching pattern wins.
    axes_pattern: ``{pattern: roles}`` for kernels with more than two axes: one letter per
      axis, ``l`` a stacked-layer axis, ``i`` an input axis, ``o`` an output axis, e.g.
      ``"ioo"`` for a DenseGeneral query kernel (d, heads, head_dim), ``"lio"`` for a
      scanned Dense stack (layers, d, k). ``analyze`` infers these from the model.
    exclude: patterns of paths never to adapt (applied after ``targets``).
    dropout: dropout rate on the adapter branch's input (training only).
    init: ``"kaiming_uniform"`` (PEFT's default for A), ``"gaussian"`` (A ~ N(0, 1/r)), or
      one that starts A and B from W and leaves the residual in the base (``lora_jax.inits``;
      use ``lora_jax.init_with_base``): ``"pissa"`` (the top-r singular triplets),
      ``"pissa_niter_<N>"`` (from a randomized SVD with N subspace iterations), ``"olora"``
      (the QR decomposition).
    use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    kind: the adapter kind, by its registered name (``lora_jax.kinds.names()``): ``"lora"``
      (``W + s·A@B``, the default) or another registered kind, whose own docs say what it
      trains beside A and B.
    dtype: dtype of A and B, float32 by default whatever the base dtype.
    kernel_names: leaf names that are matmul kernels (Flax calls them ``kernel``).
    modules_to_save: patterns (searched like ``targets``) of parameters trained in full beside
      the adapters, as PEFT's ``modules_to_save``: a new classifier head, a layer norm. Every
      leaf on a matching path gets a trained copy in the adapter tree; PEFT counts it twice
      in the total (the original and the copy) and once in the trainable count.
    bias: PEFT's ``bias``: ``"none"``; ``"all"``, every leaf named ``bias`` (PyTorch's
      ``*.bias``: Dense and LayerNorm biases alike) is trained; ``"lora_only"``, the ``bias``
      beside each adapted kernel (in its module) is trained. A trained bias is held like a
      ``modules_to_save`` leaf (a trained copy in the adapter tree) but PEFT trains it in
      place, so it counts once, in the trainable count only; a bias that ``modules_to_save``
      also selects is a ``modules_to_save`` copy, as in PEFT.
  """

  targets: str | Sequence[str]
  rank: int = 8
  alpha: float = 8.0
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  axes_pattern: Mapping[str, str] = dataclasses.field(default_factory=dict)
  exclude: str | Sequence[str] = ()
  dropout: float = 0.0
  init: str = "kaiming_uniform"
  use_rslora: bool = False
  kind: str = "lora"
  dtype: Any = jnp.float32
  kernel_names: Sequence[str] = ("kernel",)
  modules_to_save: str | Sequence[str] = ()
  bias: str = "none"

  def __post_init__(self):
    for name in ("targets", "exclude", "modules_to_save"):  # lists compare equal to tuples
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    _check_rank("rank", self.rank)
    _check_alpha("alpha", self.alpha)
    for name in ("rank_pattern", "alpha_pattern", "axes_pattern"):
      _check_mapping(name, getattr(self, name))
    for pattern, rank in self.rank_pattern.items():
      _check_rank(f"rank_pattern[{pattern!r}]", rank)
    for pattern, alpha in self.alpha_pattern.items():
      _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
    for pattern, roles in self.axes_pattern.items():
      check_roles(f"axes_pattern[{pattern!r}]", roles)
    for pattern in (*self.target_patterns, *self.exclude_patterns, *self.rank_pattern,
                    *self.alpha_pattern, *self.axes_pattern, *self.save_patterns):
      _check_regex(pattern)
    object.__setattr__(self, "kernel_names", _as_patterns("kernel_names", self.kernel_names))
    if not (is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
      raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}.")
    if not (isinstance(self.init, str) and (self.init in INITS
                                             or _PISSA_NITER.fullmatch(self.init))):
      raise ValueError(f"init must be one of {INITS} or 'pissa_niter_<N>' (N >= 1 subspace "
                       f"iterations), got {self.init!r}.")
    if not isinstance(self.use_rslora, bool):
      raise ValueError(f"use_rslora must be True or False, got {self.use_rslora!r}.")
    if not isinstance(self.kind, str):
      raise ValueError(f"kind must be an adapter kind's name (a string: one of "
                       f"{', '.join(kinds.names())}), got {self.kind!r}.")
    kinds.named(self.kind)  # raises, listing the registered kinds
    _check_dtype(self.dtype)
    if self.bias not in BIASES:
      raise ValueError(f"bias must be one of {BIASES} (PEFT's LoraConfig.bias), got "
                       f"{self.bias!r}.")

  def __hash__(self):  # dict fields: hash their items, so a config can be a static argument
    items = lambda m: tuple(sorted(m.items()))  # noqa: E731
    return hash((self.target_patterns, self.rank, self.alpha, items(self.rank_pattern),
                 items(self.alpha_pattern), items(self.axes_pattern), self.exclude_patterns,
                 self.dropout, self.init, self.use_rslora, self.kind,
                 str(jnp.dtype(self.dtype)),
                 self.kernel_names, self.save_patterns, self.bias))

  @property
  def changes_base(self) -> bool:
    """Whether ``init`` moves part of each adapted kernel into A and B (PiSSA, OLoRA), so the
    base to train on is a residual (``lora_jax.init_with_base``)."""
    return self.init in ("pissa", "olora") or _PISSA_NITER.fullmatch(self.init) is not None

  @property
  def target_patterns(self) -> tuple[str, ...]:
    return _as_patterns("targets", self.targets, allow_empty=bool(self.save_patterns))

  @property
  def save_patterns(self) -> tuple[str, ...]:
    """``modules_to_save`` as a tuple of patterns."""
    return _as_patterns("modules_to_save", self.modules_to_save, allow_empty=True)

  @property
  def exclude_patterns(self) -> tuple[str, ...]:
    return _as_patterns("exclude", self.exclude, allow_empty=True)

  @classmethod
  def from_dict(cls, data: Mapping) -> "LoraConfig":
    """The inverse of ``to_dict`` (dtype from its name, lists back to tuples)."""
    values = dict(data) if isinstance(data, Mapping) else data
    if isinstance(values, dict) and isinstance(values.get("dtype"), str):
      values["dtype"] = jnp.dtype(values["dtype"])
    return super().from_dict(values)

  def rank_for(self, path: str, layer_path: str | None = None) -> int:
    """The rank for ``path``: the first matching ``rank_pattern`` entry, else ``rank``.

    ``layer_path``: for one layer of a stacked kernel, that layer's path in the unrolled
    model (``lora_jax.family.unrolled_path``); an entry matching either path applies.
    """
    return int(_first_match(self.rank_pattern, (path, layer_path), self.rank))

  def alpha_for(self, path: str, layer_path: str | None = None) -> float:
    """The alpha for ``path`` (and ``layer_path``, as ``rank_for``): the first matching
    ``alpha_pattern`` entry, else ``alpha``."""
    return float(_first_match(self.alpha_pattern, (path, layer_path), self.alpha))

  def scale_for(self, path: str, layer_path: str | None = None) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA, for ``path`` (and
    ``layer_path``, as ``rank_for``)."""
    rank = int(self.rank_for(path, layer_path))
    alpha = float(self.alpha_for(path, layer_path))
    return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def check_roles(name: str, roles: str) -> None:
  """Raises ValueError unless ``roles`` is a valid axis-role string (see ``axes_pattern``)."""
  if (not isinstance(roles, str) or set(roles) - set(AXIS_ROLES)
      or "i" not in roles or "o" not in roles):
    raise ValueError(
        f"{name} must be a string of axis roles, one of 'l' (stacked layers), 'i' (input) "
        f"or 'o' (output) per kernel axis with at least one 'i' and one 'o', got {roles!r}.")


def _first_match(patterns: Mapping[str, Any], paths: tuple, default):
  return next((v for p, v in patterns.items()
               if any(path is not None and re.search(p, path) for path in paths)), default)


def _as_patterns(name, value, allow_empty=False) -> tuple[str, ...]:
  if isinstance(value, str):
    return (value,)
  if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
    raise ValueError(f"{name} must be a string or a list of strings, got {value!r}.")
  if not value and not allow_empty:
    raise ValueError(f"{name} must name at least one pattern (or {ALL_LINEAR!r}; or set "
                     f"modules_to_save to train only whole modules), got {value!r}.")
  return tuple(value)


def _check_mapping(name: str, value) -> None:
  if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
    raise ValueError(f"{name} must be a dict from path patterns (strings) to values, "
                     f"got {value!r}.")


def _check_regex(pattern: str) -> None:
  if pattern == ALL_LINEAR:
    return
  try:
    re.compile(pattern)
  except (re.error, OverflowError, RecursionError) as e:
    raise ValueError(f"pattern {pattern[:80]!r} is not a valid regular expression: "
                     f"{e}.") from None


def _check_dtype(dtype) -> None:
  try:
    floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ValueError(f"dtype must be a floating dtype such as float32, got {dtype!r}.")


def is_real(x) -> bool:
  """A real number that is not a bool (NumPy scalars included)."""
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_rank(name: str, rank) -> None:
  if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {rank!r}.")


def _check_alpha(name: str, alpha) -> None:
  if not is_real(alpha) or not 0 < alpha < math.inf:
    raise ValueError(f"{name} must be a finite number > 0, got {alpha!r}.")
