"""Causal-LM tasks on a Llama-family decoder: ``chat`` (the loss on the assistant's tokens
only) and ``text`` (every token), for ``lora-jax train --task chat|text``.

The model is the bundled SmolLM2-135M-Instruct GGUF (``--model smollm2-135m-instruct``), any
Llama-architecture ``.gguf`` file, or a Hugging Face Llama folder (``config.json``,
``model.safetensors``, ``tokenizer.json``). Chat rows are ``{"messages": [{"role", "content"},
...]}`` or ``{"prompt": ..., "response": ...}``; they are rendered with the model's chat
template, and a token is a target when it lies inside an assistant turn's text (its content
and its end-of-turn token). Text rows are ``{"text": ...}`` (``.jsonl``) or the blank-line
separated paragraphs of a ``.txt`` file.

Batches are padded to a few bucketed lengths, or (``--packing``) examples are packed into rows
of ``--max-length`` tokens with segment ids and restarting positions, so packed examples never
attend to each other and no loss crosses their boundary. Evaluation reports the masked loss and
perplexity and, when every validation answer is a short label, the exact-match accuracy of the
greedy answers (compared lower-cased, without surrounding spaces and final punctuation).
"""

from __future__ import annotations

import dataclasses
import typing
import functools
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax import generate as generate_lib
from lora_jax import quant
from lora_jax.app import folders, runner
from lora_jax.app.options import OptionError, RunOptions, at_most, option
from lora_jax.app.runner import RunError
from lora_jax.models import llama

TASKS = ("chat", "text")
DEFAULT_MODEL = "smollm2-135m-instruct"
BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
LABEL_TOKENS = 8  # answers this short (in tokens) count as labels: accuracy is reported
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CausalOptions(RunOptions):
  """``lora-jax train --task chat|text``'s options: the run's and the task's."""

  LABEL: typing.ClassVar[str] = "chat/text"  # in help texts

  task: str = option("chat", "chat: loss on the assistant's tokens; text: on every token",
                     choices=TASKS)
  model: str = option(DEFAULT_MODEL, "smollm2-135m-instruct (the bundled GGUF), a Llama "
                                     ".gguf file, or a Hugging Face Llama folder")
  data: str | None = option(None, "training .jsonl (chat: messages or prompt/response rows; "
                                  "text: text rows) or .txt (text)")
  val: str | None = option(None, "validation file; default: 10% of --data")
  max_length: int = option(512, "tokens per example (longer ones are cut) or per packed row")
  packing: bool = option(False, "pack examples into rows of --max-length tokens (masks keep "
                                "them apart) instead of padding each")
  share_prefix: bool = option(True, "run the tokens every row of a padded batch starts with "
                                    "(system prompt, instruction) once, as a key-value cache "
                                    "the rows attend to (the same loss, fewer FLOPs)")
  max_train: int | None = option(None, "use only the first N training examples")
  eval_examples: int = option(256, "validation examples scored at each evaluation (0: all)")
  max_new_tokens: int = option(16, "the longest greedy answer scored for accuracy")
  dtype: str = option("float32", "the frozen base's and the computation's dtype",
                      choices=tuple(DTYPES))
  batch_size: int = option(8, "examples (packed: rows) per step")
  quantize: str = option("none", "keep the frozen projection kernels quantized (QLoRA): q4_1 "
                                 "(a Q4_1 GGUF's own blocks, as stored), q8_0, nf4, nf4-dq "
                                 "(double-quantized scales), int8, or none (dense --dtype)",
                         choices=quant.CHOICES)

  def __post_init__(self):
    super().__post_init__()
    if self.task not in TASKS:
      raise OptionError("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}.")
    if self.dtype not in DTYPES:
      raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
    if self.quantize not in quant.CHOICES:
      raise OptionError("quantize", f"must be one of {', '.join(quant.CHOICES)}, got "
                                    f"{self.quantize!r}.")
    if self.quantize != "none" and self.init not in ("kaiming", "gaussian"):
      raise OptionError("init", f"{self.init} moves W's principal part into A and B, which a "
                                f"quantized base cannot give up (dequantize, initialise, "
                                f"requantize the residual with lora_jax.init_with_base and "
                                f"lora_jax.quant in Python); drop --quantize or use kaiming.")
    if not (isinstance(self.max_length, int) and not isinstance(self.max_length, bool)
            and self.max_length >= 8):
      raise OptionError("max_length", f"must be an integer >= 8, got {self.max_length!r}.")
    for name in ("max_train",):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, int) and value > 0):
        raise OptionError(name, f"must be an integer > 0, got {value!r}.")
    if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
      raise OptionError("max_new_tokens", f"must be an integer >= 1, got "
                                          f"{self.max_new_tokens!r}.")
    for name in ("max_length", "max_train", "max_new_tokens"):
      at_most(name, getattr(self, name))


