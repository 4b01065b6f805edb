"""Adapter folders for the many-adapter tests: three different adapters of SmolLM2 (other
targets, ranks and alphas; two lora_jax checkpoints and one PEFT folder), random but nonzero,
so that each changes the model's answers."""

import pathlib

import jax

import lora_jax
from _utils import randomize_b
from lora_jax.app import causal

# name: (targets, rank, alpha, format, B's scale)
SMOLLM2_ADAPTERS = {
    "qv": ("q_proj|v_proj", 4, 8.0, "checkpoint", 0.2),
    "mlp": ("gate_proj|up_proj|down_proj", 8, 32.0, "checkpoint", 0.05),
    "attn": ("q_proj|k_proj|v_proj|o_proj", 2, 4.0, "peft", 0.3),
}


def write_smollm2_adapters(folder, model) -> dict[str, str]:
  """``{name: path}`` of the three adapters written under ``folder`` for ``model`` (a
  ``lora_jax.app.causal.Model``)."""
  uses = causal.analyze(model)
  paths = {}
  for seed, (name, (targets, rank, alpha, fmt, scale)) in enumerate(SMOLLM2_ADAPTERS.items()):
    config = lora_jax.LoraConfig(targets=targets, rank=rank, alpha=alpha)
    tree = lora_jax.init(config, model.params, key=jax.random.key(seed), uses=uses)
    tree = randomize_b(tree, jax.random.key(100 + seed), scale=scale)
    path = pathlib.Path(folder) / name
    if fmt == "peft":
      lora_jax.peft.export_peft(path, jax.device_get(tree), config=config,
                                base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
                                task_type="CAUSAL_LM")
    else:
      lora_jax.checkpoint.save(path, 0, tree, config=config, base=model.params)
    paths[name] = str(path)
  return paths
