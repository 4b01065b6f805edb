"""The causal-LM task for ``lora_jax.app.runner``, and saved runs: load, evaluate, merge,
export.

Evaluation reports the masked loss and perplexity and, when every validation answer is a short
label, the exact-match accuracy of the greedy answers (compared lower-cased, without
surrounding spaces and final punctuation).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import numpy as np

import lora_jax
from lora_jax import generate as generate_lib
from lora_jax.app import runner, saved
from lora_jax.app.causal.batches import loss_of, pack, packed_batch, padded_batch
from lora_jax.app.causal.batches import select_targets, share_prefix
from lora_jax.app.causal.data import Example, labelled, normalize, read_examples
from lora_jax.app.causal.model import HUB_NAMES, Model, analyze, load_model
from lora_jax.app.causal.options import CausalOptions
from lora_jax.app.options import OptionError
from lora_jax.models import llama, llama_io


def lora_config(o: CausalOptions, config: llama.LlamaConfig) -> lora_jax.LoraConfig:
  if o.full:
    return lora_jax.LoraConfig(targets=(), modules_to_save=(".*",))
  return lora_jax.LoraConfig(targets=llama.FAMILY.targets(o.targets, config), rank=o.rank,
                             alpha=o.alpha, dropout=o.lora_dropout,
                             kind=o.variant, init=o.lora_init, bias=o.bias)


class CausalLM:
  """The task for ``lora_jax.app.runner``: a decoder, its examples, the masked loss, and
  evaluation by loss, perplexity and (short answers) exact-match accuracy.

  ``with_data=False`` (a saved run) loads the model only; ``labelled`` is then the saved
  run's (whether its validation answers were labels, scored by accuracy).
  """

  def __init__(self, o: CausalOptions, *, with_data: bool = True, total_steps: int | None = None,
               model: Model | None = None, labelled: bool = False):
    if with_data and o.data is None:
      raise OptionError("data", f"is required for --task {o.task}: a .jsonl file of "
                                f"{'chat rows' if o.task == 'chat' else 'text rows'}.")
    self.options = o
    self.placement = runner.Placement(o.mesh, llama.FAMILY.partition_rules,
                                      batch_size=o.batch_size)
    self.mesh = self.placement.mesh
    self.model = model or load_model(o.model, dtype=o.dtype, quantize=o.quantize,
                                     remat=o.remat)
    self.base_name = self.model.name
    self.module = llama.LlamaForCausalLM(self.model.config)
    self.lora_config = lora_config(o, self.model.config)
    self.total_steps = total_steps
    self.labelled = labelled
    if with_data:
      self._read_data()
    self._build(jax.random.key(o.seed))

  @property
  def tokenizer(self):
    return self.model.tokenizer

  @property
  def headline(self) -> str:
    return "val_accuracy" if self.labelled else "val_loss"

  def _read_data(self) -> None:
    o = self.options
    read = functools.partial(read_examples, tok=self.tokenizer, task=o.task,
                             max_length=o.max_length)
    train = read(o.data)
    if o.max_train is not None:
      train = train[:o.max_train]
    if o.val is not None:
      val = read(o.val)
    else:
      order = np.random.default_rng(o.seed).permutation(len(train))
      cut = max(1, len(train) // 10)
      val, train = [train[i] for i in order[:cut]], [train[i] for i in order[cut:]]
    if o.eval_examples:
      val = val[:o.eval_examples]
    self.train, self.val = train, val
    self.labelled = labelled(self.tokenizer, val)
    rows = len(pack(train, o.max_length)) if o.packing else len(train)
    self.steps_per_epoch = math.ceil(rows / o.batch_size)
    self.total_steps = o.steps or max(1, math.ceil(o.epochs * self.steps_per_epoch))

  def _build(self, key) -> None:
    params, trainable = lora_jax.init_with_base(self.lora_config, self.model.params, key=key,
                                                uses=analyze(self.model))
    self.initial = trainable if self.lora_config.changes_base else None  # PiSSA / OLoRA
    self.base, self.trainable = self.placement.both(params, trainable)

  def place(self, trainable):
    """A restored trainable tree onto the mesh: adapters follow the base."""
    return self.placement.trainable(trainable, self.base)

  def _batch_placed(self, batch):
    return self.placement.batch(batch, whole=("prefix_ids",))

  # ---- what the runner calls

  def loss(self, params, batch):
    return loss_of(self.module.apply, params, batch,
                   init_cache=functools.partial(llama.init_cache, self.model.config))

  def _prepared(self, batch: dict) -> dict:
    if self.options.share_prefix:
      batch = share_prefix(batch)
    return self._batch_placed(select_targets(batch))

  def _epoch_rows(self, epoch: int):
    """The epoch's shuffled (and packed) rows, built once per epoch, not once per step."""
    if getattr(self, "_rows", (None,))[0] != epoch:
      o = self.options
      order = np.random.default_rng(o.seed + epoch).permutation(len(self.train))
      examples = [self.train[i] for i in order]
      self._rows = (epoch, pack(examples, o.max_length) if o.packing else [[e] for e in examples])
    return self._rows[1]

  def batch(self, step: int, key) -> dict:
    o = self.options
    epoch, position = divmod(step, self.steps_per_epoch)
    rows = self._epoch_rows(epoch)
    chosen = [rows[i % len(rows)] for i in range(position * o.batch_size,
                                                 (position + 1) * o.batch_size)]
    if o.packing:
      batch = packed_batch(chosen, o.max_length)
    else:
      batch = padded_batch([r[0] for r in chosen], o.max_length)
    return self._prepared(batch)

  def batch_size(self, batch) -> int:
    return len(batch["input_ids"])

  def evaluate(self, trainable) -> dict[str, float]:
    scores = {"val_loss": self.mean_loss(trainable, self.val)}
    scores["val_perplexity"] = float(np.exp(min(scores["val_loss"], 50.0)))
    if self.labelled:
      scores["val_accuracy"] = self.accuracy(trainable, self.val)
    return scores

  @functools.cached_property
  def _loss_sum(self):
    def loss_sum(base, trainable, batch):
      weights = batch["targets"][:, 1:].sum()
      return lora_jax.lora(self.loss)(base, trainable, batch) * weights, weights
    return jax.jit(loss_sum)

  def mean_loss(self, trainable, examples: list[Example], *, batch: int = 16) -> float:
    total = count = 0.0
    for start in range(0, len(examples), batch):
      b = self._prepared(padded_batch(examples[start:start + batch], self.options.max_length))
      loss, n = self._loss_sum(self.base, trainable, b)
      total, count = total + float(loss), count + float(n)
    return total / max(count, 1.0)

  def answers(self, trainable, prompts, *, max_new_tokens: int, batch: int = 32) -> list[str]:
    """Greedy answers through the unmerged adapters."""
    tok, out = self.tokenizer, []
    for start in range(0, len(prompts), batch):
      result = generate_lib.generate(
          lora_jax.lora(self.module.apply), (self.base, trainable),
          [list(p) for p in prompts[start:start + batch]], adapted=True,
          init_cache=functools.partial(llama.init_cache, self.model.config),
          max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id or 0,
          context=self.model.config.max_position_embeddings)
      out += [tok.decode(t) for t in result.tokens]
    return out

  def accuracy(self, trainable, examples: list[Example]) -> float:
    longest = max(len(self.tokenizer.encode(e.answer)) for e in examples)
    new = min(self.options.max_new_tokens, longest + 1)
    said = self.answers(trainable, [e.prompt for e in examples], max_new_tokens=new)
    return float(np.mean([normalize(s) == normalize(e.answer) for s, e in zip(said, examples)]))

  def counts(self) -> lora_jax.ParamCount:
    return runner.counts(self.options, self.base, self.trainable, config=self.lora_config)

  def describe(self) -> dict:
    return {"task": self.options.task, "labelled": self.labelled}

  def sizes(self) -> dict:
    return {"train_examples": len(self.train), "val_examples": len(self.val)}



