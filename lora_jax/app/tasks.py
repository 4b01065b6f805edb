"""The app's task records: what the command line needs of a task, declared by the task.

``lora_jax.app.cli`` names no task. A task's module declares one ``Task`` record and
registers it, as a model family does (``lora_jax.family``); ``lora-jax train --task NAME``,
``eval``, ``merge`` and ``export-peft`` on its runs, and any commands of its own (``generate``,
``serve``) then go through the record. ``BUILT_IN`` lists the app's own task modules, imported
on first use; the first one's task (its options class defined there) is the default
(``--task`` left out, or a run saved before tasks had names).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from lora_jax.app.run_folder import saved_config

# The built-in task modules, the default task's first; the one place that names them.
BUILT_IN = ("lora_jax.app.classify", "lora_jax.app.causal")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Command:
  """A command a task brings: ``add(subparsers)`` adds its parser, ``run(args)`` runs it (the
  exit status)."""

  add: Callable[[Any], None]
  run: Callable[[Any], int]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Task:
  """One task's record.

  Attributes:
    names: its ``--task`` names, the ``task`` a run's ``config.json`` holds (runs of the
      default task may hold none); with several, its options class has a ``task`` field.
    options: its options class (a ``lora_jax.app.options.RunOptions``).
    new: ``new(options)``: the task the runner trains (``lora_jax.app.runner.Task``), data
      read and checked.
    evaluate: ``evaluate(runs, files, args)``: ``{metric: value}`` per run, ``files[i]``
      (None: the run's own validation data) for ``runs[i]``; ``args``: the parsed command line.
    merge: ``merge(run, out)``: writes the merged model, returns the path to show; None: none.
    export_peft: ``export_peft(run, out)``: writes a PEFT adapter folder; None: none.
    out: the default run folder, ``{task}`` replaced by the name.
    summary: ``--task``'s help for its names.
    about: a phrase of ``train``'s help (what it fine-tunes).
    description: a sentence of ``train``'s description.
    eval_help, data_help, merge_help: its parts of ``eval``'s, ``eval --data``'s and
      ``merge``'s help.
    eval_needs_data: ``eval`` needs ``--data`` for its runs (no validation split of its own).
    eval_flags: ``eval_flags(parser)`` adds ``eval``'s flags of this task.
    commands: commands of its own, ``{name: Command}``.
  """

  names: tuple[str, ...]
  options: type
  new: Callable[[Any], Any]
  evaluate: Callable[[list, list, Any], list[dict[str, float]]]
  merge: Callable[[Any, Any], Any] | None = None
  export_peft: Callable[[Any, Any], Any] | None = None
  out: str = "runs/{task}"
  summary: str = ""
  about: str = ""
  description: str = ""
  eval_help: str = ""
  data_help: str = ""
  merge_help: str = ""
  eval_needs_data: bool = False
  eval_flags: Callable[[Any], None] | None = None
  commands: Mapping[str, Command] = dataclasses.field(default_factory=dict)

  @property
  def label(self) -> str:
    """Its names as help texts show them (``chat/text``)."""
    return "/".join(self.names)


_REGISTRY: dict[str, Task] = {}
_LOADED: list[bool] = []


def _load_built_in() -> None:
  if not _LOADED:
    _LOADED.append(True)
    for module in BUILT_IN:
      importlib.import_module(module)


def register(record: Task) -> Task:
  """Registers ``record`` under each of its names (after the built-in tasks); returns it.

  Raises:
    TypeError: ``record`` is not a ``Task``.
    ValueError: a name another task has (``unregister`` it first).
  """
  if not isinstance(record, Task):
    raise TypeError(f"register takes a lora_jax.app.tasks.Task, got {type(record).__name__}.")
  _load_built_in()
  taken = [n for n in record.names if n in _REGISTRY and _REGISTRY[n] is not record]
  if taken:
    raise ValueError(f"task names {taken} are registered already; unregister them first.")
  _REGISTRY.update({n: record for n in record.names})
  return record


def unregister(name: str) -> None:
  """Removes the task named ``name`` (all its names) from the registry (no error if absent)."""
  record = _REGISTRY.get(name)
  for n in record.names if record is not None else ():
    _REGISTRY.pop(n, None)


def registered() -> list[Task]:
  """The registered tasks: the built-in ones in ``BUILT_IN``'s order (the default first), then
  the others in the order they registered."""
  _load_built_in()
  records = list({id(r): r for r in _REGISTRY.values()}.values())
  return sorted(records, key=_rank)


def _rank(record: Task) -> int:
  """The place in ``BUILT_IN`` of the module that defines ``record``'s options (or after)."""
  module = record.options.__module__
  return next((i for i, m in enumerate(BUILT_IN) if module == m or module.startswith(m + ".")),
              len(BUILT_IN))


def default() -> str:
  """The default task's name."""
  return registered()[0].names[0]


def get(name: str) -> Task:
  """The task named ``name``.

  Raises:
    ValueError: an unknown name (the message lists the registered ones).
  """
  _load_built_in()
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; the tasks are: {', '.join(_REGISTRY)}.")
  return _REGISTRY[name]


def of_options(options_cls: type) -> Task:
  """The task whose options class is ``options_cls``."""
  return next(r for r in registered() if r.options is options_cls)


def saved_name(saved: dict) -> str:
  """A run's task name from its ``config.json`` (the default task when it has none)."""
  return saved.get("task", default())


def of_run(run) -> Task:
  """The task of a saved run folder."""
  return get(saved_name(saved_config(run)))
