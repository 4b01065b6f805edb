"""SST-2 as instructions on a decoder LLM: lora_jax against Hugging Face PEFT on transformers.

Shaped like nanoGPT's bench.py: settings at the top (and on the command line), warm-up, timed
steps (each waited on: ``jax.block_until_ready``; torch on the CPU returns when it is done,
CUDA is synchronized), compile time reported apart, JSON out. Everything runs in one process,
in this order, on the same data:

  base_zero_shot  greedy exact-match accuracy of the base model (LoRA B = 0) on the eval rows.
  lora_jax        ``--steps`` AdamW steps of ``--batch`` examples through lora_jax's public path
                  (LoraConfig -> analyze -> init -> train_step), then its accuracy. Each batch
                  shape is compiled ahead of time (``compile_s``), so every timed step is a step.
  peft_eager      transformers' LlamaForCausalLM + ``peft.get_peft_model``, eager, the same
                  LoRA config, batches, learning-rate schedule and loss. The untimed warm-up
                  is one forward and backward pass per batch shape (``compile_s``: nothing
                  compiles, the first passes allocate). Its accuracy: its adapter, saved by
                  PEFT and read by ``lora_jax.peft.import_peft``, scored by the same evaluator
                  as lora_jax's (one evaluator for both, and fast enough for all of dev.tsv);
                  ``model.generate``'s own answers on the first ``--hf-check-rows`` rows are
                  reported beside it (``hf_generate_agreement``: the fraction that match).
  peft_compiled   (``--compile``) the same under ``torch.compile``; the warm-up compiles.

Accuracy: greedy answers (``MAX_NEW_TOKENS``), exact match after ``causal.normalize``, through
``lora_jax.generate`` with the adapters unmerged; prompts batched by length, each batch's shared
start (system prompt + instruction) run once into the key-value cache (``share_prefix``).

The task: each SST-2 row is one user turn (``prompt(sentence)``) and the assistant's answer
"positive" or "negative"; the loss is on the answer's tokens only (its text and end-of-turn
token), ``lora_jax.app.causal.masked_loss`` and its torch twin ``torch_masked_loss``. LoRA rank
8, alpha 16 on all seven projections of every layer (PEFT: the same ``target_modules``), AdamW
(weight decay 0.01) with a 10% linear warm-up from 0 and a cosine decay to 0
(``lora_jax.app.runner.optimizer_for``; torch: ``lr_factor`` as a LambdaLR). Batches are the
training rows shuffled by ``--seed``, right-padded to ``padded_batch``'s length buckets (32,
64, 128, ...; ``--pad-multiple 16``: each batch's longest row rounded up to 16), built once as
numpy arrays and used by every row. ``tokens_per_s`` counts the non-pad tokens of a step (their
mean over the steps) over the median step time.

Usage (from the repository root; the data is ../shared/data/sst2):
  python benchmarks/llm_sst2.py                                   # 150 steps, all 6,735 dev rows
  python benchmarks/llm_sst2.py --compile --json benchmarks/results/llm_sst2_compiled.json
  python benchmarks/llm_sst2.py --model path/to/hf_llama_folder --steps 2 --batch 4 \
      --eval-rows 4 --train-rows 8 --no-peft --json /tmp/x.json   # a smoke test
"""
from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax import generate as generate_lib
from lora_jax import quant
from lora_jax.app import causal, runner
from lora_jax.models import llama

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"  # train.tsv, dev.tsv; never copied into the repo
JSON = ROOT / "benchmarks" / "results" / "llm_sst2.json"

MODEL = causal.DEFAULT_MODEL  # the bundled SmolLM2-135M-Instruct GGUF (dequantized to float32)
STEPS, BATCH, LR, SEED = 150, 16, 1e-3, 0
MAX_LENGTH = 256
RANK, ALPHA, WEIGHT_DECAY = 8, 16.0, 0.01
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_NEW_TOKENS = 3  # greedy answer length scored for accuracy
HF_CHECK_ROWS = 256  # PEFT's own model.generate on these first eval rows, against the evaluator
EVAL_BATCH = 32  # prompts per generate call
FINAL_LOSS_STEPS = 10  # final_loss: the mean of the last this many steps' losses
LABELS = {1: "positive", 0: "negative"}
INSTRUCTION = "Is the sentiment of this movie review positive or negative? Answer with one word."
TORCH = ("torch", "transformers", "peft")


