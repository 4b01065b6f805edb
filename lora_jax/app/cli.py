"""The ``lora-jax`` command line. Bad input prints one line on stderr and exits with 2.

``train``'s option flags are generated from ``ClassifyOptions`` (one ``--flag`` per field,
its help from the field); ``--config FILE.json|yaml`` supplies options, and flags given on the
command line override the file's values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import types
import typing

from lora_jax.app.options import OptionError, flag, resumed

__all__ = ["add_option_flags", "flag", "main", "options_from", "read_config_file"]


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse would also print the usage)
    raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
  print(message.splitlines()[0] if message else "error", file=sys.stderr)
  return 2


# ----------------------------------------------------------------------- flags from options


def _scalar(hint):
  """The argparse type of a field annotated ``hint`` (``float | None`` -> float)."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    hint = next(h for h in typing.get_args(hint) if h is not type(None))
  return hint


def add_option_flags(parser: argparse.ArgumentParser, options_cls, *, others=(),
                     skip=()) -> None:
  """One flag per field of ``options_cls`` (and of the option classes ``others``, for fields
  ``options_cls`` lacks); unset flags stay out of the parsed namespace, so a ``--config``
  file's values (and then the defaults) fill them."""
  seen = set(skip)
  for cls in (options_cls, *others):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
      if field.name in seen:
        continue
      seen.add(field.name)
      kind = _scalar(hints[field.name])
      meta = dict(field.metadata)
      text = f"{meta.pop('help', '')} (default: {_defaults(field.name, (cls, *others))})"
      text = text.replace("%", "%%")
      if kind is bool:
        parser.add_argument(flag(field.name), dest=field.name,
                            action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=text)
      else:
        parser.add_argument(flag(field.name), dest=field.name, type=kind,
                            default=argparse.SUPPRESS, help=text, **meta)


def _defaults(name: str, classes) -> str:
  """A field's default, or each class's where they differ (``classify: 32; chat/text: 8``)."""
  values = {}
  for cls in classes:
    for field in dataclasses.fields(cls):
      if field.name == name:
        values.setdefault(repr(field.default) if isinstance(field.default, str)
                          else str(field.default), []).append(getattr(cls, "LABEL", ""))
  if len(values) == 1:
    return next(iter(values))
  return "; ".join(f"{'/'.join(t for t in tasks if t)}: {v}" for v, tasks in values.items())


def read_config_file(path) -> dict:
  """Options from a ``.json`` or ``.yaml`` / ``.yml`` file (a mapping of field names)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--config file {str(path)!r} does not exist.")
  text = path.read_text()
  suffix = path.suffix.lower()
  if suffix not in (".json", ".yaml", ".yml"):
    raise ValueError(f"--config {path}: unknown format {suffix!r}; use .json or .yaml.")
  if suffix == ".json":
    try:
      values = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"--config {path} is not valid JSON: {e}.") from None
  else:
    import yaml  # the app extra's PyYAML
    try:
      values = yaml.safe_load(text)
    except yaml.YAMLError as e:
      raise ValueError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}.") from None
  if not isinstance(values, dict):
    raise ValueError(f"--config {path} must hold a mapping of option names to values.")
  return {k.replace("-", "_"): v for k, v in values.items()}


TASKS = ("chat", "text")  # lora_jax.app.causal.TASKS (not imported here: keeps --help fast)


def given_options(args, options_cls) -> dict:
  """The option values given: ``--config``'s, then the flags on the command line.

  Raises:
    OptionError: a flag of another task's options (``--pooling`` with ``--task chat``).
  """
  names = {f.name for f in dataclasses.fields(options_cls)}
  values = read_config_file(args.config) if getattr(args, "config", None) else {}
  every = _all_option_names()
  values.update({k: v for k, v in vars(args).items() if k in names or k in every})
  task = values.pop("task", None)
  shown = task or ("chat" if "task" in names else "classify")
  for k in values:
    if k not in names and k in every:
      owner = "classify" if "task" in names else "chat and text"
      raise OptionError(k, f"applies to --task {owner}, not {shown}.")
  if "task" in names and task is not None:
    values["task"] = task
  return values


def _all_option_names() -> set[str]:
  from lora_jax.app.causal import CausalOptions
  from lora_jax.app.classify import ClassifyOptions
  return {f.name for cls in (ClassifyOptions, CausalOptions) for f in dataclasses.fields(cls)}


def task_of(args) -> str:
  """The task asked for: ``--task``, else the ``--config`` file's, else classify."""
  if getattr(args, "task", None):
    return args.task
  values = read_config_file(args.config) if getattr(args, "config", None) else {}
  return values.get("task", "classify")


