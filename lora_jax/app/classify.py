"""The text-classification task: the pretrained MiniLM encoder plus a new classifier head.

With LoRA the trained tree is the adapters on the targeted projections plus the head, as
PEFT's ``modules_to_save`` (``LoraConfig(modules_to_save=("classifier",))``); with ``full``
it is every parameter (``LoraConfig(targets=(), modules_to_save=(".*",))``). Either way the
library builds, trains (``lora_jax.train_step``), checkpoints (``lora_jax.checkpoint``),
merges and exports it; this module supplies the data, the model, the loss and the metric.
"""

from __future__ import annotations

import dataclasses
import typing
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.app import data as data_lib
from lora_jax.app import runner, saved, tasks
from lora_jax.app.options import OptionError, RunOptions, at_most, option
from lora_jax.app.runner import RunError
from lora_jax.models import bert, targets_for

BUCKETS = (16, 32, 64, 128, 256, 512)  # padded lengths, so jit compiles a handful of shapes
MAX_POSITIONS = 512  # all-MiniLM-L6-v2's max_position_embeddings
BASE_NAME = "all-MiniLM-L6-v2"
HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifyOptions(RunOptions):
  """``lora-jax train``'s options: the run's (``RunOptions``) and the task's."""

  LABEL: typing.ClassVar[str] = "classify"  # in help texts

  data: str | None = option(None, "training file (.tsv, .csv, .jsonl); default: the embedded "
                                  "VADER polarity task")
  val: str | None = option(None, "validation file; default: the task's, or 10% of --data")
  text_column: str = option("sentence", "the text column of --data and --val")
  label_column: str = option("label", "the integer label column of --data and --val")
  pooling: str = option("pooler", "the classifier's input: BERT's pooler on the first token "
                                  "(transformers' BertForSequenceClassification) or the mean of "
                                  "the token states (sentence-transformers' pooling, which "
                                  "all-MiniLM-L6-v2 was trained with)", choices=bert.POOLINGS)
  dropout: float = option(0.1, "dropout before the classifier head (--lora-dropout is the "
                               "adapters')")
  max_length: int = option(64, "tokens per example (longer ones are truncated)")
  max_train: int | None = option(None, "use only the first N training examples")

  def __post_init__(self):
    super().__post_init__()
    if self.pooling not in bert.POOLINGS:
      raise OptionError("pooling", f"must be one of {', '.join(bert.POOLINGS)}, got "
                                   f"{self.pooling!r}.")
    if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
      raise OptionError("dropout", f"must be a number in [0, 1), got {self.dropout!r}.")
    if not (isinstance(self.max_length, int) and not isinstance(self.max_length, bool)
            and 2 <= self.max_length <= MAX_POSITIONS):
      raise OptionError("max_length", f"must be an integer from 2 to {MAX_POSITIONS} (the "
                                      f"model's positions), got {self.max_length!r}.")
    if self.max_train is not None and not (isinstance(self.max_train, int)
                                           and self.max_train > 0):
      raise OptionError("max_train", f"must be an integer > 0, got {self.max_train!r}.")
    at_most("max_train", self.max_train)


# ----------------------------------------------------------------------- data