# ----------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded decoder: its config, parameters, tokenizer and name."""

  config: llama.LlamaConfig
  params: dict
  tokenizer: object  # lora_jax.models.chat.ChatTokenizer
  name: str


def _not_a_model(path: pathlib.Path) -> str | None:
  """What an existing ``--model`` path is when it cannot be a model; None otherwise."""
  if path.is_dir() and path.suffix == ".gguf":
    return "a folder, not a .gguf file"
  if path.is_dir() and not (path / "config.json").is_file():
    return "a folder without config.json"
  if path.is_file() and path.suffix != ".gguf":
    return "a file that is not a .gguf"
  return None


def load_model(name: str, *, dtype: str = "float32", quantize: str = "none",
               **overrides) -> Model:
  """The named bundled model, a ``.gguf`` file or a Hugging Face Llama folder; with
  ``quantize`` (not "none") its projection kernels are ``lora_jax.quant`` kinds (a GGUF's
  tensors stored in that format keep their bytes).

  Raises:
    ValueError: none of those (the message says what is accepted), or kernels the format
      cannot hold (an input size that is not a multiple of its block).
  """
  from lora_jax.models import chat, gguf, llama_io

  jdtype = DTYPES[dtype]
  path = pathlib.Path(name)
  fmt, double = quant.parse_choice(quantize)
  expected = (f"expected {DEFAULT_MODEL} (the bundled GGUF), a .gguf file or a Hugging Face "
              f"Llama folder (config.json, model.safetensors, tokenizer.json).")
  if name != DEFAULT_MODEL and (what := _not_a_model(path)):
    raise ValueError(f"model {name!r} is {what}; {expected}")
  if name == DEFAULT_MODEL or name.endswith(".gguf"):
    file = gguf.read(gguf.smollm2_path() if name == DEFAULT_MODEL else path)
    config = gguf.llama_config(file, dtype=jdtype, param_dtype=jdtype, **overrides)
    if fmt is not None and not double:
      return Model(config, gguf.quantized_params(file, config, fmt),
                   chat.load_chat_tokenizer(file), name)
    params = llama_io.params_from_tensors(gguf.hf_tensors(file, config), config)
    model = Model(config, params, chat.load_chat_tokenizer(file), name)
  elif path.is_dir():
    config, params = llama_io.load(path, dtype=jdtype, **overrides)
    model = Model(config, params, chat.load_folder_tokenizer(path), str(path))
  else:
    raise ValueError(f"model {name!r} not found: {expected}")
  if fmt is None:
    return model
  uses = analyze(model)
  params = jax.jit(lambda p: quant.quantize(p, fmt, double_quant=double, uses=uses))(
      model.params)
  return dataclasses.replace(model, params=params)


# ----------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Example:
  """Token ids and, per token, whether it is a target of the loss."""

  ids: tuple[int, ...]
  targets: tuple[bool, ...]
  answer: str | None = None  # a chat example's last assistant turn (for exact match)
  prompt: tuple[int, ...] | None = None  # its tokens before that answer


ROLES = ("system", "user", "assistant")  # a chat row's roles


