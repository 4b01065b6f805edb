"""Checks of a PEFT LoRA adapter folder before ``lora_jax.peft.import_peft`` applies it: finite
tensors, scales and updates, and LoRA factors only on the modules adapter_config.json targets
by PEFT 0.21's own rule (``peft.tuners.tuners_utils.check_target_module_exists``).
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Mapping

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)
ALL_LINEAR = "all-linear"  # PEFT's shorthand for every Linear / Conv1D layer
EMBEDDINGS = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES
TIED_OUTPUT = "lm_head"  # the layer ensure_weight_tying ties to the input embedding's adapter
SEQ_CLS_HEADS = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES


def check_finite(tensors: Mapping[str, np.ndarray], file) -> None:
  """Raises ValueError for a tensor holding NaN or Inf (PEFT applies it, and outputs are NaN).

  Args:
    tensors: ``{PEFT key: array}`` as read from adapter_model.safetensors.
    file: the file, for messages.

  Raises:
    ValueError: naming the first such tensor, how many values and the first index.
  """
  for key, value in tensors.items():
    bad = np.argwhere(~np.isfinite(value))
    if len(bad):
      raise ValueError(
          f"{file}: tensor {key!r} holds {len(bad)} NaN or infinite value"
          f"{'s' if len(bad) > 1 else ''} (the first at index {tuple(int(i) for i in bad[0])}), "
          f"which would make the model's outputs NaN; the adapter is damaged or its training "
          f"diverged: export the adapter again from a checkpoint with finite weights.")


def _peak(a: np.ndarray, b: np.ndarray) -> float:
  """``max |B @ A|`` of ``lora_A`` (r, in, ...) and ``lora_B`` (out, r, ...), or a cheap upper
  bound of it, ``sum_k max|B[:, k]| * max|A[k]|``, where that is within float32's range."""
  a = np.abs(a.reshape(a.shape[0], -1).astype(np.float64))  # (r, in)
  b = np.abs(b.reshape(b.shape[0], -1).astype(np.float64))  # (out, r)
  bound = float(b.max(axis=0) @ a.max(axis=1))
  if bound <= F32_MAX:
    return bound
  return max(float((b[i:i + 1024] @ a).max()) for i in range(0, len(b), 1024))


def check_scales(pairs: Mapping[str, Mapping[str, tuple]], settings: Mapping[str, tuple],
                 *, use_rslora: bool, file) -> None:
  """Raises ValueError where a module's scale, or its update ``scale * B @ A``, is beyond
  float32's range (the adapted weights would be Inf, the outputs NaN).

  Args:
    pairs: ``{module: {"A": (key, lora_A), "B": (key, lora_B), ...}}`` in torch's layouts.
    settings: ``{module: (rank, alpha)}``, after ``rank_pattern`` and ``alpha_pattern``.
    use_rslora: the scale is ``alpha / sqrt(rank)``, not ``alpha / rank``.
    file: the adapter file, for messages.

  Raises:
    ValueError: naming the module, its factors' keys and the scale.
  """
  for module, pair in pairs.items():
    (a_key, a), (b_key, b) = pair["A"], pair["B"]
    rank, alpha = settings[module]
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    if not scale <= F32_MAX:
      how = f"sqrt(r {rank}), use_rslora" if use_rslora else f"r {rank}"
      raise ValueError(
          f"{file}: the factors {a_key!r} and {b_key!r} cannot be applied: the scale of module "
          f"{module!r} (lora_alpha {alpha:g} / {how}) is {scale:g}, beyond float32's largest "
          f"{F32_MAX:.2g}, so the update would be Inf or NaN; set lora_alpha / alpha_pattern "
          f"in adapter_config.json to what the adapter was trained with.")
    peak = scale * _peak(a, b)
    if not peak <= F32_MAX:
      raise ValueError(
          f"{file}: the update scale * lora_B @ lora_A of module {module!r} ({a_key!r}, "
          f"{b_key!r}) reaches {peak:.2g}, beyond float32's largest {F32_MAX:.2g}, so the "
          f"adapted weights would be Inf; the factors are damaged, or lora_alpha / alpha_pattern "
          f"(scale {scale:g}) is not what the adapter was trained with: export it again.")