def load_data(o: ClassifyOptions):
  """(train, validation) examples: the files, or the embedded VADER task."""
  if o.data is None:
    return data_lib.vader_polarity()
  read = lambda path: data_lib.read_examples(  # noqa: E731
      path, text_column=o.text_column, label_column=o.label_column)
  train = read(o.data)
  if o.val is not None:
    return train, read(o.val)
  order = np.random.default_rng(o.seed).permutation(len(train))
  cut = max(1, len(train) // 10)
  return train.take(order[cut:]), train.take(order[:cut])


def split(o: ClassifyOptions):
  """(train, validation) examples as a run uses them (``max_train`` and ``eval_examples``)."""
  train, val = load_data(o)
  if o.max_train is not None:
    train = train.take(np.arange(min(o.max_train, len(train))))
  if o.eval_examples:
    val = val.take(np.arange(min(o.eval_examples, len(val))))
  return train, val


def _bucket(n: int, max_length: int) -> int:
  return next((b for b in BUCKETS if b >= n and b <= max_length), max_length)


def tokenize(tok, examples, max_length: int):
  """Token ids per example (unpadded, truncated) and labels."""
  tok.no_padding()
  tok.enable_truncation(max_length)
  return [e.ids for e in tok.encode_batch(list(examples.texts))], examples.labels


def batch_of(ids, labels, index, max_length):
  """A padded batch: (input_ids, attention_mask, labels), length bucketed."""
  length = _bucket(max(len(ids[i]) for i in index), max_length)
  x = np.zeros((len(index), length), np.int32)
  for row, i in enumerate(index):
    x[row, :len(ids[i])] = ids[i]
  return {"input_ids": x, "attention_mask": (x != 0).astype(np.int32), "labels": labels[index]}


def check_labels(train, val, *, where: str) -> int:
  """The number of classes: the training labels must be 0, 1, ..., K-1, each present, and
  the validation labels among them.

  Raises:
    ValueError: a class missing from the training data (a gap, or a stray large label), or a
      validation label the training data does not have.
  """
  classes = sorted({int(x) for x in train.labels})
  if classes != list(range(len(classes))):
    missing = sorted(set(range(classes[-1] + 1)) - set(classes))
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    raise ValueError(f"{where}: labels must be 0, 1, ..., K-1 with every class in the training "
                     f"data; found {len(classes)} classes up to {classes[-1]}, missing {shown}.")
  unknown = sorted({int(x) for x in val.labels} - set(classes))
  if unknown:
    raise ValueError(f"validation labels {unknown[:5]} are not among the training data's "
                     f"classes 0..{len(classes) - 1}.")
  return max(len(classes), 2)


# ----------------------------------------------------------------------- the task


def lora_config(o: ClassifyOptions) -> lora_jax.LoraConfig:
  """What is trained: LoRA on the targets plus the head, or (``full``) every parameter."""
  if o.full:
    return lora_jax.LoraConfig(targets=(), modules_to_save=(".*",))
  return lora_jax.LoraConfig(targets=targets_for("minilm-l6-h384", o.targets), rank=o.rank,
                             alpha=o.alpha, dropout=o.lora_dropout, exclude="classifier",
                             modules_to_save=("classifier",), kind=o.variant,
                             init=o.lora_init, bias=o.bias)


class Classify:
  """The task for ``lora_jax.app.runner``: MiniLM + head, its data, loss and accuracy.

  ``num_labels=None`` reads the data (a new run); a saved run passes its ``num_labels`` and
  no data is read.
  """

  headline = "val_accuracy"
  base_name = BASE_NAME

  def __init__(self, o: ClassifyOptions, *, num_labels: int | None = None,
               total_steps: int | None = None):
    self.options = o
    self.lora_config = lora_config(o)  # checks the targets before the weights load
    if num_labels is None:
      self._read_data()
    else:
      self.num_labels, self.total_steps = num_labels, total_steps
    self.placement = runner.Placement(o.mesh, bert.FAMILY.partition_rules,
                                      batch_size=o.batch_size)
    self.mesh = self.placement.mesh
    self._build(jax.random.key(o.seed))
    if self.mesh is None:
      self._predict = jax.jit(self._argmax)
    else:  # predictions replicated: readable on every process
      self._predict = jax.jit(self._argmax, out_shardings=self.placement.replicated())

  def _read_data(self) -> None:
    o = self.options
    train, val = split(o)
    self.num_labels = check_labels(train, val, where=o.data or "the default task")
    tok = bert.tokenizer()
    self.train_ids, self.train_labels = tokenize(tok, train, o.max_length)
    self.val_ids, self.val_labels = tokenize(tok, val, o.max_length)
    self.steps_per_epoch = math.ceil(len(train) / o.batch_size)
    self.total_steps = o.steps or max(1, math.ceil(o.epochs * self.steps_per_epoch))

  def _build(self, key) -> None:
    o = self.options
    config, encoder = bert.load(num_labels=self.num_labels, classifier_dropout=o.dropout,
                                       remat=o.remat, pooling=o.pooling)
    self.module = bert.BertForSequenceClassification(config)
    example = jnp.ones((1, 8), jnp.int32)
    params = self.module.init(key, example)
    params["params"]["bert"] = {k: v for k, v in encoder["params"].items()
                                if k in params["params"]["bert"]}  # "mean": no pooler
    uses = lora_jax.analyze(self.module.apply, params, example)  # axis roles, routes
    base, trainable = lora_jax.init_with_base(self.lora_config, params,
                                              key=jax.random.fold_in(key, 1), uses=uses)
    self.initial = trainable if self.lora_config.changes_base else None  # PiSSA / OLoRA
    self.base, self.trainable = self.placement.both(base, trainable)
    # the base every row of a mixed evaluation runs on: a PiSSA / OLoRA run's is a residual
    self.original = self.base if self.initial is None else self.placement.both(params, {})[0]

  def place(self, trainable):
    """A restored trainable tree onto the mesh: adapters and extras follow the base."""
    return self.placement.trainable(trainable, self.base)

  def _batch_placed(self, batch):
    return self.placement.batch(batch)

  # ---- what the runner calls

  def logits(self, params, batch):
    """The classifier's logits, written against ordinary params; with ``batch["key"]`` the
    head's dropout is on (training)."""
    key = batch.get("key")
    rngs = None if key is None else {"dropout": key}
    return self.module.apply(params, batch["input_ids"], batch["attention_mask"],
                             deterministic=key is None, rngs=rngs)

  def loss(self, params, batch):
    logits = self.logits(params, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  def batch(self, step: int, key) -> dict:
    o = self.options
    epoch, position = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng(o.seed + epoch).permutation(len(self.train_ids))
    index = order[position * o.batch_size:(position + 1) * o.batch_size]
    batch = batch_of(self.train_ids, self.train_labels, index, o.max_length)
    return {**self._batch_placed(batch), "key": key}

  def batch_size(self, batch) -> int:
    return len(batch["labels"])

  def _argmax(self, base, trainable, batch):
    return jnp.argmax(lora_jax.lora(self.logits)(base, trainable, batch), -1)

  def predict(self, trainable, batch):
    return self._predict(self.base, trainable, self._batch_placed(batch))

  def accuracy(self, trainable, ids, labels) -> float:
    predicted = predictions(lambda batch, _: self.predict(trainable, batch), ids, labels,
                            self.options.max_length)
    return float((predicted == labels).mean())

  def evaluate(self, trainable) -> dict[str, float]:
    return {"val_accuracy": self.accuracy(trainable, self.val_ids, self.val_labels)}

  def counts(self) -> lora_jax.ParamCount:
    return runner.counts(self.options, self.base, self.trainable, config=self.lora_config)

  def describe(self) -> dict:
    return {"num_labels": self.num_labels}

  def sizes(self) -> dict:
    return {"train_examples": len(self.train_ids), "val_examples": len(self.val_ids)}


# ----------------------------------------------------------------------- saved runs


def new(o: ClassifyOptions) -> Classify:
  return Classify(o)


def _saved(config: dict) -> Classify:
  return Classify(ClassifyOptions.from_dict(config["options"]), num_labels=config["num_labels"],
                  total_steps=config["total_steps"])


def load(run) -> tuple[Classify, dict]:
  """A saved run's task (no data read) and its trainable tree, restored with
  ``lora_jax.checkpoint.restore`` (which checks the base)."""
  return saved.load(run, _saved)


def evaluate(run, data: str | None, *, text_column: str, label_column: str) -> float:
  """The run's accuracy on ``data`` (None: its own validation split)."""
  return evaluate_runs([run], [data], text_column=text_column, label_column=label_column)[0]


def _scored(task: Classify, data, text_column: str, label_column: str):
  """(ids, labels) of ``data`` (None: the run's own validation split) for ``task``."""
  if data is None:
    examples = split(task.options)[1]
  else:
    examples = data_lib.read_examples(data, text_column=text_column, label_column=label_column)
  unknown = sorted({int(x) for x in examples.labels} - set(range(task.num_labels)))
  if unknown:
    raise ValueError(f"{data}: labels {unknown[:5]} are not classes of the run's model "
                     f"(0..{task.num_labels - 1}).")
  return tokenize(bert.tokenizer(), examples, task.options.max_length)


def evaluate_runs(runs, data, *, text_column: str = "sentence",
                  label_column: str = "label") -> list[float]:
  """The accuracy of each run on its file (``data[i]``; None: its own validation split).

  Several runs are scored together: their trainable trees (adapters and heads) are stacked
  into one ``lora_jax.bank`` over the first run's base, and every batch mixes their examples,
  each row classified with its own run's adapter and head (equal to scoring each run alone).

  Raises:
    RunError: runs whose models differ (labels, pooling), which one base cannot serve.
  """
  loaded = [load(run) for run in runs]
  sets = [_scored(task, file, text_column, label_column)
          for (task, _), file in zip(loaded, data)]
  first = loaded[0][0]
  for run, (task, _) in zip(runs, loaded):
    if (task.num_labels, task.options.pooling) != (first.num_labels, first.options.pooling):
      raise RunError(f"{run} has {task.num_labels} labels and {task.options.pooling} pooling, "
                     f"{runs[0]} {first.num_labels} and {first.options.pooling}: one base "
                     f"cannot serve both; evaluate them one at a time.")
  if len(runs) == 1:
    return [first.accuracy(loaded[0][1], *sets[0])]
  trees = {str(i): on_original(task, t) for i, (task, t) in enumerate(loaded)}
  bank = lora_jax.bank.stack(trees, first.original)
  ids = [x for s in sets for x in s[0]]
  labels = np.concatenate([s[1] for s in sets])
  owner = np.repeat(np.arange(len(runs)), [len(s[1]) for s in sets]).astype(np.int32)
  predicted = _mixed_predictions(first, bank, ids, labels, owner,
                                 max(t.options.max_length for t, _ in loaded))
  return [float((predicted[owner == i] == labels[owner == i]).mean()) for i in range(len(runs))]


def on_original(task: Classify, trainable):
  """``trainable`` as a tree on the original base: a PiSSA / OLoRA run's adapters converted
  to plain LoRA (``lora_jax.convert_to_lora``), others as they are."""
  if task.initial is None:
    return trainable
  return lora_jax.convert_to_lora(trainable, initial=task.initial)


def predictions(predict, ids, labels, max_length: int) -> np.ndarray:
  """``predict(batch, rows)`` over ``ids`` in padded batches of 128, concatenated."""
  out = []
  for start in range(0, len(ids), 128):
    rows = np.arange(start, min(start + 128, len(ids)))
    out.append(np.asarray(predict(batch_of(ids, labels, rows, max_length), rows)))
  return np.concatenate(out)


def _mixed_predictions(task: Classify, bank, ids, labels, owner, max_length: int) -> np.ndarray:
  mixed = jax.jit(lambda base, bank, batch, index: jnp.argmax(
      lora_jax.lora(task.logits)(base, bank, batch, adapter_index=index), -1))
  return predictions(lambda batch, rows: mixed(task.original, bank, batch, owner[rows]), ids,
                     labels, max_length)


def merge(run, out) -> pathlib.Path:
  """Writes the merged encoder and head as safetensors with the checkpoint's names (into a
  staging folder first; never into a run folder)."""
  return saved.export(run, out, load, lambda task, trainable, staging: _write_merged(
      task, lora_jax.merge(task.base, trainable), staging))


def _write_merged(task: "Classify", params, out: pathlib.Path) -> None:
  from safetensors.numpy import save_file

  encoder = params["params"]["bert"]
  if "pooler" not in encoder:  # a mean-pooled run: the checkpoint's pooler, untouched
    encoder = {**encoder, "pooler": bert.load()[1]["params"]["pooler"]}
  tensors = bert.tensors_from_params({"params": encoder}, task.module.config)
  head = params["params"]["classifier"]
  tensors["classifier.weight"] = np.asarray(head["kernel"]).T.copy()
  tensors["classifier.bias"] = np.asarray(head["bias"])
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
               "special_tokens_map.json"):
    if (bert.minilm_dir() / name).is_file():
      shutil.copy(bert.minilm_dir() / name, out / name)
  (out / "config.json").write_text(json.dumps(_hf_config(task), indent=2) + "\n")


def _hf_config(task: Classify) -> dict:
  config = json.loads((bert.minilm_dir() / "config.json").read_text())
  labels = {str(i): f"LABEL_{i}" for i in range(task.num_labels)}
  # Hugging Face's BertForSequenceClassification classifies the pooler's output; a mean-pooled
  # head is the encoder (BertModel) plus classifier.* applied to the masked mean.
  mean = task.options.pooling == "mean"
  config.update(architectures=["BertModel" if mean else "BertForSequenceClassification"],
                id2label=labels, label2id={v: int(k) for k, v in labels.items()},
                classifier_pooling=task.options.pooling)
  return config


def export_peft(run, out) -> pathlib.Path:
  """Writes a LoRA run as a PEFT adapter folder (the head as ``modules_to_save``), which
  ``PeftModel.from_pretrained(BertForSequenceClassification...)`` loads."""
  def pooled(task: Classify) -> None:
    if task.options.pooling != "pooler":
      raise RunError(f"{run} classifies the mean of the token states, which no transformers "
                     f"class does; export it with lora-jax merge.")

  return saved.export_peft(run, out, load, base_model=lambda _: HUB_NAME, task_type="SEQ_CLS",
                           check=pooled)


# ----------------------------------------------------------------------- the task record


def _eval_flags(parser) -> None:
  parser.add_argument("--text-column", default="sentence")
  parser.add_argument("--label-column", default="label")


def _evaluate(runs, files, args) -> list[dict[str, float]]:
  scores = evaluate_runs(runs, files, text_column=args.text_column,
                         label_column=args.label_column)
  return [{"accuracy": a} for a in scores]


TASK = tasks.register(tasks.Task(
    names=("classify",), options=ClassifyOptions, new=new, evaluate=_evaluate,
    merge=lambda run, out: merge(run, out) / "model.safetensors", export_peft=export_peft,
    out="runs/minilm-lora", summary="classify (default)", about="classify with MiniLM (default)",
    description="--task classify (default) fine-tunes the bundled all-MiniLM-L6-v2 for text "
                "classification (without --data: the embedded VADER polarity task).",
    eval_help="accuracy on a labelled file (several runs: together, in mixed batches over one "
              "base)",
    data_help="a .tsv, .csv or .jsonl file; without it, the run's own validation split",
    merge_help="safetensors with the original names", eval_flags=_eval_flags))
