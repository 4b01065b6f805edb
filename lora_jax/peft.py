"""Hugging Face PEFT interoperability: lora_jax adapters to and from PEFT's saved LoRA format.

``export_peft`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT 0.21's
``save_pretrained`` does, so ``peft.PeftModel.from_pretrained`` loads a lora_jax adapter onto the
matching transformers model; ``import_peft`` reads such a folder back onto the Flax params of
the project's model (``lora_jax.models``), concrete or ``jax.eval_shape``-abstract.

Names, one rule (``torch_name``): drop a leading ``params`` collection and the trailing
``kernel``, join with '.', and write the layer index after the layer-stack module of a
registered model family (``lora_jax.family``; this module names none):
``encoder/layer_3/attention/self/query/kernel`` (an unrolled stack) or
``encoder/layer/attention/self/query/kernel`` at index 3 of its stacked axis (a scanned stack)
is ``encoder.layer.3.attention.self.query``. Other models: ``name_map=``.

``modules_to_save`` extras are written under their module's name with PyTorch's parameter
names (``kernel`` and ``scale`` -> ``weight``, a Linear kernel transposed), e.g.
``base_model.model.classifier.weight``, and listed in the config's ``modules_to_save``.
Biases trained in place (``LoraConfig.bias``, PEFT's ``bias``) are written as PEFT's
``get_peft_model_state_dict`` writes them: ``base_model.model.<module>.bias``, and
``<module>.base_layer.bias`` for an adapted module (PEFT wraps it; the bias is its base
layer's).

Tensors: ``base_model.model.<module>.lora_A.weight`` is ``a.T`` (r, in) and ``lora_B.weight``
is ``b.T`` (out, r), as ``torch.nn.Linear`` stores (out, in); kernels with several input or
output axes are flattened. GPT-2's ``Conv1D`` layers (``fan_in_fan_out``) use the same A and B.
An embedding table (a leaf named ``embedding``, (vocab, features)) has PEFT's
``lora_embedding_A`` (r, vocab) = ``a.T`` and ``lora_embedding_B`` (features, r) = ``b.T``
(no ``.weight``). A convolution's kernel (*window, in, out) (a kernel ``analyze`` saw as a
``conv_general_dilated`` filter) has a ``torch.nn.Conv*d`` layout: ``lora_A.weight``
(r, in, *window) and ``lora_B.weight`` (out, r, 1, ...) from a (*window, in, r), b (r, out).
The scale is not stored: it is ``lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``) after
PEFT's ``rank_pattern`` and ``alpha_pattern``, which match a regular expression against the
end of the dotted module name (``peft.utils.other.get_pattern_key``); the first key wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _files, _peft_checks, _tree, family
from lora_jax._tree import listing
from lora_jax.adapters import LoraWeights, factor_shapes, split, static_scale
from lora_jax.config import BIASES, LoraConfig, is_real
from lora_jax.targets import EMBEDDING_NAMES, base_leaves, resolve, trains_bias

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_VERSION = "0.21.2"  # the PEFT release whose format this module writes and reads


_stack_re = family.stack_re  # the registered families' layer stacks, in a module path


# Every field PEFT 0.21's LoraConfig writes, with its default (``inference_mode`` as saved).
PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
    "auto_mapping": None, "base_model_name_or_path": None, "bias": "none", "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False,
    "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
    "peft_type": "LORA", "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": 8,
    "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": None, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}
# Fields that, when set, make the adapter more than W + s·A@B on kernels.
UNSUPPORTED = {
    "lora_bias": "a trained bias on lora_B",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "LoRA on bare nn.Parameters",
    "layer_replication": "replicated layers",
    "use_qalora": "QA-LoRA (pooled adapter inputs)",
    "alora_invocation_tokens": "activated LoRA (token-dependent adapters)",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (an SVD-truncated base weight)",
    "monteclora_config": "MonteCLoRA (sampled adapters)",
    "use_bdlora": "block-diagonal LoRA factors",
}
# init_lora_weights values that leave the base weights alone (pissa, olora, corda, loftq and
# lora_ga rewrite them when PEFT loads the adapter; mica is a LoRA variant).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")

_FACTOR = re.compile(r"base_model\.model\.(?P<module>.+)\.(?:lora_(?P<factor>[AB])\.weight|"
                     r"lora_embedding_(?P<table>[AB])|"
                     r"(?P<magnitude>lora_magnitude_vector))")


class PeftConfigWarning(UserWarning):
  """adapter_config.json holds keys PEFT 0.21 does not know (a newer PEFT wrote it)."""


def torch_name(path: str, layer: int | None = None) -> str:
  """The PyTorch module name of the Flax kernel at ``path`` ('/'-joined).

  Args:
    path: e.g. ``params/model/layers_5/self_attn/q_proj/kernel`` (unrolled) or
      ``params/encoder/layer/attention/self/query/kernel`` (scanned).
    layer: the index along the kernel's stacked layer axis (scanned stacks only).

  Returns:
    e.g. ``model.layers.5.self_attn.q_proj``, or ``encoder.layer.3.attention.self.query`` for
    the scanned path with ``layer=3``.

  Raises:
    ValueError: a layer index for a kernel outside a scanned stack, or none for one inside.
  """
  keys = path.split("/")
  module = "/".join(keys[1 if keys[0] == "params" else 0:-1])
  m = _stack_re().search(module)
  scanned = m is not None and m["index"] is None
  if scanned != (layer is not None):
    stacks = ", ".join(f.layer_stack for f in family.registered().values())
    raise ValueError(f"kernel {path!r} " + (
        "sits in a scanned layer stack and needs the layer index along its stacked axis."
        if scanned else f"has a stacked layer axis but no scanned layer stack ({stacks}) in "
        f"its path; pass name_map=callable(path, layer) for other models."))
  if m is not None:
    index = layer if scanned else m["index"]
    module = f"{module[:m.start()]}{m['stack']}/{index}{module[m.end():]}"
  return module.replace("/", ".")


def model_fan_in_fan_out(paths: Iterable[str]) -> bool:
  """Whether transformers stores the layers of the model with these Flax paths as Conv1D."""
  stacks = {m["stack"] for p in paths if (m := _stack_re().search(_tree.join(p) if
                                                                 isinstance(p, tuple) else p))}
  return any(f.conv1d for f in family.registered().values() if f.layer_stack in stacks)


def patterns(names: Iterable[str]) -> list[str]:
  """Regular expressions that together match exactly ``names`` (as whole strings), one per
  group of names differing only in their first number: ``a.0.b``, ``a.1.b`` -> ``a\\.(0|1)\\.b``.
  """
  groups: dict[tuple, list[str]] = {}
  for name in names:
    m = re.search(r"\d+", name)
    key = (name[:m.start()], name[m.end():]) if m else (name, None)
    groups.setdefault(key, []).append(m.group() if m else "")
  out = []
  for (head, tail), numbers in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
    numbers = sorted(set(numbers), key=lambda n: (len(n), n))
    if tail is None or len(numbers) == 1:
      out.append(re.escape(head + numbers[0] + (tail or "")))
    else:
      out.append(f"{re.escape(head)}({'|'.join(numbers)}){re.escape(tail)}")
  return out


def grouped_patterns(values: Mapping[str, Any]) -> dict[str, Any]:
  """``{pattern: value}`` matching exactly the names of ``values`` that share each value."""
  by_value: dict[Any, list[str]] = {}
  for name, value in values.items():
    by_value.setdefault(value, []).append(name)
  return {p: v for v, names in by_value.items() for p in patterns(names)}


def pattern_value(pattern_map: Mapping[str, Any], name: str, default):
  """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the value of the first key that
  matches a dotted suffix of the module ``name`` (``re.match(rf"(.*\\.)?({key})$", name)``)."""
  return next((v for k, v in pattern_map.items() if re.match(rf"(.*\.)?({k})$", name)), default)


# ---- export ------------------------------------------------------------------------------------

_TORCH_PARAM = {"kernel": "weight", "scale": "weight", "embedding": "weight"}  # else the same


def _torch_param(leaf: str, value: np.ndarray, conv1d: bool) -> tuple[str, np.ndarray]:
  """PyTorch's parameter name and layout for one Flax leaf of one layer: a Linear kernel (in,
  out) is stored (out, in); GPT-2's Conv1D keeps (in, out)."""
  if leaf == "kernel" and not conv1d:
    if value.ndim != 2:
      raise ValueError(f"a modules_to_save kernel of shape {value.shape} has no torch.nn.Linear "
                       f"layout; only 2-D kernels can be exported.")
    value = value.T
  return _TORCH_PARAM.get(leaf, leaf), np.ascontiguousarray(value)


