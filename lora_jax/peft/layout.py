"""How PEFT lays out each adapted module's tensors: PyTorch's parameter names and shapes for
Linear, GPT-2 Conv1D, embedding and convolution layers, and a family's stacked layers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from lora_jax import _tree
from lora_jax.adapters import LoraWeights
from lora_jax.peft.names import stack_re
from lora_jax.targets import EMBEDDING_NAMES

TORCH_PARAM = {"kernel": "weight", "scale": "weight", "embedding": "weight"}  # else the same


def torch_param(leaf: str, value: np.ndarray, conv1d: bool) -> tuple[str, np.ndarray]:
  """PyTorch's parameter name and layout for one Flax leaf of one layer: a Linear kernel (in,
  out) is stored (out, in); GPT-2's Conv1D keeps (in, out)."""
  if leaf == "kernel" and not conv1d:
    if value.ndim != 2:
      raise ValueError(f"a modules_to_save kernel of shape {value.shape} has no torch.nn.Linear "
                       f"layout; only 2-D kernels can be exported.")
    value = value.T
  return TORCH_PARAM.get(leaf, leaf), np.ascontiguousarray(value)


def stacked(path: str) -> bool:
  m = stack_re().search(path.rsplit("/", 1)[0])
  return m is not None and m["index"] is None


def in_stack(path: str) -> bool:
  """Whether ``path`` is in a family's layer stack (where GPT-2's layers are Conv1D; a head
  outside it is a torch.nn.Linear)."""
  return stack_re().search(path.rsplit("/", 1)[0]) is not None


def extra_tensors(extras, conv1d: bool, name_map) -> dict[str, np.ndarray]:
  """``{"<module>.<param>": tensor}`` for the trained ``modules_to_save`` leaves."""
  out = {}
  for keys, x in extras.items():
    path, value = _tree.join(keys), np.asarray(x, np.float32)
    for layer in range(value.shape[0]) if stacked(path) else [None]:
      name, tensor = torch_param(keys[-1], value if layer is None else value[layer],
                                  conv1d and in_stack(path))
      out[f"{name_map(path, layer)}.{name}"] = tensor
  return out


def bias_keys(biases: Mapping[tuple, tuple], adapted: Iterable[str], name_map
               ) -> dict[str, tuple[tuple[str, ...], int | None]]:
  """``{file key: (leaf keys, layer or None)}`` for the biases trained in place, given as
  ``{leaf keys: shape}``, one key per layer of a stacked leaf: ``<module>.bias``, or
  ``<module>.base_layer.bias`` for a module in ``adapted`` (PEFT's wrapped layers)."""
  adapted, out = set(adapted), {}
  for keys, shape in biases.items():
    path = _tree.join(keys)
    for layer in range(shape[0]) if stacked(path) else [None]:
      name = name_map(path, layer)
      out[f"base_model.model.{name}{'.base_layer' if name in adapted else ''}.bias"] = (keys,
                                                                                        layer)
  return out


def torch_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(lora_A.weight (r, in), lora_B.weight (out, r))`` from one layer's ``a (*in, r)`` and
  ``b (r, *out)``."""
  r = a.shape[-1]
  return np.ascontiguousarray(a.reshape(-1, r).T), np.ascontiguousarray(b.reshape(r, -1).T)


def torch_conv_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(lora_A.weight (r, in, *window), lora_B.weight (out, r, 1, ...))``, a ``Conv*d``'s
  layout, from a Flax convolution's ``a (*window, in, r)`` and ``b (r, out)``."""
  n = a.ndim - 2  # window axes
  a = np.transpose(a, (n + 1, n, *range(n)))
  return np.ascontiguousarray(a), np.ascontiguousarray(b.T.reshape(*b.T.shape, *(1,) * n))


def layout_of(path: str, lw: LoraWeights, uses) -> str:
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
  if lw.axes != wanted or type(lw) is not LoraWeights:
    raise ValueError(f"adapter at {path!r} (axes {lw.axes!r}, {type(lw).__name__}) is on "
                     f"{'an embedding table' if kind == 'embedding' else 'a convolution'}, "
                     f"which PEFT stores only as plain LoRA with axes {wanted!r}.")
  return kind


def layer_tensors(name: str, kind: str, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
  """PEFT's tensors of one module's factors (``a (*in, r)``, ``b (r, *out)``)."""
  prefix = f"base_model.model.{name}"
  if kind == "embedding":
    a, b = torch_factors(a, b)
    return {f"{prefix}.lora_embedding_A": a, f"{prefix}.lora_embedding_B": b}
  a, b = (torch_conv_factors if kind == "conv" else torch_factors)(a, b)
  return {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}


