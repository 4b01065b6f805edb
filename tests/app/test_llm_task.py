"""The chat / text task's mechanics on tiny random Llamas: assistant-only targets, the masked
loss against a hand computation, packing, the key-value cache, and the command line (train,
eval, generate, merge, export-peft, --mesh, bad input) on a tiny Llama folder that carries
SmolLM2's tokenizer."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import generate as gen
from lora_jax.app import causal
from lora_jax.models import llama
from _llm import SENTIMENT, needs_smollm2, tiny_llama_folder, write_gguf, write_jsonl

TINY = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=64)


@functools.lru_cache(maxsize=None)
def _tiny(scan: bool = True):
  config = llama.LlamaConfig(**{**TINY.__dict__, "scan_layers": scan})
  module = llama.LlamaForCausalLM(config)
  return module, module.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)), jax.jit(module.apply)


def _example(ids, first_target):
  return causal.Example(tuple(ids), tuple(i >= first_target for i in range(len(ids))))


# ----------------------------------------------------------------------- the loss


def test_masked_loss_equals_a_hand_computed_loss_and_prompts_get_no_gradient():
  module, params, apply = _tiny()
  examples = [_example([5, 9, 3, 7, 11, 2], 4), _example([8, 1, 6, 2], 2)]
  batch = causal.padded_batch(examples, 64)
  logits = np.asarray(apply(params, batch["input_ids"],
                                   attention_mask=batch["attention_mask"]), np.float64)
  terms = []  # by hand: -log softmax(logits[t])[token t+1] for every target token t+1
  for row, e in enumerate(examples):
    for t in range(len(e.ids) - 1):
      if e.targets[t + 1]:
        z = logits[row, t] - logits[row, t].max()
        terms.append(np.log(np.exp(z).sum()) - z[e.ids[t + 1]])
  assert len(terms) == 2 + 2
  loss = causal.masked_loss(jnp.asarray(logits, jnp.float32), batch)
  np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
  grad = np.asarray(jax.grad(causal.masked_loss)(jnp.asarray(logits, jnp.float32), batch))
  carries = np.zeros(grad.shape[:2], bool)  # logits at t carry gradient iff t+1 is a target
  carries[:, :-1] = batch["targets"][:, 1:]
  assert np.all(grad[~carries] == 0) and np.all(np.abs(grad[carries]).sum(-1) > 0)


def test_the_head_on_selected_positions_gives_the_same_loss_and_gradients():
  module, params, _ = _tiny()
  examples = [_example([5, 9, 3, 7, 11, 2, 4, 8, 1, 3, 6, 2, 9, 9, 5, 7, 2], 15),
              _example([8, 1, 6, 2, 4, 4, 4, 1, 2, 3, 4, 5, 6, 7, 8, 9], 14)]
  full = causal.padded_batch(examples, 64)
  selected = causal.select_targets(full)
  assert selected["select"].shape == (2, 8) and selected["select_weights"].sum() == 4
  loss = lambda p, b: causal.loss_of(module.apply, p, b)  # noqa: E731
  (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(loss))(params, x) for x in (full, selected))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_a_shared_prefix_run_once_gives_the_same_loss_and_gradients():
  module, params, _ = _tiny()
  start = [7, 3, 9, 1, 4, 4, 2, 8, 6, 5, 3]  # 11 shared tokens: 8 of them split off
  examples = [_example(start + [5, 9, 3, 7, 11, 2], 13), _example(start + [8, 1, 6, 2], 12),
              _example(start + [3, 3, 1, 2, 9, 9, 9, 4, 2], 14)]
  full = causal.padded_batch(examples, 64)
  shared = causal.share_prefix(full)
  assert shared["prefix_ids"].tolist() == [start[:8]] and shared["input_ids"].shape == (3, 16)
  cache = functools.partial(llama.init_cache, module.config)
  loss = jax.jit(jax.value_and_grad(
      lambda p, b: causal.loss_of(module.apply, p, b, init_cache=cache)))
  a, ga = loss(params, full)
  for batch in (shared, causal.select_targets(shared)):
    b, gb = loss(params, batch)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
      np.testing.assert_allclose(x, y, atol=1e-5)
  assert causal.share_prefix(causal.padded_batch(examples[:1] + [_example([1] * 9, 3)], 64)) \
      .keys() == full.keys()  # no shared start of 8 tokens: unchanged


@needs_smollm2
def test_chat_targets_are_the_assistant_turns_only():
  from lora_jax.models import chat
  tok = chat.load_chat_tokenizer()
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Colour of the sky?"},
              {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "And grass?"},
              {"role": "assistant", "content": "Green, mostly."}]
  e = causal.chat_example(tok, messages)
  assert list(e.ids) == tok.encode(tok.render(messages))
  picked = [i for i, t in zip(e.ids, e.targets) if t]
  assert tok.decode(picked, skip_special_tokens=False) == "Blue.<|im_end|>Green, mostly.<|im_end|>"
  assert e.answer == "Green, mostly."
  assert tok.decode(e.prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------- packing and positions


@pytest.mark.parametrize("scan", [True, False])
def test_packed_examples_do_not_attend_to_each_other(scan):
  module, params, apply = _tiny(scan)
  examples = [_example([3, 4, 5, 6, 7], 2), _example([9, 8, 7], 1), _example([1, 2, 3, 4], 3)]
  rows = causal.pack(examples, 16)
  assert len(rows) == 1
  packed = causal.packed_batch(rows, 16)
  logits = apply(params, packed["input_ids"], positions=packed["positions"],
                        attention_mask=packed["attention_mask"],
                        segment_ids=packed["segment_ids"])
  at = 0
  for e in examples:  # each example alone gives the same logits as inside the packed row
    alone = apply(params, jnp.asarray([e.ids]))
    np.testing.assert_allclose(logits[0, at:at + len(e.ids)], alone[0], atol=1e-5)
    at += len(e.ids)
  padded = causal.padded_batch(examples, 16)
  loss_padded = causal.masked_loss(apply(params, padded["input_ids"],
                                                attention_mask=padded["attention_mask"]), padded)
  np.testing.assert_allclose(causal.masked_loss(logits, packed), loss_padded, rtol=1e-5)


def test_pack_fills_rows_up_to_max_length():
  examples = [_example(range(n), 1) for n in (5, 6, 4, 9, 2)]
  rows = causal.pack(examples, 10)
  assert [[len(e.ids) for e in r] for r in rows] == [[5], [6, 4], [9], [2]]
  batch = causal.packed_batch(rows, 10)
  assert batch["segment_ids"][1].tolist() == [1] * 6 + [2] * 4
  assert batch["positions"][1].tolist() == list(range(6)) + list(range(4))
  assert not batch["targets"][1, 6]  # an example's first token is never a target


def test_cached_greedy_decoding_equals_recomputing_without_a_cache():
  """Left-padded batched decoding with the cache gives the tokens of the plain argmax loop
  that re-runs the whole unpadded sequence at every step."""
  module, params, apply = _tiny()
  prompts = [[5, 9, 3], [8, 1, 6, 2, 4, 7, 10], [12]]
  result = gen.generate(module.apply, params, prompts, max_new_tokens=4,
                        init_cache=functools.partial(llama.init_cache, module.config))
  for prompt, got in zip(prompts, result.tokens):
    seq = list(prompt)
    for _ in range(4):
      seq.append(int(jnp.argmax(apply(params, jnp.asarray([seq]))[0, -1])))
    assert got == seq[len(prompt):]


def test_a_shared_start_runs_once_at_batch_1_and_decodes_the_same_tokens():
  """The prompts' common start (whole multiples of 16 tokens) fills the cache once, at batch 1;
  greedy and sampled tokens equal those of every row running its whole prompt."""
  module, params, apply = _tiny()
  start = list(range(3, 23))  # 20 shared tokens: 16 of them run once
  prompts = [start + [5, 9], start + [8, 1, 6, 2, 4], start + [12]]
  assert gen.shared_start(prompts) == 16 and gen.shared_start(prompts[:1]) == 0
  assert gen.shared_start([start[:16], start]) == 0  # every row keeps a token of its own
  seen = []

  def traced(params, tokens, **kw):  # records the token shapes each jitted step is traced for
    seen.append(tokens.shape)
    return module.apply(params, tokens, **kw)

  cache = functools.partial(llama.init_cache, module.config)
  hot = gen.Sampling(temperature=1.0, top_k=20)
  for sampling in (gen.GREEDY, hot):
    runs = [gen.generate(traced, params, prompts, max_new_tokens=6, init_cache=cache,
                         sampling=sampling, key=jax.random.key(3), share_prefix=share)
            for share in (True, False)]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].prompt_tokens == runs[1].prompt_tokens == sum(map(len, prompts))
  assert seen[:3] == [(1, 16), (3, 16), (3, 1)] and (3, 32) in seen  # shared; whole prompts
  for prompt, got in zip(prompts, runs[0].tokens[:1]):  # and the plain argmax loop's tokens
    seq = list(prompt)
    for _ in range(6):
      seq.append(int(jnp.argmax(apply(params, jnp.asarray([seq]))[0, -1])))
  greedy = gen.generate(module.apply, params, prompts, max_new_tokens=6, init_cache=cache)
  assert greedy.tokens[0] == seq[len(prompts[0]):]


def test_generation_stops_and_sampling_is_keyed():
  module, params, apply = _tiny()
  cache = functools.partial(llama.init_cache, module.config)
  greedy = gen.generate(module.apply, params, [[5, 9, 3]], max_new_tokens=6, init_cache=cache)
  stop = greedy.tokens[0][2]
  first = greedy.tokens[0].index(stop)
  stopped = gen.generate(module.apply, params, [[5, 9, 3]], max_new_tokens=6, init_cache=cache,
                         stop_ids=[stop])
  assert stopped.tokens[0] == greedy.tokens[0][:first + 1]
  hot = gen.Sampling(temperature=1.5, top_k=20, top_p=0.95)
  draw = lambda seed: gen.generate(  # noqa: E731
      module.apply, params, [[5, 9, 3]], max_new_tokens=12, init_cache=cache, sampling=hot,
      key=jax.random.key(seed)).tokens
  assert draw(1) == draw(1) and draw(1) != draw(2)
  with pytest.raises(ValueError, match="needs an explicit PRNG key"):
    gen.generate(module.apply, params, [[5]], max_new_tokens=2, init_cache=cache, sampling=hot)
  with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
    gen.generate(module.apply, params, [[5] * 60], max_new_tokens=8, init_cache=cache,
                 context=64)
  with pytest.raises(ValueError, match="top_p must be in"):
    gen.Sampling(temperature=1.0, top_p=1.5)


def test_sampling_filters_keep_the_top_k_and_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draws = lambda s: np.asarray([int(gen.sample(logits, k, s)[0]) for k in keys])  # noqa: E731
  assert set(draws(gen.Sampling(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draws(gen.Sampling(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
  assert set(draws(gen.Sampling(temperature=1.0, top_k=1))) == {0}


# ----------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("llm")
  model = tiny_llama_folder(root / "model")
  data = write_jsonl(root / "train.jsonl", SENTIMENT * 3)
  return root, model, data


def _main(capsys, *argv):
  from lora_jax.app import cli
  code = cli.main([str(a) for a in argv])
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.fixture(scope="module")
def chat_run(folder):
  from lora_jax.app import cli
  root, model, data = folder
  out = root / "run"
  code = cli.main(["train", "--task", "chat", "--model", str(model), "--data", str(data),
                   "--steps", "4", "--eval-every", "2", "--log-every", "1", "--batch-size", "4",
                   "--max-length", "64", "--targets", "all-linear", "--out", str(out)])
  assert code == 0
  return out


@pytest.mark.slow
@needs_smollm2
def test_chat_run_trains_evaluates_and_generates(folder, chat_run, capsys):
  root, model, data = folder
  metrics = json.loads((chat_run / "metrics.json").read_text())
  config = json.loads((chat_run / "config.json").read_text())
  assert config["task"] == "chat" and config["labelled"] is True
  assert [h["step"] for h in metrics["history"]] == [2, 4]
  assert 0 <= metrics["val_accuracy"] <= 1
  # all-linear on 2 layers: q (32->32), k, v (32->16), o (32->32), gate, up (32->64),
  # down (64->32), each r * (in + out) with r = 8
  per_layer = 8 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32))
  assert metrics["counts"]["trainable"] == 2 * per_layer
  code, out, _ = _main(capsys, "eval", chat_run, "--data", data)
  assert code == 0 and "loss " in out and "perplexity " in out and "accuracy " in out
  code, out, err = _main(capsys, "generate", chat_run, "--prompt", "hello", "--max-new-tokens",
                         "3")
  assert code == 0 and "tokens/s" in err and "unmerged adapters" in err
  code, out, err = _main(capsys, "generate", chat_run, "--prompt", "hello", "--max-new-tokens",
                         "300")
  assert code == 2 and err.count("\n") == 1 and "exceeds the model's context of 256" in err


@pytest.mark.slow
@needs_smollm2
def test_chat_run_on_a_mesh_gives_one_devices_losses(folder, chat_run, tmp_path):
  from lora_jax.app import cli
  root, model, data = folder
  assert cli.main(["train", "--task", "chat", "--model", str(model), "--data", str(data),
                   "--steps", "4", "--eval-every", "4", "--log-every", "1", "--batch-size", "4",
                   "--max-length", "64", "--targets", "all-linear", "--mesh", "2x4", "--out",
                   str(tmp_path / "m")]) == 0
  read = lambda run: [json.loads(line) for line in  # noqa: E731
                      (run / "metrics.jsonl").read_text().splitlines() if "train_loss" in line]
  one, mesh = read(chat_run), read(tmp_path / "m")
  assert [r["step"] for r in mesh] == [r["step"] for r in one] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["train_loss"] for r in mesh], [r["train_loss"] for r in one],
                             rtol=1e-4)


@pytest.mark.slow
@pytest.mark.interop
@needs_smollm2
def test_merged_folder_and_peft_export_give_our_logits(folder, chat_run, capsys, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  root, model, data = folder
  task, trainable = causal.load(chat_run)
  ids = np.asarray([task.tokenizer.encode("a great film, wonderful acting")], np.int32)
  ours = np.asarray(lora_jax.lora(task.module.apply)(task.base, trainable, jnp.asarray(ids)))
  assert _main(capsys, "merge", chat_run, "--out", tmp_path / "merged")[0] == 0
  merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged",
                                                         dtype=torch.float32)
  with torch.no_grad():
    got = merged(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, ours, atol=1e-4)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
  assert tok("a great film, wonderful acting")["input_ids"] == ids[0].tolist()
  assert _main(capsys, "export-peft", chat_run, "--out", tmp_path / "peft")[0] == 0
  base = transformers.LlamaForCausalLM.from_pretrained(model, dtype=torch.float32)
  adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
  with torch.no_grad():
    got = adapted(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, ours, atol=1e-4)


@pytest.mark.slow
@needs_smollm2
def test_text_task_with_packing(folder, tmp_path, capsys):
  root, model, _ = folder
  text = tmp_path / "corpus.txt"
  text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog."
                              for i in range(12)))
  code, out, err = _main(capsys, "train", "--task", "text", "--model", model, "--data", text,
                         "--packing", "--steps", "2", "--eval-every", "2", "--batch-size", "2",
                         "--max-length", "64", "--out", tmp_path / "t")
  assert code == 0, err
  metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
  assert "val_accuracy" not in metrics and np.isfinite(metrics["val_loss"])


@pytest.mark.slow
@needs_smollm2
def test_a_qlora_run_trains_on_a_quantized_base_and_evaluates(folder, tmp_path, capsys):
  """--quantize q4_1: the projections stay Q4_1 blocks; the run saves and evaluates like any
  other (merging is lora_jax.merge's: tests/core/test_quant.py)."""
  root, model, data = folder
  code, _, err = _main(capsys, "train", "--task", "chat", "--model", model, "--data", data,
                       "--quantize", "q4_1", "--steps", "2", "--eval-every", "2",
                       "--batch-size", "4", "--max-length", "64", "--out", tmp_path / "q")
  assert code == 0, err
  config = json.loads((tmp_path / "q" / "config.json").read_text())
  assert config["options"]["quantize"] == "q4_1"
  code, out, err = _main(capsys, "eval", tmp_path / "q", "--data", data)
  assert code == 0 and out.startswith("loss ") and "perplexity" in out, err
  # on a 2x4 mesh the codes and scales are split like W (tensor-parallel): the same losses
  code, _, err = _main(capsys, "train", "--task", "chat", "--model", model, "--data", data,
                       "--quantize", "q4_1", "--steps", "2", "--eval-every", "2",
                       "--batch-size", "4", "--max-length", "64", "--mesh", "2x4",
                       "--out", tmp_path / "qm")
  assert code == 0, err
  losses = [json.loads((tmp_path / r / "metrics.json").read_text())["history"][-1]["loss"]
            for r in ("q", "qm")]
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)