def _saved(config: dict) -> CausalLM:
  return CausalLM(CausalOptions.from_dict(config["options"]), with_data=False,
                  total_steps=config["total_steps"], labelled=config.get("labelled", False))


def load(run) -> tuple[CausalLM, object]:
  """A saved run's task (model only, no data) and its restored trainable tree."""
  return saved.load(run, _saved)


def evaluate(run, data: str) -> dict[str, float]:
  """Masked loss, perplexity and (short answers) exact-match accuracy on a file."""
  task, trainable = load(run)
  o = task.options
  examples = read_examples(data, task.tokenizer, task=o.task, max_length=o.max_length)
  scores = {"loss": task.mean_loss(trainable, examples)}
  scores["perplexity"] = float(np.exp(min(scores["loss"], 50.0)))
  if labelled(task.tokenizer, examples):
    scores["accuracy"] = task.accuracy(trainable, examples)
  return scores



def merge(run, out) -> pathlib.Path:
  """Writes the merged model as a Hugging Face Llama folder (``config.json``,
  ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) that
  ``LlamaForCausalLM.from_pretrained`` loads; staged, never into a run folder."""
  return saved.export(run, out, load, _write_merged)


def _write_merged(task: CausalLM, trainable, out: pathlib.Path) -> None:
  params = jax.device_get(lora_jax.merge(task.base, trainable))
  tok = task.tokenizer
  files = {"tokenizer.json": tok.tokenizer.to_str(),
           "tokenizer_config.json": json.dumps(tok.tokenizer_config(), indent=2,
                                               ensure_ascii=False) + "\n"}
  llama_io.save(out, task.model.config, params, bos_token_id=tok.bos_id,
                eos_token_id=tok.eos_id, extra_files=files)


def export_peft(run, out) -> pathlib.Path:
  """Writes a LoRA run as a PEFT adapter folder for ``LlamaForCausalLM`` (task CAUSAL_LM)."""
  return saved.export_peft(run, out, load, task_type="CAUSAL_LM",
                           base_model=lambda task: HUB_NAMES.get(task.options.model,
                                                                 task.options.model))