def _stacked(path: str) -> bool:
  m = _stack_re().search(path.rsplit("/", 1)[0])
  return m is not None and m["index"] is None


def _in_stack(path: str) -> bool:
  """Whether ``path`` is in a family's layer stack (where GPT-2's layers are Conv1D; a head
  outside it is a torch.nn.Linear)."""
  return _stack_re().search(path.rsplit("/", 1)[0]) is not None


def _extra_tensors(extras, conv1d: bool, name_map) -> dict[str, np.ndarray]:
  """``{"<module>.<param>": tensor}`` for the trained ``modules_to_save`` leaves."""
  out = {}
  for keys, x in extras.items():
    path, value = _tree.join(keys), np.asarray(x, np.float32)
    for layer in range(value.shape[0]) if _stacked(path) else [None]:
      name, tensor = _torch_param(keys[-1], value if layer is None else value[layer],
                                  conv1d and _in_stack(path))
      out[f"{name_map(path, layer)}.{name}"] = tensor
  return out


def _bias_keys(biases: Mapping[tuple, tuple], adapted: Iterable[str], name_map
               ) -> dict[str, tuple[tuple[str, ...], int | None]]:
  """``{file key: (leaf keys, layer or None)}`` for the biases trained in place, given as
  ``{leaf keys: shape}``, one key per layer of a stacked leaf: ``<module>.bias``, or
  ``<module>.base_layer.bias`` for a module in ``adapted`` (PEFT's wrapped layers)."""
  adapted, out = set(adapted), {}
  for keys, shape in biases.items():
    path = _tree.join(keys)
    for layer in range(shape[0]) if _stacked(path) else [None]:
      name = name_map(path, layer)
      out[f"base_model.model.{name}{'.base_layer' if name in adapted else ''}.bias"] = (keys,
                                                                                        layer)
  return out


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def _check_agrees(path: str, lw: LoraWeights, config: LoraConfig, layer: int | None
                  ) -> tuple[int, float]:
  """``(rank, alpha)`` of the leaf at ``path`` (of one ``layer`` of a stacked one); raises
  ValueError unless they are the config's for ``path`` (and the layer's unrolled path)."""
  layer_path = None if layer is None else family.unrolled_path(path, layer)
  rank, alpha = config.rank_for(path, layer_path), config.alpha_for(path, layer_path)
  leaf_rank = lw.rank if lw.ranks is None else lw.ranks[layer]
  leaf_scale = lw.scale[layer] if isinstance(lw.scale, tuple) else lw.scale
  leaf_alpha = leaf_scale * (math.sqrt(leaf_rank) if config.use_rslora else leaf_rank)
  if leaf_rank != rank or not math.isclose(leaf_alpha, alpha, rel_tol=1e-6):
    where = f" (layer {layer})" if lw.per_layer else ""
    raise ValueError(
        f"adapter at {path!r}{where} has rank {leaf_rank} and scale {leaf_scale:g} (alpha "
        f"{leaf_alpha:g}), but the config gives rank {rank}, alpha {alpha:g}, scale "
        f"{config.scale_for(path, layer_path):g}{' (rsLoRA)' if config.use_rslora else ''}; "
        f"export with the LoraConfig the adapters were made with.")
  return rank, alpha


