"""The public API is exactly what __init__ lists."""

import inspect

import lora_jax

PUBLIC = [
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


def test_public_api_is_pinned():
  assert lora_jax.__all__ == PUBLIC
  for name in PUBLIC:
    assert getattr(lora_jax, name) is not None
  exported = {n for n in dir(lora_jax)
              if not n.startswith("_") and not inspect.ismodule(getattr(lora_jax, n))}
  assert exported == set(PUBLIC)


def test_submodules_for_checkpoints_and_peft():
  assert callable(lora_jax.checkpoint.save) and callable(lora_jax.checkpoint.restore)
  assert callable(lora_jax.peft.export_peft) and callable(lora_jax.peft.import_peft)
  assert callable(lora_jax.sharding.adapter_shardings) and callable(lora_jax.sharding.mesh)
  assert callable(lora_jax.quant.quantize) and callable(lora_jax.quant.dequantize)
