"""Run folders: train (with checkpoints, resume and Ctrl-C), evaluate, and merge to safetensors."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

import lora_jax
from lora_jax import finetune
from lora_jax.finetune import Options
from lora_jax.models import weights


class RunError(ValueError):
  """A problem with the run folder or the options (one line for the command line)."""


def _manager(run: pathlib.Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
  return ocp.CheckpointManager(run.resolve() / "checkpoints", options=options)


def _abstract(tree):
  return jax.tree_util.tree_map(  # restored arrays land where the fresh ones are (a mesh)
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _restore(run: pathlib.Path, state):
  manager = _manager(run)
  step = manager.latest_step()
  if step is None:
    raise RunError(f"{run} has no checkpoint to resume from; start without --resume.")
  restored = manager.restore(step, args=ocp.args.StandardRestore(_abstract(state)))
  return restored, step


def _save(manager, step: int, state) -> None:
  manager.save(step, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()


def _primary() -> bool:
  """Whether this process writes the run's files and prints (process 0 of a multi-host run)."""
  return jax.process_index() == 0


def _sync(name: str) -> None:
  """Waits for every process of a multi-host run (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _prepare(run: pathlib.Path, *, overwrite: bool, resume: bool) -> None:
  if resume:
    if not (run / "config.json").is_file():
      raise RunError(f"{run} holds no run to resume (no config.json).")
    return
  occupied = run.exists() and any(run.iterdir())
  if occupied and not overwrite:
    raise RunError(f"output folder {run} already holds files; pass --overwrite to replace "
                   f"them or --resume to continue that run.")
  _sync("lora_jax: run folder checked")  # every process has looked before one changes it
  if _primary():
    if occupied:
      shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
  _sync("lora_jax: run folder ready")


def _write_json(path: pathlib.Path, value) -> None:
  if not _primary():
    return
  path.write_text(json.dumps(value, indent=2, default=str) + "\n")


class _Trainer:
  def __init__(self, o: Options):
    self.o = o
    train, val = finetune.load_data(o)
    if o.max_train is not None:
      train = train.take(np.arange(min(o.max_train, len(train))))
    self.num_labels = int(max(train.labels.max(), val.labels.max(), 1)) + 1
    tok = weights.tokenizer()
    self.train_ids, self.train_labels = finetune.tokenize(tok, train, o.max_length)
    self.val_ids, self.val_labels = finetune.tokenize(tok, val, o.max_length)
    self.steps_per_epoch = math.ceil(len(train) / o.batch_size)
    self.total = o.steps or max(1, math.ceil(o.epochs * self.steps_per_epoch))
    self.model = finetune.Model(o, self.num_labels, key=jax.random.key(o.seed))
    self.optimizer = finetune.optimizer_for(o, self.total)
    self.train_step, self.predict = finetune.make_steps(self.model, self.optimizer)

  def batch(self, step: int):
    epoch, position = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng(self.o.seed + epoch).permutation(len(self.train_ids))
    index = order[position * self.o.batch_size:(position + 1) * self.o.batch_size]
    return finetune.batch_of(self.train_ids, self.train_labels, index, self.o.max_length)

  def evaluate(self, trained) -> float:
    return finetune.accuracy(self.predict, trained, self.val_ids, self.val_labels,
                             batch_size=128, max_length=self.o.max_length)


def train(o: Options, run, *, overwrite: bool = False, resume: bool = False) -> dict:
  """Trains into the run folder; returns the metrics. A checkpoint is written at every
  evaluation, so after Ctrl-C the last one is readable and ``resume=True`` continues from it."""
  run = pathlib.Path(run)
  _prepare(run, overwrite=overwrite, resume=resume)
  if resume:
    o = Options(**json.loads((run / "config.json").read_text())["options"])
  t = _Trainer(o)
  state = {"trained": t.model.trained,
           "opt_state": finetune.init_opt_state(t.optimizer, t.model.trained)}
  metrics = {"history": [], "counts": dataclasses.asdict(t.model.counts())}
  start = 0
  if resume:
    state, start = _restore(run, state)
    metrics = json.loads((run / "metrics.json").read_text())
  _write_json(run / "config.json", {"options": dataclasses.asdict(o), "num_labels": t.num_labels,
                                     "total_steps": t.total, "lora_jax": lora_jax.__version__})
  manager = _manager(run)
  try:
    state = _loop(t, state, start, metrics, manager, run)
  except KeyboardInterrupt:
    step = metrics["history"][-1]["step"] if metrics["history"] else start
    sys.stderr.write(f"\ninterrupted: the checkpoint at step {step} is kept; continue with "
                     f"--resume\n")
    raise
  _finish(t, state, metrics, run)
  return metrics


def _loop(t: _Trainer, state, start: int, metrics: dict, manager, run: pathlib.Path):
  key = jax.random.key(t.o.seed + 1)
  before = metrics["history"][-1]["elapsed_s"] if metrics["history"] else 0.0  # resumed runs
  seen, evaluating, began = 0, 0.0, time.perf_counter()
  trained, opt_state = state["trained"], state["opt_state"]
  for step in range(start, t.total):
    batch = t.batch(step)
    trained, opt_state, loss = t.train_step(trained, opt_state, batch,
                                            jax.random.fold_in(key, step))
    seen += len(batch["labels"])
    done = step + 1
    rate = seen / (time.perf_counter() - began - evaluating)  # training examples/s only
    if done % t.o.eval_every == 0 or done == t.total:
      paused = time.perf_counter()
      acc = t.evaluate(trained)
      _save(manager, done, {"trained": trained, "opt_state": opt_state})
      evaluating += time.perf_counter() - paused
      metrics["history"].append({"step": done, "loss": float(loss), "val_accuracy": acc,
                                 "examples_per_s": rate,
                                 "elapsed_s": before + time.perf_counter() - began})
      _write_json(run / "metrics.json", metrics)
      if _primary():
        finetune.progress(done, t.total, float(loss), rate, f" val acc {acc:.4f}")
    elif done % 10 == 0 and _primary():
      finetune.progress(done, t.total, float(loss), rate)
  if _primary():
    sys.stderr.write("\n")
  metrics["elapsed_s"] = before + time.perf_counter() - began
  return {"trained": trained, "opt_state": opt_state}


def _finish(t: _Trainer, state, metrics: dict, run: pathlib.Path) -> None:
  last = metrics["history"][-1]
  metrics.update(val_accuracy=last["val_accuracy"], steps=t.total,
                 train_examples=len(t.train_ids), val_examples=len(t.val_ids))
  _write_json(run / "metrics.json", metrics)
  if not _primary():
    return
  plot(metrics, run / "curves.png")
  c = metrics["counts"]
  print(f"{'full fine-tuning' if t.o.full else 'LoRA'}: val accuracy {last['val_accuracy']:.4f} "
        f"after {t.total} steps in {metrics['elapsed_s']:.0f} s; trainable {c['trainable']:,d} "
        f"of {c['total']:,d} ({100 * c['trainable'] / c['total']:.2f}%); run folder {run}")


def plot(metrics: dict, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [h["step"] for h in metrics["history"]]
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
  left.plot(steps, [h["loss"] for h in metrics["history"]], marker="o")
  left.set(xlabel="step", ylabel="training loss (last batch)", title="loss")
  right.plot(steps, [h["val_accuracy"] for h in metrics["history"]], marker="o", color="C2")
  right.set(xlabel="step", ylabel="validation accuracy", title="accuracy")
  for ax in (left, right):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


class _Saved:
  """A saved run's model, predict function and restored state; its data is not read."""

  def __init__(self, run: pathlib.Path):
    config = json.loads((run / "config.json").read_text())
    self.o, self.num_labels = Options(**config["options"]), config["num_labels"]
    self.model = finetune.Model(self.o, self.num_labels, key=jax.random.key(self.o.seed))
    optimizer = finetune.optimizer_for(self.o, config["total_steps"])
    _, self.predict = finetune.make_steps(self.model, optimizer)
    empty = {"trained": self.model.trained,
             "opt_state": finetune.init_opt_state(optimizer, self.model.trained)}
    self.state, _ = _restore(run, empty)


