"""The decoder of a causal-LM run: the bundled SmolLM2-135M-Instruct GGUF, any
Llama-architecture ``.gguf`` file, or a Hugging Face Llama folder (``config.json``,
``model.safetensors``, ``tokenizer.json``)."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp

import lora_jax
from lora_jax import quant
from lora_jax.app.causal.options import DEFAULT_MODEL, DTYPES
from lora_jax.models import chat, gguf, llama, llama_io

HUB_NAMES = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded decoder: its config, parameters, tokenizer and name."""

  config: llama.LlamaConfig
  params: dict
  tokenizer: object  # lora_jax.models.chat.ChatTokenizer
  name: str


def _not_a_model(path: pathlib.Path) -> str | None:
  """What an existing ``--model`` path is when it cannot be a model; None otherwise."""
  if path.is_dir() and path.suffix == ".gguf":
    return "a folder, not a .gguf file"
  if path.is_dir() and not (path / "config.json").is_file():
    return "a folder without config.json"
  if path.is_file() and path.suffix != ".gguf":
    return "a file that is not a .gguf"
  return None


def load_model(name: str, *, dtype: str = "float32", quantize: str = "none",
               **overrides) -> Model:
  """The named bundled model, a ``.gguf`` file or a Hugging Face Llama folder; with
  ``quantize`` (not "none") its projection kernels are ``lora_jax.quant`` kinds (a GGUF's
  tensors stored in that format keep their bytes).

  Raises:
    ValueError: none of those (the message says what is accepted), or kernels the format
      cannot hold (an input size that is not a multiple of its block).
  """
  jdtype = DTYPES[dtype]
  path = pathlib.Path(name)
  fmt, double = quant.parse_choice(quantize)
  expected = (f"expected {DEFAULT_MODEL} (the bundled GGUF), a .gguf file or a Hugging Face "
              f"Llama folder (config.json, model.safetensors, tokenizer.json).")
  if name != DEFAULT_MODEL and (what := _not_a_model(path)):
    raise ValueError(f"model {name!r} is {what}; {expected}")
  if name == DEFAULT_MODEL or name.endswith(".gguf"):
    file = gguf.read(gguf.smollm2_path() if name == DEFAULT_MODEL else path)
    config = gguf.llama_config(file, dtype=jdtype, param_dtype=jdtype, **overrides)
    if fmt is not None and not double:
      return Model(config, gguf.quantized_params(file, config, fmt),
                   chat.load_chat_tokenizer(file), name)
    params = llama_io.params_from_tensors(gguf.hf_tensors(file, config), config)
    model = Model(config, params, chat.load_chat_tokenizer(file), name)
  elif path.is_dir():
    config, params = llama_io.load(path, dtype=jdtype, **overrides)
    model = Model(config, params, chat.load_folder_tokenizer(path), str(path))
  else:
    raise ValueError(f"model {name!r} not found: {expected}")
  if fmt is None:
    return model
  uses = analyze(model)
  params = jax.jit(lambda p: quant.quantize(p, fmt, double_quant=double, uses=uses))(
      model.params)
  return dataclasses.replace(model, params=params)



def analyze(model: Model) -> dict:
  """``lora_jax.analyze`` of the model's Llama on a short example: each kernel's axis roles."""
  module = llama.LlamaForCausalLM(model.config)
  return lora_jax.analyze(module.apply, model.params, jnp.ones((1, 8), jnp.int32))

