"""PEFT's names: the file names, adapter_config.json's fields, PyTorch module names and the
regular expressions PEFT matches them with."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from lora_jax import _tree, family, kinds

stack_re = family.stack_re  # the registered families' layer stacks, in a module path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_VERSION = "0.21.2"  # the PEFT release whose format this module writes and reads

# Every field PEFT 0.21's LoraConfig writes, with its default (``inference_mode`` as saved), but
# the flags that select an adapter kind (``kind_flags``).
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
    "task_type": None, "trainable_token_indices": None, "use_bdlora": None,
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
  m = stack_re().search(module)
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
  stacks = {m["stack"] for p in paths if (m := stack_re().search(_tree.join(p) if
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


def kind_flags() -> dict[str, bool]:
  """Every registered adapter kind's adapter_config.json flags, all off (plain LoRA)."""
  return {k: False for kind in kinds.all() for k in kinds.peft_form(kind) or {}}


def kind_of(data: Mapping[str, Any]) -> type:
  """The adapter kind whose flags adapter_config.json ``data`` sets (LoRA: none set)."""
  chosen = [kind for kind in kinds.all() if kinds.peft_form(kind)
            and all(data.get(k, False) == v for k, v in kinds.peft_form(kind).items())]
  return max(chosen, key=lambda kind: len(kinds.peft_form(kind)), default=kinds.named("lora"))


def kind_label(kind: type) -> str:
  """``name (flag true, ...)``, for messages."""
  flags = ", ".join(f"{k} {str(v).lower()}" for k, v in (kinds.peft_form(kind) or {}).items())
  return f"{kind.name} ({flags})" if flags else kind.name
