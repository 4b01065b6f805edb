"""Generation speed on SmolLM2-135M-Instruct: the base, merged adapters and unmerged adapters
(``lora_jax.lora``), batch 1 and 8, greedy with a key-value cache.

Shaped like nanoGPT's bench.py: settings from the command line, one warm-up call per row
(compilation: reported apart), then ``--rounds`` timed calls, the median kept, JSON out.
Every row decodes exactly ``--new-tokens`` tokens (no stop token) after the same chat prompts,
so the rows do the same work; tokens/s counts new tokens of all rows over prefill + decode.
The adapters are LoRA r=8, alpha 16 on all seven projections with a random non-zero B (a
trained adapter's cost; B = 0 would cost the same).

Usage:
  python benchmarks/generate.py --json benchmarks/results/generate_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import statistics
import sys

import jax
import jax.numpy as jnp

import lora_jax
from lora_jax import generate as gen
from lora_jax.app import causal
from lora_jax.models import llama

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Is 'a gorgeous, witty, seductive movie' positive or negative?",
             "List three prime numbers.", "Explain gravity to a child.",
             "What is 12 times 12?", "Name a famous painter.", "Why is the sky blue?"]


def adapters(model, *, seed: int = 0):
  """LoRA r=8 on q,k,v,o,gate,up,down with random A and B (B scaled to a trained size)."""
  module = llama.LlamaForCausalLM(model.config)
  config = lora_jax.LoraConfig(targets=llama.FAMILY.targets("all-linear", model.config), rank=8,
                               alpha=16)
  uses = lora_jax.analyze(module.apply, model.params, jnp.ones((1, 8), jnp.int32))
  trainable = lora_jax.init(config, model.params, key=jax.random.key(seed), uses=uses)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
  noisy = lambda lw: dataclasses.replace(  # noqa: E731
      lw, b=0.01 * jax.random.normal(next(keys), lw.b.shape, lw.b.dtype))
  return jax.tree.map(noisy, trainable, is_leaf=lambda x: isinstance(x, lora_jax.LoraWeights))


def measure(fn, params, prompts, *, config, new_tokens: int, rounds: int, adapted: bool):
  run = functools.partial(gen.generate, fn, params, prompts, max_new_tokens=new_tokens,
                          init_cache=functools.partial(llama.init_cache, config),
                          adapted=adapted, context=config.max_position_embeddings)
  first = run()
  timed = [run() for _ in range(rounds)]
  median = statistics.median(r.tokens_per_s for r in timed)
  return {"tokens_per_s": median, "new_tokens": timed[0].new_tokens,
          "prefill_s": statistics.median(r.prefill_s for r in timed),
          "decode_s": statistics.median(r.decode_s for r in timed),
          "first_call_s": first.prefill_s + first.decode_s, "rounds": rounds,
          "tokens": timed[0].tokens}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=causal.DEFAULT_MODEL)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  model = causal.load_model(args.model)
  module = llama.LlamaForCausalLM(model.config)
  tok = model.tokenizer
  trainable = adapters(model)
  merged = lora_jax.merge(model.params, trainable)
  rows = {}
  for batch in [int(b) for b in args.batches.split(",")]:
    prompts = [tok.encode(tok.render([{"role": "user", "content": QUESTIONS[i % 8]}],
                                     add_generation_prompt=True)) for i in range(batch)]
    cases = {"base": (module.apply, model.params, False),
             "merged": (module.apply, merged, False),
             "unmerged": (lora_jax.lora(module.apply), (model.params, trainable), True)}
    for name, (fn, params, adapted) in cases.items():
      row = measure(fn, params, prompts, config=model.config, new_tokens=args.new_tokens,
                    rounds=args.rounds, adapted=adapted)
      rows[f"{name}_b{batch}"] = row
      print(f"{name:9s} batch {batch}: {row['tokens_per_s']:7.1f} tokens/s "
            f"(prefill {row['prefill_s']:.3f} s, decode {row['decode_s']:.2f} s, first call "
            f"{row['first_call_s']:.1f} s)", flush=True)
    same = rows[f"merged_b{batch}"]["tokens"] == rows[f"unmerged_b{batch}"]["tokens"]
    rows[f"merged_b{batch}"]["same_tokens_as_unmerged"] = same
  for row in rows.values():
    row.pop("tokens")
  result = {"benchmark": "generate", "model": args.model, "new_tokens": args.new_tokens,
            "machine": machine(), "rows": rows}
  write_json(result, args.json)
  return result


def machine() -> dict:
  return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "python": sys.version.split()[0]}


def write_json(result: dict, path) -> None:
  """``result`` as indented JSON at ``path`` (nothing when ``path`` is None)."""
  if path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