def options_class(task: str):
  from lora_jax.app.causal import CausalOptions
  from lora_jax.app.classify import ClassifyOptions
  return ClassifyOptions if task == "classify" else CausalOptions


def options_from(args, options_cls):
  """The options: defaults, then ``--config``'s values, then the flags given; data files as
  absolute paths, so ``--resume`` works from any folder."""
  options = options_cls.from_dict(given_options(args, options_cls))
  given = lambda name: getattr(options, name, None)  # noqa: E731
  files = {name: str(pathlib.Path(given(name)).resolve()) for name in ("data", "val")
           if given(name) and pathlib.Path(given(name)).is_file()}
  if given("model") and pathlib.Path(given("model")).exists():  # a .gguf file or a folder
    files["model"] = str(pathlib.Path(given("model")).resolve())
  return dataclasses.replace(options, **files)


# ----------------------------------------------------------------------- the parser


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="lora-jax", description="LoRA for JAX: train, evaluate, merge, count.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  _count_parser(sub)
  _train_parser(sub)
  ev = sub.add_parser("eval", help="accuracy of a trained run on a labelled file (chat/text: "
                                   "masked loss, perplexity, exact-match accuracy)")
  ev.add_argument("run", nargs="+", help="run folder(s) written by lora-jax train; several "
                                         "classification runs are evaluated together, in "
                                         "mixed batches over one base")
  ev.add_argument("--data", action="append", default=None,
                  help="a .tsv, .csv or .jsonl file (chat/text: the task's .jsonl or .txt); one "
                       "for every run or one per run, in order; without it a classification "
                       "run is scored on its own validation split")
  ev.add_argument("--text-column", default="sentence")
  ev.add_argument("--label-column", default="label")
  merge = sub.add_parser("merge", help="write merged weights as safetensors (original names; "
                                       "chat/text: a Hugging Face Llama folder)")
  merge.add_argument("run")
  merge.add_argument("--out", required=True, help="folder for model.safetensors and configs")
  export = sub.add_parser("export-peft", help="write a LoRA run as a Hugging Face PEFT adapter")
  export.add_argument("run")
  export.add_argument("--out", required=True, help="folder for adapter_config.json and "
                                                   "adapter_model.safetensors")
  _generate_parser(sub)
  _serve_parser(sub)
  return parser


def _generate_parser(sub) -> None:
  from lora_jax import quant
  from lora_jax.app.options import (MAX_INT, MAX_SEED, MAX_TEMPERATURE, finite_in, integer_in,
                                    prompt_text)
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


def _serve_parser(sub) -> None:
  from lora_jax import quant
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


def _variants() -> dict[str, list]:
  """``{variant: [(family, overrides), ...]}`` over the registered families."""
  from lora_jax import family
  out: dict[str, list] = {}
  for record in family.registered().values():
    for name, overrides in record.variants.items():
      out.setdefault(name, []).append((record.name, dict(overrides)))
  return out


def _count_parser(sub) -> None:
  from lora_jax import family, models, quant

  aliases = "; ".join(f"{f.name}: {','.join(f.target_aliases)}"
                      for f in family.registered().values() if f.target_aliases)
  count = sub.add_parser("count", help="print the LoRA plan and parameter counts of a model",
                         description="Plan and PEFT-style counts for a named model config, "
                                     "from abstract shapes (no weights are allocated).")
  count.add_argument("--model", required=True, help=f"one of: {', '.join(models.configs())}")
  count.add_argument("--rank", type=int, default=8)
  count.add_argument("--alpha", type=float, default=None, help="default: the rank")
  count.add_argument("--targets", default=None,
                     help=f"comma-separated family aliases ({aliases}), module names, regular "
                          f"expressions, or all-linear; default: the family's (the query and "
                          f"value projections)")
  for name, owners in _variants().items():  # from the family records
    shown = "; ".join(f"{fam}: {overrides}" for fam, overrides in owners)
    count.add_argument(flag(name), dest=name, action="store_true",
                       help=f"a config variant ({shown})")
  count.add_argument("--use-rslora", action="store_true")
  count.add_argument("--bias", default="none", choices=("none", "lora_only", "all"),
                     help="biases trained in place, as PEFT's bias (counted once)")
  count.add_argument("--quantize", default="none", choices=quant.CHOICES,
                     help="also print the frozen base's resident bytes with its matmul kernels "
                          "(but the head) in this format (nf4-dq: NF4 with double quantization)")
  count.add_argument("--summary", action="store_true", help="print only the totals")