@pytest.mark.slow
@needs_smollm2
def test_generate_on_a_quantized_model_gives_its_dequantized_models_tokens(folder, capsys):
  """``lora-jax generate MODEL --quantize q4_1``: the base runs through the transform with its
  Q4_1 blocks; greedy tokens equal the dequantized parameters' own (the same values)."""
  from lora_jax import quant
  root, model, _ = folder
  got = causal.generate_text(str(model), ["Is 'a mess' positive?"], max_new_tokens=6,
                             quantize="q4_1")
  loaded = causal.load_model(str(model), quantize="q4_1")
  tok = loaded.tokenizer
  ids = tok.encode(tok.render([{"role": "user", "content": "Is 'a mess' positive?"}],
                              add_generation_prompt=True))
  want = gen.generate(
      llama.LlamaForCausalLM(loaded.config).apply, quant.dequantize(loaded.params), [ids],
      init_cache=functools.partial(llama.init_cache, loaded.config), max_new_tokens=6,
      stop_ids=tok.stop_ids, pad_id=tok.pad_id or 0)
  assert got.generation.tokens == want.tokens and not got.adapted
  code, _, err = _main(capsys, "generate", model, "--prompt", "hi", "--quantize", "nf4")
  assert code == 2 and "not a multiple of nf4's block of 64" in err  # width 32


