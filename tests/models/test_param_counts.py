"""The parameter-count benchmark: a subset of its table, checked by the paper's formula."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("param_counts", ROOT / "benchmarks" /
                                                "param_counts.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["param_counts"] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def _lora_paper(layers, d, matrices, r):
  """|Θ| = 2 × L̂ × d_model × r, L̂ = matrices × layers (Hu et al. 2021, section 5.4)."""
  return 2 * matrices * layers * d * r


@pytest.mark.parametrize("index,layers,d,matrices,expected_match", [
    (0, 12, 768, 2, "rounded"),    # Table 2, RoBERTa base, r=8 on Wq, Wv: 0.3M
    (1, 24, 1024, 2, "rounded"),   # Table 2, RoBERTa large: 0.8M
    (3, 24, 1024, 2, "no"),        # Table 3, GPT-2 M: 0.35M is not reproduced
    (9, 96, 12288, 2, "truncated"),  # Table 15, r_q = r_v = 4: 18.8M
    (14, 96, 12288, 4, "no"),      # Table 15, all four r = 64: 603.8M is not reproduced
])
def test_rows_match_the_paper_formula(bench, index, layers, d, matrices, expected_match):
  row = bench.ROWS[index]
  result = bench.evaluate(row)
  assert result["trainable"] == _lora_paper(layers, d, matrices, row.rank)
  assert result["match"] == expected_match
  assert (result["note"] != "") == (expected_match == "no")


def test_match_rules(bench):
  assert bench.match(294_912, "0.3M") == "rounded"
  assert bench.match(393_216, "0.3M") == "no"  # 0.39M: truncation only where the source does
  assert bench.match(18_874_368, "18.8M") == "no"
  assert bench.match(18_874_368, "18.8M", "truncate") == "truncated"
  assert bench.match(393_216, "0.35M") == "no"
  assert bench.match(4_194_304, "4,194,304") == "exact"
  assert bench.match(4_194_305, "4,194,304") == "no"
  assert bench.match(0, "0.5") == "no"
  assert bench.match(1_000, "1k") == "rounded"
  assert bench.match(10, "") == ""


def test_markdown_and_csv_are_written(bench, tmp_path, monkeypatch):
  monkeypatch.setattr("sys.argv", ["param_counts.py", "--out", str(tmp_path), "--no-chart",
                                   "--rows", "3"])
  bench.main()
  table = (tmp_path / "param_counts.md").read_text()
  assert ("| roberta-base | q,v | 8 | 294,912 | 124,940,544 | 0.2360 | 0.3M | rounded | "
          "Hu et al. 2021 (LoRA), Table 2, RoB-base (LoRA) |") in table
  assert len((tmp_path / "param_counts.csv").read_text().splitlines()) == 4


def test_chart_is_a_png(bench, tmp_path):
  pytest.importorskip("matplotlib")
  bench.chart(str(tmp_path / "share.png"))
  assert (tmp_path / "share.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_shows_the_generated_table(bench):
  readme = (ROOT / "README.md").read_text()
  table = (ROOT / "benchmarks" / "results" / "param_counts.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  assert rows and all(row in readme for row in rows)
