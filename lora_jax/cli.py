"""The ``lora-jax`` command line. Bad input prints one line on stderr and exits with 2."""

from __future__ import annotations

import argparse
import sys

from lora_jax import models
from lora_jax.config import LoraConfig
from lora_jax.finetune import Options


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
  _train_parser(sub)
  ev = sub.add_parser("eval", help="accuracy of a trained run on a labelled file")
  ev.add_argument("run", help="the run folder written by lora-jax train")
  ev.add_argument("--data", required=True, help="a .tsv, .csv or .jsonl file")
  ev.add_argument("--text-column", default="sentence")
  ev.add_argument("--label-column", default="label")
  merge = sub.add_parser("merge", help="write merged weights as safetensors (original names)")
  merge.add_argument("run")
  merge.add_argument("--out", required=True, help="folder for model.safetensors and configs")
  return parser


def _train_parser(sub) -> None:
  d = Options()
  train = sub.add_parser(
      "train", help="fine-tune all-MiniLM-L6-v2 with LoRA (default) or fully",
      description="Fine-tunes the bundled all-MiniLM-L6-v2 for text classification. Without "
                  "--data it trains on the embedded VADER polarity task.")
  train.add_argument("--data", help="training file (.tsv, .csv, .jsonl); default: VADER task")
  train.add_argument("--val", help="validation file; default: the task's, or 10%% of --data")
  train.add_argument("--text-column", default=d.text_column)
  train.add_argument("--label-column", default=d.label_column)
  for name, kind in (("rank", int), ("alpha", float), ("dropout", float), ("lr", float),
                     ("batch-size", int), ("epochs", float), ("steps", int),
                     ("max-length", int), ("max-train", int), ("eval-every", int),
                     ("seed", int)):
    train.add_argument(f"--{name}", type=kind, default=getattr(d, name.replace("-", "_")))
  train.add_argument("--targets", default=d.targets,
                     help="q,v (default), all-linear, aliases or patterns")
  train.add_argument("--pooling", choices=models.bert.POOLINGS, default=d.pooling,
                     help="the classifier's input: BERT's pooler on the first token "
                          "(default; transformers' BertForSequenceClassification) or the mean "
                          "of the token states (sentence-transformers' pooling, which "
                          "all-MiniLM-L6-v2 was trained with)")
  train.add_argument("--full", action="store_true", help="full fine-tuning (the baseline)")
  train.add_argument("--lora-plus-ratio", type=float, default=d.lora_plus_ratio,
                     help="LoRA+: B's learning rate is this times --lr (A's and the head's)")
  train.add_argument("--remat", action="store_true",
                     help="gradient checkpointing: recompute each layer in the backward pass")
  train.add_argument("--distributed", action="store_true",
                     help="multi-host: call jax.distributed.initialize() first (every host runs "
                          "the same command; coordinator and process ids from the cluster, or "
                          "from the three options below)")
  train.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
  train.add_argument("--num-processes", type=int, default=None, help="multi-host: processes")
  train.add_argument("--process-id", type=int, default=None, help="multi-host: this process")
  train.add_argument("--mesh", default=None,
                     help='device mesh "DxM": batch split over D devices, the encoder '
                          'tensor-parallel over M (D*M = all devices), e.g. 8x1 or 4x2')
  train.add_argument("--out", default="runs/minilm-lora", help="run folder")
  train.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
  train.add_argument("--resume", action="store_true", help="continue the run in --out")


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


def _train(args) -> int:
  from lora_jax import run

  fields = {f: getattr(args, f) for f in Options.__dataclass_fields__}
  if args.distributed or args.coordinator:
    from lora_jax import sharding
    sharding.initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                        process_id=args.process_id)
  try:
    run.train(Options(**fields), args.out, overwrite=args.overwrite, resume=args.resume)
  except KeyboardInterrupt:
    return 130
  return 0


def _eval(args) -> int:
  from lora_jax import run

  acc = run.evaluate(args.run, args.data, text_column=args.text_column,
                     label_column=args.label_column)
  print(f"accuracy {acc:.4f} on {args.data}")
  return 0


def _merge(args) -> int:
  from lora_jax import run

  print(f"wrote {run.merge(args.run, args.out) / 'model.safetensors'}")
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    return {"count": _count, "train": _train, "eval": _eval, "merge": _merge}[args.command](args)
  except (FileNotFoundError, ValueError) as e:
    return _fail(f"lora-jax {args.command}: {e}")
  except Exception as e:  # noqa: BLE001  never a traceback on the command line
    return _fail(f"lora-jax {args.command}: unexpected {type(e).__name__}: {e}")


if __name__ == "__main__":
  sys.exit(main())
