"""lora_jax: LoRA (low-rank adaptation) for any JAX function, Flax linen and NNX included."""

from lora_jax.adapters import LoraWeights as LoraWeights
from lora_jax.adapters import init as init
from lora_jax.adapters import merge as merge
from lora_jax.adapters import unmerge as unmerge
from lora_jax.config import ALL_LINEAR as ALL_LINEAR
from lora_jax.inits import convert_to_lora as convert_to_lora
from lora_jax.inits import init_with_base as init_with_base
from lora_jax.config import LoraConfig as LoraConfig
from lora_jax.targets import ParamCount as ParamCount
from lora_jax.targets import Plan as Plan
from lora_jax.targets import Target as Target
from lora_jax.targets import count as count
from lora_jax.targets import plan as plan
from lora_jax.transform import KernelUse as KernelUse
from lora_jax.transform import LoraFallbackWarning as LoraFallbackWarning
from lora_jax.transform import analyze as analyze
from lora_jax.train import StepOutput as StepOutput
from lora_jax.train import lora_plus as lora_plus
from lora_jax.train import train_step as train_step
from lora_jax.train import value_and_grad as value_and_grad
from lora_jax.transform import lora as lora

from lora_jax import bank as bank  # noqa: E402  many adapters: AdapterBank, mixed batches
from lora_jax import checkpoint as checkpoint  # noqa: E402  save / restore (orbax)
from lora_jax import combine as combine  # noqa: E402  weighted combination of adapters (PEFT)
from lora_jax import dora as dora  # noqa: E402  DoRA: the weight-decomposed adapter kind
from lora_jax import inits as inits  # noqa: E402  PiSSA / OLoRA and PEFT's conversion
from lora_jax import family as family  # noqa: E402  model-family records (the registry)
from lora_jax import kernels as kernels  # noqa: E402  kernel kinds (dense, quantized)
from lora_jax import peft as peft  # noqa: E402  export_peft / import_peft (Hugging Face PEFT)
from lora_jax import quant as quant  # noqa: E402  QLoRA: quantized frozen kernels
from lora_jax import sharding as sharding  # noqa: E402  meshes, adapter shardings, sharded step

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR",
    "KernelUse",
    "LoraConfig",
    "LoraFallbackWarning",
    "LoraWeights",
    "ParamCount",
    "Plan",
    "StepOutput",
    "Target",
    "analyze",
    "convert_to_lora",
    "count",
    "init",
    "init_with_base",
    "lora",
    "lora_plus",
    "merge",
    "plan",
    "train_step",
    "unmerge",
    "value_and_grad",
]
