"""The ``lora-jax`` command line. Bad input prints one line on stderr and exits with 2.

The command line names no task: ``train``, ``eval``, ``merge`` and ``export-peft`` go through
the task records (``lora_jax.app.tasks``), and a task may bring commands of its own
(``generate``, ``serve``). ``train``'s option flags are generated from the tasks' options
classes (one ``--flag`` per field, its help from the field); ``--config FILE.json|yaml``
supplies options, and flags given on the command line override the file's values.
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

from lora_jax.app import tasks
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
  """A field's default, or each class's where they differ (``A: 32; B/C: 8``, by task)."""
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


def given_options(args, options_cls) -> dict:
  """The option values given: ``--config``'s, then the flags on the command line.

  Raises:
    OptionError: a flag of another task's options only.
  """
  names = {f.name for f in dataclasses.fields(options_cls)}
  values = read_config_file(args.config) if getattr(args, "config", None) else {}
  owners = _option_owners()
  values.update({k: v for k, v in vars(args).items() if k in names or k in owners})
  task = values.pop("task", None)
  shown = task or tasks.of_options(options_cls).names[0]
  for k in values:
    if k not in names and k in owners:
      raise OptionError(k, f"applies to --task {' or '.join(owners[k])}, not {shown}.")
  if "task" in names and task is not None:
    values["task"] = task
  return values


def _option_owners() -> dict[str, list[str]]:
  """``{option: the tasks that have it}``, each task as its names (``a and b``)."""
  owners: dict[str, list[str]] = {}
  for record in tasks.registered():
    for f in dataclasses.fields(record.options):
      owners.setdefault(f.name, []).append(" and ".join(record.names))
  return owners


def task_of(args) -> str:
  """The task asked for: ``--task``, else the ``--config`` file's, else the default."""
  if getattr(args, "task", None):
    return args.task
  values = read_config_file(args.config) if getattr(args, "config", None) else {}
  return values.get("task", tasks.default())


def options_class(task: str):
  """The options class of the task named ``task``."""
  return tasks.get(task).options


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
  records = tasks.registered()
  parser = _Parser(prog="lora-jax", description="LoRA for JAX: train, evaluate, merge, count.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  _count_parser(sub)
  _train_parser(sub, records)
  ev = sub.add_parser("eval", help="score a trained run on a file (" + _each(records, "eval_help")
                      + ")")
  ev.add_argument("run", nargs="+", help="run folder(s) written by lora-jax train, all of one "
                                         "task")
  ev.add_argument("--data", action="append", default=None,
                  help="one for every run or one per run, in order (" + _each(records, "data_help")
                       + ")")
  for record in records:
    if record.eval_flags is not None:
      record.eval_flags(ev)
  merge = sub.add_parser("merge", help="write merged weights (" + _each(records, "merge_help")
                         + ")")
  merge.add_argument("run")
  merge.add_argument("--out", required=True, help="folder for model.safetensors and configs")
  export = sub.add_parser("export-peft", help="write a LoRA run as a Hugging Face PEFT adapter")
  export.add_argument("run")
  export.add_argument("--out", required=True, help="folder for adapter_config.json and "
                                                   "adapter_model.safetensors")
  for record in records:
    for command in record.commands.values():
      command.add(sub)
  return parser


def _each(records, field: str) -> str:
  """Each task's ``field`` (a help text), labelled by its names (``a: ...; b/c: ...``)."""
  return "; ".join(f"{r.label}: {getattr(r, field)}" for r in records if getattr(r, field))


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


def _train_parser(sub, records) -> None:
  first, *others = records
  outs = "; ".join(f"--task {r.label}: {', '.join(r.out.format(task=n) for n in r.names)}"
                   for r in others)
  train = sub.add_parser(
      "train", help="LoRA (or full) fine-tuning: " + ", or ".join(r.about for r in records),
      description=" ".join(r.description for r in records))
  train.add_argument("--task", default=argparse.SUPPRESS,
                     choices=tuple(n for r in records for n in r.names),
                     help=", ".join(r.summary for r in records))
  add_option_flags(train, first.options, others=tuple(r.options for r in others),
                   skip=("task",))
  train.add_argument("--config", default=None,
                     help="a .json or .yaml file of options (field names); flags override it")
  train.add_argument("--out", default=None, help=f"run folder (default: "
                                                 f"{first.out.format(task=first.names[0])}"
                                                 f"{'; ' if outs else ''}{outs})")
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

  run = pathlib.Path(args.out or tasks.get(task_of(args)).out.format(task=task_of(args)))
  if args.distributed or args.coordinator:
    sharding.initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                        process_id=args.process_id)
  if args.resume:
    runner.check(run, overwrite=args.overwrite, resume=True)
    saved = runner.saved_config(run)
    task_name = tasks.saved_name(saved)
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
    task = tasks.get(task_name).new(options)  # data, weights and targets checked: nothing deleted
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


def _eval(args) -> int:
  runs, data = args.run, args.data or []
  if len(data) not in (0, 1, len(runs)):
    return _fail(f"--data is given {len(data)} times for {len(runs)} runs; give it once (every "
                 f"run) or once per run.")
  data = data * len(runs) if len(data) == 1 else data or [None] * len(runs)
  records = {id(r): r for r in map(tasks.of_run, runs)}
  if len(records) > 1:
    names = ", ".join(r.label for r in records.values())
    return _fail(f"the runs are of different tasks ({names}); evaluate each task's runs "
                 f"apart.")
  record = next(iter(records.values()))
  if record.eval_needs_data and None in data:
    return _fail(f"--data is required for {record.label} runs ({record.data_help}).")
  scores = record.evaluate(runs, data, args)
  for run, file, got in zip(runs, data, scores):
    print(" ".join(f"{k} {v:.4f}" for k, v in got.items())
          + f" on {file or 'its validation split'}" + (f" ({run})" if len(runs) > 1 else ""))
  return 0


def _merge(args) -> int:
  merge = tasks.of_run(args.run).merge
  if merge is None:
    return _fail(f"lora-jax merge: {args.run}'s task writes no merged model.")
  print(f"wrote {merge(args.run, args.out)}")
  return 0


def _export_peft(args) -> int:
  export = tasks.of_run(args.run).export_peft
  if export is None:
    return _fail(f"lora-jax export-peft: {args.run}'s task has no PEFT form.")
  print(f"wrote {export(args.run, args.out)}")
  return 0


COMMANDS = {"count": _count, "train": _train, "eval": _eval, "merge": _merge,
            "export-peft": _export_peft}


def _interrupted() -> int:
  """Exit 130 at once after Ctrl-C, once the run has cleaned up (metrics closed, lock freed):
  Python's own shutdown can crash in XLA when Ctrl-C landed in the middle of a compilation
  (seen as a segmentation fault), so it is skipped."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(130)


def _command(name: str):
  """The command ``name``: the command line's own, or a task's."""
  if name in COMMANDS:
    return COMMANDS[name]
  return next(r.commands[name].run for r in tasks.registered() if name in r.commands)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    code = _command(args.command)(args)
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