def _read_rows(path: str):
  """``(line number, row)`` of a .jsonl file, or (text) ``(paragraph number, {"text": ...})``
  of a .txt file."""
  from lora_jax.app.data import lone_surrogate, not_utf8

  file = pathlib.Path(path)
  if file.is_dir():
    raise ValueError(f"data file {path} is a folder; expected a .jsonl file (or a .txt file for "
                     f"--task text).")
  if not file.is_file():
    raise FileNotFoundError(f"data file {path} does not exist.")
  if file.suffix.lower() not in (".txt", ".jsonl"):
    raise ValueError(f"{path}: unknown format {file.suffix!r}; use .jsonl (or .txt for text).")
  try:
    text = file.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
  except UnicodeDecodeError:
    raise not_utf8(path) from None
  if file.suffix.lower() == ".txt":
    parts = [p.strip() for p in text.split("\n\n")]
    return [(i + 1, {"text": p}) for i, p in enumerate(parts) if p]
  rows = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} line {n} is not valid JSON: {e.msg}.") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}.")
    found = lone_surrogate(row)
    if found is not None:
      raise ValueError(f"{path} line {n}: {found[0]} holds a lone surrogate ({found[1]}): half "
                       f"of a UTF-16 pair, which is not text; write the character itself or "
                       f"its whole pair.")
    rows.append((n, row))
  if not rows:
    raise ValueError(f"{path} holds no examples.")
  return rows


def messages_of(row: dict, where: str) -> list[dict]:
  """A chat row's messages: ``messages``, or ``prompt`` + ``response``.

  Raises:
    ValueError: neither form, a turn without a known role or a string content, or no
      assistant turn (there would be nothing to learn).
  """
  if "messages" in row:
    messages = row["messages"]
  elif "prompt" in row and "response" in row:
    for key in ("prompt", "response"):
      if not isinstance(row[key], str):
        raise ValueError(f"{where}: \"{key}\" must be a string, got "
                         f"{json.dumps(row[key])[:80]}.")
    messages = [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["response"]}]
  else:
    raise ValueError(f"{where}: a chat row needs \"messages\" (a list of role/content turns) or "
                     f"\"prompt\" and \"response\"; found keys {sorted(row)}.")
  if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
    raise ValueError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} "
                     f"objects.")
  _check_turns(messages, where)
  if not any(m.get("role") == "assistant" for m in messages):
    raise ValueError(f"{where}: the conversation has no assistant turn, so nothing would be "
                     f"learned from it; add the assistant's reply.")
  if messages[0].get("role") == "assistant":
    raise ValueError(f"{where}: the conversation starts with an assistant turn; put the user's "
                     f"turn first.")
  return messages


def _check_turns(messages: list[dict], where: str) -> None:
  """Raises ValueError naming the first turn without one of ``ROLES`` or a string content."""
  for i, m in enumerate(messages):
    if "role" not in m:
      raise ValueError(f"{where}: messages[{i}] has no \"role\"; give one of "
                       f"{', '.join(ROLES)}.")
    if m["role"] not in ROLES:
      raise ValueError(f"{where}: messages[{i}] has role {m['role']!r}; a chat row's roles are "
                       f"{', '.join(ROLES)}.")
    if "content" not in m:
      raise ValueError(f"{where}: messages[{i}] has no \"content\"; give the turn's text.")
    if not isinstance(m["content"], str):
      raise ValueError(f"{where}: messages[{i}] needs a string \"content\", got "
                       f"{json.dumps(m['content'])[:80]}.")