# ---------------------------------------------------------------------------- data


def prompt(sentence: str) -> str:
  """The user turn for one SST-2 sentence."""
  return f"{INSTRUCTION}\n\nReview: {sentence.strip()}"


def messages(sentence: str, label: int) -> list[dict]:
  """One SST-2 row as a conversation: the user's prompt and the assistant's one-word answer."""
  return [{"role": "user", "content": prompt(sentence)},
          {"role": "assistant", "content": LABELS[label]}]


def read_sst2(path) -> list[tuple[str, int]]:
  """``(sentence, label)`` rows of an SST-2 .tsv file (header ``sentence<TAB>label``)."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    if header[:2] != ["sentence", "label"]:
      raise ValueError(f"{path}: expected the header sentence<TAB>label, got {header!r}.")
    return [(row[0], int(row[1])) for row in reader if row]


def examples_of(tok, rows, max_length: int) -> list[causal.Example]:
  """Tokenized conversations, cut at ``max_length`` tokens (SST-2's rows never are)."""
  out = []
  for sentence, label in rows:
    e = causal.chat_example(tok, messages(sentence, label))
    if len(e.ids) > max_length:
      e = causal.Example(e.ids[:max_length], e.targets[:max_length], e.answer, e.prompt)
    out.append(e)
  return out


def make_batches(examples: list[causal.Example], *, steps: int, batch: int, max_length: int,
                 pad_multiple: int = 0) -> list[dict]:
  """``steps`` right-padded numpy batches of ``batch`` examples, in order (cycling if too few):
  ``padded_batch``'s length buckets, or (``pad_multiple``) the longest row rounded up to a
  multiple of it."""
  out = []
  for s in range(steps):
    chosen = [examples[(s * batch + i) % len(examples)] for i in range(batch)]
    b = causal.padded_batch(chosen, max_length)
    if pad_multiple:
      longest = max(len(e.ids) for e in chosen)
      length = min(b["input_ids"].shape[1], -(-longest // pad_multiple) * pad_multiple)
      b = {k: v[:, :length] for k, v in b.items()}
    out.append(b)
  return out


def shape_of(b: dict) -> tuple[int, int]:
  return tuple(b["input_ids"].shape)


# ---------------------------------------------------------------------------- shared helpers


def lr_factor(step: int, total: int) -> float:
  """The learning rate at optimizer step ``step`` (0-based) over the peak: ``optimizer_for``'s
  optax schedule (10% linear warm-up from 0, cosine to 0) as a torch LambdaLR factor."""
  if total < 2:
    return 1.0
  warmup = min(max(1, total // 10), total - 1)
  if step < warmup:
    return step / warmup
  done = min(step - warmup, total - warmup) / (total - warmup)
  return 0.5 * (1.0 + math.cos(math.pi * done))


def load_average() -> float | None:
  """The machine's 1-minute load average (a busy shared machine slows torch's threads most)."""
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def step_stats(times: list[float], losses: list[float], batches: list[dict]) -> dict:
  """The timing row: median step, throughput (non-pad tokens and examples per second)."""
  median = statistics.median(times)
  tokens = float(np.mean([b["attention_mask"].sum() for b in batches]))
  return {"load_average_after": load_average(), "steps": len(times), "first_step_s": times[0],
          "median_step_s": median, "mean_step_s": statistics.fmean(times), "min_step_s": min(times),
          "tokens_per_step": tokens, "tokens_per_s": tokens / median,
          "examples_per_s": len(batches[0]["input_ids"]) / median,
          "first_loss": losses[0], "final_loss": statistics.fmean(losses[-FINAL_LOSS_STEPS:]),
          "losses": losses, "step_s": times}


def accuracy(said: list[str], examples: list[causal.Example]) -> float:
  return float(np.mean([causal.normalize(s) == causal.normalize(e.answer)
                        for s, e in zip(said, examples)]))


def chunks(items: list, size: int):
  return [items[i:i + size] for i in range(0, len(items), size)]


def answer_in_batches(examples: list[causal.Example], answer) -> list[str]:
  """``answer(part) -> texts`` over batches of ``EVAL_BATCH`` prompts of similar length (sorted
  by length: little padding); the texts come back in the examples' order."""
  order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
  said: list[str] = [""] * len(examples)
  for part in chunks(order, EVAL_BATCH):
    for i, text in zip(part, answer([examples[i] for i in part])):
      said[i] = text
  return said


# ---------------------------------------------------------------------------- lora_jax


class JaxLoRA:
  """lora_jax's public path on the loaded model: LoraConfig, analyze, init, train_step."""

  def __init__(self, model: causal.Model, args):
    self.model, self.args = model, args
    self.module = llama.LlamaForCausalLM(model.config)
    self.options = causal.CausalOptions(targets="all-linear", rank=RANK, alpha=ALPHA, lr=args.lr,
                                        batch_size=args.batch, steps=args.steps, seed=args.seed,
                                        max_length=args.max_length)
    self.config = causal.lora_config(self.options, model.config)
    self.uses = lora_jax.analyze(self.module.apply, model.params, jnp.ones((1, 8), jnp.int32))
    self.initial = lora_jax.init(self.config, model.params, key=jax.random.key(args.seed),
                                 uses=self.uses)
    self.adapted = lora_jax.lora(self.module.apply)  # one function: generate's jit cache hits

  def loss(self, params, batch):
    """``CausalLM.loss``: the masked loss; over a shared prefix's cache and the selected
    positions' logits when the batch was prepared for them (the same value)."""
    return causal.loss_of(self.module.apply, params, batch,
                          init_cache=functools.partial(llama.init_cache, self.model.config))

  def answers(self, trainable, examples: list[causal.Example]) -> list[str]:
    """Greedy answers with ``lora_jax.generate`` through ``lora(apply)`` (unmerged adapters);
    each batch's shared start (system prompt + instruction) runs once into the cache."""
    tok, config = self.model.tokenizer, self.model.config

    def answer(part):
      result = generate_lib.generate(
          self.adapted, (self.model.params, trainable), [list(e.prompt) for e in part],
          adapted=True, init_cache=functools.partial(llama.init_cache, config),
          max_new_tokens=MAX_NEW_TOKENS, stop_ids=tok.stop_ids, pad_id=tok.pad_id or 0,
          context=config.max_position_embeddings)
      return [tok.decode(t) for t in result.tokens]

    return answer_in_batches(examples, answer)

  def evaluate(self, trainable, examples) -> dict:
    return self.scored(trainable, examples)[0]

  def scored(self, trainable, examples) -> tuple[dict, list[str]]:
    t0 = time.perf_counter()
    said = self.answers(trainable, examples)
    return {"accuracy": accuracy(said, examples), "eval_s": time.perf_counter() - t0,
            "answers_sample": said[:8]}, said

  def train(self, batches: list[dict], *, prepare: bool = True) -> tuple[dict, Any]:
    """Trains on ``batches``; ``prepare``: as ``lora-jax train`` does (``share_prefix``, then
    ``select_targets``), else on the plain padded batches (full logits, every token)."""
    base = self.model.params
    optimizer = runner.optimizer_for(self.options, len(batches))
    step = lora_jax.train_step(self.loss, optimizer)
    trainable, opt_state = self.initial, optimizer.init(self.initial)
    ready = [causal.select_targets(causal.share_prefix(b)) if prepare else b for b in batches]
    placed = [jax.device_put(b) for b in ready]
    jax.block_until_ready(placed)
    t0 = time.perf_counter()
    compiled = {}
    for b in placed:  # each batch shape compiled ahead (the time apart), then only steps
      key = shape_of(b)
      if key not in compiled:
        compiled[key] = step.lower(base, trainable, opt_state, b).compile()
    compile_s = time.perf_counter() - t0
    times, losses, load = [], [], load_average()
    start = time.perf_counter()
    for b in placed:
      t0 = time.perf_counter()
      out = compiled[shape_of(b)](base, trainable, opt_state, b)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
      trainable, opt_state = out.adapters, out.opt_state
      losses.append(float(out.loss))
    wall = time.perf_counter() - start
    counts = lora_jax.count(base, self.initial)
    return {"compile_s": compile_s, "compiled_shapes": len(compiled),
            "load_average_before": load, "train_wall_s": wall,
            "train_wall_with_compile_s": wall + compile_s, **step_stats(times, losses, batches),
            "trainable": counts.trainable, "total": counts.total}, trainable


# ---------------------------------------------------------------------------- PEFT


def torch_masked_loss(logits, batch):
  """``causal.masked_loss`` in torch: logits at t predict token t+1, weighted by its target."""
  import torch
  labels, weights = batch["input_ids"][:, 1:], batch["targets"][:, 1:].float()
  losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                             reduction="none")
  return (losses * weights).sum() / weights.sum().clamp(min=1.0)


def load_hf(name: str):
  """transformers' LlamaForCausalLM of the same model, float32."""
  import torch
  import transformers
  if name == causal.DEFAULT_MODEL or name.endswith(".gguf"):
    from lora_jax.models import gguf
    path = gguf.smollm2_path() if name == causal.DEFAULT_MODEL else pathlib.Path(name)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
  return transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)


def peft_row(args, tok, batches: list[dict], eval_examples, *, compile: bool,
             scorer: JaxLoRA) -> dict:
  """transformers + PEFT LoRA, trained on ``batches``; scored on ``eval_examples`` by the same
  evaluator as lora_jax (its adapter saved by PEFT and read with ``lora_jax.peft.import_peft``),
  and its ``model.generate`` answers compared with that evaluator's on the first
  ``--hf-check-rows`` rows."""
  import peft
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count())
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  hf = load_hf(args.model)
  load_s = time.perf_counter() - t0
  torch.manual_seed(args.seed)
  model = peft.get_peft_model(hf, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS),
      task_type="CAUSAL_LM")).to(device)
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=WEIGHT_DECAY)
  schedule = torch.optim.lr_scheduler.LambdaLR(
      optimizer, functools.partial(lr_factor, total=len(batches)))
  forward = torch.compile(model) if compile else model
  placed = [{"input_ids": torch.from_numpy(b["input_ids"]).long().to(device),
             "attention_mask": torch.from_numpy(b["attention_mask"]).long().to(device),
             "targets": torch.from_numpy(b["targets"]).to(device)} for b in batches]

  def loss_of(b):
    logits = forward(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return torch_masked_loss(logits, b)

  t0 = time.perf_counter()
  seen = set()
  for b in placed:  # warm-up: one forward and backward per shape (compiles under --compile)
    if tuple(b["input_ids"].shape) not in seen:
      seen.add(tuple(b["input_ids"].shape))
      loss_of(b).backward()
      optimizer.zero_grad(set_to_none=True)
  sync()
  compile_s = time.perf_counter() - t0

  times, losses, load = [], [], load_average()
  start = time.perf_counter()
  for b in placed:
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_of(b)
    loss.backward()
    optimizer.step()
    schedule.step()
    sync()
    times.append(time.perf_counter() - t0)
    losses.append(float(loss.detach()))
  wall = time.perf_counter() - start

  model.eval()
  with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    _, adapters = lora_jax.peft.import_peft(folder, scorer.model.params, uses=scorer.uses)
  scored, said = scorer.scored(adapters, eval_examples)
  check = eval_examples[:args.hf_check_rows]
  t0 = time.perf_counter()
  hf_said = peft_answers(model, tok, check, device)
  scored.update(hf_generate_s=time.perf_counter() - t0, hf_generate_rows=len(check),
                hf_generate_accuracy=accuracy(hf_said, check) if check else None,
                hf_generate_agreement=(sum(a == b for a, b in zip(hf_said, said)) / len(check)
                                       if check else None))
  return {"load_s": load_s, "compile_s": compile_s, "compiled_shapes": len(seen),
          "load_average_before": load,
          "train_wall_s": wall, "train_wall_with_compile_s": wall + compile_s,
          **step_stats(times, losses, batches), **scored,
          "trainable": sum(p.numel() for p in trainable),
          "total": sum(p.numel() for p in model.parameters()), "device": device,
          "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
          "peft": peft.__version__, "torch": torch.__version__,
          **({"eval_note": "hf_generate_* from the eager module (generate is not compiled)"}
             if compile else {})}


def peft_answers(model, tok, examples, device) -> list[str]:
  """Greedy answers with ``model.generate``: the same prompt ids, left-padded; each row cut at
  its first stop token and decoded without special tokens, as lora_jax's are."""
  import torch
  pad, stops = tok.pad_id or 0, set(tok.stop_ids)

  def answer(part):
    ids, mask = generate_lib.left_pad([list(e.prompt) for e in part], pad_id=pad, bucket=1)
    with torch.no_grad():
      generated = model.generate(
          input_ids=torch.from_numpy(ids).long().to(device),
          attention_mask=torch.from_numpy(mask).long().to(device),
          max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad,
          eos_token_id=list(tok.stop_ids))
    cut = lambda row: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))  # noqa
    return [tok.decode(row[:cut(row)]) for row in generated[:, ids.shape[1]:].tolist()]

  return answer_in_batches(examples, answer)