def _true_rank(path: str, layer, a: np.ndarray, b: np.ndarray, rank: int):
  """One layer's ``a (*in, width)`` and ``b (width, *out)`` cut to its true ``rank``; the
  padding beyond it must be zero (it is, unless something other than training set it)."""
  if np.any(a[..., rank:]) or np.any(b[rank:]):
    raise ValueError(f"adapter at {path!r} has nonzero entries beyond layer {layer}'s rank "
                     f"{rank} (columns of a, rows of b), which PEFT's tensors of that rank "
                     f"cannot hold; keep the padding of per-layer ranks zero.")
  return a[..., :rank], b[:rank]


def _layers(path: str, lw: LoraWeights) -> list[int | None]:
  stacked = lw.axes.count("l")
  if stacked > 1:
    raise ValueError(f"adapter at {path!r} has axes {lw.axes!r}: more than one stacked layer "
                     f"axis has no PyTorch module name.")
  return list(range(lw.a.shape[0])) if stacked else [None]


def _torch_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(lora_A.weight (r, in), lora_B.weight (out, r))`` from one layer's ``a (*in, r)`` and
  ``b (r, *out)``."""
  r = a.shape[-1]
  return np.ascontiguousarray(a.reshape(-1, r).T), np.ascontiguousarray(b.reshape(r, -1).T)


def _torch_conv_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(lora_A.weight (r, in, *window), lora_B.weight (out, r, 1, ...))``, a ``Conv*d``'s
  layout, from a Flax convolution's ``a (*window, in, r)`` and ``b (r, out)``."""
  n = a.ndim - 2  # window axes
  a = np.transpose(a, (n + 1, n, *range(n)))
  return np.ascontiguousarray(a), np.ascontiguousarray(b.T.reshape(*b.T.shape, *(1,) * n))


