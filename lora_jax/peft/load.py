"""A PEFT LoRA adapter folder onto the Flax params of a project model (``import_peft``)."""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _tree, family, kinds
from lora_jax._tree import listing
from lora_jax.adapters import LoraWeights, factor_shapes, static_scale
from lora_jax.config import LoraConfig
from lora_jax.peft import checks, layout
from lora_jax.peft.files import read_config, read_tensors
from lora_jax.peft.names import (CONFIG_FILE, WEIGHTS_FILE, grouped_patterns,
                                 kind_label, kind_of, model_fan_in_fan_out, pattern_value,
                                 patterns, torch_name)
from lora_jax.targets import EMBEDDING_NAMES, base_leaves, resolve

_FACTOR = re.compile(r"base_model\.model\.(?P<module>.+)\.(?:lora_(?P<factor>[AB])\.weight|"
                     r"lora_embedding_(?P<table>[AB])|(?P<vector>lora_\w+_vector))")


def _not_lora(key: str, vector: str | None, file) -> str:
  head = (f"{file}: tensor {key!r} is not a LoRA factor (base_model.model.<module>.lora_A.weight "
          f"or .lora_B.weight, or an embedding's .lora_embedding_A or .lora_embedding_B) but ")
  owners = [k for k in kinds.all() if kinds.peft_form(k) and vector in k.peft_vectors]
  if owners:
    return (f"{head}the {vector} of the adapter kind {kind_label(owners[0])}, which "
            f"{CONFIG_FILE} does not select: set those flags in it, or drop the tensor.")
  what = ("a trained bias on lora_B" if key.endswith("lora_B.bias") else
          "a modules_to_save copy, a trained bias or another non-LoRA weight")
  return (f"{head}{what}, which lora_jax adapters cannot hold (a module trained in full must be "
          f"listed in the config's modules_to_save, a trained bias needs the config's bias "
          f"\"all\" or \"lora_only\").")


def _factor_pairs(tensors: Mapping[str, np.ndarray], file, *, kind: type
                  ) -> dict[str, dict[str, tuple]]:
  """``{module name: {"A": (key, array), "B": (key, array)}}`` and the 1-D tensors the adapter
  ``kind`` has per module (``peft_vectors``), by name; every key a paired factor."""
  pairs: dict[str, dict[str, tuple]] = {}
  for key, value in tensors.items():
    m = _FACTOR.fullmatch(key)
    if m is None or (m["vector"] and m["vector"] not in kind.peft_vectors):
      raise ValueError(_not_lora(key, m and m["vector"], file))
    if not (value.ndim == 1 if m["vector"] else
            value.ndim == 2 or (m["factor"] and value.ndim > 2)):
      raise ValueError(f"{file}: tensor {key!r} has shape {value.shape}; LoRA factors are 2-D "
                       f"(a convolution's lora_A / lora_B 3-D or more) and an adapter kind's "
                       f"vectors 1-D.")
    factor = m["vector"] or m["factor"] or m["table"]
    pair = pairs.setdefault(m["module"], {})
    table = m["table"] is not None
    if factor in pair or (not m["vector"] and any(("lora_embedding_" in pair[f][0]) != table
                                                  for f in "AB" if f in pair)):
      raise ValueError(f"{file}: module {m['module']!r} has both lora_A / lora_B and "
                       f"lora_embedding_A / lora_embedding_B tensors; it is one or the other.")
    pair[factor] = (key, value)
  for module, pair in pairs.items():
    for factor, partner in (("A", "B"), ("B", "A"), *((v, "A") for v in kind.peft_vectors)):
      if factor in pair and partner not in pair:
        table = "_embedding" if "lora_embedding_" in pair[factor][0] else ""
        raise ValueError(f"{file}: tensor {pair[factor][0]!r} has no lora{table}_{partner} "
                         f"partner for module {module!r}.")
    for vector in kind.peft_vectors:
      if vector not in pair:
        raise ValueError(f"{file}: module {module!r} has no {vector}, which the adapter kind "
                         f"{kind_label(kind)} needs for every module.")
  return pairs


class _Kernel(NamedTuple):
  keys: tuple[str, ...]  # the pytree keys of the kernel leaf
  shape: tuple[int, ...]
  axes: str  # roles: l stacked layer, i input, o output
  table: bool = False  # an embedding table (PEFT's lora_embedding_A / _B)

  def size(self, role: str) -> int:
    return math.prod(n for n, r in zip(self.shape, self.axes) if r == role)