# ---------------------------------------------------------------------------- report


def versions() -> dict:
  from importlib.metadata import PackageNotFoundError, version
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", *TORCH):
    try:
      out[name] = version(name)
    except PackageNotFoundError:
      out[name] = None
  return out


def machine() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor(),
          "machine": platform.machine(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
          "load_average_at_end": load_average(),
          "versions": versions()}


def print_table(rows: dict) -> None:
  head = (f"{'row':<16}{'accuracy':>9}{'step ms':>10}{'tokens/s':>10}{'ex/s':>8}"
          f"{'compile s':>11}{'train s':>9}{'final loss':>12}")
  print(head)
  print("-" * len(head))
  for name, r in rows.items():
    if "error" in r:
      print(f"{name:<16}error: {r['error'][:60]}")
      continue
    cells = [f"{r['accuracy']:>9.3f}" if "accuracy" in r else f"{'-':>9}"]
    if "median_step_s" in r:
      cells += [f"{1e3 * r['median_step_s']:>10.1f}", f"{r['tokens_per_s']:>10.1f}",
                f"{r['examples_per_s']:>8.2f}", f"{r['compile_s']:>11.1f}",
                f"{r['train_wall_s']:>9.1f}", f"{r['final_loss']:>12.4f}"]
    print(f"{name:<16}" + "".join(cells))


