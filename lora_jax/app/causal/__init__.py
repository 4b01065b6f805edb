"""Causal-LM tasks on a Llama-family decoder: ``chat`` (the loss on the assistant's tokens
only) and ``text`` (every token), for ``lora-jax train --task chat|text``.

By capability: ``options`` (the task's options), ``model`` (loading the decoder), ``data``
(chat and text rows to examples), ``batches`` (padded and packed batches, the masked loss),
``task`` (the task for the runner, and saved runs: evaluate, merge, export) and ``generation``
(``lora-jax generate`` and the mixed batches ``lora-jax serve`` decodes). Each module's
docstring says what it reads and writes.
"""

from lora_jax.app import tasks
from lora_jax.app.causal import commands
from lora_jax.app.causal.batches import (BUCKETS, loss_of, masked_loss, pack, packed_batch,
                                         padded_batch, select_targets, share_prefix)
from lora_jax.app.causal.data import (LABEL_TOKENS, ROLES, Example, chat_example, labelled,
                                      messages_of, normalize, read_examples, text_examples)
from lora_jax.app.causal.generation import (Answers, adapted_apply, adapter_paths,
                                            generate_mixed, generate_text, load_bank,
                                            prompt_ids)
from lora_jax.app.causal.model import HUB_NAMES, Model, analyze, load_model
from lora_jax.app.causal.options import DEFAULT_MODEL, DTYPES, TASKS, CausalOptions
from lora_jax.app.causal.task import CausalLM, evaluate, export_peft, load, lora_config, merge

__all__ = ["BUCKETS", "DEFAULT_MODEL", "DTYPES", "HUB_NAMES", "LABEL_TOKENS", "ROLES", "TASKS",
           "Answers", "CausalLM", "CausalOptions", "Example", "Model", "adapted_apply",
           "adapter_paths", "analyze", "chat_example", "evaluate", "export_peft",
           "generate_mixed", "generate_text", "labelled", "load", "load_bank", "load_model",
           "loss_of", "lora_config", "masked_loss", "merge", "messages_of", "normalize", "pack",
           "packed_batch", "padded_batch", "prompt_ids", "read_examples", "select_targets",
           "share_prefix", "text_examples", "TASK"]

# ----------------------------------------------------------------------- the task record



def _evaluate(runs, files, args) -> list[dict[str, float]]:
  return [evaluate(run, file) for run, file in zip(runs, files)]


TASK = tasks.register(tasks.Task(
    names=TASKS, options=CausalOptions, new=CausalLM, evaluate=_evaluate, merge=merge,
    export_peft=export_peft, out="runs/llm-{task}",
    summary="chat (loss on the assistant's tokens) or text",
    about="chat/text with a Llama-family decoder",
    description="--task chat / text fine-tunes a Llama-family decoder (--model, default the "
                "bundled SmolLM2-135M-Instruct) on a .jsonl file (--data).",
    eval_help="masked loss, perplexity, exact-match accuracy",
    data_help="the task's .jsonl or .txt file", merge_help="a Hugging Face Llama folder",
    eval_needs_data=True,
    commands={"generate": tasks.Command(add=commands.add_generate_parser, run=commands.generate),
              "serve": tasks.Command(add=commands.add_serve_parser, run=commands.serve)}))
