"""The task-agnostic training loop behind ``lora-jax train``: run folders, resume, Ctrl-C,
multi-host, metrics. It knows nothing of labels or tokens: a task (``lora_jax.app.tasks``)
supplies the data, the model, the loss, the evaluation, a batch's size and the export.

A run folder holds ``config.json`` (every option), ``metrics.jsonl`` (one JSON line per logged
interval and per evaluation), ``metrics.json`` (the summary: history at each evaluation,
counts, time), TensorBoard event files in ``tensorboard/``, ``curves.png`` and
``checkpoints/``, a ``lora_jax.checkpoint`` folder (the trainable tree with its description
and base identity, the optimizer state and the step), so ``lora_jax.checkpoint.restore``
reads a run like any other checkpoint. The step is ``lora_jax.train_step``; the logged
training loss is the mean over each interval, not the last batch's.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax
from lora_jax import checkpoint, sharding
from lora_jax.app.exports import export_folder, staged  # noqa: F401  (the tasks' exports)
from lora_jax.app.run_folder import (CHECKPOINTS, Folder, RunError, RunLock, check,  # noqa: F401
                                  interrupts_deferred, is_run, primary, saved_config, sync)
from lora_jax.app.run_folder import interrupts_kept as _interrupts_kept
from lora_jax.app.options import OptionError, RunOptions

KEEP = 2  # checkpoints kept in a run folder
MAX_SKIPPED = 5  # --skip-nonfinite: non-finite steps in a row before the run stops


class Task(Protocol):
  """What the runner needs of a task (e.g. ``lora_jax.app.classify.Classify``)."""

  options: RunOptions
  lora_config: lora_jax.LoraConfig  # what is trained: adapters and modules_to_save extras
  base: Any  # the frozen base tree (placed on the mesh, if any)
  trainable: Any  # the initial trainable tree
  base_name: str
  total_steps: int
  headline: str  # the metric printed at the end, e.g. "val_accuracy"

  def loss(self, params, batch) -> jax.Array: ...  # written against ordinary params
  def batch(self, step: int, key) -> dict: ...  # placed; may carry the step's PRNG key
  def batch_size(self, batch) -> int: ...
  def evaluate(self, trainable) -> dict[str, float]: ...
  def counts(self) -> lora_jax.ParamCount: ...
  def place(self, trainable): ...  # a restored trainable tree onto the mesh, if any
  def describe(self) -> dict: ...  # more for config.json (e.g. num_labels)
  def sizes(self) -> dict: ...  # for metrics.json (e.g. train_examples)


def write_json(path: pathlib.Path, value) -> None:
  if primary():
    path.write_text(json.dumps(value, indent=2, default=str, allow_nan=False) + "\n")


# ----------------------------------------------------------------------- optimizer


def optimizer_for(o: RunOptions, total_steps: int) -> optax.GradientTransformation:
  """AdamW with 10% linear warm-up and cosine decay. With ``lora_plus_ratio`` (LoRA+, as PEFT's
  ``create_loraplus_optimizer``): every B and 1-D trained extra at ratio times the learning
  rate, the rest at it."""
  if total_steps < 2:  # no room for a warm-up and a decay: the peak rate
    schedule = optax.constant_schedule(o.learning_rate)
  else:
    warmup = min(max(1, total_steps // 10), total_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup, total_steps)
  if o.lora_plus_ratio is None:
    optimizer = optax.adamw(schedule, weight_decay=0.01)
  else:
    optimizer = lora_jax.lora_plus(optax.adamw, learning_rate=schedule, ratio=o.lora_plus_ratio,
                                   weight_decay=0.01)
  if o.skip_nonfinite:  # a non-finite step leaves the parameters and state as they were
    return optax.apply_if_finite(optimizer, max_consecutive_errors=MAX_SKIPPED)
  return optimizer


# ----------------------------------------------------------------------- metrics


class Metrics:
  """``metrics.jsonl`` lines, TensorBoard scalars and the ``metrics.json`` summary; only the
  primary process writes."""

  def __init__(self, folder: Folder, summary: dict, *, start: int = 0):
    self.folder, self.summary = folder, summary
    self.writer = None
    if primary():
      from tensorboardX import SummaryWriter
      self._truncate(start)
      # a resumed run rewrites the steps after its checkpoint: TensorBoard drops the old ones
      # (the writer's open file follows the folder when it is moved into place)
      self.writer = SummaryWriter(str(folder.path / "tensorboard"),
                                  purge_step=start + 1 if start else None)

  @property
  def run(self) -> pathlib.Path:
    return self.folder.path

  def _truncate(self, start: int) -> None:
    """Drops the lines logged after step ``start`` (written before an interruption; a resumed
    run logs those steps again)."""
    path = self.run / "metrics.jsonl"
    if path.is_file():
      lines = path.read_text().splitlines()
      path.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= start))

  def log(self, record: dict) -> None:
    if not primary():
      return
    with (self.run / "metrics.jsonl").open("a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self.writer.add_scalar(key.replace("_", "/", 1), value, record["step"])
    self.writer.flush()

  def save(self) -> None:
    write_json(self.run / "metrics.json", self.summary)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def plot(summary: dict, path) -> None:
  """``curves.png``: the interval-mean training loss and the headline metric per evaluation."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  history = summary["history"]
  steps = [h["step"] for h in history]
  headline = summary["headline"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
  left.plot(steps, [h["loss"] for h in history], marker="o")
  left.set(xlabel="step", ylabel="training loss (interval mean)", title="loss")
  right.plot(steps, [h[headline] for h in history], marker="o", color="C2")
  right.set(xlabel="step", ylabel=headline.replace("_", " "), title=headline.replace("_", " "))
  for ax in (left, right):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def counts(o: RunOptions, base, trainable, *, config: lora_jax.LoraConfig | None = None
           ) -> lora_jax.ParamCount:
  """A task's counts: every parameter with ``full``, else PEFT's count of the trainable tree
  (``config``: the task's LoraConfig, whose ``bias`` says which extras PEFT trains in place)."""
  if o.full:
    total = lora_jax.targets.num_params(base)
    return lora_jax.ParamCount(trainable=total, total=total)
  return lora_jax.count(base, trainable, config=config)


# ----------------------------------------------------------------------- placement


class Placement:
  """Where a task's trees live: one device (``mesh`` None: nothing moves), or a device mesh
  with the family's tensor-parallel ``rules`` (the base laid out by them, the trainable tree
  following its base leaves, batches split over the mesh's data axis).

  Raises (constructor):
    OptionError: ``batch_size`` does not split over the data axis.
  """

  def __init__(self, mesh_shape: str | None, rules, *, batch_size: int):
    self.mesh = sharding.mesh(mesh_shape) if mesh_shape else None
    self.rules = rules
    if self.mesh is not None and batch_size % self.mesh.shape["data"]:
      raise OptionError("batch_size", f"{batch_size} does not split over the mesh's data axis "
                                      f"of {self.mesh.shape['data']} devices; use a multiple "
                                      f"of it.")

  def specs(self, tree):
    return sharding.named_shardings(sharding.tensor_parallel_specs(
        tree, self.rules, mesh=self.mesh), self.mesh)

  def both(self, base, trainable):
    """The base and a trainable tree on the mesh."""
    if self.mesh is None:
      return base, trainable
    return sharding.put(base, self.specs(base)), self.trainable(trainable, base)

  def trainable(self, trainable, base):
    """A (restored) trainable tree laid out like its base leaves."""
    if self.mesh is None:
      return trainable
    return sharding.put(trainable, sharding.adapter_shardings(trainable, self.specs(base)))

  def replicated(self):
    return None if self.mesh is None else NamedSharding(self.mesh, P())

  def batch(self, batch: dict, *, whole=()) -> dict:
    """A batch split over the data axis (replicated when it does not divide); the keys in
    ``whole`` (arrays without the batch axis) replicated. Its rows: the leading axis of the
    other arrays."""
    if self.mesh is None:
      return batch
    rows = next(len(v) for k, v in batch.items() if k not in whole)
    spec = P("data") if rows % self.mesh.shape["data"] == 0 else P()
    return {k: sharding.put(v, NamedSharding(self.mesh, P() if k in whole else spec))
            for k, v in batch.items()}


# ----------------------------------------------------------------------- the loop


class _Interval:
  """The training losses of a logging interval, kept on the device (no per-step sync or extra
  dispatch) and read once when logged. With ``skip_nonfinite`` a non-finite loss (a skipped
  step) is counted apart, not averaged."""

  def __init__(self, *, skip_nonfinite: bool = False):
    self.skip, self.losses = skip_nonfinite, []

  @property
  def steps(self) -> int:
    return len(self.losses)

  def add(self, loss) -> None:
    self.losses.append(loss)

  def mean(self) -> tuple[float, int]:
    """(the mean loss over the interval's finite steps (NaN if none), the steps skipped)."""
    losses = np.asarray(jnp.stack(self.losses), np.float64) if self.losses else np.zeros(0)
    self.losses = []
    kept = losses[np.isfinite(losses)] if self.skip else losses
    return (float(kept.mean()) if kept.size else float("nan")), losses.size - kept.size


def restore(run: pathlib.Path, base, *, opt_state=None) -> checkpoint.Restored:
  """The run's newest intact checkpoint; when newer steps are damaged, one line on stderr says
  which step is used and why."""
  import warnings
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", checkpoint.CheckpointFallbackWarning)
    restored = checkpoint.restore(run / CHECKPOINTS, base=base, opt_state=opt_state)
  for w in caught:
    if issubclass(w.category, checkpoint.CheckpointFallbackWarning) and primary():
      sys.stderr.write(f"lora-jax: {w.message}\n")
    elif not issubclass(w.category, checkpoint.CheckpointFallbackWarning):
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  return restored


def _restore(run: pathlib.Path, task: Task, opt_state):
  """The last intact checkpoint's trainable tree (placed like a fresh one), optimizer state
  (laid out like the fresh ``opt_state``, its template) and step."""
  restored = restore(run, task.base, opt_state=opt_state)
  return task.place(restored.adapters), restored.opt_state, restored.step


def train(task: Task, run, *, resume: bool = False, overwrite: bool = False,
          inputs=None) -> dict:
  """Trains ``task`` into the run folder (checked again with ``run_folder.check``: ``overwrite``,
  ``inputs``); returns the metrics summary. A checkpoint is written at every evaluation, so
  after Ctrl-C the last one is readable and ``resume=True`` continues from it. A new run that
  ends before its first checkpoint (refused, failed or interrupted) leaves nothing behind: its
  staging folder is removed."""
  run = pathlib.Path(run)
  folder = Folder(run, staged=not resume)
  try:
    folder.open(overwrite=overwrite, inputs=inputs)
    return _train(task, run, folder, resume=resume)
  finally:
    folder.discard()


def _train(task: Task, run: pathlib.Path, folder: Folder, *, resume: bool) -> dict:
  optimizer = optimizer_for(task.options, task.total_steps)
  trainable = task.trainable
  opt_state = jax.jit(optimizer.init)(trainable)
  summary = {"history": [], "counts": _counts(task), "headline": task.headline}
  start = 0
  if resume:
    trainable, opt_state, start = _restore(run, task, opt_state)
    summary = _saved_summary(run, start)
    if primary():
      sys.stderr.write(f"lora-jax: resuming {run} at step {start} of {task.total_steps} with "
                       f"the options it was started with\n")
  write_json(folder.path / "config.json", {"options": task.options.to_dict(),
                                   "total_steps": task.total_steps, **task.describe(),
                                   "lora_jax": lora_jax.__version__})
  state = {"trainable": trainable, "opt_state": opt_state, "step": start}
  metrics = None
  try:  # Ctrl-C while the writers open (tensorboardX's import takes seconds) is reported too
    with _interrupts_kept() as interrupted:
      metrics = Metrics(folder, summary, start=start)
      _loop(task, optimizer, state, metrics, folder, interrupted=interrupted)
  except KeyboardInterrupt:
    step = summary["history"][-1]["step"] if summary["history"] else start
    if folder.staged:
      sys.stderr.write(f"\ninterrupted before the first checkpoint: {run} is unchanged\n")
    else:
      sys.stderr.write(f"\ninterrupted: the checkpoint at step {step} is kept; continue with "
                       f"--resume\n")
    raise
  finally:
    if metrics is not None:
      metrics.close()
  _finish(task, metrics, run)
  return summary


def _saved_summary(run: pathlib.Path, start: int) -> dict:
  """``metrics.json`` of a run being resumed, its history cut at the restored step."""
  path = run / "metrics.json"
  try:
    summary = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise RunError(f"{path} is damaged ({type(e).__name__}: {e}); start the run again with "
                   f"--overwrite.") from None
  summary["history"] = [h for h in summary["history"] if h["step"] <= start]
  return summary


def _counts(task: Task) -> dict:
  c = task.counts()
  return {"trainable": c.trainable, "total": c.total}


def _loop(task: Task, optimizer, state: dict, metrics: Metrics, folder: Folder, *,
          interrupted=lambda: False) -> None:
  from tqdm import tqdm

  o, history = task.options, metrics.summary["history"]
  step_fn = lora_jax.train_step(task.loss, optimizer)
  key = jax.random.key(o.seed + 1)
  before = history[-1]["elapsed_s"] if history else 0.0  # a resumed run's time so far
  seen, evaluating, began = 0, 0.0, time.perf_counter()
  interval = _Interval(skip_nonfinite=o.skip_nonfinite)
  bar = tqdm(total=task.total_steps, initial=state["step"], disable=not primary(), unit="step",
             dynamic_ncols=True, file=sys.stderr,
             mininterval=0.1 if sys.stderr.isatty() else 10.0)  # a log file: a line per 10 s
  trainable, opt_state = state["trainable"], state["opt_state"]
  try:
    for step in range(state["step"], task.total_steps):
      if interrupted():  # a Ctrl-C that a garbage-collector callback swallowed
        raise KeyboardInterrupt
      step_key = jax.random.fold_in(key, step)
      batch = task.batch(step, step_key)
      trainable, opt_state, loss, _ = step_fn(task.base, trainable, opt_state, batch, key=step_key)
      interval.add(loss)
      seen += task.batch_size(batch)
      done = step + 1
      bar.update(1)
      if done % o.log_every and done % o.eval_every and done != task.total_steps:
        continue
      rate = seen / (time.perf_counter() - began - evaluating)  # training examples/s only
      logged, skipped = interval.mean()
      _check_finite(logged, done, history)
      record = {"step": done, "train_loss": logged, "examples_per_s": rate}
      if skipped:
        record["skipped_steps"] = skipped
      if done % o.eval_every == 0 or done == task.total_steps:
        _check_finite(_finite_tree(trainable), done, history, what="trained parameters")
        paused = time.perf_counter()
        scores = task.evaluate(trainable)
        with interrupts_deferred():  # Ctrl-C lands after the save, not inside orbax
          checkpoint.save(folder.path / CHECKPOINTS, done, trainable, config=task.lora_config,
                          base=task.base, opt_state=opt_state, data_position=done,
                          base_name=task.base_name, keep=KEEP)
          folder.promote()  # the new run has started cleanly: it replaces the old one now
        evaluating += time.perf_counter() - paused
        record.update(scores)
        history.append({"step": done, "loss": logged, **scores, "examples_per_s": rate,
                        "elapsed_s": before + time.perf_counter() - began})
        metrics.save()
      metrics.log(record)
      bar.set_postfix({"loss": f"{logged:.4f}", **{k: f"{v:.4f}" for k, v in record.items()
                                                    if k == task.headline}})
  finally:
    bar.close()  # the bar's line ends before any message
  metrics.summary["elapsed_s"] = before + time.perf_counter() - began


def _finite_tree(tree) -> float:
  """0.0 when every leaf of ``tree`` is finite, else NaN (one device reduction)."""
  ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))
  return 0.0 if bool(ok) else float("nan")