def _train_parser(sub) -> None:
  from lora_jax.app.causal import CausalOptions
  from lora_jax.app.classify import ClassifyOptions

  train = sub.add_parser(
      "train", help="LoRA (or full) fine-tuning: classify with MiniLM (default), or chat/text "
                    "with a Llama-family decoder",
      description="--task classify (default) fine-tunes the bundled all-MiniLM-L6-v2 for text "
                  "classification (without --data: the embedded VADER polarity task). --task "
                  "chat / text fine-tunes a Llama-family decoder (--model, default the bundled "
                  "SmolLM2-135M-Instruct) on a .jsonl file (--data).")
  train.add_argument("--task", default=argparse.SUPPRESS, choices=("classify",) + TASKS,
                     help="classify (default), chat (loss on the assistant's tokens) or text")
  add_option_flags(train, ClassifyOptions, others=(CausalOptions,), skip=("task",))
  train.add_argument("--config", default=None,
                     help="a .json or .yaml file of options (field names); flags override it")
  train.add_argument("--out", default=None, help="run folder (default: runs/minilm-lora; "
                                                 "--task chat/text: runs/llm-chat, runs/llm-text)")
  train.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
  train.add_argument("--resume", action="store_true", help="continue the run in --out")
  train.add_argument("--distributed", action="store_true",
                     help="multi-host: call jax.distributed.initialize() first (every host runs "
                          "the same command; coordinator and process ids from the cluster, or "
                          "from the three options below)")
  train.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
  train.add_argument("--num-processes", type=int, default=None, help="multi-host: processes")
  train.add_argument("--process-id", type=int, default=None, help="multi-host: this process")


# ----------------------------------------------------------------------- commands


def _count(args) -> int:
  from lora_jax import models, quant
  from lora_jax.config import LoraConfig

  overrides = {}
  for name in _variants():
    if getattr(args, name):
      overrides.update(models.variant(args.model, name))
  targets = args.targets or models.default_targets(args.model, **overrides)
  config = LoraConfig(targets=models.targets_for(args.model, targets, **overrides),
                      rank=args.rank, alpha=args.rank if args.alpha is None else args.alpha,
                      use_rslora=args.use_rslora, bias=args.bias)
  shown = models.plan_model(args.model, config, **overrides)
  print(shown.counts if args.summary else shown)
  if args.quantize != "none":
    fmt, dq = quant.parse_choice(args.quantize)
    print(base_line(models.base_bytes(args.model, fmt, double_quant=dq, **overrides),
                    args.quantize))
  return 0


def base_line(b: dict, name: str) -> str:
  gib = lambda n: f"{n / 2**30:.3f} GiB"  # noqa: E731
  return (f"frozen base ({name}): {gib(b['total'])} resident; quantized kernels "
          f"{b['quantized_weights']:,} weights in {gib(b['kernels'])} "
          f"({b['bits_per_weight']:.3f} bits/weight), other leaves {gib(b['dense'])}")


def _train(args) -> int:
  from lora_jax import sharding
  from lora_jax.app import runner

  default = "runs/minilm-lora" if task_of(args) == "classify" else f"runs/llm-{task_of(args)}"
  run = pathlib.Path(args.out or default)
  if args.distributed or args.coordinator:
    sharding.initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                        process_id=args.process_id)
  if args.resume:
    runner.check(run, overwrite=args.overwrite, resume=True)
    saved = runner.saved_config(run)
    task_name = saved.get("task", "classify")
    cls = options_class(task_name)
    given = given_options(args, cls) if task_name == task_of(args) or not getattr(
        args, "task", None) else _refuse_task(args.task, task_name)
    given = _same_files(given, saved["options"])
    options = resumed(cls.from_dict(saved["options"]), given, total_steps=saved["total_steps"])
  else:
    task_name = task_of(args)
    options = options_from(args, options_class(task_name))
  inputs = _inputs(args, options)
  runner.check(run, overwrite=args.overwrite, resume=args.resume, inputs=inputs)  # writes nothing
  with runner.RunLock(run):  # a second writer of this folder is refused
    task = _new_task(task_name, options)  # data, weights and targets checked: nothing deleted
    try:  # checked again under the lock, then staged: the old run stays until a checkpoint
      runner.train(task, run, resume=args.resume, overwrite=args.overwrite, inputs=inputs)
    except KeyboardInterrupt:
      return 130
  return 0


FILES = ("data", "val", "model")  # options that name files or folders the run reads


def _inputs(args, options) -> dict[str, str]:
  """``{flag: path}`` of what a run reads: its data, model and ``--config`` file."""
  found = {flag(name): getattr(options, name) for name in FILES
           if getattr(options, name, None) and pathlib.Path(getattr(options, name)).exists()}
  if getattr(args, "config", None):
    found["--config"] = args.config
  return found