def _layout(path: str, lw: LoraWeights, uses) -> str:
  """How PEFT stores the adapter of the kernel at ``path``: ``"embedding"`` (a leaf named
  ``embedding``, or one ``uses`` saw looked up), ``"conv"`` (one ``uses`` saw as a
  convolution's filter, roles "i...io"), else ``"linear"``."""
  consumers = getattr((uses or {}).get(path), "consumers", ())
  if path.rsplit("/", 1)[-1] in EMBEDDING_NAMES or "gather" in consumers:
    kind = "embedding"
  elif "conv_general_dilated" in consumers:
    kind = "conv"
  else:
    return "linear"
  wanted = "io" if kind == "embedding" else "i" * (len(lw.axes) - 1) + "o"
  if lw.axes != wanted or isinstance(lw, _dora_kinds()):
    raise ValueError(f"adapter at {path!r} (axes {lw.axes!r}, {type(lw).__name__}) is on "
                     f"{'an embedding table' if kind == 'embedding' else 'a convolution'}, "
                     f"which PEFT stores only as plain LoRA with axes {wanted!r}.")
  return kind


def _dora_kinds() -> tuple[type, ...]:
  from lora_jax import dora  # an adapter kind built on adapters.py's
  return (dora.DoraWeights,)


def _layer_tensors(name: str, kind: str, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
  """PEFT's tensors of one module's factors (``a (*in, r)``, ``b (r, *out)``)."""
  prefix = f"base_model.model.{name}"
  if kind == "embedding":
    a, b = _torch_factors(a, b)
    return {f"{prefix}.lora_embedding_A": a, f"{prefix}.lora_embedding_B": b}
  a, b = (_torch_conv_factors if kind == "conv" else _torch_factors)(a, b)
  return {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}


def _check_pattern_lookup(pattern_map: dict, wanted: dict[str, Any], default) -> None:
  for name, value in wanted.items():
    if pattern_value(pattern_map, name, default) != value:
      raise ValueError(f"module {name!r} is a dotted suffix of another adapted module's name, so "
                       f"PEFT's rank_pattern / alpha_pattern cannot tell them apart.")


def peft_config(config: LoraConfig, modules: Mapping[str, tuple[int, float]], *,
                fan_in_fan_out: bool, base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> dict:
  """The adapter_config.json contents for ``{torch module name: (rank, alpha)}``."""
  ranks = {m: r for m, (r, _) in modules.items()}
  alphas = {m: _number(a) for m, (_, a) in modules.items()}
  rank_pattern = grouped_patterns({m: r for m, r in ranks.items() if r != config.rank})
  alpha_pattern = grouped_patterns({m: a for m, a in alphas.items() if a != config.alpha})
  _check_pattern_lookup(dict(sorted(rank_pattern.items())), ranks, config.rank)
  _check_pattern_lookup(dict(sorted(alpha_pattern.items())), alphas, _number(config.alpha))
  return {**PEFT_DEFAULTS, "r": config.rank, "lora_alpha": _number(config.alpha),
          "use_rslora": config.use_rslora, "use_dora": config.use_dora,
          "lora_dropout": float(config.dropout),
          "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
          "target_modules": "|".join(patterns(modules)), "rank_pattern": rank_pattern,
          "alpha_pattern": alpha_pattern, "fan_in_fan_out": fan_in_fan_out, "bias": config.bias,
          "base_model_name_or_path": base_model_name_or_path, "task_type": task_type}


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to a temporary file beside ``path``, then renames it over ``path``."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    _files.publish(tmp)  # mkstemp's file is the owner's only (0600)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def export_peft(directory, adapters, *, config: LoraConfig,
                base_model_name_or_path: str | None = None, task_type: str | None = None,
                name_map: Callable[[str, int | None], str] = torch_name,
                fan_in_fan_out: bool | None = None, initial=None,
                uses: Mapping | None = None) -> None:
  """Writes ``adapters`` as a PEFT LoRA adapter folder that ``PeftModel.from_pretrained`` loads.

  Trained extras are written as the biases PEFT trains in place where ``config.bias`` trains
  them (``lora_jax.targets.trains_bias``), as ``modules_to_save`` otherwise.

  Args:
    directory: the folder (created if needed); its two files are replaced atomically.
    adapters: the adapter tree (``lora_jax.init`` / training), on the params of a project model.
    config: the LoraConfig the adapters were made with; every leaf's rank and alpha (recovered
      from its scale) must agree with it.
    base_model_name_or_path: written to adapter_config.json (e.g. the Hub id of the base).
    task_type: PEFT's task type (``"CAUSAL_LM"``, ...), or None for a bare ``PeftModel``.
    name_map: ``(flax kernel path, layer index or None) -> PyTorch module name``.
    fan_in_fan_out: whether the torch layers are GPT-2 Conv1D; None: from the model family.
    initial: for a PiSSA / OLoRA ``config`` (trained on the residual base), the adapters
      ``lora_jax.init_with_base`` returned: the file then holds the plain LoRA adapter of rank
      2r on the original base (``lora_jax.convert_to_lora``; PEFT's
      ``path_initial_model_for_weight_conversion``), with r and lora_alpha doubled.

    uses: the ``lora_jax.analyze`` result of the model; kernels it saw as convolution filters
      are written in ``torch.nn.Conv*d``'s layout (without it, as Linear layers), tables it
      saw looked up as embeddings (a leaf named ``embedding`` is one anyway).


  Raises:
    ValueError: empty adapters, a leaf that disagrees with ``config``, module names that
      PEFT could not tell apart, a PiSSA / OLoRA config without ``initial``, or DoRA on an
      embedding table or a convolution.
  """
  if config.changes_base != (initial is not None):
    raise ValueError(
        f"init={config.init!r} adapters act on the residual base, so PEFT needs them converted "
        f"to a LoRA adapter on the original base: pass initial= (the adapters init_with_base "
        f"returned)." if config.changes_base else
        f"initial= converts PiSSA / OLoRA adapters, but config.init is {config.init!r}; drop it.")
  if initial is not None:
    from lora_jax import inits  # built on this package's adapters

    adapters = inits.convert_to_lora(adapters, initial=initial)
    config = inits.converted_config(config)
  lora, extras = split(adapters)
  if not lora:
    raise ValueError("adapters hold no LoraWeights; nothing to export (PEFT's LoRA format "
                     "needs at least one LoRA target; a run that trains only modules_to_save "
                     "is a full fine-tuning of those modules: save it with lora-jax merge).")
  flat = {_tree.join(p): lw for p, lw in lora.items()}
  tensors: dict[str, np.ndarray] = {}
  modules: dict[str, tuple[int, float]] = {}
  for path, lw in flat.items():
    kind = _layout(path, lw, uses)
    a_all, b_all = np.asarray(lw.a, np.float32), np.asarray(lw.b, np.float32)
    for layer in _layers(path, lw):
      rank, alpha = _check_agrees(path, lw, config, layer)
      name = name_map(path, layer)
      if name in modules:
        raise ValueError(f"name_map gives the module name {name!r} twice (again for {path!r}).")
      at = () if layer is None else layer
      tensors.update(_layer_tensors(name, kind, *_true_rank(path, layer, a_all[at], b_all[at],
                                                            rank)))
      if getattr(lw, "magnitude", None) is not None:  # DoRA: one per output feature
        tensors[f"base_model.model.{name}.lora_magnitude_vector"] = np.asarray(
            lw.magnitude, np.float32)[at].reshape(-1)
      modules[name] = (rank, alpha)
  paths = [*flat, *(_tree.join(p) for p in extras)]
  conv1d = model_fan_in_fan_out(paths) if fan_in_fan_out is None else fan_in_fan_out
  biases = {k: x for k, x in extras.items() if trains_bias(config, k, lora)}
  saved = _extra_tensors({k: x for k, x in extras.items() if k not in biases}, conv1d, name_map)
  tensors.update({f"base_model.model.{k}": v for k, v in saved.items()})
  for key, (keys, layer) in _bias_keys({k: x.shape for k, x in biases.items()}, modules,
                                       name_map).items():
    value = np.asarray(biases[keys], np.float32)
    tensors[key] = np.ascontiguousarray(value[() if layer is None else layer].reshape(-1))
  contents = peft_config(config, modules, fan_in_fan_out=conv1d, task_type=task_type,
                         base_model_name_or_path=base_model_name_or_path)
  if saved:
    contents["modules_to_save"] = sorted({k.rsplit(".", 1)[0] for k in saved})
  from safetensors.numpy import save

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _write_atomic(directory / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
  _write_atomic(directory / CONFIG_FILE, json.dumps(contents, indent=2, sort_keys=True).encode())


# ---- import ------------------------------------------------------------------------------------

def _is_rank(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _is_alpha(x) -> bool:
  return is_real(x) and 0 < x < math.inf


def _check_value(file, key: str, value, ok: Callable[[Any], bool], what: str) -> None:
  if not ok(value):
    raise ValueError(f"{file}: {key} must be {what}, got {value!r}.")


def _check_patterns(file, key: str, pattern_map, ok, what: str) -> None:
  _check_value(file, key, pattern_map, lambda m: isinstance(m, dict), "a dict")
  for k, v in pattern_map.items():
    _check_value(file, f"{key}[{k!r}]", v, ok, what)
    try:
      re.compile(k)
    except re.error as e:
      raise ValueError(f"{file}: {key} key {k!r} is not a valid regular expression: {e}.") from None


def _check_supported(data: dict, file) -> None:
  """Raises ValueError for anything in adapter_config.json lora_jax cannot reproduce exactly."""
  if data.get("peft_type") != "LORA":
    raise ValueError(f"{file}: peft_type is {data.get('peft_type')!r}; only LoRA adapters "
                     f"(peft_type \"LORA\") can be imported.")
  for key, what in UNSUPPORTED.items():
    if data.get(key):
      raise ValueError(f"{file}: {key}={data[key]!r} is not supported: {what} is not plain LoRA "
                       f"(W + s·A@B on kernels), which is all lora_jax adapters hold.")
  if data.get("bias", "none") not in BIASES:
    raise ValueError(f"{file}: bias={data['bias']!r} is not supported: PEFT's LoRA bias is one "
                     f"of {', '.join(BIASES)}.")
  init = data.get("init_lora_weights", True)
  if not any(init is v or (isinstance(v, str) and init == v) for v in PLAIN_INITS):
    raise ValueError(f"{file}: init_lora_weights={init!r} is not supported: PEFT rewrites the "
                     f"base weights (or adds a variant) for it when it loads the adapter; "
                     f"supported: {', '.join(map(repr, PLAIN_INITS))}.")


def _check_types(data: dict, file) -> None:
  _check_value(file, "r", data.get("r", 8), _is_rank, "an integer >= 1")
  _check_value(file, "lora_alpha", data.get("lora_alpha", 8), _is_alpha, "a number > 0")
  _check_patterns(file, "rank_pattern", data.get("rank_pattern") or {}, _is_rank,
                  "an integer >= 1")
  _check_patterns(file, "alpha_pattern", data.get("alpha_pattern") or {}, _is_alpha,
                  "a number > 0")
  for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
    _check_value(file, key, data.get(key, False), lambda x: isinstance(x, bool), "true or false")
  _check_value(file, "lora_dropout", data.get("lora_dropout", 0.0),
               lambda x: is_real(x) and 0 <= x < 1, "a number in [0, 1)")


def read_config(file) -> dict:
  """adapter_config.json, checked: a LoRA adapter lora_jax reproduces exactly.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not JSON, a field of the wrong type, or an unsupported feature.
  Warns:
    PeftConfigWarning: keys PEFT 0.21 does not know (ignored).
  """
  file = pathlib.Path(file)
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found; a PEFT adapter folder holds {CONFIG_FILE} and "
                            f"{WEIGHTS_FILE} (as written by save_pretrained).")
  try:
    data = json.loads(file.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{file} is not valid JSON: {e}.") from None
  if not isinstance(data, dict):
    raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}.")
  unknown = sorted(set(data) - set(PEFT_DEFAULTS) - {"runtime_config"})
  if unknown:
    warnings.warn(PeftConfigWarning(
        f"{file}: keys {unknown} are unknown to PEFT {PEFT_VERSION}'s LoraConfig (a newer PEFT "
        f"wrote them?) and are ignored."), stacklevel=3)
  _check_supported(data, file)
  _check_types(data, file)
  return data


def read_tensors(file) -> dict[str, np.ndarray]:
  """The tensors of adapter_model.safetensors as float32 NumPy arrays.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a readable safetensors file (truncated, corrupted header, ...).
  """
  from safetensors import safe_open

  file = pathlib.Path(file)
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found; a PEFT adapter folder holds {CONFIG_FILE} and "
                            f"{WEIGHTS_FILE} (as written by save_pretrained).")
  try:
    with safe_open(str(file), framework="flax") as f:  # flax: bfloat16 tensors too
      return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error type, or TypeError for a dtype
    raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); "
                     f"it may be truncated or corrupted.") from e


