"""The ``lora-jax`` command line. Bad input prints one line on stderr and exits with 2."""

from __future__ import annotations

import argparse
import sys

from lora_jax import models
from lora_jax.config import LoraConfig


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse would also print the usage)
    raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
  print(message.splitlines()[0] if message else "error", file=sys.stderr)
  return 2


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="lora-jax", description="LoRA for JAX: count, and more to come.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  count = sub.add_parser("count", help="print the LoRA plan and parameter counts of a model",
                         description="Plan and PEFT-style counts for a named model config, "
                                     "from abstract shapes (no weights are allocated).")
  count.add_argument("--model", required=True, help=f"one of: {', '.join(models.CONFIGS)}")
  count.add_argument("--rank", type=int, default=8)
  count.add_argument("--alpha", type=float, default=None, help="default: the rank")
  count.add_argument("--targets", default=None,
                     help="comma-separated aliases (q,k,v,o,gate,up,down; qkv for GPT-2's "
                          "fused c_attn), module names, regular expressions, or all-linear; "
                          "default: the query and value projections")
  count.add_argument("--separate-qkv", action="store_true",
                     help="GPT-2 family: separate q, k, v projections instead of c_attn "
                          "(same base count; the LoRA paper's Wq, Wv)")
  count.add_argument("--use-rslora", action="store_true")
  count.add_argument("--summary", action="store_true", help="print only the totals")
  return parser


def _count(args) -> int:
  overrides = _overrides(args)
  targets = args.targets or models.default_targets(args.model, **overrides)
  config = LoraConfig(targets=models.targets_for(args.model, targets, **overrides),
                      rank=args.rank, alpha=args.rank if args.alpha is None else args.alpha,
                      use_rslora=args.use_rslora)
  shown = models.plan_model(args.model, config, **overrides)
  print(shown.counts if args.summary else shown)
  return 0


def _overrides(args) -> dict:
  if not args.separate_qkv:
    return {}
  if models.spec_of(args.model).family != "gpt2":
    raise ValueError(f"--separate-qkv applies to the GPT-2 family only, not {args.model}.")
  return {"fused_qkv": False}


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    return {"count": _count}[args.command](args)
  except ValueError as e:
    return _fail(f"lora-jax {args.command}: {e}")
  except Exception as e:  # noqa: BLE001  never a traceback on the command line
    return _fail(f"lora-jax {args.command}: unexpected {type(e).__name__}: {e}")


if __name__ == "__main__":
  sys.exit(main())