def chat_example(tok, messages: list[dict], *, where: str = "messages") -> Example:
  """The rendered conversation's tokens; targets: the tokens inside assistant turns (content
  and end-of-turn token, not the template's text before them)."""
  text = tok.render(messages)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before = tok.render(messages[:i], add_generation_prompt=True)
    through = tok.render(messages[:i + 1]).rstrip()
    if not (through.startswith(before) and text.startswith(through)):
      raise ValueError(f"{where}: the chat template does not render the conversation turn by "
                       f"turn (a prefix changes), so the assistant's tokens cannot be found.")
    spans.append((len(before), len(through)))
  encoding = tok.tokenizer.encode(text)
  targets = tuple(any(a <= start < b for a, b in spans) for start, _ in encoding.offsets)
  last = len(messages) - 1
  answer = prompt = None
  if messages[last]["role"] == "assistant":
    answer = messages[last]["content"]
    prompt = tuple(tok.encode(tok.render(messages[:last], add_generation_prompt=True)))
  return Example(tuple(encoding.ids), targets, answer, prompt)


def text_examples(tok, text: str, max_length: int) -> list[Example]:
  """A document's tokens plus the end-of-sequence token, cut into rows of ``max_length``;
  every token but a row's first is a target."""
  ids = tok.encode(text) + ([tok.eos_id] if tok.eos_id is not None else [])
  rows = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
  return [Example(tuple(r), (False,) + (True,) * (len(r) - 1)) for r in rows if len(r) > 1]


def read_examples(path: str, tok, *, task: str, max_length: int) -> list[Example]:
  """A file's examples for ``task``; chat examples longer than ``max_length`` are cut, and
  dropped (counted on stderr) if no target token is left.

  Raises:
    ValueError: a malformed row (named by file and line), or no usable example.
  """
  examples, dropped = [], 0
  for n, row in _read_rows(path):
    where = f"{path} line {n}"
    if task == "text":
      if not isinstance(row.get("text"), str):
        raise ValueError(f"{where}: a text row needs a string \"text\"; found keys "
                         f"{sorted(row)}.")
      examples += text_examples(tok, row["text"], max_length)
      continue
    example = chat_example(tok, messages_of(row, where), where=where)
    if len(example.ids) > max_length:
      example = dataclasses.replace(example, ids=example.ids[:max_length],
                                    targets=example.targets[:max_length])
    if any(example.targets[1:]):
      examples.append(example)
    else:
      dropped += 1
  if dropped and runner.primary():
    sys.stderr.write(f"lora-jax: {path}: {dropped} conversation(s) longer than --max-length "
                     f"have no assistant token left and are skipped.\n")
  if not examples:
    raise ValueError(f"{path}: no example has a token to learn (raise --max-length?).")
  return examples


def _bucket(n: int, max_length: int) -> int:
  return next((b for b in BUCKETS if n <= b <= max_length), max_length)


def padded_batch(examples: list[Example], max_length: int) -> dict:
  """Right-padded rows (length bucketed): input ids, attention mask and target mask."""
  length = _bucket(max(len(e.ids) for e in examples), max_length)
  ids = np.zeros((len(examples), length), np.int32)
  mask = np.zeros((len(examples), length), np.int32)
  targets = np.zeros((len(examples), length), bool)
  for row, e in enumerate(examples):
    ids[row, :len(e.ids)] = e.ids
    mask[row, :len(e.ids)] = 1
    targets[row, :len(e.ids)] = e.targets
  return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def pack(examples: list[Example], max_length: int) -> list[list[Example]]:
  """Examples in order into rows of at most ``max_length`` tokens (a new row when the next
  does not fit)."""
  rows, row, used = [], [], 0
  for e in examples:
    if row and used + len(e.ids) > max_length:
      rows.append(row)
      row, used = [], 0
    row.append(e)
    used += len(e.ids)
  return rows + ([row] if row else [])


def packed_batch(rows: list[list[Example]], max_length: int) -> dict:
  """Packed rows: ids, segment ids (1, 2, ... per example; 0 is padding), positions that
  restart at each example, and the target mask (an example's first token never is one)."""
  shape = (len(rows), max_length)
  ids, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  positions, targets = np.zeros(shape, np.int32), np.zeros(shape, bool)
  for r, row in enumerate(rows):
    at = 0
    for s, e in enumerate(row, 1):
      n = len(e.ids)
      ids[r, at:at + n], segments[r, at:at + n] = e.ids, s
      positions[r, at:at + n] = np.arange(n)
      targets[r, at:at + n] = e.targets
      targets[r, at] = False
      at += n
  return {"input_ids": ids, "segment_ids": segments, "positions": positions,
          "attention_mask": (segments > 0).astype(np.int32), "targets": targets}