def _check_finite(value: float, step: int, history: list, *, what: str = "training loss") -> None:
  """Stops the run, before anything is written, when ``value`` is not finite."""
  if np.isfinite(value):
    return
  kept = (f"the checkpoint of step {history[-1]['step']} is kept" if history
          else "no checkpoint was written")
  raise RunError(f"the {what} became non-finite by step {step} (usual causes: --lr or "
                 f"--lora-plus-ratio too large, or bad inputs); the run stopped and {kept}; "
                 f"start again with a lower --lr (--overwrite).")


def _finish(task: Task, metrics: Metrics, run: pathlib.Path) -> None:
  summary = metrics.summary
  last = summary["history"][-1]
  summary.update({task.headline: last[task.headline], "steps": task.total_steps},
                 **task.sizes())
  metrics.save()
  if not primary():
    return
  plot(summary, run / "curves.png")
  c = summary["counts"]
  name = task.headline.replace("_", " ")
  print(f"{'full fine-tuning' if task.options.full else 'LoRA'}: {name} "
        f"{last[task.headline]:.4f} after {task.total_steps} steps in "
        f"{summary['elapsed_s']:.0f} s; trainable {c['trainable']:,d} of {c['total']:,d} "
        f"({100 * c['trainable'] / c['total']:.2f}%); run folder {run}")
