"""A PEFT adapter folder's two files read and checked: adapter_config.json and
adapter_model.safetensors."""

from __future__ import annotations

import json
import math
import pathlib
import re
import warnings
from typing import Any, Callable

import numpy as np

from lora_jax.config import BIASES, is_real
from lora_jax.peft.names import (CONFIG_FILE, PEFT_DEFAULTS, PEFT_VERSION, PLAIN_INITS,
                                 UNSUPPORTED, WEIGHTS_FILE, PeftConfigWarning, kind_flags)

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
  for key in ("use_rslora", "fan_in_fan_out", *kind_flags()):
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
  unknown = sorted(set(data) - set(PEFT_DEFAULTS) - set(kind_flags()) - {"runtime_config"})
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