@pytest.mark.slow
@needs_smollm2
def test_bad_input_is_one_line_and_exit_2(folder, tmp_path, capsys):
  root, model, data = folder
  no_answer = write_jsonl(tmp_path / "bad.jsonl", [
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
      {"messages": [{"role": "user", "content": "hello?"}]}])
  cases = [
      (["train", "--task", "chat", "--model", model, "--data", no_answer],
       f"{no_answer} line 2: the conversation has no assistant turn"),
      (["train", "--task", "chat", "--model", model, "--data", tmp_path / "none.jsonl"],
       "does not exist"),
      (["train", "--task", "chat", "--model", model],
       "--data is required for --task chat"),
      (["train", "--task", "chat", "--model", model, "--data", data, "--pooling", "mean"],
       "--pooling applies to --task classify, not chat"),
      (["train", "--task", "chat", "--model", tmp_path / "nothing", "--data", data],
       "not found: expected smollm2-135m-instruct"),
      (["train", "--task", "text", "--model", model, "--data", data],
       "a text row needs a string \"text\""),
      (["train", "--task", "chat", "--model", model, "--data", data, "--quantize", "nf4"],
       "has input size 32, not a multiple of nf4's block of 64"),
  ]
  for argv, message in cases:
    code, _, err = _main(capsys, *argv, "--out", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
  assert not (tmp_path / "r").exists()


@pytest.mark.slow
@needs_smollm2
def test_bad_model_files_are_one_line_and_exit_2(folder, tmp_path, capsys):
  from lora_jax.models import gguf
  root, model, data = folder
  other = write_gguf(tmp_path / "gpt2.gguf", "gpt2",
                     {"token_embd.weight": np.ones((16, 8), np.float32)})
  half = tmp_path / "half.gguf"
  real = gguf.smollm2_path().read_bytes()
  half.write_bytes(real[:len(real) // 2])
  cases = [
      (["generate", other, "--prompt", "hi"], "holds a 'gpt2' model (general.architecture)"),
      (["generate", half, "--prompt", "hi"], "half.gguf is not a complete GGUF file (truncated"),
      (["train", "--task", "chat", "--model", other, "--data", data, "--out", tmp_path / "r"],
       "only 'llama'-architecture GGUF files load"),
      (["generate", model, "--prompt", "hi " * 300], "exceeds the model's context of 256 tokens"),
  ]
  for argv, message in cases:
    code, _, err = _main(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
  assert not (tmp_path / "r").exists()


@pytest.mark.slow
@needs_smollm2
def test_a_chat_run_resumes_and_extends(chat_run, tmp_path, capsys):
  import shutil
  run = tmp_path / "run"
  shutil.copytree(chat_run, run)
  code, _, err = _main(capsys, "train", "--resume", "--steps", "6", "--out", run)
  assert code == 0, err
  history = json.loads((run / "metrics.json").read_text())["history"]
  assert [h["step"] for h in history] == [2, 4, 6]
  code, _, err = _main(capsys, "train", "--resume", "--steps", "8", "--task", "text", "--out",
                       run)
  assert code == 2 and "--task 'text' differs from the saved run's 'chat'" in err