# ---- targets ------------------------------------------------------------------------------------

def _in_layers(data: Mapping, name: str) -> bool:
  """PEFT's ``layers_to_transform`` / ``layers_pattern`` filter: the first number after the
  layer stack (``layers_pattern``, else any segment after a dot) is one of the layers."""
  layers, stacks = data.get("layers_to_transform"), data.get("layers_pattern")
  if layers is None or layers == []:
    return True
  match = None
  if not stacks:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
  for stack in [stacks] if isinstance(stacks, str) else stacks or ():
    match = re.match(rf"(?:^|.*?\.){stack}\.(?P<idx>\d+)\.", name)
    if match:
      break
  if match is None:
    return False
  index = int(match["idx"])
  return index == layers if isinstance(layers, int) else index in layers


def _excluded(data: Mapping, name: str) -> bool:
  """PEFT's ``exclude_modules`` (a regex on the whole name, or names / suffixes after a dot)
  and ``modules_to_save`` (never adapted: trained in full instead)."""
  exclude = data.get("exclude_modules")
  if isinstance(exclude, str):
    if re.fullmatch(exclude, name):
      return True
  elif exclude and (name in exclude or any(name.endswith(f".{e}") for e in exclude)):
    return True
  return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in data.get("modules_to_save") or ())


def _embedding_targeted(target) -> bool:
  if isinstance(target, str):
    return any(re.fullmatch(target, e) for e in EMBEDDINGS)
  return any(t.split(".")[-1] in EMBEDDINGS for t in target or ())


def _all_linear(target) -> bool:
  return isinstance(target, str) and target.lower() == ALL_LINEAR


def targeted(data: Mapping, name: str, *, linear: bool = True) -> bool:
  """Whether PEFT 0.21 puts a LoRA layer on the module ``name`` for adapter_config.json
  ``data`` (``check_target_module_exists``, and ensure_weight_tying's tied output layer).

  Args:
    data: the config's contents (checked with ``check_targets``).
    name: the torch module name, e.g. ``model.layers.0.self_attn.q_proj``.
    linear: whether the module is a Linear / Conv1D layer (``"all-linear"`` is those but the
      model's output layer: ``lm_head``, or with task SEQ_CLS ``score`` / ``classifier``).

  Example:
    >>> targeted({"target_modules": ["q_proj"], "layers_to_transform": [1]},
    ...          "model.layers.0.self_attn.q_proj")
    False
  """
  target = data.get("target_modules")
  if data.get("ensure_weight_tying") and name == TIED_OUTPUT and _embedding_targeted(target):
    return True
  if target is None or _excluded(data, name):
    return False
  if _all_linear(target):
    heads = SEQ_CLS_HEADS if data.get("task_type") == "SEQ_CLS" else ()
    return linear and name not in (TIED_OUTPUT, *heads)
  if isinstance(target, str):
    return re.fullmatch(target, name) is not None
  if name in target:  # a full name is adapted whatever layers_to_transform says
    return True
  return any(name.endswith(f".{t}") for t in target) and _in_layers(data, name)


def _is_names(value) -> bool:
  return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_index(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _compile(file, key: str, shown: str, pattern: str) -> None:
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{file}: {key} {shown!r} is not a valid regular expression ({e}); PEFT "
                     f"would fail on it too.") from None


