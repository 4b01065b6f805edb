"""Model sources: a checkpoint's tensors listed without reading them, each tensor (or a slice
of it) read on demand.

A source is one seam for every checkpoint format: ``tensors()`` gives each tensor's shape (in
Hugging Face's order, a Linear weight (out, in)) and stored type from the file's header alone,
and ``read(name, index)`` reads that tensor, or only the slice ``index`` of it, from the
memory-mapped file. ``SafetensorsSource`` reads a Hugging Face folder (``model.safetensors``, or
the shards its ``model.safetensors.index.json`` names) or one ``.safetensors`` file;
``GGUFSource`` reads a GGUF file, dequantizing one tensor at a time.

Example:

  >>> import pathlib, tempfile
  >>> import numpy as np
  >>> from safetensors.numpy import save_file
  >>> from lora_jax.models import sources
  >>> folder = pathlib.Path(tempfile.mkdtemp())
  >>> save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)},
  ...           str(folder / "model.safetensors"))
  >>> source = sources.open_source(folder)
  >>> source.tensors()["w"].shape, source.tensors()["w"].dtype
  ((3, 4), 'F32')
  >>> source.read("w", (slice(1, 2), slice(None))).tolist()
  [[4.0, 5.0, 6.0, 7.0]]
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from lora_jax._tree import listing
from lora_jax.models import weights  # weights imports JAX: NumPy reads bfloat16

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """A tensor as its file stores it: shape (Hugging Face's order), the stored type's name
  (safetensors' ``F32``, ``BF16``, ``F16``, ...; GGUF's ``F32``, ``Q4_1``, ...), its file."""

  shape: tuple[int, ...]
  dtype: str
  file: pathlib.Path


class Source(Protocol):
  """What every checkpoint reader provides: a listing and reads of one tensor or slice."""

  path: pathlib.Path

  def tensors(self) -> Mapping[str, TensorInfo]:
    """Every tensor's shape and stored type, by checkpoint name; reads no tensor data."""

  def read(self, name: str, index: Index | None = None) -> np.ndarray:
    """The tensor ``name`` (or its slice ``index``) as a NumPy array of its stored type
    (GGUF: dequantized to float32)."""


class SafetensorsSource:
  """The tensors of a Hugging Face folder's safetensors files, or of one ``.safetensors`` file,
  memory-mapped: listing reads the headers only; ``read`` copies just the requested slice.

  Raises:
    FileNotFoundError: no ``model.safetensors`` or index in the folder, or a shard the index
      names is missing (the message names the path).
    ValueError: a file is not a complete safetensors file, the index is damaged, or it names a
      tensor its shard does not hold.
  """

  def __init__(self, path):
    from safetensors import SafetensorError, safe_open

    self.path = pathlib.Path(path)
    self._handles, self._tensors = {}, {}
    for file, expected in weights.safetensors_files(self.path):
      try:
        handle = safe_open(str(file), framework="np")
      except SafetensorError as e:
        raise ValueError(f"{file} is not a complete safetensors file ({e}); download or copy it "
                         f"again.") from None
      names = set(handle.keys())
      missing = sorted(set(expected) - names)
      if missing:
        raise ValueError(f"{file} lacks {listing(missing)}, which the checkpoint's "
                         f"{weights.SAFETENSORS_INDEX} places there; download the shard again.")
      for name in sorted(names):
        part = handle.get_slice(name)
        self._tensors[name] = TensorInfo(tuple(int(n) for n in part.get_shape()),
                                         part.get_dtype(), file)
        self._handles[name] = handle

  def tensors(self) -> Mapping[str, TensorInfo]:
    return self._tensors

  def read(self, name: str, index: Index | None = None) -> np.ndarray:
    part = self._handles[_known(self, name)].get_slice(name)
    return np.asarray(part[index] if index is not None else part[:])


# --- GGUF ----------------------------------------------------------------------------------

# GGUF tensor types the gguf package dequantizes with NumPy and these loaders accept.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  """An opened GGUF file: its path, metadata values by key, and its tensors by name."""

  path: pathlib.Path
  metadata: dict
  tensors: dict

  def get(self, key: str, default=None):
    return self.metadata.get(key, default)

  def require(self, key: str):
    if key not in self.metadata:
      raise ValueError(f"{self.path}: GGUF metadata has no {key!r}; a Llama-architecture file "
                       f"from llama.cpp's converter has it.")
    return self.metadata[key]


def read(path) -> GGUFFile:
  """Opens a GGUF file (memory-mapped; tensors are dequantized only when asked for).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a complete GGUF file (truncated or damaged).
  """
  import gguf

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"path: no GGUF file at {path}; pass the path of a .gguf file.")
  try:
    reader = gguf.GGUFReader(str(path))
    metadata = {k: _value(f) for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
  except (ValueError, IndexError, OSError, KeyError) as e:
    raise ValueError(f"{path} is not a complete GGUF file (truncated or damaged: {e}); "
                     f"download or copy it again.") from None
  return GGUFFile(path, metadata, tensors)


def _value(field):
  try:
    return field.contents()
  except Exception:  # noqa: BLE001  (a field type this gguf version cannot decode: skip it)
    return None


def dequantize(file: GGUFFile, name: str) -> np.ndarray:
  """One tensor as float32, shaped as Hugging Face stores it (a Linear weight (out, in)).

  Raises:
    ValueError: a tensor type this loader does not accept (named, with the accepted ones).
  """
  import gguf

  tensor = file.tensors[name]
  kind = tensor.tensor_type.name
  if kind not in SUPPORTED_TYPES:
    raise ValueError(f"{file.path}: tensor {name} is stored as {kind}, which this loader does "
                     f"not dequantize; supported: {', '.join(SUPPORTED_TYPES)}.")
  return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)


def hf_shape(tensor) -> tuple[int, ...]:
  """A GGUF tensor's shape in Hugging Face's order (GGUF lists it innermost-first)."""
  return tuple(int(n) for n in reversed(tensor.shape))


class GGUFSource:
  """The tensors of a GGUF file under their GGUF names, memory-mapped by the ``gguf`` reader:
  listing reads the header only; ``read`` dequantizes one tensor to float32 and slices it.

  Raises:
    FileNotFoundError, ValueError: as ``read``.
  """

  def __init__(self, path):
    self.file = read(path)
    self.path = self.file.path
    self._tensors = {name: TensorInfo(hf_shape(t), t.tensor_type.name, self.path)
                     for name, t in self.file.tensors.items()}

  def tensors(self) -> Mapping[str, TensorInfo]:
    return self._tensors

  def read(self, name: str, index: Index | None = None) -> np.ndarray:
    w = dequantize(self.file, _known(self, name))
    return w[index] if index is not None else w


def _known(source, name: str) -> str:
  if name not in source.tensors():
    raise KeyError(f"{source.path} holds no tensor {name!r}; it holds "
                   f"{listing(source.tensors())}.")
  return name


def open_source(path) -> Source:
  """The source for ``path``: a ``.gguf`` file, a ``.safetensors`` file, or a Hugging Face
  folder with safetensors weights.

  Raises:
    FileNotFoundError: ``path`` does not exist.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or folder; pass a Hugging Face model folder, "
                            f"a .safetensors file or a .gguf file.")
  if path.is_file() and path.suffix == ".gguf":
    return GGUFSource(path)
  return SafetensorsSource(path)


def read_all(source: Source) -> dict[str, np.ndarray]:
  """Every tensor of ``source``, whole, by name."""
  return {name: source.read(name) for name in source.tensors()}
