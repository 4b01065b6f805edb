"""LoRA (or full) fine-tuning of the pretrained MiniLM encoder for text classification.

The engine behind ``lora-jax train`` / ``eval`` / ``merge``. A run folder holds
``config.json`` (every option), ``metrics.json`` (losses, validation accuracy, speed, counts),
``curves.png`` and ``checkpoints/`` (orbax: the trained tree, optimizer state and step), so an
interrupted run resumes and a finished one can be evaluated or merged.

With LoRA the trained tree is the adapters plus the new classifier head (PEFT's
``modules_to_save``); with ``full`` it is every parameter.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax
from lora_jax import data as data_lib
from lora_jax import sharding
from lora_jax.models import bert, targets_for, weights

BUCKETS = (16, 32, 64, 128, 256, 512)  # padded lengths, so jit compiles a handful of shapes


@dataclasses.dataclass(frozen=True)
class Options:
  data: str | None = None  # training file; None: the embedded VADER polarity task
  val: str | None = None  # validation file; None: the embedded task's, or 10% of --data
  text_column: str = "sentence"
  label_column: str = "label"
  rank: int = 8
  alpha: float = 16.0
  targets: str = "q,v"
  dropout: float = 0.1
  pooling: str = "pooler"  # "pooler" (first token, as transformers) or "mean" (over tokens)
  lr: float | None = None  # default: 1e-3 with LoRA, 5e-5 full
  batch_size: int = 32
  epochs: float = 3.0
  steps: int | None = None  # overrides epochs
  max_length: int = 64
  max_train: int | None = None  # use only the first N training examples (a fixed budget)
  eval_every: int = 100
  seed: int = 0
  full: bool = False
  lora_plus_ratio: float | None = None  # LoRA+: B's learning rate is this times A's (and --lr)
  remat: bool = False  # recompute each layer's activations in the backward pass
  mesh: str | None = None  # "DxM": batch over D devices, BERT tensor-parallel over M

  @property
  def learning_rate(self) -> float:
    return self.lr if self.lr is not None else (5e-5 if self.full else 1e-3)


def load_data(o: Options):
  if o.data is None:
    return data_lib.vader_polarity()
  train = data_lib.read_examples(o.data, text_column=o.text_column, label_column=o.label_column)
  if o.val is not None:
    val = data_lib.read_examples(o.val, text_column=o.text_column, label_column=o.label_column)
    return train, val
  order = np.random.default_rng(o.seed).permutation(len(train))
  cut = max(1, len(train) // 10)
  return train.take(order[cut:]), train.take(order[:cut])


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


class Model:
  """The classifier, its frozen base and its trained tree, for one set of options."""

  def __init__(self, o: Options, num_labels: int, *, key):
    self.options = o
    if o.pooling not in bert.POOLINGS:
      raise ValueError(f"--pooling (pooling) must be one of {', '.join(bert.POOLINGS)}, got "
                       f"{o.pooling!r}.")
    config, encoder = weights.load_bert(num_labels=num_labels, classifier_dropout=o.dropout,
                                       remat=o.remat, pooling=o.pooling)
    self.module = bert.BertForSequenceClassification(config)
    example = jnp.ones((1, 8), jnp.int32)
    params = self.module.init(key, example)
    params["params"]["bert"] = {k: v for k, v in encoder["params"].items()
                                if k in params["params"]["bert"]}  # "mean": no pooler
    self.base = params
    self.lora_config = None
    self.mesh = sharding.mesh(o.mesh) if o.mesh else None
    if self.mesh is not None and o.batch_size % self.mesh.shape["data"]:
      raise ValueError(f"--batch-size {o.batch_size} does not split over the mesh's data axis "
                       f"of {self.mesh.shape['data']} devices; use a multiple of it.")
    if o.full:
      self.trained = self._place_tree({"params": params})
      self.base = self.trained["params"]
      return
    self.lora_config = lora_jax.LoraConfig(
        targets=targets_for("minilm-l6-h384", o.targets), rank=o.rank, alpha=o.alpha,
        exclude="classifier")
    self.uses = lora_jax.analyze(self.module.apply, params, example)  # axis roles, routes
    adapters = lora_jax.init(self.lora_config, params, key=jax.random.fold_in(key, 1),
                             uses=self.uses)
    self.trained = {"adapters": adapters, "head": params["params"]["classifier"]}
    if self.mesh is not None:
      self.base = self._place_tree(params)
      specs = sharding.named_shardings(self._specs(params), self.mesh)
      self.trained = {"adapters": sharding.put(adapters,
                                               sharding.adapter_shardings(adapters, specs)),
                      "head": sharding.put(self.trained["head"],
                                           NamedSharding(self.mesh, P()))}  # replicated

  def _specs(self, tree):
    return sharding.tensor_parallel_specs(tree, bert.PARTITION_RULES, mesh=self.mesh)

  def _place_tree(self, tree):
    """``tree`` on the mesh by BERT's tensor-parallel rules (no mesh: as it is)."""
    if self.mesh is None:
      return tree
    return sharding.put(tree, sharding.named_shardings(self._specs(tree), self.mesh))

  def place(self, batch):
    """A batch split over the mesh's "data" axis (replicated if it does not divide)."""
    if self.mesh is None:
      return batch
    rows = len(batch["input_ids"])
    spec = P("data") if rows % self.mesh.shape["data"] == 0 else P()
    return sharding.put(batch, NamedSharding(self.mesh, spec))

  def params(self, trained, base=None):
    """The full parameter tree with the trained head (LoRA) or all trained parameters."""
    if self.options.full:
      return trained["params"]
    base = self.base if base is None else base
    return {"params": {**base["params"], "classifier": trained["head"]}}

  def logits(self, trained, batch, *, key=None, base=None):
    deterministic = key is None
    rngs = None if deterministic else {"dropout": key}
    if self.options.full:
      return self.module.apply(trained["params"], batch["input_ids"], batch["attention_mask"],
                               deterministic=deterministic, rngs=rngs)
    apply = lambda p, ids, mask: self.module.apply(  # noqa: E731
        p, ids, mask, deterministic=deterministic, rngs=rngs)
    return lora_jax.lora(apply)(self.params(trained, base), trained["adapters"],
                                batch["input_ids"], batch["attention_mask"],
                                lora_dropout_key=key)

  def counts(self) -> lora_jax.ParamCount:
    total = lora_jax.targets.num_params(self.base)
    if self.options.full:
      return lora_jax.ParamCount(trainable=total, total=total)
    trainable = lora_jax.targets.num_params(self.trained["head"]) + lora_jax.count(
        {}, self.trained["adapters"]).trainable
    return lora_jax.ParamCount(trainable=trainable, total=total + trainable)


