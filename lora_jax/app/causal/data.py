"""Chat and text rows to examples: token ids and, per token, whether it is a loss target.

Chat rows are ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt": ...,
"response": ...}``, rendered with the model's chat template; a token is a target when it lies
inside an assistant turn's text (its content and its end-of-turn token). Text rows are
``{"text": ...}`` (``.jsonl``) or the blank-line separated paragraphs of a ``.txt`` file.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

from lora_jax.app import data as data_lib
from lora_jax.app import runner

LABEL_TOKENS = 8  # answers this short (in tokens) count as labels: accuracy is reported


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
  file = pathlib.Path(path)
  if file.is_dir():
    raise ValueError(f"data file {path} is a folder; expected a .jsonl file (or a .txt file for "
                     f"--task text).")
  if not file.is_file():
    raise FileNotFoundError(f"data file {path} does not exist.")
  if file.suffix.lower() not in (".txt", ".jsonl"):
    raise ValueError(f"{path}: unknown format {file.suffix!r}; use .jsonl (or .txt for text).")
  if file.suffix.lower() == ".jsonl":
    rows = data_lib.jsonl_rows(path, where="{path} line {n}")
    if not rows:
      raise ValueError(f"{path} holds no examples.")
    return rows
  try:
    text = file.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
  except UnicodeDecodeError:
    raise data_lib.not_utf8(path) from None
  parts = [p.strip() for p in text.split("\n\n")]
  return [(i + 1, {"text": p}) for i, p in enumerate(parts) if p]


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



def labelled(tok, examples: list[Example]) -> bool:
  """Whether every example ends with a short assistant answer (a label to match exactly)."""
  return bool(examples) and all(
      e.answer is not None and len(tok.encode(e.answer)) <= LABEL_TOKENS for e in examples)



def normalize(answer: str) -> str:
  return answer.strip().rstrip(".!").strip().lower()

