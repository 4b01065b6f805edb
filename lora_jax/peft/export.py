"""lora_jax adapters to a PEFT LoRA adapter folder (``export_peft``)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lora_jax import _files, _tree, family, inits, kinds
from lora_jax.adapters import LoraWeights, split
from lora_jax.config import LoraConfig
from lora_jax.peft import layout
from lora_jax.peft.names import (CONFIG_FILE, PEFT_DEFAULTS, WEIGHTS_FILE, grouped_patterns,
                                 kind_flags, model_fan_in_fan_out, pattern_value, patterns,
                                 torch_name)
from lora_jax.targets import trains_bias

# ---- export ------------------------------------------------------------------------------------

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
  return {**PEFT_DEFAULTS, **kind_flags(), **kinds.peft_form(kinds.named(config.kind)),
          "r": config.rank, "lora_alpha": _number(config.alpha),
          "use_rslora": config.use_rslora,
          "lora_dropout": float(config.dropout),
          "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
          "target_modules": "|".join(patterns(modules)), "rank_pattern": rank_pattern,
          "alpha_pattern": alpha_pattern, "fan_in_fan_out": fan_in_fan_out, "bias": config.bias,
          "base_model_name_or_path": base_model_name_or_path, "task_type": task_type}


def _check_kind(config: LoraConfig, flat: Mapping[str, LoraWeights]) -> None:
  kind = kinds.named(config.kind)
  if kinds.peft_form(kind) is None:
    raise ValueError(f"adapter kind {config.kind!r} ({kind.__name__}) has no PEFT form (its "
                     f"class sets no ``peft`` flags); PEFT's format holds only "
                     f"{', '.join(k.name for k in kinds.all() if kinds.peft_form(k) is not None)}"
                     f" adapters.")
  for path, lw in flat.items():
    if type(lw) is not kind:
      raise ValueError(f"adapter at {path!r} is a {type(lw).__name__}, but config.kind is "
                       f"{config.kind!r} ({kind.__name__}); PEFT's file has one kind.")


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
      PEFT could not tell apart, a PiSSA / OLoRA config without ``initial``, an adapter kind
      without a PEFT form (``lora_jax.kinds``) or other than the config's, or a kind other
      than plain LoRA on an embedding table or a convolution.
  """
  if config.changes_base != (initial is not None):
    raise ValueError(
        f"init={config.init!r} adapters act on the residual base, so PEFT needs them converted "
        f"to a LoRA adapter on the original base: pass initial= (the adapters init_with_base "
        f"returned)." if config.changes_base else
        f"initial= converts PiSSA / OLoRA adapters, but config.init is {config.init!r}; drop it.")
  if initial is not None:
    adapters = inits.convert_to_lora(adapters, initial=initial)
    config = inits.converted_config(config)
  lora, extras = split(adapters)
  if not lora:
    raise ValueError("adapters hold no LoraWeights; nothing to export (PEFT's LoRA format "
                     "needs at least one LoRA target; a run that trains only modules_to_save "
                     "is a full fine-tuning of those modules: save it with lora-jax merge).")
  flat = {_tree.join(p): lw for p, lw in lora.items()}
  _check_kind(config, flat)
  tensors: dict[str, np.ndarray] = {}
  modules: dict[str, tuple[int, float]] = {}
  for path, lw in flat.items():
    kind = layout.layout_of(path, lw, uses)
    a_all, b_all = np.asarray(lw.a, np.float32), np.asarray(lw.b, np.float32)
    for layer in _layers(path, lw):
      rank, alpha = _check_agrees(path, lw, config, layer)
      name = name_map(path, layer)
      if name in modules:
        raise ValueError(f"name_map gives the module name {name!r} twice (again for {path!r}).")
      at = () if layer is None else layer
      tensors.update(layout.layer_tensors(name, kind, *_true_rank(path, layer, a_all[at], b_all[at],
                                                            rank)))
      tensors.update({f"base_model.model.{name}.{k}": v
                      for k, v in lw.peft_tensors(() if layer is None else (layer,)).items()})
      modules[name] = (rank, alpha)
  paths = [*flat, *(_tree.join(p) for p in extras)]
  conv1d = model_fan_in_fan_out(paths) if fan_in_fan_out is None else fan_in_fan_out
  biases = {k: x for k, x in extras.items() if trains_bias(config, k, lora)}
  saved = layout.extra_tensors({k: x for k, x in extras.items() if k not in biases}, conv1d, name_map)
  tensors.update({f"base_model.model.{k}": v for k, v in saved.items()})
  for key, (keys, layer) in layout.bias_keys({k: x.shape for k, x in biases.items()}, modules,
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



