"""Hugging Face Llama folders into the reference Llama (``lora_jax.models.llama``) and back.

``load`` reads a ``save_pretrained`` folder (``config.json`` and ``model.safetensors`` or a
sharded ``model.safetensors.index.json``; float32, float16 or bfloat16) with NumPy, no torch;
``save`` writes one back (a merged export) that ``transformers.LlamaForCausalLM.from_pretrained``
loads. The mapping is the family's checkpoint table (``lora_jax.models.weights``).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import sources, weights
from lora_jax.models.llama import FAMILY, LlamaConfig, LlamaForCausalLM

SAVE_DTYPES = ("float32", "bfloat16", "float16")  # torch dtypes a Llama export may use
HEAD_TENSOR, EMBED_TENSOR = "lm_head.weight", "model.embed_tokens.weight"
_BUFFER = ".rotary_emb.inv_freq"  # saved by old transformers; recomputed, not a parameter
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


def config_from_hf(source, **overrides) -> LlamaConfig:
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
  fields = {k: hf[k] for k in _REQUIRED}
  fields.update(num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(_rope_theta(hf)),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
  return LlamaConfig(**{**fields, **overrides})


def _hf_dict(source) -> tuple[dict, str]:
  if isinstance(source, Mapping):
    return dict(source), "config"
  path = pathlib.Path(source)
  path = path if path.suffix == ".json" else path / weights.CONFIG_FILE
  return weights.read_json(path), str(path)


def _refuse_unsupported(hf: dict, where: str) -> None:
  """Raises ValueError for the first config field lora_jax's Llama cannot reproduce."""
  model_type = hf.get("model_type", "llama")
  if model_type != "llama":
    raise ValueError(f"{where}: model_type {model_type!r} is not supported; config_from_hf reads "
                     f"Llama checkpoints (model_type 'llama') only.")
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    raise ValueError(f"{where}: no {', '.join(missing)}; a Llama config.json names every size "
                     f"({', '.join(_REQUIRED)}).")
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


def param_tree(config: LlamaConfig):
  """``LlamaForCausalLM(config)``'s parameter tree (no ``"params"`` level) as
  ShapeDtypeStructs."""
  return jax.eval_shape(LlamaForCausalLM(config).init, jax.random.key(0),
                        np.zeros((1, 2), np.int32))["params"]


def _tied_copy(tensors: Mapping, config: LlamaConfig) -> tuple[str, ...]:
  """``("lm_head.weight",)`` when a tied checkpoint also stores its head as an exact copy of the
  embedding (harmless, ignored); otherwise ``()``, and a stored head is unexpected."""
  head, embed = tensors.get(HEAD_TENSOR), tensors.get(EMBED_TENSOR)
  if not config.tie_word_embeddings or head is None or embed is None:
    return ()
  return (HEAD_TENSOR,) if head.shape == embed.shape and np.array_equal(head, embed) else ()


def check_tensors(tensors: Mapping, config: LlamaConfig, *, tree=None) -> None:
  """Checks a Llama checkpoint's tensors (arrays or ShapeDtypeStructs) against
  ``LlamaForCausalLM(config)``; old rotary buffers and a tied copy of the head are ignored.

  Args:
    tensors: checkpoint name -> tensor.
    config: the LlamaConfig the tensors should fit.
    tree: ``param_tree(config)``, when already at hand.

  Raises:
    ValueError: missing, unexpected and mis-shaped tensors (all listed).
  """
  tree = param_tree(config) if tree is None else tree
  expected = weights.checkpoint_shapes(FAMILY, tree, **weights.layout(config))
  buffers = tuple(k for k in tensors if k.endswith(_BUFFER))
  weights.check_checkpoint(tensors, expected, model="Llama",
                           ignore=buffers + _tied_copy(tensors, config))


def params_from_tensors(tensors: Mapping, config: LlamaConfig) -> dict:
  """The ``{"params": ...}`` tree of ``LlamaForCausalLM(config)`` from checkpoint tensors, cast
  to ``config.param_dtype``.

  Raises:
    ValueError: missing, unexpected or mis-shaped tensors (all listed).
  """
  tree = param_tree(config)
  check_tensors(tensors, config, tree=tree)
  return weights.params_from_checkpoint(tensors, FAMILY, tree, **weights.layout(config),
                                        dtype=jnp.dtype(config.param_dtype))


