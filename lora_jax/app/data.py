"""Text-classification data: TSV, CSV and JSONL readers (the JSONL one shared with the causal
LM tasks), and the embedded default task.

The default task needs no download at run time: the VADER lexicon (Hutto & Gilbert 2014),
shipped in the PyPI package ``vadersentiment``, lists English words, phrases and emoticons with
the mean valence ten people gave them on a -4..4 scale. Entries with ``|mean| >= 1.0`` become a
binary polarity task (1 = positive, 0 = negative; 5,817 distinct tokens of 7,520 entries, 44%
positive); the near-neutral ones in between are dropped. A fixed seeded shuffle gives an 80/20
train / validation split.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import pathlib

import numpy as np

VADER_THRESHOLD = 1.0
VADER_SEED = 0
VADER_VALIDATION = 0.2


@dataclasses.dataclass(frozen=True)
class Examples:
  texts: tuple[str, ...]
  labels: np.ndarray  # int32, (n,)

  def __len__(self) -> int:
    return len(self.texts)

  def take(self, index) -> "Examples":
    return Examples(tuple(self.texts[i] for i in index), self.labels[index])


def _rows(path: pathlib.Path):
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    yield from (row for _, row in jsonl_rows(path))
    return
  if suffix not in (".tsv", ".csv"):
    raise ValueError(f"{path}: unknown data format {suffix!r}; use .tsv, .csv or .jsonl.")
  with path.open(encoding="utf-8-sig", newline="") as f:  # a byte-order mark is not a column
    yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",",
                              quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)


def jsonl_rows(path, *, where: str = "{path}: line {n}") -> list[tuple[int, dict]]:
  """``(line number, object)`` of each non-blank line of a JSONL file (a byte-order mark is
  not text).

  Args:
    path: the file.
    where: how an error names line ``n`` of ``path`` (a format string).

  Raises:
    ValueError: bytes that are not UTF-8 (the first named by line and byte offset), or a line
      that is not JSON, not an object, or holds a lone surrogate (named by file and line).
  """
  try:
    text = pathlib.Path(path).read_text(encoding="utf-8-sig")
  except UnicodeDecodeError:
    raise not_utf8(path) from None
  rows = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    at = where.format(path=path, n=n)
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{at} is not valid JSON: {e.msg}.") from None
    if not isinstance(row, dict):
      raise ValueError(f"{at}: expected a JSON object, got {type(row).__name__}.")
    found = lone_surrogate(row)
    if found is not None:
      raise ValueError(f"{at}: {found[0]} holds a lone surrogate ({found[1]}): half of a "
                       f"UTF-16 pair, which is not text; write the character itself or its "
                       f"whole pair.")
    rows.append((n, row))
  return rows


def _label(value, path, n, column) -> int:
  try:
    label = int(str(value).strip())
  except ValueError:
    raise ValueError(f"{path}: row {n} has label {value!r} in column {column!r}; labels must be "
                     f"integers such as 0 and 1.") from None
  if label < 0:
    raise ValueError(f"{path}: row {n} has negative label {label}; use 0, 1, ...")
  return label


def read_examples(path, *, text_column: str = "sentence", label_column: str = "label"):
  """Reads a TSV, CSV or JSONL file with a text column and an integer label column.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: unknown format, a missing column, a non-integer label, no rows, bytes that
      are not UTF-8 (the first named by line and byte offset), or a lone surrogate (named by
      line).
  """
  path = pathlib.Path(path)
  if path.is_dir():
    raise ValueError(f"data file {str(path)!r} is a folder; give a .tsv, .csv or .jsonl file.")
  if not path.is_file():
    raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
  try:
    return _read(path, text_column, label_column)
  except UnicodeDecodeError:
    raise not_utf8(path) from None


def not_utf8(path) -> ValueError:
  """The error for a file that is not UTF-8 text: its first bad byte, line and byte offset."""
  raw = pathlib.Path(path).read_bytes()
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    return ValueError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8. The first bad "
                      f"byte, 0x{raw[e.start]:02x}, is on line {line} (byte offset {e.start}).")
  return ValueError(f"{path}: not UTF-8 text; save it as UTF-8.")


def lone_surrogate(value, at: str = "") -> tuple[str, str] | None:
  """Where a JSON value holds a lone surrogate (an escape such as ``"\\ud800"`` without its
  pair, which is not text and which no tokenizer takes).

  Args:
    value: a string, or a dict or list of JSON values.
    at: the path of ``value`` itself (empty: the root).

  Returns:
    ``(path, escape)``, e.g. ``("messages[0].content", "\\ud800")``, for the first such
    string; None when there is none.
  """
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      return at, f"\\u{ord(value[e.start]):04x}"
    return None
  if isinstance(value, dict):
    items = [(f"{at}.{k}" if at else str(k), v) for k, v in value.items()]
  elif isinstance(value, list):
    items = [(f"{at}[{i}]", v) for i, v in enumerate(value)]
  else:
    return None
  return next((found for where, v in items if (found := lone_surrogate(v, where))), None)


def _read(path: pathlib.Path, text_column: str, label_column: str) -> "Examples":
  texts, labels = [], []
  for n, row in enumerate(_rows(path), 1):
    for column in (text_column, label_column):
      if column not in row:
        raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(map(str, row))}); "
                         f"set --text-column / --label-column.")
    texts.append(str(row[text_column]))
    labels.append(_label(row[label_column], path, n, label_column))
  if not texts:
    raise ValueError(f"{path}: the dataset is empty; it needs at least one row.")
  return Examples(tuple(texts), np.asarray(labels, np.int32))


def vader_lexicon_path() -> pathlib.Path:
  spec = importlib.util.find_spec("vaderSentiment")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the default dataset needs the vadersentiment package; run "
                            "`pip install vadersentiment`.")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "vader_lexicon.txt"


def vader_polarity() -> tuple[Examples, Examples]:
  """The embedded default: (train, validation) from the VADER lexicon (see module docs)."""
  polar: dict[str, int] = {}
  for line in vader_lexicon_path().read_text(encoding="utf-8", errors="replace").splitlines():
    token, mean = line.split("\t")[:2]
    if abs(float(mean)) >= VADER_THRESHOLD:
      polar.setdefault(token, int(float(mean) > 0))  # a few tokens repeat: keep the first
  data = Examples(tuple(polar), np.asarray(list(polar.values()), np.int32))
  order = np.random.default_rng(VADER_SEED).permutation(len(data))
  cut = int(round(len(data) * (1 - VADER_VALIDATION)))
  return data.take(order[:cut]), data.take(order[cut:])
