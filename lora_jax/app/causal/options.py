"""``lora-jax train --task chat|text``'s options: the run's and the causal-LM task's."""

from __future__ import annotations

import dataclasses
import typing

import jax.numpy as jnp

from lora_jax import quant
from lora_jax.app.options import OptionError, RunOptions, at_most, option

TASKS = ("chat", "text")
DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CausalOptions(RunOptions):
  """``lora-jax train --task chat|text``'s options: the run's and the task's."""

  LABEL: typing.ClassVar[str] = "chat/text"  # in help texts

  task: str = option("chat", "chat: loss on the assistant's tokens; text: on every token",
                     choices=TASKS)
  model: str = option(DEFAULT_MODEL, "smollm2-135m-instruct (the bundled GGUF), a Llama "
                                     ".gguf file, or a Hugging Face Llama folder")
  data: str | None = option(None, "training .jsonl (chat: messages or prompt/response rows; "
                                  "text: text rows) or .txt (text)")
  val: str | None = option(None, "validation file; default: 10% of --data")
  max_length: int = option(512, "tokens per example (longer ones are cut) or per packed row")
  packing: bool = option(False, "pack examples into rows of --max-length tokens (masks keep "
                                "them apart) instead of padding each")
  share_prefix: bool = option(True, "run the tokens every row of a padded batch starts with "
                                    "(system prompt, instruction) once, as a key-value cache "
                                    "the rows attend to (the same loss, fewer FLOPs)")
  max_train: int | None = option(None, "use only the first N training examples")
  eval_examples: int = option(256, "validation examples scored at each evaluation (0: all)")
  max_new_tokens: int = option(16, "the longest greedy answer scored for accuracy")
  dtype: str = option("float32", "the frozen base's and the computation's dtype",
                      choices=tuple(DTYPES))
  batch_size: int = option(8, "examples (packed: rows) per step")
  quantize: str = option("none", "keep the frozen projection kernels quantized (QLoRA): q4_1 "
                                 "(a Q4_1 GGUF's own blocks, as stored), q8_0, nf4, nf4-dq "
                                 "(double-quantized scales), int8, or none (dense --dtype)",
                         choices=quant.CHOICES)

  def __post_init__(self):
    super().__post_init__()
    if self.task not in TASKS:
      raise OptionError("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}.")
    if self.dtype not in DTYPES:
      raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
    if self.quantize not in quant.CHOICES:
      raise OptionError("quantize", f"must be one of {', '.join(quant.CHOICES)}, got "
                                    f"{self.quantize!r}.")
    if self.quantize != "none" and self.init not in ("kaiming", "gaussian"):
      raise OptionError("init", f"{self.init} moves W's principal part into A and B, which a "
                                f"quantized base cannot give up (dequantize, initialise, "
                                f"requantize the residual with lora_jax.init_with_base and "
                                f"lora_jax.quant in Python); drop --quantize or use kaiming.")
    if not (isinstance(self.max_length, int) and not isinstance(self.max_length, bool)
            and self.max_length >= 8):
      raise OptionError("max_length", f"must be an integer >= 8, got {self.max_length!r}.")
    for name in ("max_train",):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, int) and value > 0):
        raise OptionError(name, f"must be an integer > 0, got {value!r}.")
    if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
      raise OptionError("max_new_tokens", f"must be an integer >= 1, got "
                                          f"{self.max_new_tokens!r}.")
    for name in ("max_length", "max_train", "max_new_tokens"):
      at_most(name, getattr(self, name))

