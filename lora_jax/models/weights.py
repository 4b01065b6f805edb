"""Hugging Face checkpoints (safetensors) into the reference Flax models and back, without torch:
the family-independent part.

The mapping is one readable table per family, its record's ``weight_table``
(``lora_jax.family.Family``): each row names a Flax path, the checkpoint's tensor name (``{i}``:
the layer), and whether the tensor is a ``torch.nn.Linear`` weight (stored (out, in), so
transposed into a Flax kernel (in, out)). Rows with ``{i}`` repeat per layer: a scanned model
stacks them along a new leading axis at the row's Flax path; an unrolled one names layer i's
module ``{layer_stack}_{i}`` (``model/layers_3/...``). Rows whose Flax path the model lacks (the
head of a tied Llama) are skipped.

Each family's loader sits beside its model: ``lora_jax.models.bert`` (``load``, the bundled
MiniLM, its tokenizer) and ``lora_jax.models.llama_io`` (``load``, ``save``).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import uuid
from collections.abc import Mapping
from typing import NamedTuple

# Importing JAX registers ml_dtypes' bfloat16 with NumPy, so safetensors.numpy reads and writes
# BF16 tensors as NumPy arrays (without it: "data type 'bfloat16' not understood").
import jax
import numpy as np

from lora_jax import _files, _tree
from lora_jax._tree import listing
from lora_jax.family import Family
from lora_jax.targets import leaves_by_path

CONFIG_FILE = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

Shapes = dict[str, tuple[int, ...]]


# --- The family-driven table ------------------------------------------------------------------


class Entry(NamedTuple):
  """One checkpoint tensor of a table row: its name, the model's Flax path (``'/'``-joined),
  its position on the path's stacked layer axis (None: not stacked) and whether it is a Linear
  weight (transposed)."""

  name: str
  path: str
  index: int | None
  linear: bool


def entries(family: Family, paths, *, layers: int, scan: bool) -> list[Entry]:
  """The checkpoint tensors of ``family``'s table whose Flax path is in ``paths``.

  Args:
    family: the family record (its ``weight_table`` and ``layer_stack``).
    paths: the model's ``'/'``-joined Flax paths (a dict of them, or a set).
    layers: the number of layers ``{i}`` runs over.
    scan: layers stacked along a leading axis (True) or unrolled ``{layer_stack}_{i}``.

  Raises:
    ValueError: a per-layer row whose Flax path is not under the family's layer stack.
  """
  found = []
  for flax_path, name, linear in family.weight_table:
    for i, hf_name in _names(name, layers):
      path = flax_path if i is None or scan else _unrolled(flax_path, i, family)
      if path in paths:
        found.append(Entry(hf_name, path, i if scan else None, linear))
  return found


def _names(name: str, layers: int) -> list[tuple[int | None, str]]:
  if "{i}" not in name:
    return [(None, name)]
  return [(i, name.format(i=i)) for i in range(layers)]


def _unrolled(path: str, layer: int, family: Family) -> str:
  stack = family.layer_stack + "/"
  if not path.startswith(stack) and f"/{stack}" not in path:
    raise ValueError(f"{family.name} weight_table row {path!r} repeats per layer ({{i}}) but is "
                     f"not under the layer stack {family.layer_stack!r}; fix the row or the "
                     f"family's layer_stack.")
  return path.replace(stack, f"{family.layer_stack}_{layer}/", 1)


def shapes(tree) -> Shapes:
  """``{'/'-joined Flax path: shape}`` of a parameter tree (arrays or ShapeDtypeStructs)."""
  return {p: tuple(x.shape) for p, x in leaves_by_path(tree).items()}


def layout(config) -> dict:
  """The table's ``layers`` and ``scan`` keywords for a model config with ``num_hidden_layers``
  and ``scan_layers`` (BERT's, Llama's)."""
  return {"layers": config.num_hidden_layers, "scan": config.scan_layers}


def checkpoint_shapes(family: Family, tree, *, layers: int, scan: bool) -> Shapes:
  """Checkpoint name -> shape in the checkpoint, for every table row ``tree`` (the model's
  parameters, abstract or concrete, without the ``"params"`` level) holds."""
  flat = shapes(tree)
  return {e.name: _checkpoint_shape(flat[e.path], e)
          for e in entries(family, flat, layers=layers, scan=scan)}


def _checkpoint_shape(shape: tuple[int, ...], entry: Entry) -> tuple[int, ...]:
  shape = shape[1:] if entry.index is not None else shape
  return tuple(reversed(shape)) if entry.linear else tuple(shape)


def fit_problems(found: Shapes, expected: Shapes, *, ignore=()) -> list[str]:
  """``["missing: ...", "unexpected: ...", "mis-shaped: ..."]`` (those that apply) of ``found``
  against ``expected`` (name -> shape); names in ``ignore`` are never unexpected."""
  missing = [k for k in expected if k not in found]
  unexpected = [k for k in found if k not in expected and k not in ignore]
  wrong = [f"{k} {found[k]} (expected {expected[k]})" for k in expected
           if k in found and found[k] != expected[k]]
  return [f"{label}: {listing(items, 4)}" for label, items in
          (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if items]


def check_checkpoint(tensors: Mapping, expected: Shapes, *, model: str, ignore=()) -> None:
  """Raises ValueError listing ``tensors``' missing, unexpected and mis-shaped names against
  ``expected`` (``checkpoint_shapes``); ``model`` names the config in the message."""
  found = {k: tuple(v.shape) for k, v in tensors.items()}
  problems = fit_problems(found, expected, ignore=ignore)
  if problems:
    raise ValueError(f"checkpoint does not fit the {model} config; " + "; ".join(problems) + ".")


def params_from_checkpoint(tensors: Mapping, family: Family, tree, *, layers: int, scan: bool,
                           dtype=np.float32) -> dict:
  """The ``{"params": ...}`` tree of the model whose parameters ``tree`` describes, from
  checkpoint tensors already checked (``check_checkpoint``), cast to ``dtype``, as device
  arrays."""
  flat: dict[str, np.ndarray | list[np.ndarray]] = {}
  for e in entries(family, shapes(tree), layers=layers, scan=scan):
    value = np.asarray(tensors[e.name], dtype)
    value = value.T if e.linear else value
    if e.index is None:
      flat[e.path] = value
    else:  # entries list a row's layers in order
      flat.setdefault(e.path, []).append(value)
  # On the device once here: NumPy leaves (transposed views among them) would otherwise be
  # copied to the device at every jitted call that takes them.
  return jax.device_put({"params": _tree.nest({
      tuple(p.split("/")): np.stack(v) if isinstance(v, list) else np.ascontiguousarray(v)
      for p, v in flat.items()})})


def params_from_source(source, family: Family, tree, *, layers: int, scan: bool,
                       dtype=np.float32, shardings=None) -> dict:
  """``params_from_checkpoint``'s tree, each leaf made in place from a model source
  (``lora_jax.models.sources``): ``jax.make_array_from_callback`` asks for each device's slice,
  and only that slice of each checkpoint tensor is read and cast (a stacked leaf reads the
  layers its slice holds), so the host never holds more than one device's part of a tensor.

  Args:
    source: a model source whose tensors are already checked (``check_checkpoint`` on its
      listing); its names are the table's.
    family, tree, layers, scan, dtype: as ``params_from_checkpoint``.
    shardings: optional ``{'/'-joined Flax path: jax.sharding.Sharding}``; a leaf without one
      goes to the first device whole.
  """
  by_path: dict[str, list[Entry]] = {}
  for e in entries(family, shapes(tree), layers=layers, scan=scan):
    by_path.setdefault(e.path, []).append(e)
  flat = leaves_by_path(tree)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  made = {}
  for path, rows in by_path.items():
    sharding = (shardings or {}).get(path, default)
    parts: dict = {}  # a part several devices hold (replicas) is read once
    made[tuple(path.split("/"))] = jax.make_array_from_callback(
        tuple(flat[path].shape), sharding,
        lambda index, rows=rows, parts=parts: _part(parts, source, rows, index, dtype))
  return {"params": _tree.nest(made)}


def _part(parts: dict, source, rows: list[Entry], index: tuple, dtype) -> np.ndarray:
  key = tuple((s.start, s.stop, s.step) for s in index)
  if key not in parts:
    parts[key] = _read_part(source, rows, index, dtype)
  return parts[key]


def _read_part(source, rows: list[Entry], index: tuple, dtype) -> np.ndarray:
  """The part ``index`` (slices of the Flax leaf) of the leaf that ``rows`` fill."""
  if rows[0].index is None:  # one tensor
    return _read_tensor(source, rows[0], index, dtype)
  layers, rest = index[0], index[1:]
  picked = [rows[i] for i in range(*layers.indices(len(rows)))]
  return np.stack([_read_tensor(source, e, rest, dtype) for e in picked])


def _read_tensor(source, e: Entry, index: tuple, dtype) -> np.ndarray:
  value = np.asarray(source.read(e.name, tuple(reversed(index)) if e.linear else index), dtype)
  return np.ascontiguousarray(value.T if e.linear else value)


def checkpoint_from_params(params, family: Family, tree, *, layers: int, scan: bool,
                           dtype=np.float32) -> dict[str, np.ndarray]:
  """Checkpoint tensors under their original names (contiguous, ``dtype``) from a parameter
  tree (without the ``"params"`` level) laid out as ``tree``; leaves no row names are ignored.

  Raises:
    ValueError: ``params`` lacks or mis-shapes a leaf of ``tree`` that the table names.
  """
  expected = shapes(tree)
  found = {p: s for p, s in shapes(params).items() if p in expected}
  problems = fit_problems(found, expected)
  if problems:
    raise ValueError(f"parameters do not fit the {family.name} config; " + "; ".join(problems)
                     + ". Pass the tree the model's config was loaded or initialized with.")
  flat = leaves_by_path(params)
  host = {}  # one device-to-host copy per Flax path (a stacked kernel serves every layer)
  tensors = {}
  for e in entries(family, expected, layers=layers, scan=scan):
    if e.path not in host:
      host[e.path] = np.asarray(flat[e.path])
    value = host[e.path] if e.index is None else host[e.path][e.index]
    value = value.astype(dtype, copy=False)
    tensors[e.name] = np.ascontiguousarray(value.T if e.linear else value)
  return tensors


# --- Files ---------------------------------------------------------------------------------


def safetensors_files(path) -> list[tuple[pathlib.Path, list[str]]]:
  """``(file, the tensor names the index places in it)`` for each safetensors file of a
  Hugging Face folder (``model.safetensors``, or every shard ``model.safetensors.index.json``
  names, each checked to exist), or for ``path`` itself when it is a file (no names).

  Raises:
    FileNotFoundError: neither file, or a shard, exists (the message names the path).
    ValueError: the index is not JSON with a ``weight_map``.
  """
  path = pathlib.Path(path)
  if path.is_file():
    return [(path, [])]
  single, index = path / SAFETENSORS, path / SAFETENSORS_INDEX
  if single.is_file():
    return [(single, [])]
  if not index.is_file():
    raise FileNotFoundError(
        f"{single}: no such file (nor {index.name}); expected a Hugging Face checkpoint folder "
        f"with safetensors weights (save_pretrained writes them; convert .bin files first).")
  weight_map = read_json(index).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index}: expected a JSON object with a \"weight_map\" (tensor name -> "
                     f"shard file), as save_pretrained writes; re-download the checkpoint.")
  files = {}
  for name, file in weight_map.items():
    files.setdefault(index.parent / file, []).append(name)
  for file in files:
    if not file.is_file():
      raise FileNotFoundError(f"{file}: no such file, though {index.name} names it; download "
                              f"every shard of the checkpoint.")
  return list(files.items())


def read_json(path) -> dict:
  """The JSON object in ``path``.

  Raises:
    FileNotFoundError: no such file (the message names the path).
    ValueError: the file is not JSON, or not a JSON object.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file; expected a Hugging Face model folder "
                            f"(save_pretrained writes {CONFIG_FILE} and the weights).")
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); re-download or rewrite it.") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
  return data