def _same_files(given: dict, saved: dict) -> dict:
  """``given`` with each path that names the saved run's file (another spelling of it, e.g.
  relative) replaced by the saved value, so ``--resume`` compares files, not strings."""
  same = {}
  for name in FILES:
    mine, theirs = given.get(name), saved.get(name)
    if not (isinstance(mine, str) and isinstance(theirs, str)) or mine == theirs:
      continue
    try:
      if os.path.samefile(mine, theirs):
        same[name] = theirs
    except OSError:  # one of them is gone: compare the paths
      if pathlib.Path(mine).resolve() == pathlib.Path(theirs).resolve():
        same[name] = theirs
  return {**given, **same}


def _refuse_task(asked: str, saved: str):
  raise OptionError("task", f"{asked!r} differs from the saved run's {saved!r}; --resume "
                            f"continues a run with the options it started with.")


def _new_task(task_name: str, options):
  if task_name == "classify":
    from lora_jax.app import classify
    return classify.Classify(options)
  from lora_jax.app import causal
  return causal.CausalLM(options)


def _saved_task(run) -> str:
  """The task of a saved run folder (``classify`` for runs saved before tasks had names)."""
  from lora_jax.app import runner
  return runner.saved_config(run).get("task", "classify")


def _eval(args) -> int:
  runs, data = args.run, args.data or []
  if len(data) not in (0, 1, len(runs)):
    return _fail(f"--data is given {len(data)} times for {len(runs)} runs; give it once (every "
                 f"run) or once per run.")
  data = data * len(runs) if len(data) == 1 else data or [None] * len(runs)
  tasks = {_saved_task(run) for run in runs}
  if tasks != {"classify"}:
    from lora_jax.app import causal
    if None in data:
      return _fail("--data is required for chat/text runs (the task's .jsonl or .txt file).")
    for run, file in zip(runs, data):
      scores = causal.evaluate(run, file)
      print(" ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" on {file}"
            + (f" ({run})" if len(runs) > 1 else ""))
    return 0
  from lora_jax.app import classify

  scores = classify.evaluate_runs(runs, data, text_column=args.text_column,
                                  label_column=args.label_column)
  for run, file, acc in zip(runs, data, scores):
    where = file or "its validation split"
    print(f"accuracy {acc:.4f} on {where}" + (f" ({run})" if len(runs) > 1 else ""))
  return 0


def _merge(args) -> int:
  if _saved_task(args.run) != "classify":
    from lora_jax.app import causal
    print(f"wrote {causal.merge(args.run, args.out)}")
    return 0
  from lora_jax.app import classify

  print(f"wrote {classify.merge(args.run, args.out) / 'model.safetensors'}")
  return 0


def _export_peft(args) -> int:
  if _saved_task(args.run) != "classify":
    from lora_jax.app import causal
    print(f"wrote {causal.export_peft(args.run, args.out)}")
    return 0
  from lora_jax.app import classify

  print(f"wrote {classify.export_peft(args.run, args.out)}")
  return 0


def _generate(args) -> int:
  from lora_jax.app import causal

  adapters = causal.adapter_paths(args.adapter) if args.adapter else None
  single = len(args.prompt) == 1 and not args.quiet and not adapters
  stream = sys.stdout if single else None
  result = causal.generate_text(
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


def _serve(args) -> int:
  from lora_jax.app import causal, serve

  try:
    return serve.serve(args.model, causal.adapter_paths(args.adapter), host=args.host,
                       port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                       max_new_tokens_limit=args.max_new_tokens_limit,
                       batch_wait_ms=args.batch_wait_ms, quantize=args.quantize)
  except KeyboardInterrupt:  # Ctrl-C while loading (once serving, it stops the server)
    return 130


COMMANDS = {"count": _count, "train": _train, "eval": _eval, "merge": _merge,
            "export-peft": _export_peft, "generate": _generate, "serve": _serve}


def _interrupted() -> int:
  """Exit 130 at once after Ctrl-C, once the run has cleaned up (metrics closed, lock freed):
  Python's own shutdown can crash in XLA when Ctrl-C landed in the middle of a compilation
  (seen as a segmentation fault), so it is skipped."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(130)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    code = COMMANDS[args.command](args)
    return _interrupted() if code == 130 else code
  except KeyboardInterrupt:  # the command's own clean-up (temporary folders) has run
    print(f"lora-jax {args.command}: interrupted", file=sys.stderr)
    return _interrupted()
  except OptionError as e:
    return _fail(f"lora-jax {args.command}: {flag(e.field)} {e.message}")
  except (FileNotFoundError, ValueError) as e:
    return _fail(f"lora-jax {args.command}: {e}")
  except Exception as e:  # noqa: BLE001  never a traceback on the command line
    return _fail(f"lora-jax {args.command}: unexpected {type(e).__name__}: {e}")


if __name__ == "__main__":
  sys.exit(main())
