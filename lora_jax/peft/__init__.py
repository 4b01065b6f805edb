"""Hugging Face PEFT interoperability: lora_jax adapters to and from PEFT's saved LoRA format.

``export_peft`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT 0.21's
``save_pretrained`` does, so ``peft.PeftModel.from_pretrained`` loads a lora_jax adapter onto the
matching transformers model; ``import_peft`` reads such a folder back onto the Flax params of
the project's model (``lora_jax.models``), concrete or ``jax.eval_shape``-abstract.

Names, one rule (``torch_name``): drop a leading ``params`` collection and the trailing
``kernel``, join with '.', and write the layer index after the layer-stack module of a
registered model family (``lora_jax.family``; this module names none):
``encoder/layer_3/attention/self/query/kernel`` (an unrolled stack) or
``encoder/layer/attention/self/query/kernel`` at index 3 of its stacked axis (a scanned stack)
is ``encoder.layer.3.attention.self.query``. Other models: ``name_map=``.

``modules_to_save`` extras are written under their module's name with PyTorch's parameter
names (``kernel`` and ``scale`` -> ``weight``, a Linear kernel transposed), e.g.
``base_model.model.classifier.weight``, and listed in the config's ``modules_to_save``.
Biases trained in place (``LoraConfig.bias``, PEFT's ``bias``) are written as PEFT's
``get_peft_model_state_dict`` writes them: ``base_model.model.<module>.bias``, and
``<module>.base_layer.bias`` for an adapted module (PEFT wraps it; the bias is its base
layer's).

Tensors: ``base_model.model.<module>.lora_A.weight`` is ``a.T`` (r, in) and ``lora_B.weight``
is ``b.T`` (out, r), as ``torch.nn.Linear`` stores (out, in); kernels with several input or
output axes are flattened. GPT-2's ``Conv1D`` layers (``fan_in_fan_out``) use the same A and B.
An embedding table (a leaf named ``embedding``, (vocab, features)) has PEFT's
``lora_embedding_A`` (r, vocab) = ``a.T`` and ``lora_embedding_B`` (features, r) = ``b.T``
(no ``.weight``). A convolution's kernel (*window, in, out) (a kernel ``analyze`` saw as a
``conv_general_dilated`` filter) has a ``torch.nn.Conv*d`` layout: ``lora_A.weight``
(r, in, *window) and ``lora_B.weight`` (out, r, 1, ...) from a (*window, in, r), b (r, out).
The scale is not stored: it is ``lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``) after
PEFT's ``rank_pattern`` and ``alpha_pattern``, which match a regular expression against the
end of the dotted module name (``peft.utils.other.get_pattern_key``); the first key wins.
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