def load(folder, *, dtype=jnp.float32, **overrides):
  """``(config, params)`` of a Hugging Face Llama folder (``save_pretrained``'s output).

  Reads ``config.json``, then ``model.safetensors`` (or the shards of
  ``model.safetensors.index.json``) with NumPy, no torch, memory-mapped, one tensor at a time
  (``params_from_source``). The parameters are cast to ``dtype``,
  which also becomes the config's ``dtype`` and ``param_dtype`` unless ``overrides`` (any
  LlamaConfig field: ``scan_layers``, ``remat``, ...) set them; they follow ``param_dtype``.

  Raises:
    FileNotFoundError: no ``config.json`` or weights (the message names the path).
    ValueError: an unsupported config (``config_from_hf``), or missing, unexpected or mis-shaped
      tensors (all listed in one message).
  """
  folder = pathlib.Path(folder)
  config = config_from_hf(folder, **{"dtype": dtype, "param_dtype": dtype, **overrides})
  return config, params_from_source(sources.SafetensorsSource(folder), config)


def params_from_source(source, config: LlamaConfig) -> dict:
  """``params_from_tensors``' tree from a model source (``lora_jax.models.sources``), checked on
  its listing before any tensor is read, each leaf then made in place from the parts it holds
  (``weights.params_from_source``): no whole-checkpoint copy is built on the host (the memory
  map's touched pages still count in the process's RSS until the OS drops them).

  Raises:
    ValueError: missing, unexpected or mis-shaped tensors (all listed).
  """
  tree = param_tree(config)
  listed = {n: jax.ShapeDtypeStruct(t.shape, np.float32) for n, t in source.tensors().items()}
  if config.tie_word_embeddings:  # a stored head is harmless only as an exact copy (read both)
    listed.update({n: source.read(n) for n in (HEAD_TENSOR, EMBED_TENSOR) if n in listed})
  check_tensors(listed, config, tree=tree)
  return weights.params_from_source(source, FAMILY, tree, **weights.layout(config),
                                    dtype=jnp.dtype(config.param_dtype))


def tensors_from_params(params, config: LlamaConfig, *, dtype="float32"
                        ) -> dict[str, np.ndarray]:
  """Checkpoint tensors under Hugging Face names from a ``LlamaForCausalLM(config)`` tree
  (``{"params": ...}``, e.g. merged LoRA weights; the inverse of ``params_from_tensors``), cast to
  ``dtype`` and ready for ``safetensors.numpy.save_file``. A tied config has no ``lm_head``.

  Raises:
    ValueError: ``params`` is not ``{"params": tree}``, or its tree lacks, adds or mis-shapes a
      parameter of ``LlamaForCausalLM(config)`` (all listed).
  """
  if not isinstance(params, Mapping) or "params" not in params:
    raise ValueError(f"params must be {{'params': tree}} as llama_io.load returns it, got a "
                     f"{type(params).__name__} without a 'params' key.")
  tree = param_tree(config)
  problems = weights.fit_problems(weights.shapes(params["params"]), weights.shapes(tree))
  if problems:
    raise ValueError("params do not fit the Llama config; " + "; ".join(problems) + ". Pass the "
                     "config the parameters were loaded or initialized with (scan_layers and "
                     "tie_word_embeddings included).")
  return weights.checkpoint_from_params(params["params"], FAMILY, tree, **weights.layout(config),
                                        dtype=jnp.dtype(dtype))


def hf_config(config: LlamaConfig, *, dtype="float32", bos_token_id=None,
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


def save(folder, config: LlamaConfig, params, *, dtype="float32", bos_token_id=None,
         eos_token_id=None, extra_files: Mapping[str, bytes | str] | None = None) -> pathlib.Path:
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
  files = {weights.CONFIG_FILE: json.dumps(hf_config(
      config, dtype=dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id), indent=2) + "\n",
           **_extra_files(extra_files or {})}
  tensors = tensors_from_params(params, config, dtype=_save_dtype(dtype))
  _refuse_existing(folder)
  weights.write_folder(folder, tensors, files)
  return folder


def _extra_files(extra: Mapping) -> dict[str, bytes | str]:
  for name, data in extra.items():
    if not isinstance(name, str) or pathlib.PurePath(name).name != name or name in (".", ".."):
      raise ValueError(f"extra_files name {name!r} is not a plain file name; llama_io.save writes "
                       f"files directly inside the folder.")
    if name in (weights.CONFIG_FILE, weights.SAFETENSORS):
      raise ValueError(f"extra_files name {name!r} collides with the file llama_io.save writes; "
                       f"leave it out.")
    if not isinstance(data, (bytes, str)):
      raise TypeError(f"extra_files[{name!r}] is {type(data).__name__}; pass bytes or str.")
  return dict(extra)


def _refuse_existing(folder: pathlib.Path) -> None:
  if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
    raise FileExistsError(f"{folder} already exists and is not an empty folder; llama_io.save does "
                          f"not overwrite: choose a new path or remove it first.")