def _kernel_axes(path: str, shape, uses) -> str | None:
  if uses is not None and path in uses:
    return getattr(uses[path], "axes", uses[path])
  return {2: "io", 3: "lio"}.get(len(shape))


def _kernels(params, uses) -> dict[str, _Kernel]:
  """The matmul kernels and embedding tables of ``params`` with their axis roles (from
  ``uses``, else ``io`` for 2-D and ``lio`` for 3-D, a scanned Dense stack); kernels with
  unknown roles are left out."""
  out = {}
  for keys, leaf in base_leaves(params).items():
    shape = tuple(getattr(leaf, "shape", ()))
    path = _tree.join(keys)
    table = bool(keys) and keys[-1] in EMBEDDING_NAMES and len(shape) == 2
    named = table or (bool(keys) and keys[-1] == "kernel")
    axes = _kernel_axes(path, shape, uses) if named else None
    if axes and len(axes) == len(shape) and axes.count("l") <= 1:
      out[path] = _Kernel(keys, shape, axes, table)
  return out


def _module_index(kernels: Mapping[str, _Kernel], name_map) -> dict[str, tuple[str, int | None]]:
  """``{PyTorch module name: (Flax kernel path, layer index or None)}``, one per layer."""
  index: dict[str, tuple[str, int | None]] = {}
  for path, k in kernels.items():
    for layer in range(k.shape[k.axes.index("l")]) if "l" in k.axes else [None]:
      try:
        name = name_map(path, layer)
      except (KeyError, ValueError):  # a kernel the map cannot name; no tensor can refer to it
        break
      if name in index:
        raise ValueError(f"name_map gives the module name {name!r} for both {index[name][0]!r} "
                         f"and {path!r}.")
      index[name] = (path, layer)
  return index


def _conv_as_linear(a_key, a, b_key, b, path: str, k: _Kernel, file):
  """A ``Conv*d``'s ``lora_A.weight`` (r, in, *window) and ``lora_B.weight`` (out, r, 1, ...)
  as the (r, *window * in) and (out, r) factors of the Flax kernel (*window, in, out)."""
  n = a.ndim - 2
  if (k.axes != "i" * (n + 1) + "o" or b.ndim != a.ndim or any(d != 1 for d in b.shape[2:])
      or a.shape[1:] != (k.shape[-2], *k.shape[:-2])):
    raise ValueError(f"{file}: {a_key!r} has shape {a.shape} and {b_key!r} {b.shape}, a "
                     f"convolution's factors, which do not fit {path!r} of shape {k.shape} "
                     f"and axes {k.axes!r} (a Flax convolution kernel (*window, in, out) with "
                     f"axes 'i...io' needs lora_A (r, in, *window), lora_B (out, r, 1, ...); "
                     f"pass uses=lora_jax.analyze(...) for its axes).")
  r = a.shape[0]
  return np.moveaxis(a, 1, -1).reshape(r, -1), b.reshape(b.shape[0], r)


class _Entry(NamedTuple):
  path: str
  layer: int | None
  a: np.ndarray  # lora_A.weight (r, in)
  b: np.ndarray  # lora_B.weight (out, r)
  rank: int
  alpha: float
  vectors: dict  # the adapter kind's 1-D tensors (out,), by name (``peft_vectors``)


def _rank_alpha(data: dict, module: str) -> tuple[int, float]:
  """The config's ``(r, lora_alpha)`` for ``module``, after ``rank_pattern`` / ``alpha_pattern``."""
  return (pattern_value(data.get("rank_pattern") or {}, module, data.get("r", 8)),
          pattern_value(data.get("alpha_pattern") or {}, module, data.get("lora_alpha", 8)))


