"""The causal-LM tasks' own commands: ``lora-jax generate`` and ``lora-jax serve``."""

from __future__ import annotations

import sys

from lora_jax import quant
from lora_jax.app import serve as serve_lib
from lora_jax.app.causal import generation
from lora_jax.app.options import (MAX_INT, MAX_SEED, MAX_TEMPERATURE, finite_in, integer_in,
                                  prompt_text)


def add_generate_parser(sub) -> None:
  gen = sub.add_parser("generate", help="answer prompts with a chat/text run or a model",
                       description="Greedy (default) or sampled decoding with a key-value "
                                   "cache; one prompt streams its answer.")
  gen.add_argument("source", help="a chat/text run folder, smollm2-135m-instruct, a .gguf file "
                                  "or a Hugging Face Llama folder")
  gen.add_argument("--prompt", action="append", required=True, type=prompt_text,
                   help="a user message (repeat for a batch); rendered with the chat template")
  gen.add_argument("--raw", action="store_true", help="use the prompt text as is (no template)")
  gen.add_argument("--max-new-tokens", type=integer_in(1, MAX_INT), default=128,
                   help="at most this many new tokens per answer (the prompt and these must fit "
                        "the model's context; default: 128)")
  gen.add_argument("--temperature", type=finite_in(0, MAX_TEMPERATURE), default=0.0,
                   help="0: greedy (default); sampled up to 2 (the range OpenAI's API accepts)")
  gen.add_argument("--top-k", type=integer_in(1, MAX_INT), default=None,
                   help="sample from the K most likely tokens (default: all)")
  gen.add_argument("--top-p", type=finite_in(0, 1, low_open=True), default=None,
                   help="sample from the smallest set of tokens whose probability reaches P, "
                        "in (0, 1] (default: no cut)")
  gen.add_argument("--seed", type=integer_in(0, MAX_SEED), default=0,
                   help="the sampling PRNG key's seed, 0 to 2**63 - 1 (default: 0)")
  gen.add_argument("--merged", action="store_true",
                   help="a run: merge the adapters into the weights first (default: unmerged)")
  gen.add_argument("--quiet", action="store_true", help="print the answer only at the end")
  gen.add_argument("--quantize", default="none", choices=quant.CHOICES,
                   help="a model's projections kept in this format (QLoRA's base; a run "
                        "uses the setting it was trained with)")
  gen.add_argument("--adapter", action="append", default=None, metavar="NAME=PATH",
                   help="an adapter over the model SOURCE: a chat/text run, a PEFT folder or a "
                        "lora_jax checkpoint folder (repeat: every prompt is answered by every "
                        "adapter, in one mixed batch)")


def add_serve_parser(sub) -> None:
  srv = sub.add_parser("serve", help="an OpenAI-style HTTP server over a model and its adapters",
                       description="POST /v1/completions and /v1/chat/completions (a request's "
                                   "model names an adapter, or the model for none), GET "
                                   "/v1/models and /health. Requests are decoded together, "
                                   "in mixed batches (each row its own adapter); a "
                                   "request's temperature is 0 to 2 (OpenAI's range), top_p "
                                   "in (0, 1], seed 0 to 2**63 - 1. SIGTERM or Ctrl-C stops "
                                   "it.")
  srv.add_argument("--model", default="smollm2-135m-instruct",
                   help="smollm2-135m-instruct (default), a .gguf file or a Hugging Face "
                        "Llama folder")
  srv.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH",
                   help="an adapter served as model NAME: a chat/text run, a PEFT folder or "
                        "a lora_jax checkpoint folder (repeat for several)")
  srv.add_argument("--host", default="127.0.0.1")
  srv.add_argument("--port", type=int, default=8000, help="0 to 65535; 0: any free port")
  srv.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together, 1 to 1024")
  srv.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting at most, 1 to 2**20; more are answered 503")
  srv.add_argument("--max-new-tokens-limit", type=int, default=512,
                   help="the largest max_tokens a request may ask for (1 to 2**31 - 1; the "
                        "model's context bounds each request too)")
  srv.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests after its first, 0 to 60000")
  srv.add_argument("--quantize", default="none", choices=quant.CHOICES,
                   help="the model's projections kept in this format")


def generate(args) -> int:
  adapters = generation.adapter_paths(args.adapter) if args.adapter else None
  single = len(args.prompt) == 1 and not args.quiet and not adapters
  stream = sys.stdout if single else None
  result = generation.generate_text(
      args.source, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
      top_k=args.top_k, top_p=args.top_p, seed=args.seed, merged=args.merged, raw=args.raw,
      quantize=args.quantize, stream=stream, adapters=adapters)
  if stream is None:
    names = result.adapters or [None] * len(result.texts)
    for prompt, name, text in zip(args.prompt * len(adapters or [None]), names, result.texts):
      print(f"{f'[{name}] ' if name else ''}{prompt}\n-> {text}\n")
  else:
    print()
  print(f"{result.generation.new_tokens} new tokens in "
        f"{result.generation.prefill_s + result.generation.decode_s:.2f} s "
        f"({result.generation.tokens_per_s:.1f} tokens/s, batch {len(result.texts)}, "
        f"{'merged' if args.merged else 'unmerged adapters' if result.adapted else 'base'}"
        f"{f', adapters mixed: {len(adapters)}' if adapters else ''})",
        file=sys.stderr)
  return 0


def serve(args) -> int:
  try:
    return serve_lib.serve(args.model, generation.adapter_paths(args.adapter), host=args.host,
                       port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                       max_new_tokens_limit=args.max_new_tokens_limit,
                       batch_wait_ms=args.batch_wait_ms, quantize=args.quantize)
  except KeyboardInterrupt:  # Ctrl-C while loading (once serving, it stops the server)
    return 130
