"""Many adapters on one base: memory, mixed-batch throughput and swap latency.

Shaped like nanoGPT's bench.py: settings from the command line, a warm-up call per row
(compilation, reported apart), ``--rounds`` rounds that time every row once (interleaved, so
this shared machine's drifting speed falls on all rows alike), medians kept, JSON out.

- Memory: SmolLM2-135M-Instruct (LoRA r=8 on all seven projections) and the MiniLM
  classifier (q,v r=8 plus its head), base + an ``AdapterBank`` of N adapters against N merged
  copies, N = 1, 10, 100: the bank's bytes are those of live device arrays, measured (the bank
  built, its source trees dropped); a merged copy is a whole model (every leaf's bytes), one
  measured and multiplied (100 copies of SmolLM2 would not fit in this machine's memory).
- Throughput (SmolLM2): one batch of 8 rows spanning 8 adapters (``adapter_index``) against
  the same batch with one adapter (``bank.pick``), 8 sequential single-adapter batches (one row
  each) and merging / un-merging each adapter for its row; for the forward pass and for
  greedy generation. Tokens/s over all rows.
- Swap latency: a jitted call whose adapter changes between calls (a new slot index) against
  one that repeats it, and ``bank.put`` (new weights into a slot), in microseconds.

Usage:
  python benchmarks/many_adapters.py --json benchmarks/results/many_adapters_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax import generate as gen
from lora_jax.app import causal
from lora_jax.models import bert, llama

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from generate import QUESTIONS, machine, write_json  # noqa: E402
from generate import adapters as smollm2_adapter  # noqa: E402


def live_bytes() -> int:
  gc.collect()
  return sum(x.nbytes for x in jax.live_arrays())


def tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved(cases: dict, rounds: int) -> dict:
  """``{case: (first call s, [s per round])}``: one warm-up call each (compilation), then
  ``rounds`` rounds that run every case once, so a drift of this shared machine's speed
  falls on all cases alike. Each ``fn`` blocks until its result is ready."""
  first = {case: _seconds(fn) for case, fn in cases.items()}
  times = {case: [] for case in cases}
  for _ in range(rounds):
    for case, fn in cases.items():
      times[case].append(_seconds(fn))
  return {case: (first[case], times[case]) for case in cases}


def _rows(kind: str, results: dict, tokens: int) -> dict:
  """Rows of tokens/s (median round) and the mixed / single ratio of each round."""
  rows = {}
  for case, (first, times) in results.items():
    median = statistics.median(times)
    rows[f"{kind}_{case}"] = {"tokens_per_s": tokens / median, "median_s": median,
                              "first_call_s": first, "rounds": len(times)}
    print(f"{kind} {case:13s}: {tokens / median:8.1f} tokens/s", flush=True)
  ratios = [s / m for m, s in zip(results["mixed"][1], results["single"][1])]
  rows[f"{kind}_mixed"]["ratio_to_single_per_round"] = ratios
  rows[f"{kind}_mixed"]["ratio_to_single"] = statistics.median(ratios)
  return rows


# ----------------------------------------------------------------------- memory


def minilm(seed: int = 0):
  """The MiniLM classifier (2 labels), its base and a q,v r=8 + head adapter maker."""
  config, encoder = bert.load(num_labels=2)
  module = bert.BertForSequenceClassification(config)
  example = jnp.ones((1, 8), jnp.int32)
  params = module.init(jax.random.key(seed), example)
  params["params"]["bert"] = encoder["params"]
  uses = lora_jax.analyze(module.apply, params, example)
  lora = lora_jax.LoraConfig(targets=bert.FAMILY.targets("q,v", config), rank=8, alpha=16,
                             modules_to_save=["classifier"])

  def make(i: int):
    tree = lora_jax.init(lora, params, key=jax.random.key(i), uses=uses)
    return jax.tree_util.tree_map(lambda x: x + 0.01 * (i + 1), tree)

  return module, params, make


def memory_rows(name: str, base, make, counts) -> dict:
  """Resident bytes: base + a bank of N adapters, and N merged copies."""
  base_bytes = tree_bytes(base)
  one = make(0)
  merged_bytes = tree_bytes(lora_jax.merge(base, one))  # a fine-tuned copy: a whole model
  rows = {}
  for n in counts:
    before = live_bytes()
    bank = lora_jax.bank.stack({f"a{i}": make(i) for i in range(n)}, base)
    jax.block_until_ready(bank)
    bank_bytes = live_bytes() - before
    rows[f"{name}_n{n}"] = {
        "adapters": n, "base_bytes": base_bytes, "adapter_bytes": tree_bytes(one),
        "bank_bytes": bank_bytes, "base_plus_bank_bytes": base_bytes + bank_bytes,
        "merged_copy_bytes": merged_bytes, "merged_copies_bytes": n * merged_bytes,
        "ratio_merged_to_bank": n * merged_bytes / (base_bytes + bank_bytes)}
    print(f"{name} N={n:3d}: base + bank {(base_bytes + bank_bytes) / 2**20:9.1f} MiB, "
          f"{n} merged copies {n * merged_bytes / 2**20:10.1f} MiB", flush=True)
    del bank
  return rows


# ----------------------------------------------------------------------- throughput


def forward_rows(model, trees, bank, tokens, rounds: int) -> dict:
  module = llama.LlamaForCausalLM(model.config)
  adapted = lora_jax.lora(module.apply)
  base = model.params
  names = list(trees)
  index = bank.indices(names)
  one = jax.jit(lambda b, t, x: adapted(b, t, x))
  mixed = jax.jit(lambda b, bk, x, i: adapted(b, bk, x, adapter_index=i))
  plain = jax.jit(module.apply)
  merge, unmerge = jax.jit(lora_jax.merge), jax.jit(lora_jax.unmerge)
  picked = bank.pick(0)

  def sequential():
    for row, name in enumerate(names):
      jax.block_until_ready(one(base, trees[name], tokens[row:row + 1]))

  def merging():
    params = base
    for row, name in enumerate(names):
      params = merge(params, trees[name])
      jax.block_until_ready(plain(params, tokens[row:row + 1]))
      params = unmerge(params, trees[name])
    jax.block_until_ready(params)

  cases = {"mixed": lambda: jax.block_until_ready(mixed(base, bank, tokens, index)),
           "single": lambda: jax.block_until_ready(one(base, picked, tokens)),
           "sequential": sequential, "merge_unmerge": merging}
  return _rows("forward", interleaved(cases, rounds), tokens.size)


def generation_rows(model, trees, bank, prompts, new_tokens: int, rounds: int) -> dict:
  module = llama.LlamaForCausalLM(model.config)
  adapted = lora_jax.lora(module.apply)
  base, names = model.params, list(trees)
  kw = dict(init_cache=lambda b, n: llama.init_cache(model.config, b, n),
            max_new_tokens=new_tokens, context=model.config.max_position_embeddings)
  merge, unmerge = jax.jit(lora_jax.merge), jax.jit(lora_jax.unmerge)
  picked = bank.pick(0)
  out = {}

  def mixed():
    out["mixed"] = gen.generate(adapted, (base, bank), prompts, adapted=True,
                                adapter_index=bank.indices(names), **kw)

  def single():
    out["single"] = gen.generate(adapted, (base, picked), prompts, adapted=True, **kw)

  def sequential():
    out["sequential"] = [gen.generate(adapted, (base, trees[n]), [p], adapted=True, **kw)
                         for p, n in zip(prompts, names)]

  def merging():
    params, results = base, []
    for p, n in zip(prompts, names):
      params = merge(params, trees[n])
      results.append(gen.generate(module.apply, params, [p], **kw))
      params = unmerge(params, trees[n])
    jax.block_until_ready(params)
    out["merge_unmerge"] = results

  total = new_tokens * len(prompts)  # no stop token (none is given): every row decodes all
  rows = _rows("generate", interleaved({"mixed": mixed, "single": single,
                                        "sequential": sequential, "merge_unmerge": merging},
                                       rounds), total)
  alone = [r.tokens[0] for r in out["sequential"]]
  rows["generate_mixed"]["same_tokens_as_sequential"] = out["mixed"].tokens == alone
  return rows


def swap_rows(model, bank, trees, rounds: int) -> dict:
  module = llama.LlamaForCausalLM(model.config)
  adapted = lora_jax.lora(module.apply)
  x = jnp.ones((1, 1), jnp.int32)
  traces = []

  @jax.jit
  def run(base, bank, index, x):
    traces.append(1)
    return adapted(base, bank.pick(index), x)

  def call(i) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run(model.params, bank, i, x))
    return time.perf_counter() - start

  slots = [bank.index(n) for n in trees]
  call(slots[0])
  same, switching = [], []
  for k in range(rounds):  # pairs: the same adapter again, then another one
    same.append(call(slots[k % len(slots)]))
    switching.append(call(slots[(k + 1) % len(slots)]))
  diffs = [b - a for a, b in zip(same, switching)]
  same, switching = (statistics.median(t) * 1e6 for t in (same, switching))
  start = time.perf_counter()
  jax.block_until_ready(bank.put(list(trees)[0], trees[list(trees)[1]], model.params))
  put_us = (time.perf_counter() - start) * 1e6
  row = {"same_adapter_call_us": same, "switching_call_us": switching,
         "swap_cost_us": statistics.median(diffs) * 1e6, "put_us": put_us,
         "traces": len(traces), "calls": 2 * rounds + 1}
  print(f"swap: call {same:.0f} us same adapter, {switching:.0f} us switching (median pair "
        f"difference {row['swap_cost_us']:.0f} us); put {put_us:.0f} us; {len(traces)} "
        f"trace(s)", flush=True)
  return {"swap": row}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--counts", default="1,10,100")
  parser.add_argument("--seq", type=int, default=64, help="forward pass tokens per row")
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--skip", default="", help="comma list of: memory,forward,generate,swap")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  skip = set(filter(None, args.skip.split(",")))
  counts = [int(n) for n in args.counts.split(",")]
  rows = {}
  model = causal.load_model(causal.DEFAULT_MODEL)
  if "memory" not in skip:
    module, params, make = minilm()
    rows.update(memory_rows("minilm", params, make, counts))
    del params
    rows.update(memory_rows("smollm2", model.params,
                            lambda i: smollm2_adapter(model, seed=i), counts))
  trees = {f"task{i}": smollm2_adapter(model, seed=i) for i in range(8)}
  bank = lora_jax.bank.stack(trees, model.params)
  tok = model.tokenizer
  prompts = [tok.encode(tok.render([{"role": "user", "content": q}], add_generation_prompt=True))
             for q in QUESTIONS]
  if "forward" not in skip:
    tokens = np.asarray([(p * args.seq)[:args.seq] for p in prompts], np.int32)
    rows.update(forward_rows(model, trees, bank, tokens, args.rounds))
  if "generate" not in skip:
    rows.update(generation_rows(model, trees, bank, prompts, args.new_tokens, args.rounds))
  if "swap" not in skip:
    rows.update(swap_rows(model, bank, trees, 100))
  for kind in ("forward", "generate"):
    if f"{kind}_mixed" in rows:
      print(f"{kind}: mixed / single-adapter batch tokens/s = "
            f"{rows[f'{kind}_mixed']['ratio_to_single']:.3f} (median of the rounds' ratios; "
            f"goal >= 0.8)")
  result = {"benchmark": "many_adapters", "model": causal.DEFAULT_MODEL,
            "settings": vars(args), "machine": machine(), "rows": rows}
  write_json(result, args.json)
  return result


if __name__ == "__main__":
  main()