def _entry(module: str, pair: dict, index, kernels, data: dict, file, *, kind: type) -> _Entry:
  """One module's factors, checked against its base kernel and the config's rank."""
  (a_key, a), (b_key, b) = pair["A"], pair["B"]
  if module not in index:
    raise ValueError(f"{file}: tensor {a_key!r} names the module {module!r}, which is not a "
                     f"kernel of the base params; modules include {listing(index)}.")
  path, layer = index[module]
  k = kernels[path]
  if ("lora_embedding_" in a_key) != k.table:
    raise ValueError(f"{file}: {a_key!r} is {'a Linear' if k.table else 'an embedding'} "
                     f"factor, but {path!r} is {'an embedding table' if k.table else 'a kernel'}"
                     f"{' (PEFT names its factors lora_embedding_A / _B)' if k.table else ''}.")
  vectors = {n: pair[n] for n in kind.peft_vectors}
  if vectors and (a.ndim > 2 or k.table):
    raise ValueError(f"{file}: {next(iter(vectors.values()))[0]!r} is the adapter kind "
                     f"{kind_label(kind)} on {path!r}, an embedding table or a convolution, "
                     f"where lora_jax imports plain LoRA only.")
  if a.ndim > 2:
    a, b = _conv_as_linear(a_key, a, b_key, b, path, k, file)
  ins, outs = k.size("i"), k.size("o")
  if a.shape[1] != ins or b.shape[0] != outs:
    raise ValueError(f"{file}: {a_key!r} has shape {a.shape} and {b_key!r} {b.shape}, which do "
                     f"not fit the base kernel {path!r} of shape {k.shape} (lora_A needs "
                     f"(r, {ins}), lora_B ({outs}, r)).")
  rank, alpha = _rank_alpha(data, module)
  if a.shape[0] != rank or b.shape[1] != rank:
    raise ValueError(f"{file}: {a_key!r} has rank {a.shape[0]} and {b_key!r} rank {b.shape[1]}, "
                     f"but {CONFIG_FILE} gives rank {rank} for {module!r} (r, rank_pattern).")
  for key, v in vectors.values():
    if v.shape != (outs,):
      raise ValueError(f"{file}: {key!r} has shape {v.shape}; the base kernel {path!r} has "
                       f"{outs} output features.")
  return _Entry(path, layer, a, b, rank, float(alpha), {n: v for n, (_, v) in vectors.items()})


def _by_kernel(entries: Iterable[_Entry], file) -> dict[str, list[_Entry]]:
  """Entries grouped by Flax kernel. The layers of a stacked one may have different ranks or
  alphas only in a registered family's scanned layer stack, whose layers a LoraConfig names
  by their unrolled paths (``lora_jax.family.unrolled_path``)."""
  out: dict[str, list[_Entry]] = {}
  for e in entries:
    out.setdefault(e.path, []).append(e)
  for path, group in out.items():
    settings = sorted({(e.rank, e.alpha) for e in group})
    if len(settings) > 1 and family.unrolled_path(path, 0) is None:
      shown = ", ".join(f"rank {r} alpha {a:g}" for r, a in settings)
      raise ValueError(f"{file}: the layers of the stacked kernel {path!r} have different ranks "
                       f"or scales ({shown}), which a LoraConfig names per layer only in the "
                       f"layer stack of a registered model family (lora_jax.family); load onto "
                       f"the params of the model built unrolled.")
  return out


def _check_fan_in_fan_out(data: dict, kernels, expected: bool | None, file) -> bool:
  """The model's fan_in_fan_out, checked against the file's."""
  expected = model_fan_in_fan_out(kernels) if expected is None else expected
  if data.get("fan_in_fan_out", False) != expected:
    layers = "GPT-2 Conv1D (fan_in_fan_out true)" if expected else "Linear (fan_in_fan_out false)"
    raise ValueError(f"{file}: fan_in_fan_out is {str(data.get('fan_in_fan_out')).lower()}, but "
                     f"the base model's layers are {layers}: the adapter was saved for a "
                     f"different model (pass fan_in_fan_out= if the base is right).")
  return expected


def _anchored(values: Mapping[str, Any]) -> dict[str, Any]:
  return {f"^(?:{p})$": v for p, v in grouped_patterns(values).items()}


def _lora_config(data: dict, groups: Mapping[str, list[_Entry]], kernels,
                 extras: Mapping) -> LoraConfig:
  """The LoraConfig that makes these kernels' adapters with lora_jax.init / plan."""
  rank, alpha = data.get("r", 8), float(data.get("lora_alpha", 8))
  settings = {}  # {kernel path, or a layer's unrolled path where the layers differ: entry}
  for path, group in groups.items():
    if len({(e.rank, e.alpha) for e in group}) > 1:
      settings.update({family.unrolled_path(path, e.layer): e for e in group})
    else:
      settings[path] = group[0]
  return LoraConfig(
      modules_to_save=tuple(f"^(?:{p})$" for p in patterns(_tree.join(k) for k in extras)),
      targets=[f"^(?:{p})$" for p in patterns(groups)], rank=rank, alpha=alpha,
      rank_pattern=_anchored({p: e.rank for p, e in settings.items() if e.rank != rank}),
      alpha_pattern=_anchored({p: e.alpha for p, e in settings.items() if e.alpha != alpha}),
      axes_pattern=_anchored({p: kernels[p].axes for p in groups if kernels[p].axes != "io"}),
      dropout=float(data.get("lora_dropout", 0.0)), use_rslora=data.get("use_rslora", False),
      kind=kind_of(data).name, bias=data.get("bias", "none"),
      init="gaussian" if data.get("init_lora_weights") == "gaussian" else "kaiming_uniform")


