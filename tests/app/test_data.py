"""Data readers (TSV, CSV, JSONL) and the embedded VADER polarity task."""

import csv

import numpy as np
import pytest

from lora_jax.app import data


def test_reads_tsv_csv_and_jsonl(tmp_path):
  (tmp_path / "a.tsv").write_text('sentence\tlabel\nit \'s "great"\t1\nawful\t0\n')
  (tmp_path / "a.csv").write_text('text,y\n"good, really",1\nbad,0\n')
  (tmp_path / "a.jsonl").write_text('{"text": "fine", "y": 1}\n\n{"text": "poor", "y": "0"}\n')
  tsv = data.read_examples(tmp_path / "a.tsv")
  assert tsv.texts == ('it \'s "great"', "awful") and tsv.labels.tolist() == [1, 0]
  csv_ = data.read_examples(tmp_path / "a.csv", text_column="text", label_column="y")
  assert csv_.texts == ("good, really", "bad") and csv_.labels.tolist() == [1, 0]
  jsonl = data.read_examples(tmp_path / "a.jsonl", text_column="text", label_column="y")
  assert jsonl.texts == ("fine", "poor") and jsonl.labels.dtype == np.int32


@pytest.mark.parametrize("name,content,error,message", [
    ("a.tsv", "text\tlabel\nx\t1\n", ValueError, r"no column 'sentence' \(columns: text, label\)"),
    ("a.tsv", "sentence\tlabel\nx\tpositive\n", ValueError,
     r"row 1 has label 'positive' in column 'label'; labels must be integers"),
    ("a.tsv", "sentence\tlabel\n", ValueError, r"the dataset is empty"),
    ("a.jsonl", '{"sentence": "x", "label": 1}\n{oops\n', ValueError, r"line 2 is not valid JSON"),
    ("a.txt", "x", ValueError, r"unknown data format '.txt'; use .tsv, .csv or .jsonl"),
    ("a.tsv", "sentence\tlabel\nx\t-1\n", ValueError, r"negative label -1"),
])
def test_bad_files(tmp_path, name, content, error, message):
  (tmp_path / name).write_text(content)
  with pytest.raises(error, match=message):
    data.read_examples(tmp_path / name)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data file '.*nope.tsv' does not exist"):
    data.read_examples(tmp_path / "nope.tsv")


def test_vader_task_is_fixed_split_of_polar_entries():
  with data.vader_lexicon_path().open(encoding="utf-8", errors="replace") as f:
    rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
  polar = {}
  for r in rows:
    if abs(float(r[1])) >= 1.0:
      polar.setdefault(r[0], int(float(r[1]) > 0))
  train, val = data.vader_polarity()
  assert len(train) + len(val) == len(polar) == 5817  # 13 repeated tokens kept once
  assert len(val) == round(0.2 * len(polar))
  assert not set(train.texts) & set(val.texts)
  for text, label in zip(train.texts + val.texts, np.concatenate([train.labels, val.labels])):
    assert polar[text] == label
  again, _ = data.vader_polarity()
  assert again.texts == train.texts
  assert 0.4 < train.labels.mean() < 0.5  # 44% positive


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
  path = tmp_path / "bom.tsv"
  path.write_bytes("\ufeffsentence\tlabel\ngood\t1\n".encode("utf-8"))
  examples = data.read_examples(path)
  assert examples.texts == ("good",) and examples.labels.tolist() == [1]


def test_a_folder_or_non_utf8_file_is_named(tmp_path):
  with pytest.raises(ValueError, match=r"data file '.*' is a folder; give a \.tsv, \.csv"):
    data.read_examples(tmp_path)
  path = tmp_path / "latin1.tsv"
  path.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1\.tsv: not UTF-8 text \(invalid "
                                       r"continuation byte\); save it as UTF-8\."):
    data.read_examples(path)