def masked_loss(logits, batch):
  """Mean next-token cross-entropy over the target tokens: the logits at position t predict
  token t+1, counted where token t+1 is a target."""
  logits = logits[:, :-1].astype(jnp.float32)
  labels, weights = batch["input_ids"][:, 1:], batch["targets"][:, 1:].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def select_targets(batch: dict) -> dict:
  """Adds ``select`` (batch, k): the positions whose next token is a target, with their
  ``select_labels`` and ``select_weights`` (k rounded up to a multiple of 8), when they are at
  most half the positions; the loss then runs the head on those positions only."""
  follows = batch["targets"][:, 1:]
  k = -(-int(follows.sum(1).max()) // 8) * 8
  if k > follows.shape[1] // 2:
    return batch
  shape = (len(follows), k)
  select, labels = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  weights = np.zeros(shape, np.float32)
  for row, flags in enumerate(follows):
    at = np.flatnonzero(flags)
    select[row, :len(at)], weights[row, :len(at)] = at, 1.0
    labels[row, :len(at)] = batch["input_ids"][row, at + 1]
  return {**batch, "select": select, "select_labels": labels, "select_weights": weights}


def share_prefix(batch: dict, *, multiple: int = 8) -> dict:
  """Splits a padded batch's shared start off: the tokens every row begins with (a system
  prompt, an instruction), rounded down to a multiple of ``multiple`` and ending before any
  target. ``loss_of`` then runs them once (batch 1) into a key-value cache that every row's
  remaining tokens attend to: the same loss, for a fraction of the token-FLOPs. The rest is
  re-padded to its longest row (a multiple of ``multiple``). Batches without such a start (or
  packed ones) come back unchanged."""
  ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
  if "segment_ids" in batch or "select" in batch:
    return batch
  same = np.all(ids == ids[:1], axis=0) & np.all(mask > 0, axis=0)
  shared = len(same) if same.all() else int(np.argmin(same))
  first_target = int(np.argmax(targets.any(0))) if targets.any() else len(same)
  shared = min(shared, first_target - 1)
  shared -= shared % multiple
  if shared < multiple:
    return batch
  rest = int(mask.sum(1).max()) - shared
  rest = -(-rest // multiple) * multiple
  cut = slice(shared, shared + rest)
  return {"prefix_ids": ids[:1, :shared], "input_ids": ids[:, cut], "targets": targets[:, cut],
          "attention_mask": np.concatenate([mask[:, :shared], mask[:, cut]], 1)}


def _with_prefix(apply, params, batch, init_cache, kw):
  """``kw`` for the rows' pass over the cache of their shared prefix (``share_prefix``)."""
  prefix, ids = batch["prefix_ids"], batch["input_ids"]
  shared, (rows, length) = prefix.shape[1], ids.shape
  _, cache = apply(params, prefix, cache=init_cache(1, shared + length), cache_index=0,
                   logits_at=jnp.zeros((1, 1), jnp.int32))
  cache = jax.tree.map(lambda a: jnp.broadcast_to(a, (a.shape[0], rows) + a.shape[2:]), cache)
  positions = jnp.broadcast_to(shared + jnp.arange(length, dtype=jnp.int32), (rows, length))
  return dict(kw, positions=positions, cache=cache, cache_index=shared)


def loss_of(apply, params, batch, *, init_cache=None):
  """The task's loss: ``masked_loss`` of ``apply``'s logits; the same value computed at the
  selected positions only when the batch has a ``select`` (``select_targets``), and over the
  cache of a shared prefix when it has ``prefix_ids`` (``share_prefix``; needs
  ``init_cache(batch, length)``)."""
  kw = dict(positions=batch.get("positions"), attention_mask=batch["attention_mask"],
            segment_ids=batch.get("segment_ids"))
  if "prefix_ids" in batch:
    kw = _with_prefix(apply, params, batch, init_cache, kw)
  if "select" not in batch:
    logits = apply(params, batch["input_ids"], **kw)
    return masked_loss(logits[0] if "cache" in kw else logits, batch)
  logits = apply(params, batch["input_ids"], logits_at=batch["select"], **kw)
  logits = logits[0] if "cache" in kw else logits
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["select_labels"])
  weights = batch["select_weights"]
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def normalize(answer: str) -> str:
  return answer.strip().rstrip(".!").strip().lower()


# ----------------------------------------------------------------------- the task


def lora_config(o: CausalOptions, config: llama.LlamaConfig) -> lora_jax.LoraConfig:
  if o.full:
    return lora_jax.LoraConfig(targets=(), modules_to_save=(".*",))
  return lora_jax.LoraConfig(targets=llama.FAMILY.targets(o.targets, config), rank=o.rank,
                             alpha=o.alpha, dropout=o.lora_dropout,
                             kind=o.variant, init=o.lora_init, bias=o.bias)


class CausalLM:
  """The task for ``lora_jax.app.runner``: a decoder, its examples, the masked loss, and
  evaluation by loss, perplexity and (short answers) exact-match accuracy.

  ``with_data=False`` (a saved run) loads the model only.
  """

  def __init__(self, o: CausalOptions, *, with_data: bool = True, total_steps: int | None = None,
               model: Model | None = None):
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
    if with_data:
      self._read_data()
    self._build(jax.random.key(o.seed))

  @property
  def tokenizer(self):
    return self.model.tokenizer

  @property
  def headline(self) -> str:
    return "val_accuracy" if getattr(self, "labelled", False) else "val_loss"

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


def labelled(tok, examples: list[Example]) -> bool:
  """Whether every example ends with a short assistant answer (a label to match exactly)."""
  return bool(examples) and all(
      e.answer is not None and len(tok.encode(e.answer)) <= LABEL_TOKENS for e in examples)


# ----------------------------------------------------------------------- saved runs


def load(run) -> tuple[CausalLM, object]:
  """A saved run's task (model only, no data) and its restored trainable tree."""
  run = pathlib.Path(run)
  saved = runner.saved_config(run)
  task = CausalLM(CausalOptions.from_dict(saved["options"]), with_data=False,
                  total_steps=saved["total_steps"])
  task.labelled = saved.get("labelled", False)
  restored = runner.restore(run, task.base)
  return task, task.place(restored.adapters)


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


HUB_NAMES = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def merge(run, out) -> pathlib.Path:
  """Writes the merged model as a Hugging Face Llama folder (``config.json``,
  ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) that
  ``LlamaForCausalLM.from_pretrained`` loads; staged, never into a run folder."""
  from lora_jax.models import llama_io

  out = runner.export_folder(run, out)
  task, trainable = load(run)
  params = jax.device_get(lora_jax.merge(task.base, trainable))
  tok = task.tokenizer
  files = {"tokenizer.json": tok.tokenizer.to_str(),
           "tokenizer_config.json": json.dumps(tok.tokenizer_config(), indent=2,
                                               ensure_ascii=False) + "\n"}
  with runner.staged(out) as staging:
    llama_io.save(staging, task.model.config, params, bos_token_id=tok.bos_id,
                       eos_token_id=tok.eos_id, extra_files=files)
  return out


def export_peft(run, out) -> pathlib.Path:
  """Writes a LoRA run as a PEFT adapter folder for ``LlamaForCausalLM`` (task CAUSAL_LM)."""
  out = runner.export_folder(run, out)
  task, trainable = load(run)
  if task.options.full:
    raise RunError(f"{run} is a full fine-tuning run; export it with lora-jax merge.")
  initial = None if task.initial is None else jax.device_get(task.initial)
  hub_name = HUB_NAMES.get(task.options.model, task.options.model)
  with runner.staged(out) as staging:
    lora_jax.peft.export_peft(staging, jax.device_get(trainable), config=task.lora_config,
                              initial=initial, base_model_name_or_path=hub_name,
                              task_type="CAUSAL_LM")
  return out


def adapter_paths(specs) -> dict[str, str]:
  """``{name: path}`` from ``NAME=PATH`` strings (a bare ``PATH`` is named by its folder).

  Raises:
    ValueError: an empty name or path, or one name twice.
  """
  paths = {}
  for spec in specs:
    name, _, path = spec.partition("=") if "=" in spec else (pathlib.Path(spec).name, "", spec)
    if not path or not name:
      raise ValueError(f"--adapter {spec!r}: expected NAME=PATH (PATH a run, PEFT or checkpoint "
                       f"folder).")
    if not pathlib.Path(path).exists():
      raise ValueError(f"--adapter {name}: {path} does not exist.")
    if name in paths:
      raise ValueError(f"--adapter: the name {name!r} is given twice; name each adapter once "
                       f"(NAME=PATH).")
    paths[name] = path
  return paths


def _check_run_model(path: str, model: Model) -> None:
  folder = pathlib.Path(path)
  if not runner.is_run(folder):
    return
  options = runner.saved_config(folder).get("options", {})
  if options.get("task", "classify") not in ("chat", "text"):
    raise ValueError(f"adapter {path}: a classification run, not a chat/text run of "
                     f"{model.name}.")
  if pathlib.Path(options.get("model", DEFAULT_MODEL)).resolve() != pathlib.Path(
      model.name).resolve():
    raise ValueError(f"adapter {path} was trained on {options.get('model')!r}, not on "
                     f"{model.name!r}; serve it with --model {options.get('model')}.")


def load_bank(model: Model, paths) -> lora_jax.bank.AdapterBank:
  """The adapters at ``{name: path}`` (runs of this model, PEFT or checkpoint folders)
  stacked over ``model``'s parameters.

  Raises:
    ValueError: a path that holds no adapter, a run of another model, adapters that do not
      fit the model.
  """
  for path in paths.values():
    _check_run_model(path, model)
  return lora_jax.bank.load({n: folders.adapters_at(p) for n, p in paths.items()}, model.params,
                            uses=analyze(model))


def analyze(model: Model) -> dict:
  """``lora_jax.analyze`` of the model's Llama on a short example: each kernel's axis roles."""
  module = llama.LlamaForCausalLM(model.config)
  return lora_jax.analyze(module.apply, model.params, jnp.ones((1, 8), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Answers:
  texts: list[str]
  generation: generate_lib.Generation
  adapted: bool
  adapters: list | None = None  # with several adapters: each text's adapter name


def generate_text(source: str, prompts: list[str], *, max_new_tokens: int = 128,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int = 0, merged: bool = False, raw: bool = False,
                  quantize: str = "none", stream=None, adapters=None) -> Answers:
  """Answers ``prompts`` (user messages, rendered with the chat template unless ``raw``) with a
  chat/text run (its adapters unmerged through ``lora_jax.lora``, or ``merged``) or a model
  (its projections kept in ``quantize``'s format unless "none"; a run keeps its own setting).
  With ``stream`` (a text file) and one prompt, the answer is written as it is decoded.
  With ``adapters`` (``{name: path}``, over the model ``source``), every prompt is answered
  by every adapter, all in one mixed batch (each row its own adapter).

  Raises:
    ValueError: a prompt too long for the model's context, bad sampling settings, a source
      that is neither a chat/text run nor a model, or ``quantize`` with a run.
  """
  folder = pathlib.Path(source)
  is_run = runner.is_run(folder)
  if adapters:
    if is_run or merged:
      raise ValueError("--adapter adds adapters to a model: give the model (not a run) as the "
                       "source, and leave out --merged.")
    return _generate_mixed(load_model(source, quantize=quantize), adapters, prompts, raw=raw,
                           max_new_tokens=max_new_tokens, seed=seed,
                           sampling=generate_lib.Sampling(temperature=temperature, top_k=top_k,
                                                          top_p=top_p))
  if is_run:
    if quantize != "none":
      raise ValueError(f"--quantize applies to a model, not a run: {source} was trained with "
                       f"--quantize as its config.json says, and generates with that.")
    task, trainable = load(folder)
    if task.options.task == "text":
      raw = True
    model, base = task.model, task.base
  else:
    model, trainable = load_model(source, quantize=quantize), None
    base = model.params
  tok = model.tokenizer
  ids = prompt_ids(tok, prompts, raw=raw)
  sampling = generate_lib.Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
  module = llama.LlamaForCausalLM(model.config)
  if trainable is None and quantize != "none":  # a quantized base runs through the transform
    fn, params, trainable, merged = lora_jax.lora(module.apply), (base, {}), {}, False
  elif trainable is None or merged:
    fn, params = module.apply, base if trainable is None else lora_jax.merge(base, trainable)
  else:
    fn, params = lora_jax.lora(module.apply), (base, trainable)
  shown = []
  on_tokens = None
  if stream is not None and len(prompts) == 1:
    def on_tokens(tokens, running):
      if running[0]:
        shown.append(int(tokens[0]))
        text = tok.decode(shown)
        stream.write(text[len(tok.decode(shown[:-1])):])
        stream.flush()
  result = generate_lib.generate(
      fn, params, ids, init_cache=functools.partial(llama.init_cache, model.config),
      max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id or 0,
      sampling=sampling, key=jax.random.key(seed), context=model.config.max_position_embeddings,
      adapted=trainable is not None and not merged, on_tokens=on_tokens)
  return Answers([tok.decode(t) for t in result.tokens], result, bool(trainable))


def prompt_ids(tok, prompts: list[str], *, raw: bool) -> list[list[int]]:
  """Token ids of user prompts: rendered with the chat template unless ``raw``."""
  texts = prompts if raw else [tok.render([{"role": "user", "content": p}],
                                          add_generation_prompt=True) for p in prompts]
  return [tok.encode(t) for t in texts]


@functools.lru_cache(maxsize=8)
def adapted_apply(config: llama.LlamaConfig):
  """``lora(LlamaForCausalLM(config).apply)``, one per config: generation's jitted steps are
  cached per function, so calls with the same shapes reuse their compilation."""
  return lora_jax.lora(llama.LlamaForCausalLM(config).apply)


def generate_mixed(model: Model, bank, ids: list[list[int]], names: list, *,
                   max_new_tokens: int, sampling=generate_lib.GREEDY, seed: int = 0
                   ) -> generate_lib.Generation:
  """Decodes ``ids[i]`` with adapter ``names[i]`` of ``bank`` (None: the base), all rows in
  one mixed batch."""
  return generate_lib.generate(
      adapted_apply(model.config), (model.params, bank), ids,
      init_cache=functools.partial(llama.init_cache, model.config),
      max_new_tokens=max_new_tokens, stop_ids=model.tokenizer.stop_ids,
      pad_id=model.tokenizer.pad_id or 0, sampling=sampling, key=jax.random.key(seed),
      context=model.config.max_position_embeddings, adapted=True,
      adapter_index=bank.indices(names))


def _generate_mixed(model: Model, adapters, prompts, *, raw, max_new_tokens, seed,
                    sampling) -> Answers:
  bank = load_bank(model, adapters)
  names = [n for n in adapters for _ in prompts]
  ids = prompt_ids(model.tokenizer, prompts, raw=raw) * len(adapters)
  result = generate_mixed(model, bank, ids, names, max_new_tokens=max_new_tokens,
                          sampling=sampling, seed=seed)
  return Answers([model.tokenizer.decode(t) for t in result.tokens], result, True, names)