def package_folder(package: str, *, install: str) -> pathlib.Path:
  """The folder of an installed weights package, found with ``importlib.util.find_spec`` and
  never imported (its declared dependencies may be missing on purpose).

  Raises:
    FileNotFoundError: the package is not installed (the message gives ``install``).
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the pretrained weights package is not installed; run {install}.")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def write_folder(folder, tensors: dict, files: Mapping[str, bytes | str]) -> None:
  """Writes ``tensors`` (as ``model.safetensors``) and ``files`` into a sibling temporary
  folder, then renames it to ``folder``: an interrupted write leaves no partial ``folder``.

  Args:
    folder: the folder to create; it must not exist, or be an empty folder (replaced).
    tensors: checkpoint name -> contiguous NumPy array.
    files: ``{file name: bytes or text}`` written alongside.
  """
  from safetensors.numpy import save_file

  folder = pathlib.Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:12]}"
  tmp.mkdir()
  try:
    save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
    for name, data in files.items():
      if isinstance(data, str):
        (tmp / name).write_text(data, encoding="utf-8")
      else:
        (tmp / name).write_bytes(data)
    _files.publish(tmp)  # the umask's modes (save_file and mkdir's differ)
    if folder.is_dir():
      folder.rmdir()  # empty (checked before): the rename needs the name free on every OS
    tmp.rename(folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