def _adapter(target, group: list[_Entry], config: LoraConfig, kernel) -> LoraWeights:
  """The adapter of ``config.kind`` of one kernel; layers of a stacked kernel without tensors
  stay zero (the kind's ``from_peft`` keeps them at identity)."""
  a_shape, b_shape = factor_shapes(target)
  a, b = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
  for e in group:  # a layer of a smaller rank than the stack's fills its first e.rank
    at = () if e.layer is None else (e.layer,)
    a[(*at, ..., slice(e.rank))] = e.a.T.reshape(*a_shape[len(at):-1], e.rank)
    b[(*at, slice(e.rank))] = e.b.T.reshape(e.rank, *b_shape[len(at) + 1:])
  lw = LoraWeights(a=jnp.asarray(a, config.dtype), b=jnp.asarray(b, config.dtype),
                   axes=target.axes, dropout=0.0 if target.embedding else config.dropout,
                   **static_scale(target))
  vectors = {() if e.layer is None else (e.layer,): e.vectors for e in group}
  return kinds.named(config.kind).from_peft(lw, vectors, base=kernel)


def import_peft(directory, params, *, uses: Mapping | None = None,
                name_map: Callable[[str, int | None], str] = torch_name,
                fan_in_fan_out: bool | None = None) -> tuple[LoraConfig, dict]:
  """Reads a PEFT LoRA adapter folder onto the Flax params of the matching project model.

  Args:
    directory: the folder with adapter_config.json and adapter_model.safetensors.
    params: the base params (concrete or ``jax.eval_shape``-abstract), e.g. of
      ``lora_jax.models.BertModel``; scanned or unrolled layer stacks.
    uses: optional ``lora_jax.analyze`` result (or ``{path: roles}``) for kernels other than
      2-D Dense kernels, 3-D scanned Dense stacks and embedding tables (a convolution's
      kernel needs it: roles "i...io").
    name_map: ``(flax kernel path, layer index or None) -> PyTorch module name``; it raises
      KeyError or ValueError for kernels it cannot name (no tensor may refer to those).
    fan_in_fan_out: whether the torch model's layers are GPT-2 Conv1D; None: from the family.

  Returns:
    ``(config, adapters)``: a LoraConfig (exact path patterns, ``modules_to_save`` and
    ``bias`` included; ``lora_jax.init(config, params)`` makes a tree of the same layout) and
    the trainable tree: float32 factors, and the ``modules_to_save`` leaves and trained biases
    in their base leaves' dtype.
    Layers of a stacked kernel that the adapter leaves out (``layers_to_transform``) get zero
    factors. Layers of a scanned stack with their own rank or alpha (PEFT's ``rank_pattern``
    naming ``model.layers.0.self_attn.q_proj``) share one stacked adapter padded to the
    largest rank, with one scale per layer; the config names them by their unrolled paths
    (``^(?:params/model/layers_0/self_attn/q_proj/kernel)$``).

  Raises:
    FileNotFoundError: a missing file (named).
    ValueError: an unreadable file, anything lora_jax cannot reproduce exactly (other PEFT
      types, a bias on lora_B, a kind other than LoRA on embeddings or convolutions, a
      base-weight copy (PEFT's
      ``save_embedding_layers``) that is not the base's, a fan_in_fan_out that does not fit the
      model, the biases in the file not being exactly those the config's bias trains,
      different ranks or scales across the layers of a stacked kernel outside a
      registered family's layer stack), or a tensor that does
      not fit the base (the message names the file and the key); a NaN / Inf tensor, or a
      scale or update ``scale * B @ A`` beyond float32; factors of a module the config does
      not target by PEFT's rule (``target_modules``, ``layers_to_transform``,
      ``exclude_modules``; ``lora_jax.peft.checks``). Nothing is returned until
      everything is checked.
  Warns:
    PeftConfigWarning: adapter_config.json keys PEFT 0.21 does not know.
  """
  directory = pathlib.Path(directory)
  config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
  data = read_config(config_file)
  tensors = read_tensors(weights_file)
  checks.check_finite(tensors, weights_file)
  kernels = _kernels(params, uses)
  conv1d = _check_fan_in_fan_out(data, kernels, fan_in_fan_out, config_file)
  saved, biases, rest = _sorted_tensors(tensors, data)
  copies = {k: v for k, v in rest.items() if _BASE_COPY.fullmatch(k)}
  pairs = _factor_pairs({k: v for k, v in rest.items() if k not in copies}, weights_file,
                        kind=kind_of(data))
  if not pairs and not saved:
    raise ValueError(f"{weights_file} holds no LoRA factors.")
  index = _module_index(kernels, name_map)
  _check_base_copies(copies, pairs, index, kernels, base_leaves(params), weights_file)
  groups = _by_kernel([_entry(m, p, index, kernels, data, weights_file, kind=kind_of(data))
                       for m, p in pairs.items()], weights_file)
  checks.check_targets(data, pairs, config_file)
  checks.check_scales(pairs, {m: _rank_alpha(data, m) for m in pairs},
                            use_rslora=data.get("use_rslora", False), file=weights_file)
  extras = _extras(saved, params, name_map, conv1d, weights_file)
  config = _lora_config(data, groups, kernels, extras)
  try:
    targets, wanted = resolve(config, params)
  except ValueError as e:
    raise ValueError(f"{directory}: {e}") from None
  extras.update(_bias_values(biases, [e for e in wanted if e.in_place], pairs, params, name_map,
                             config.bias, weights_file))
  leaves = base_leaves(params)
  flat = {kernels[t.path].keys: _adapter(t, groups[t.path], config, leaves[kernels[t.path].keys])
          for t in targets}
  return config, _tree.nest({**flat, **extras})