def _loss(model: Model, base, trained, batch, key):
  logits = model.logits(trained, batch, key=key, base=base)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def make_steps(model: Model, optimizer):
  """``train(trained, opt_state, batch, key)`` and ``predict(trained, batch)``, jitted. The
  frozen base is an argument (not a constant), so a sharded base stays sharded."""
  @jax.jit
  def train_(base, trained, opt_state, batch, key):
    loss, grads = jax.value_and_grad(lambda t: _loss(model, base, t, batch, key))(trained)
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  def predict_(base, trained, batch):
    return jnp.argmax(model.logits(trained, batch, base=base), -1)

  if model.mesh is not None:  # predictions replicated: readable on every process
    predict_ = jax.jit(predict_, out_shardings=NamedSharding(model.mesh, P()))
  else:
    predict_ = jax.jit(predict_)

  def train(trained, opt_state, batch, key):
    return train_(model.base, trained, opt_state, model.place(batch), key)

  def predict(trained, batch):
    return predict_(model.base, trained, model.place(batch))

  return train, predict


def init_opt_state(optimizer, trained):
  """The optimizer state, laid out like ``trained`` (sharded with it on a mesh)."""
  return jax.jit(optimizer.init)(trained)


def accuracy(predict, trained, ids, labels, *, batch_size: int, max_length: int) -> float:
  correct = 0
  for start in range(0, len(ids), batch_size):
    index = np.arange(start, min(start + batch_size, len(ids)))
    batch = batch_of(ids, labels, index, max_length)
    correct += int((np.asarray(predict(trained, batch)) == batch["labels"]).sum())
  return correct / len(ids)


def optimizer_for(o: Options, total_steps: int):
  """AdamW with 10% linear warm-up and cosine decay. With ``lora_plus_ratio`` (LoRA+, as
  PEFT's ``create_loraplus_optimizer``): A and the head at ``learning_rate``, B at ratio times it."""
  warmup = max(1, total_steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup, total_steps)
  ratio = o.lora_plus_ratio
  if ratio is None:
    return optax.adamw(schedule, weight_decay=0.01)
  if o.full or not ratio > 0:  # lora_plus checks the ratio too, but cannot name the flag
    raise ValueError(f"--lora-plus-ratio (lora_plus_ratio) must be a number > 0 for a LoRA run "
                     f"(not with --full), got {ratio!r}{' with --full' * o.full}.")
  adapters = lora_jax.lora_plus(optax.adamw, learning_rate=schedule, ratio=ratio,
                                weight_decay=0.01)
  head = optax.adamw(schedule, weight_decay=0.01)
  return optax.multi_transform({"adapters": adapters, "head": head},
                               {"adapters": "adapters", "head": "head"})


def progress(step, total, loss, rate, accuracy_text="") -> None:
  done = int(30 * step / total)
  sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{total} loss {loss:.4f} "
                   f"{rate:,.0f} ex/s{accuracy_text}   ")
  sys.stderr.flush()