def load(run) -> tuple[_Saved, dict]:
  """The model and restored state of a finished (or interrupted) run."""
  run = pathlib.Path(run)
  if not (run / "config.json").is_file():
    raise RunError(f"{run} is not a run folder (no config.json); train one with lora-jax train.")
  saved = _Saved(run)
  return saved, saved.state


def evaluate(run, data: str, *, text_column: str, label_column: str) -> float:
  t, state = load(run)
  examples = finetune.data_lib.read_examples(data, text_column=text_column,
                                             label_column=label_column)
  ids, labels = finetune.tokenize(weights.tokenizer(), examples, t.o.max_length)
  return finetune.accuracy(t.predict, state["trained"], ids, labels, batch_size=128,
                           max_length=t.o.max_length)


def merge(run, out) -> pathlib.Path:
  """Writes the merged encoder and head as safetensors with the checkpoint's names."""
  from safetensors.numpy import save_file

  t, state = load(run)
  params = t.model.params(state["trained"])
  if not t.o.full:
    params = lora_jax.merge(params, state["trained"]["adapters"])
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  encoder = params["params"]["bert"]
  if "pooler" not in encoder:  # a mean-pooled run: the checkpoint's pooler, untouched
    encoder = {**encoder, "pooler": weights.load_bert()[1]["params"]["pooler"]}
  tensors = weights.bert_tensors({"params": encoder}, t.model.module.config)
  head = params["params"]["classifier"]
  tensors["classifier.weight"] = np.asarray(head["kernel"]).T.copy()
  tensors["classifier.bias"] = np.asarray(head["bias"])
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
               "special_tokens_map.json"):
    if (weights.minilm_dir() / name).is_file():
      shutil.copy(weights.minilm_dir() / name, out / name)
  config = json.loads((weights.minilm_dir() / "config.json").read_text())
  labels = {str(i): f"LABEL_{i}" for i in range(t.num_labels)}
  # Hugging Face's BertForSequenceClassification classifies the pooler's output; a mean-pooled
  # head is the encoder (BertModel) plus classifier.* applied to the masked mean.
  mean = t.o.pooling == "mean"
  config.update(architectures=["BertModel" if mean else "BertForSequenceClassification"],
                id2label=labels, label2id={v: int(k) for k, v in labels.items()},
                classifier_pooling=t.o.pooling)
  _write_json(out / "config.json", config)
  return out