_PEFT_WRAPPER = re.compile(r"\.(?:original_module|modules_to_save)(?=\.bias$)")


def _sorted_tensors(tensors: Mapping[str, np.ndarray], data: dict) -> tuple[dict, dict, dict]:
  """``(modules_to_save tensors, biases trained in place, the rest)``. With bias "all" PEFT
  also writes a ``modules_to_save`` module's frozen original (``<module>.original_module.bias``)
  and its copy a second time (``<module>.modules_to_save.bias``): both are left out."""
  modules = data.get("modules_to_save") or ()
  saved, biases, rest = {}, {}, {}
  for key, value in tensors.items():
    if _is_saved(key, modules):
      saved[key] = value
    elif data.get("bias", "none") == "none" or not key.endswith(".bias") or ".lora_" in key:
      rest[key] = value
    elif not _is_saved(_PEFT_WRAPPER.sub("", key), modules):
      biases[key] = value
  return saved, biases, rest


def _bias_values(tensors: Mapping[str, np.ndarray], in_place, adapted: Iterable[str], params,
                 name_map, bias: str, file) -> dict:
  """The biases trained in place, ``{leaf keys: array}``, from their tensors: exactly the
  ones ``bias`` trains (the extras ``in_place``), every layer of a stacked leaf."""
  wanted = layout.bias_keys({e.keys: e.shape for e in in_place}, adapted, name_map)
  unexpected = [k for k in tensors if k not in wanted]
  if unexpected:
    raise ValueError(f"{file}: tensor {unexpected[0]!r} is not a bias that bias={bias!r} trains "
                     f"on these params (of a module that is adapted: <module>.base_layer.bias); "
                     f"expected biases include {listing(wanted) or 'none'}.")
  missing = [k for k in wanted if k not in tensors]
  if missing:
    raise ValueError(f"{file}: bias={bias!r} trains {_tree.join(wanted[missing[0]][0])!r} but "
                     f"there is no tensor {missing[0]!r} (a stacked leaf needs every layer: "
                     f"load onto the params of the model built with scan_layers=False).")
  leaves, values = base_leaves(params), {}
  for key, (keys, layer) in wanted.items():
    shape = tuple(leaves[keys].shape)
    one = shape if layer is None else shape[1:]
    if tensors[key].size != math.prod(one):
      raise ValueError(f"{file}: tensor {key!r} has shape {tensors[key].shape}, which does not "
                       f"fit {_tree.join(keys)!r} of shape {shape}.")
    out = values.setdefault(keys, np.zeros(shape, np.float32))
    out[() if layer is None else layer] = tensors[key].reshape(one)
  return {k: jnp.asarray(v, leaves[k].dtype) for k, v in values.items()}


