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
from lora_jax.models import gguf, weights  # weights imports JAX: NumPy reads bfloat16

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


class GGUFSource:
  """The tensors of a GGUF file under their GGUF names, memory-mapped by the ``gguf`` reader:
  listing reads the header only; ``read`` dequantizes one tensor to float32 and slices it.

  Raises:
    FileNotFoundError, ValueError: as ``lora_jax.models.gguf.read``.
  """

  def __init__(self, path):
    self.file = gguf.read(path)
    self.path = self.file.path
    self._tensors = {name: TensorInfo(gguf.hf_shape(t), t.tensor_type.name, self.path)
                     for name, t in self.file.tensors.items()}

  def tensors(self) -> Mapping[str, TensorInfo]:
    return self._tensors

  def read(self, name: str, index: Index | None = None) -> np.ndarray:
    w = gguf.dequantize(self.file, _known(self, name))
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
  """Every tensor of ``source``, whole, by name (what ``weights.read_checkpoint`` returns)."""
  return {name: source.read(name) for name in source.tensors()}
