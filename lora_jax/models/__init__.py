"""Reference Flax models, their family records, and the named configs of published checkpoints.

Each family's file (``bert.py``, ``gpt2.py``, ``llama.py``) holds the Flax model and its
``FAMILY`` record (``lora_jax.family.Family``: target aliases, partition rules, Hugging Face
layer stack, checkpoint table, named configs). ``FAMILIES`` below is the registry: adding a
family is one new file plus one entry there (or one ``lora_jax.family.register`` call from
anywhere). ``get("llama-2-7b")`` returns a named config's Flax module; ``abstract_params(name)``
its parameter tree as ``jax.ShapeDtypeStruct``s (no weights allocated), which is all
``lora_jax.plan`` needs to count a LoRA configuration on a 175B model.

Checkpoints: ``bert.load`` (the bundled MiniLM by default), ``llama_io.load`` / ``save``
(Hugging Face Llama folders) and ``gguf.load_llama`` (llama.cpp files), all through the
family-independent table in ``weights.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lora_jax import family, quant
from lora_jax.config import LoraConfig
from lora_jax.models import bert, gpt2, llama
from lora_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from lora_jax.targets import Plan, plan
from lora_jax.transform import analyze

FAMILIES = (llama.FAMILY, gpt2.FAMILY, bert.FAMILY)  # the registry: one line per family
for _record in FAMILIES:
  family.register(_record)


@dataclasses.dataclass(frozen=True)
class Spec:
  """A named configuration: its family's record, the model class and the model config."""

  family: str
  model: type
  config: object

  @property
  def record(self) -> family.Family:
    return family.get(self.family)


def configs() -> dict[str, Spec]:
  """Every registered family's named configs (families registered later included)."""
  return {name: Spec(f.name, model, config) for f in family.registered().values()
          for name, (model, config) in f.configs.items()}


CONFIGS: dict[str, Spec] = configs()  # the reference families' named configs


def get(name: str, **overrides):
  """The Flax module of a named config; ``overrides`` replace config fields (``scan_layers``,
  ``dtype``, ...).

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  return spec_of(name).model(_config(name, **overrides))


def spec_of(name: str) -> Spec:
  known = configs()
  if name not in known:
    raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(known)}.")
  return known[name]


def example_input(seq: int = 8):
  return jnp.zeros((1, seq), jnp.int32)


def abstract_params(name: str, **overrides):
  """The parameter tree of a named config as ShapeDtypeStructs; nothing is allocated."""
  model = get(name, **overrides)
  return jax.eval_shape(model.init, jax.random.key(0), example_input())


def _config(name: str, **overrides):
  return dataclasses.replace(spec_of(name).config, **overrides)


def targets_for(name: str, spec: str, **overrides) -> tuple[str, ...]:
  """Comma-separated target names for a named config: family aliases (``q,v``), module names
  (``q_proj``), ``all-linear``, or regular expressions, e.g. ``"q,v"`` -> ``("q_proj",
  "v_proj")`` for Llama (the family record's ``targets``)."""
  return spec_of(name).record.targets(spec, _config(name, **overrides), name=name)


def default_targets(name: str, **overrides) -> str:
  """PEFT's usual default: the query and value projections (GPT-2's fused c_attn)."""
  return spec_of(name).record.default_spec(_config(name, **overrides))


def variant(name: str, option: str) -> dict:
  """The config overrides of a family's named variant (``"separate_qkv"`` for GPT-2).

  Raises:
    ValueError: the family offers no such variant.
  """
  record = spec_of(name).record
  if option not in record.variants:
    offering = [f.name for f in family.registered().values() if option in f.variants]
    raise ValueError(f"--{option.replace('_', '-')} applies to the {', '.join(offering)} "
                     f"family only, not {name} ({record.name}).")
  return dict(record.variants[option])


def plan_model(name: str, config: LoraConfig, **overrides) -> Plan:
  """``lora_jax.plan`` for a named config, from abstract shapes (no weights allocated); axis
  roles of stacked kernels come from ``lora_jax.analyze`` of the model's ``apply``."""
  model = get(name, **overrides)
  params = jax.eval_shape(model.init, jax.random.key(0), example_input())
  return plan(config, params, uses=analyze(model.apply, params, example_input()))


def base_bytes(name: str, format: str | None = None, *, double_quant: bool = False,
               **overrides) -> dict:
  """``lora_jax.quant.base_bytes`` of a named config's frozen base, its matmul kernels (but
  the head) in ``format`` (None: as initialized), from abstract shapes (nothing allocated)."""
  model = get(name, **overrides)
  params = jax.eval_shape(model.init, jax.random.key(0), example_input())
  if format is not None:
    uses = analyze(model.apply, params, example_input())
    params = jax.eval_shape(lambda p: quant.quantize(p, format, double_quant=double_quant,
                                                     uses=uses), params)
  return quant.base_bytes(params)


__all__ = ["BertConfig", "BertForSequenceClassification", "BertModel", "CONFIGS", "FAMILIES",
           "GPT2Config", "GPT2LMHeadModel", "LlamaConfig", "LlamaForCausalLM", "Spec",
           "abstract_params", "base_bytes", "configs", "default_targets", "example_input", "get",
           "plan_model", "spec_of", "targets_for", "variant"]