_BASE_COPY = re.compile(r"base_model\.model\.(?P<module>.+)\.base_layer\.weight")


def _check_base_copies(copies, pairs, index, kernels, leaves, file) -> None:
  """PEFT saves the base weights of the input and output embeddings beside an adapter that
  targets an embedding (``save_embedding_layers``, as ``<module>.base_layer.weight``) and
  loads them over the base's: each must be a copy of the base leaf (checked when the params
  are concrete), so the adapter alone gives PEFT's outputs."""
  for key, tensor in copies.items():
    module = _BASE_COPY.fullmatch(key)["module"]
    if module not in pairs or module not in index or index[module][1] is not None:
      raise ValueError(_not_lora(key, None, file))
    k = kernels[index[module][0]]
    value = tensor if k.table else tensor.T
    leaf = leaves[k.keys]
    if value.shape != k.shape:
      raise ValueError(f"{file}: {key!r} (PEFT's copy of the base weight) has shape "
                       f"{tensor.shape}, but the base {_tree.join(k.keys)!r} has {k.shape}: the "
                       f"adapter was saved on a model with another vocabulary or width.")
    if _concrete(leaf) and not np.array_equal(np.asarray(leaf, np.float32), value):
      raise ValueError(f"{file}: {key!r} (PEFT's copy of the base weight, which PEFT loads over "
                       f"the base's) differs from the base params' {_tree.join(k.keys)!r}; load "
                       f"onto the base the adapter was trained on.")


def _concrete(x) -> bool:
  return isinstance(x, np.ndarray) or (isinstance(x, jax.Array)
                                       and not isinstance(x, jax.core.Tracer))


def _is_saved(key: str, modules: Iterable[str]) -> bool:
  """Whether ``key`` is a ``modules_to_save`` tensor (PEFT matches a module by its name or a
  dotted suffix of it)."""
  if _FACTOR.fullmatch(key) or not key.startswith("base_model.model."):
    return False
  module = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
  return any(module == m or module.endswith("." + m) for m in modules)


def _saved_index(params, name_map) -> dict[str, tuple[tuple[str, ...], int | None]]:
  """``{"<module>.<param>": (leaf keys, layer or None)}`` for every leaf of ``params``."""
  index = {}
  for keys, leaf in base_leaves(params).items():
    path = _tree.join(keys)
    for layer in range(leaf.shape[0]) if layout.stacked(path) and leaf.shape else [None]:
      try:
        module = name_map(path, layer)
      except (KeyError, ValueError):
        break
      index[f"{module}.{layout.TORCH_PARAM.get(keys[-1], keys[-1])}"] = (keys, layer)
  return index


def _extras(saved: Mapping[str, np.ndarray], params, name_map, conv1d: bool, file) -> dict:
  """The ``modules_to_save`` leaves, ``{leaf keys: array}``, from their tensors; every layer of
  a stacked leaf must be present."""
  index, leaves = _saved_index(params, name_map), base_leaves(params)
  values: dict[tuple, np.ndarray] = {}
  filled: dict[tuple, set] = {}
  for key, tensor in saved.items():
    name = key.removeprefix("base_model.model.")
    if name not in index:
      raise ValueError(f"{file}: tensor {key!r} (modules_to_save) names no parameter of the base "
                       f"params; parameters include {listing(index)}.")
    keys, layer = index[name]
    shape = tuple(leaves[keys].shape)
    linear = keys[-1] == "kernel" and not (conv1d and layout.in_stack(_tree.join(keys)))
    value = tensor.T if linear else tensor
    if value.shape != (shape if layer is None else shape[1:]):
      raise ValueError(f"{file}: tensor {key!r} has shape {tensor.shape}, which does not fit "
                       f"{_tree.join(keys)!r} of shape {shape}.")
    out = values.setdefault(keys, np.zeros(shape, np.float32))
    out[() if layer is None else layer] = value
    filled.setdefault(keys, set()).add(layer)
  for keys, layers in filled.items():
    if None not in layers and len(layers) != leaves[keys].shape[0]:
      raise ValueError(f"{file}: modules_to_save holds {len(layers)} of the "
                       f"{leaves[keys].shape[0]} layers of {_tree.join(keys)!r}; all are needed.")
  return {k: jnp.asarray(v, leaves[k].dtype) for k, v in values.items()}