def _not_lora(key: str, file) -> str:
  what = ("DoRA's magnitude vector" if "lora_magnitude_vector" in key else
          "a trained bias on lora_B" if key.endswith("lora_B.bias") else
          "a modules_to_save copy, a trained bias or another non-LoRA weight")
  return (f"{file}: tensor {key!r} is not a LoRA factor (base_model.model.<module>.lora_A.weight "
          f"or .lora_B.weight, or an embedding's .lora_embedding_A or .lora_embedding_B) but "
          f"{what}, which lora_jax adapters cannot hold (a module trained in full must be "
          f"listed in the config's modules_to_save, a trained bias needs the config's bias "
          f"\"all\" or \"lora_only\").")


def _factor_pairs(tensors: Mapping[str, np.ndarray], file, *, dora: bool = False
                  ) -> dict[str, dict[str, tuple]]:
  """``{module name: {"A": (key, array), "B": (key, array)}}`` (and ``"M"``, DoRA's magnitude
  vector, when ``dora``); every key a paired factor."""
  pairs: dict[str, dict[str, tuple]] = {}
  for key, value in tensors.items():
    m = _FACTOR.fullmatch(key)
    if m is None or (m["magnitude"] and not dora):
      raise ValueError(_not_lora(key, file))
    if not (value.ndim == 1 if m["magnitude"] else
            value.ndim == 2 or (m["factor"] and value.ndim > 2)):
      raise ValueError(f"{file}: tensor {key!r} has shape {value.shape}; LoRA factors are 2-D "
                       f"(a convolution's lora_A / lora_B 3-D or more) and DoRA's magnitude "
                       f"vectors 1-D.")
    factor = "M" if m["magnitude"] else m["factor"] or m["table"]
    pair = pairs.setdefault(m["module"], {})
    table = m["table"] is not None
    if factor in pair or (factor != "M" and any(("lora_embedding_" in pair[f][0]) != table
                                                for f in "AB" if f in pair)):
      raise ValueError(f"{file}: module {m['module']!r} has both lora_A / lora_B and "
                       f"lora_embedding_A / lora_embedding_B tensors; it is one or the other.")
    pair[factor] = (key, value)
  for module, pair in pairs.items():
    for factor, partner in (("A", "B"), ("B", "A"), ("M", "A")):
      if factor in pair and partner not in pair:
        table = "_embedding" if "lora_embedding_" in pair[factor][0] else ""
        raise ValueError(f"{file}: tensor {pair[factor][0]!r} has no lora{table}_{partner} "
                         f"partner for module {module!r}.")
    if dora and "M" not in pair:
      raise ValueError(f"{file}: module {module!r} has no lora_magnitude_vector, which DoRA "
                       f"(use_dora) needs for every module.")
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
  m: np.ndarray | None = None  # DoRA's lora_magnitude_vector (out,)


