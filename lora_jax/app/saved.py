"""Saved runs: the one load / merge / export skeleton every task's saved runs go through.

A task gives how to build itself from a run's ``config.json`` (no data read) and what an export
writes; the checks of ``--out`` (``lora_jax.app.exports``), the restore of the newest intact
checkpoint and the staging of the written folder are done here, the same for every task.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax

import lora_jax
from lora_jax.app import runner
from lora_jax.app.runner import RunError


def load(run, build: Callable[[dict], Any]) -> tuple[Any, Any]:
  """``(task, trainable)``: ``build(saved config)`` (a task without its data) and the run's
  trainable tree, restored onto its base (``lora_jax.checkpoint.restore`` checks the base)
  and placed as the task places it."""
  run = pathlib.Path(run)
  task = build(runner.saved_config(run))
  restored = runner.restore(run, task.base)
  return task, task.place(restored.adapters)


def export(run, out, load: Callable, write: Callable, *,
           check: Callable | None = None) -> pathlib.Path:
  """Writes an export of ``run`` into ``out``: ``out`` checked before any work, ``load(run)``
  (``(task, trainable)``), ``check(task)`` (raises to refuse), then ``write(task, trainable,
  folder)`` into a staging folder that becomes ``out`` whole or not at all.

  Raises:
    RunError: a bad ``out`` (``lora_jax.app.exports.export_folder``), or ``check``'s refusal.
  """
  out = runner.export_folder(run, out)
  task, trainable = load(run)
  if check is not None:
    check(task)
  with runner.staged(out) as staging:
    write(task, trainable, staging)
  return out


def export_peft(run, out, load: Callable, *, base_model: Callable[[Any], str],
                task_type: str | None, check: Callable | None = None) -> pathlib.Path:
  """Writes a LoRA run as a PEFT adapter folder (``lora_jax.peft.export_peft``; a PiSSA /
  OLoRA run as the plain LoRA adapter on the original base).

  Args:
    run, out, load, check: as ``export``'s.
    base_model: ``base_model(task)``: the config's ``base_model_name_or_path``.
    task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``).

  Raises:
    RunError: a bad ``out``, a full fine-tuning run (it has no adapter), or ``check``'s
      refusal.
  """
  def refuse(task) -> None:
    if task.options.full:
      raise RunError(f"{run} is a full fine-tuning run; export it with lora-jax merge.")
    if check is not None:
      check(task)

  def write(task, trainable, staging) -> None:
    initial = None if task.initial is None else jax.device_get(task.initial)
    lora_jax.peft.export_peft(staging, jax.device_get(trainable), config=task.lora_config,
                              initial=initial, base_model_name_or_path=base_model(task),
                              task_type=task_type)

  return export(run, out, load, write, check=refuse)
