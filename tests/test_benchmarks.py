"""benchmarks/train_step.py runs end to end on a tiny shape and writes its JSON."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
  spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" /
                                                "train_step.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_train_step_benchmark_writes_rows_and_ratios(tmp_path):
  out = tmp_path / "bench.json"
  _bench().main(["--size", "tiny", "--rows", "frozen_bound,lora,merged,infer", "--iters", "2",
                 "--warmup", "1", "--paired", "--json", str(out)])
  report = json.loads(out.read_text())
  assert set(report["paired"]) == {"scan/lora", "scan/merged"}  # each against the bound
  lora_pairs = report["paired"]["scan/lora"]
  assert len(lora_pairs["ratios"]) == 2 and all(r > 0 for r in lora_pairs["ratios"])
  assert lora_pairs["ratio_to_bound"] == pytest.approx(sum(lora_pairs["ratios"]) / 2)
  rows = report["rows"]
  assert set(rows) == {"scan/frozen_bound", "scan/lora", "scan/merged", "scan/infer"}
  assert rows["scan/frozen_bound"]["ratio_to_bound"] == 1.0
  # r (in + out) per projection: four d x d, three d x ffn, 2 layers (d 64, ffn 128, r 16)
  assert rows["scan/lora"]["trainable"] == 2 * (4 * 16 * (64 + 64) + 3 * 16 * (64 + 128))
  assert rows["scan/lora"]["ratio_to_bound"] > 0
  assert rows["scan/lora"]["trainable"] == rows["scan/merged"]["trainable"]
  assert rows["scan/lora"]["xla_peak_bytes"] > 0 and rows["scan/lora"]["loss"] > 0
  assert report["summary"]["scan"]["lora_over_bound"] == rows["scan/lora"]["ratio_to_bound"]
  infer = rows["scan/infer"]
  assert {"base_b1", "merged_b1", "unmerged_b1", "base_b32", "merged_b32", "unmerged_b32"} <= set(
      infer)
  assert infer["merged_b32"]["ratio_to_base"] > 0

  sharded = tmp_path / "mesh.json"  # the same LoRA row on a 2x4 (data x model) mesh
  _bench().main(["--size", "tiny", "--rows", "lora", "--mesh", "2x4", "--iters", "2",
                 "--warmup", "1", "--rounds", "2", "--json", str(sharded)])
  on_mesh = json.loads(sharded.read_text())
  assert on_mesh["mesh"] == "2x4" and on_mesh["device_count"] == 8
  lora_rounds = on_mesh["rows"]["scan/lora"]["ms_per_step_rounds"]  # the kept round: the lower
  assert len(lora_rounds) == 2 and on_mesh["rows"]["scan/lora"]["ms_per_step"] == min(lora_rounds)
  assert on_mesh["rows"]["scan/lora"]["loss"] == pytest.approx(rows["scan/lora"]["loss"],
                                                                rel=2e-2)


def test_train_step_benchmark_rejects_unknown_rows(capsys):
  with pytest.raises(SystemExit) as e:
    _bench().main(["--size", "tiny", "--rows", "lora,fast"])
  assert e.value.code == 2
  assert "--rows: unknown fast" in capsys.readouterr().err


def test_median_round_keeps_the_median_run():
  runs = [{"ms_per_step": 30.0, "tag": "a"}, {"ms_per_step": 10.0, "tag": "b"},
          {"ms_per_step": 20.0, "tag": "c"}]
  kept = _bench().median_round(runs)
  assert kept["tag"] == "c" and kept["ms_per_step_rounds"] == [30.0, 10.0, 20.0]
  assert _bench().median_round([{"error": "x"}]) == {"error": "x"}


def test_train_step_benchmark_rejects_zero_rounds(capsys):
  with pytest.raises(SystemExit) as e:
    _bench().main(["--size", "tiny", "--rounds", "0"])
  assert e.value.code == 2 and "--rounds: expected an integer >= 1" in capsys.readouterr().err