def _rank_alpha(data: dict, module: str) -> tuple[int, float]:
  """The config's ``(r, lora_alpha)`` for ``module``, after ``rank_pattern`` / ``alpha_pattern``."""
  return (pattern_value(data.get("rank_pattern") or {}, module, data.get("r", 8)),
          pattern_value(data.get("alpha_pattern") or {}, module, data.get("lora_alpha", 8)))


def _entry(module: str, pair: dict, index, kernels, data: dict, file) -> _Entry:
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
  if "M" in pair and (a.ndim > 2 or k.table):
    raise ValueError(f"{file}: {pair['M'][0]!r} is DoRA on {path!r}, an embedding table or a "
                     f"convolution, where lora_jax imports plain LoRA only.")
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
  m = pair.get("M", (None, None))[1]
  if m is not None and m.shape != (outs,):
    raise ValueError(f"{file}: {pair['M'][0]!r} has shape {m.shape}; the base kernel {path!r} "
                     f"has {outs} output features.")
  return _Entry(path, layer, a, b, rank, float(alpha), m)


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
      use_dora=data.get("use_dora", False), bias=data.get("bias", "none"),
      init="gaussian" if data.get("init_lora_weights") == "gaussian" else "kaiming_uniform")


def _adapter(target, group: list[_Entry], config: LoraConfig, kernel) -> LoraWeights:
  """The LoraWeights (DoRA: DoraWeights) of one kernel; layers of a stacked kernel without
  tensors stay zero (DoRA: their magnitudes are the base columns' norms, the identity)."""
  a_shape, b_shape = factor_shapes(target)
  a, b = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
  for e in group:  # a layer of a smaller rank than the stack's fills its first e.rank
    at = () if e.layer is None else (e.layer,)
    a[(*at, ..., slice(e.rank))] = e.a.T.reshape(*a_shape[len(at):-1], e.rank)
    b[(*at, slice(e.rank))] = e.b.T.reshape(e.rank, *b_shape[len(at) + 1:])
  lw = LoraWeights(a=jnp.asarray(a, config.dtype), b=jnp.asarray(b, config.dtype),
                   axes=target.axes, dropout=0.0 if target.embedding else config.dropout,
                   **static_scale(target))
  if not config.use_dora:
    return lw
  from lora_jax import dora  # an adapter kind built on adapters.py's

  identity = dora.with_magnitude(dataclasses.replace(lw, b=jnp.zeros_like(lw.b)), kernel)
  m = np.array(identity.magnitude, np.float32)
  for e in group:
    at = () if e.layer is None else (e.layer,)
    m[at] = e.m.reshape(m.shape[len(at):])
  return dataclasses.replace(identity, b=lw.b, magnitude=jnp.asarray(m, config.dtype))


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
      types, a bias on lora_B, DoRA on embeddings or convolutions, a base-weight copy (PEFT's
      ``save_embedding_layers``) that is not the base's, a fan_in_fan_out that does not fit the
      model, the biases in the file not being exactly those the config's bias trains,
      different ranks or scales across the layers of a stacked kernel outside a
      registered family's layer stack), or a tensor that does
      not fit the base (the message names the file and the key); a NaN / Inf tensor, or a
      scale or update ``scale * B @ A`` beyond float32; factors of a module the config does
      not target by PEFT's rule (``target_modules``, ``layers_to_transform``,
      ``exclude_modules``; ``lora_jax._peft_checks``). Nothing is returned until
      everything is checked.
  Warns:
    PeftConfigWarning: adapter_config.json keys PEFT 0.21 does not know.
  """
  directory = pathlib.Path(directory)
  config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
  data = read_config(config_file)
  tensors = read_tensors(weights_file)
  _peft_checks.check_finite(tensors, weights_file)
  kernels = _kernels(params, uses)
  conv1d = _check_fan_in_fan_out(data, kernels, fan_in_fan_out, config_file)
  saved, biases, rest = _sorted_tensors(tensors, data)
  copies = {k: v for k, v in rest.items() if _BASE_COPY.fullmatch(k)}
  pairs = _factor_pairs({k: v for k, v in rest.items() if k not in copies}, weights_file,
                        dora=data.get("use_dora", False))
  if not pairs and not saved:
    raise ValueError(f"{weights_file} holds no LoRA factors.")
  index = _module_index(kernels, name_map)
  _check_base_copies(copies, pairs, index, kernels, base_leaves(params), weights_file)
  groups = _by_kernel([_entry(m, p, index, kernels, data, weights_file)
                       for m, p in pairs.items()], weights_file)
  _peft_checks.check_targets(data, pairs, config_file)
  _peft_checks.check_scales(pairs, {m: _rank_alpha(data, m) for m in pairs},
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
  wanted = _bias_keys({e.keys: e.shape for e in in_place}, adapted, name_map)
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
      raise ValueError(_not_lora(key, file))
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
    for layer in range(leaf.shape[0]) if _stacked(path) and leaf.shape else [None]:
      try:
        module = name_map(path, layer)
      except (KeyError, ValueError):
        break
      index[f"{module}.{_TORCH_PARAM.get(keys[-1], keys[-1])}"] = (keys, layer)
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
    linear = keys[-1] == "kernel" and not (conv1d and _in_stack(_tree.join(keys)))
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