# ---------------------------------------------------------------------------- main


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=MODEL,
                      help=f"{MODEL} (the bundled GGUF), a Llama .gguf file or a Hugging Face "
                           f"Llama folder")
  parser.add_argument("--data", default=str(DATA), help="folder of train.tsv and dev.tsv")
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--batch", type=int, default=BATCH)
  parser.add_argument("--lr", type=float, default=LR, help="peak learning rate")
  parser.add_argument("--seed", type=int, default=SEED,
                      help="training-row shuffle, lora_jax's A init, torch.manual_seed")
  parser.add_argument("--train-rows", type=int, default=None,
                      help="shuffled training rows tokenized (default: steps x batch; fewer "
                           "are cycled)")
  parser.add_argument("--eval-rows", type=int, default=None,
                      help="score only the first N rows of dev.tsv (default: all 6,735)")
  parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
  parser.add_argument("--hf-check-rows", type=int, default=HF_CHECK_ROWS,
                      help="the first N eval rows also answered with PEFT's model.generate "
                           "(its agreement with the shared evaluator is reported)")
  parser.add_argument("--pad-multiple", type=int, default=0,
                      help="pad each batch to its longest row rounded up to a multiple of this "
                           "(default 0: padded_batch's buckets 32, 64, 128, ...)")
  parser.add_argument("--plain-steps", type=int, default=20,
                      help="also time this many steps of lora_jax on the plain padded batches "
                           "(no shared-prefix cache, logits at every position); 0: skip")
  parser.add_argument("--no-peft", dest="peft", action="store_false",
                      help="skip the transformers + PEFT rows")
  parser.add_argument("--compile", action="store_true",
                      help="also the peft_compiled row (torch.compile)")
  parser.add_argument("--quantize", default="none", choices=quant.CHOICES,
                      help="lora_jax's frozen base kept in this lora_jax.quant format (QLoRA; "
                           "q4_1: the GGUF's own blocks); PEFT's stays float32")
  parser.add_argument("--no-zero-shot", dest="zero_shot", action="store_false",
                      help="skip scoring the base model (the base_zero_shot row)")
  parser.add_argument("--json", default=str(JSON), help="where the JSON report is written")
  args = parser.parse_args(argv)
  for name in ("steps", "batch", "eval_rows", "max_length"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
  if args.hf_check_rows < 0:
    parser.error("--hf-check-rows: expected an integer >= 0")
  if args.pad_multiple < 0:
    parser.error("--pad-multiple: expected an integer >= 0")
  if args.train_rows is not None and args.train_rows < 1:
    parser.error("--train-rows: expected an integer >= 1")
  return args


def _partial(args, rows: dict) -> None:
  """The rows so far, beside the report (a long run interrupted keeps what it measured)."""
  path = pathlib.Path(args.json).with_suffix(".partial.json")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


def main(argv=None) -> dict:
  args = parse(argv)
  data = pathlib.Path(args.data)
  t0 = time.perf_counter()
  model = causal.load_model(args.model, quantize=args.quantize)
  tok = model.tokenizer
  load_s = time.perf_counter() - t0
  wanted = args.train_rows or args.steps * args.batch
  train_rows = read_sst2(data / "train.tsv")
  order = np.random.default_rng(args.seed).permutation(len(train_rows))[:wanted]
  train = examples_of(tok, [train_rows[i] for i in order], args.max_length)
  dev = examples_of(tok, read_sst2(data / "dev.tsv")[:args.eval_rows], args.max_length)
  batches = make_batches(train, steps=args.steps, batch=args.batch, max_length=args.max_length,
                         pad_multiple=args.pad_multiple)
  shapes: dict[str, int] = {}
  for b in batches:
    key = "x".join(map(str, shape_of(b)))
    shapes[key] = shapes.get(key, 0) + 1

  rows: dict[str, dict] = {}
  ours = JaxLoRA(model, args)
  if args.zero_shot:
    print("base_zero_shot ...", flush=True)
    rows["base_zero_shot"] = ours.evaluate(ours.initial, dev)
  print("lora_jax ...", flush=True)
  trained, trainable = ours.train(batches)
  rows["lora_jax"] = {**trained, **ours.evaluate(trainable, dev)}
  _partial(args, rows)
  if args.plain_steps:
    print("lora_jax_plain ...", flush=True)  # the same step without the batch preparation
    rows["lora_jax_plain"] = ours.train(batches[:args.plain_steps], prepare=False)[0]

  have_torch = all(importlib.util.find_spec(m) is not None for m in TORCH)
  skipped = {}
  for name, compile in (("peft_eager", False), ("peft_compiled", True)):
    if compile and not args.compile:
      continue
    if not args.peft:
      skipped[name] = "--no-peft"
      continue
    if not have_torch:
      skipped[name] = "torch, transformers or peft is not installed"
      continue
    print(f"{name} ...", flush=True)
    if not compile:
      rows[name] = peft_row(args, tok, batches, dev, compile=False, scorer=ours)
      _partial(args, rows)
      continue
    try:
      rows[name] = peft_row(args, tok, batches, dev, compile=True, scorer=ours)
    except Exception as e:  # noqa: BLE001  recorded, not fatal: torch.compile may fail
      rows[name] = {"error": f"{type(e).__name__}: {e}"}

  summary = {}
  for name in ("peft_eager", "peft_compiled"):
    for ours_name in ("lora_jax", "lora_jax_plain"):
      if "tokens_per_s" in rows.get(name, {}) and ours_name in rows:
        summary[f"tokens_per_s_{ours_name}_over_{name}"] = (rows[ours_name]["tokens_per_s"] /
                                                            rows[name]["tokens_per_s"])
  report = {
      "benchmark": "llm_sst2",
      "settings": {"model": args.model, "data": str(data), "steps": args.steps,
                   "batch": args.batch, "lr": args.lr, "seed": args.seed,
                   "train_rows": len(train), "eval_rows": len(dev),
                   "max_length": args.max_length, "rank": RANK, "alpha": ALPHA,
                   "lora_dropout": 0.0, "targets": list(PROJECTIONS),
                   "weight_decay": WEIGHT_DECAY, "schedule": "10% linear warm-up, cosine to 0",
                   "dtype": "float32", "quantize": args.quantize,
                   "max_new_tokens": MAX_NEW_TOKENS,
                   "eval_batch": EVAL_BATCH, "prompt": prompt("{sentence}"),
                   "answers": sorted(LABELS.values()),
                   "padding": (f"longest row rounded up to a multiple of {args.pad_multiple}"
                               if args.pad_multiple else "padded_batch buckets"),
                   "batch_shapes": shapes, "peft": args.peft, "compile": args.compile},
      "machine": machine(),
      "model_load_s": load_s,
      "rows": rows,
      "skipped": skipped,
      "summary": summary,
  }
  print()
  print_table(rows)
  for key, value in summary.items():
    print(f"{key}: {value:.2f}")
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  out.with_suffix(".partial.json").unlink(missing_ok=True)
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