def _check_kinds(data: Mapping, file) -> None:
  """Raises ValueError for target fields of the wrong type, invalid regular expressions, and
  the combinations PEFT's LoraConfig refuses."""
  for key in ("target_modules", "exclude_modules"):
    value = data.get(key)
    if not (value is None or isinstance(value, str) or _is_names(value)):
      raise ValueError(f"{file}: {key} must be a regular expression or a list of module names, "
                       f"got {value!r}.")
    if isinstance(value, str) and not _all_linear(value):
      _compile(file, key, value, value)
  layers, stacks = data.get("layers_to_transform"), data.get("layers_pattern")
  if not (layers is None or _is_index(layers) or
          (isinstance(layers, list) and all(map(_is_index, layers)))):
    raise ValueError(f"{file}: layers_to_transform must be a layer index or a list of them, got "
                     f"{layers!r}.")
  if not (stacks is None or isinstance(stacks, str) or _is_names(stacks)):
    raise ValueError(f"{file}: layers_pattern must be the name of the layer stack (e.g. "
                     f"'layers') or a list of names, got {stacks!r}.")
  if not (data.get("modules_to_save") is None or _is_names(data["modules_to_save"])):
    raise ValueError(f"{file}: modules_to_save must be a list of module names, got "
                     f"{data['modules_to_save']!r}.")
  for stack in [stacks] if isinstance(stacks, str) else stacks or ():
    _compile(file, "layers_pattern", stack, rf"(?:^|.*?\.){stack}\.(?P<idx>\d+)\.")
  for m in data.get("modules_to_save") or ():
    _compile(file, "modules_to_save", m, rf"(^|.*\.){m}($|\..*)")
  target = data.get("target_modules")
  refused = [  # PEFT's LoraConfig.__post_init__, word for word
      (isinstance(target, str) and layers is not None,
       "`layers_to_transform` cannot be used when `target_modules` is a str."),
      (isinstance(target, str) and stacks is not None,
       "`layers_pattern` cannot be used when `target_modules` is a str."),
      (bool(stacks) and layers is None,
       "When `layers_pattern` is specified, `layers_to_transform` must also be specified.")]
  for bad, message in refused:
    if bad:
      raise ValueError(f"{file}: {message} (PEFT's LoraConfig refuses this config.)")


def _described(data: Mapping) -> str:
  """The config's target fields that are set, as ``key=value`` for messages."""
  keys = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules",
          "modules_to_save")
  shown = ", ".join(f"{k}={data.get(k)!r}" for k in keys
                    if k == "target_modules" or data.get(k) not in (None, [], ""))
  if _all_linear(data.get("target_modules")):
    shown += ": every Linear layer but the output layer"
  return shown


def check_targets(data: Mapping, pairs: Mapping[str, Mapping[str, tuple]], file) -> None:
  """Raises ValueError unless every module with LoRA factors is one PEFT would adapt for this
  config (``targeted``); modules the config targets but the file leaves out are fine (PEFT
  gives them a zero update).

  Args:
    data: adapter_config.json's contents.
    pairs: ``{module: {"A": (key, lora_A), "B": (key, lora_B), ...}}`` of the file.
    file: adapter_config.json, for messages.

  Raises:
    ValueError: a target field of the wrong type or an invalid regular expression (named), a
      combination PEFT refuses, a null or empty target_modules with factors in the file, or
      factors of a module the config does not target (named, with the config's fields).
  """
  _check_kinds(data, file)
  if not pairs:
    return
  target, first = data.get("target_modules"), next(iter(pairs))
  ends = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in pairs}))
  if target is None:
    raise ValueError(f"{file}: target_modules is null: PEFT then targets its defaults for the "
                     f"model type, which lora_jax cannot see; write the targeted modules (their "
                     f"names end in {ends}).")
  if not target:
    raise ValueError(f"{file}: target_modules is empty, so PEFT adapts no module, but the file "
                     f"holds LoRA factors of {len(pairs)} modules (e.g. {first!r}); list them in "
                     f"target_modules (their names end in {ends}).")
  missed = [m for m, pair in pairs.items() if not targeted(
      data, m, linear="lora_embedding_" not in pair["A"][0] and pair["A"][1].ndim == 2)]
  if missed:
    raise ValueError(
        f"{file}: module {missed[0]!r} ({pairs[missed[0]]['A'][0]!r}) is not one that "
        f"{pathlib.Path(file).name} targets ({_described(data)}); {len(missed)} of {len(pairs)} "
        f"modules with factors are not, and PEFT would not apply their factors. Make the config "
        f"target each module of the file (a list entry is a module's name or its end after a "
        f"dot, a string a regular expression for the whole name) or leave the others out.")
