"""Hugging Face PEFT interoperability: lora_jax adapters to and from PEFT's saved LoRA format.

``export_peft`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT 0.21's
``save_pretrained`` does, so ``peft.PeftModel.from_pretrained`` loads a lora_jax adapter onto the
matching transformers model; ``import_peft`` reads such a folder back onto the Flax params of
the project's model (``lora_jax.models``), concrete or ``jax.eval_shape``-abstract.

Modules: ``names`` (tensor names and config fields), ``layout`` (a kernel's A, B in PyTorch's
layouts), ``export``, ``files`` (reading a folder), ``checks`` (what a folder must hold before
it is applied), ``load``. The format itself (names, tensors, extras, scales) is specified in
``docs/formats.md``.
"""

from lora_jax.peft.export import export_peft, peft_config
from lora_jax.peft.files import read_config, read_tensors
from lora_jax.peft.load import import_peft
from lora_jax.peft.names import (CONFIG_FILE, PEFT_DEFAULTS, PEFT_VERSION, UNSUPPORTED,
                                 WEIGHTS_FILE, PeftConfigWarning, grouped_patterns,
                                 model_fan_in_fan_out, pattern_value, patterns, torch_name)

__all__ = ["CONFIG_FILE", "PEFT_DEFAULTS", "PEFT_VERSION", "UNSUPPORTED", "WEIGHTS_FILE",
           "PeftConfigWarning", "export_peft", "grouped_patterns", "import_peft",
           "model_fan_in_fan_out", "pattern_value", "patterns", "peft_config", "read_config",
           "read_tensors", "torch_name"]
