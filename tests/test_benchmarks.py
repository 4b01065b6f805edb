"""benchmarks/train_step.py runs end to end on a tiny shape and writes its JSON."""

import argparse
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


def test_train_step_benchmark_writes_rows_and_ratios(tmp_path, monkeypatch):
  out = tmp_path / "bench.json"
  bench = _bench()  # rows in this process (the mesh run below spawns them as the script does)
  monkeypatch.setattr(bench, "spawn", lambda key, args: bench.run_one(
      argparse.Namespace(**{**vars(args), "one": key})))
  bench.main(["--size", "tiny", "--rows", "frozen_bound,lora,merged,qlora_nf4,infer",
              "--iters", "2", "--warmup", "1", "--paired", "--json", str(out)])
  report = json.loads(out.read_text())
  assert set(report["paired"]) == {"scan/lora", "scan/merged", "scan/qlora_nf4"}
  lora_pairs = report["paired"]["scan/lora"]
  assert len(lora_pairs["ratios"]) == 2 and all(r > 0 for r in lora_pairs["ratios"])
  assert lora_pairs["ratio_to_bound"] == pytest.approx(sum(lora_pairs["ratios"]) / 2)
  rows = report["rows"]
  assert set(rows) == {"scan/frozen_bound", "scan/lora", "scan/merged", "scan/qlora_nf4",
                       "scan/infer"}
  qlora = rows["scan/qlora_nf4"]  # the same adapters and loss on the NF4 base (not the same
  assert qlora["trainable"] == rows["scan/lora"]["trainable"]  # weights: rounded)
  assert qlora["loss"] == pytest.approx(rows["scan/lora"]["loss"], rel=0.05)
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
  report = _bench().report
  kept = report.median_round(runs)
  assert kept["tag"] == "c" and kept["ms_per_step_rounds"] == [30.0, 10.0, 20.0]
  assert report.median_round([{"error": "x"}]) == {"error": "x"}


def test_the_registry_holds_exactly_the_rows_that_rows_accepts():
  bench = _bench()
  rows = ["frozen_bound", "lora", "lora_autodiff", "lora_factored", "lora_merged_weight",
          "dora", "pissa", "olora", "merged", "full", "qlora_nf4",
          "qlora_int8", "qwix", "qwix_qlora_nf4", "peft_eager", "peft_compiled",
          "infer"]  # the docstring's order
  assert list(bench.ROWS) == rows and bench.parse([]).rows == ",".join(rows)  # default: all
  for name in rows:
    assert bench.planned(bench.parse(["--rows", name])) in ([f"scan/{name}"], [f"torch/{name}"])
  with pytest.raises(ValueError, match="--rows: unknown fast"):
    bench.planned(bench.parse(["--rows", "lora,fast"]))
  everything = ["--rows", ",".join(rows)]
  assert bench.planned(bench.parse(everything + ["--mesh", "2x4"])) == [
      "scan/frozen_bound", "scan/lora", "scan/merged", "scan/full"]
  assert bench.planned(bench.parse(everything + ["--compile-only", "--layers", "unroll"])) == [
      "unroll/frozen_bound", "unroll/lora", "unroll/lora_autodiff", "unroll/lora_factored",
      "unroll/lora_merged_weight", "unroll/dora", "unroll/pissa", "unroll/olora",
      "unroll/merged", "unroll/full",
      "unroll/qlora_nf4",
      "unroll/qlora_int8", "unroll/qwix", "unroll/qwix_qlora_nf4"]
  assert set(bench.report.DESCRIPTIONS) == set(rows) - {"infer"}  # every training row's words


def test_pissa_and_olora_rows_train_lora_count_from_the_original_model():
  bench = _bench()  # their first loss is the pretrained model's (the residual + A₀B₀ = W)
  shape = bench.Shape(**bench.SIZES["tiny"])
  first = {}
  for name in ("lora", "pissa", "olora"):
    x = bench.setup(shape, scan=True, remat=False, abstract=False)
    step, args, count = bench.ROWS[name](x)
    residual_alone = x.loss(args[0], x.batch)  # the frozen tree the row trains on, no adapters
    first[name] = (float(step(*args)[1]), count, float(residual_alone))
  assert first["pissa"][1] == first["olora"][1] == first["lora"][1]
  assert first["lora"][2] == pytest.approx(first["lora"][0], abs=1e-5)  # on W itself, B = 0
  for name in ("pissa", "olora"):  # bf16 base: the residual is rounded (measured ≤ 1.5e-3)
    assert first[name][0] == pytest.approx(first["lora"][0], abs=3e-3)
    assert abs(first[name][2] - first["lora"][0]) > 1e-2  # the residual alone is not W


def test_report_summarizes_a_hand_made_result():
  report = _bench().report
  gib = 2**30
  results = {
      "scan/frozen_bound": {"ms_per_step": 100.0, "tokens_per_s": 1000.0, "peak_bytes": 3 * gib,
                            "xla_peak_bytes": 1000},
      "scan/lora": {"ms_per_step": 125.0, "tokens_per_s": 800.0, "peak_bytes": 3.5 * gib,
                    "xla_peak_bytes": 1500},
      "scan/merged": {"ms_per_step": 150.0, "tokens_per_s": 2000 / 3},
      "scan/qwix": {"ms_per_step": 250.0, "tokens_per_s": 400.0},
      "scan/infer": {"base_b1": {"ms": 2.0, "tokens_per_s": 16.0},
                     "merged_b1": {"ms": 1.0, "tokens_per_s": 32.0, "ratio_to_base": 0.5}},
      "torch/peft_compiled": {"ms_per_step": 62.5, "tokens_per_s": 1600.0}}
  summary = report.summarize(results, ["scan", "unroll"])
  assert summary == {"scan": {  # no unroll rows: no unroll line
      "lora_over_bound": pytest.approx(1.25), "lora_tokens_over_qwix": pytest.approx(2.0),
      "lora_tokens_over_peft_compiled": pytest.approx(0.5),
      "lora_minus_bound_peak_bytes": gib // 2, "lora_minus_bound_xla_peak_bytes": 500}}
  assert results["scan/merged"]["ratio_to_bound"] == pytest.approx(1.5)
  assert "ratio_to_bound" not in results["torch/peft_compiled"]  # no torch bound
  table = report.markdown({"rows": results}).splitlines()
  assert table[3] == ("| scan | **LoRA with lora_jax** (`LoraConfig` → `analyze` → `init` → "
                      "`train_step`) | 125 | 800 | 1.250 | 3.50 |")
  assert len(table) == 2 + 5 + 2  # header, rule, the five timed training rows, inference
  assert table[-1] == "Inference (scan), time ÷ base model: merged_b1 0.500."


def test_train_step_benchmark_rejects_zero_rounds(capsys):
  with pytest.raises(SystemExit) as e:
    _bench().main(["--size", "tiny", "--rounds", "0"])
  assert e.value.code == 2 and "--rounds: expected an integer >= 1" in capsys.readouterr().err


def test_quant_bytes_counts_the_1b_shape_from_abstract_shapes():
  spec = importlib.util.spec_from_file_location("quant_bytes", ROOT / "benchmarks" /
                                                "quant_bytes.py")
  qb = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(qb)
  rows = qb.one_b(["nf4", "nf4-dq"])
  weights = 16 * (4 * 2048 * 2048 + 3 * 2048 * 5632)  # the seven projections of 16 layers
  assert rows["bfloat16"]["projection_weights"] == weights
  assert rows["bfloat16"]["projections"] == 2 * weights
  assert rows["nf4"]["projections"] == weights * 9 // 16  # 4 bits + a float32 per 64
  assert rows["nf4-dq"]["bits_per_weight"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
  assert rows["nf4-dq+head"]["other"] < rows["nf4-dq"]["other"]  # the head in NF4 too


def _many():
  sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports its sibling generate.py
  spec = importlib.util.spec_from_file_location("many_adapters", ROOT / "benchmarks" /
                                                "many_adapters.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_many_adapters_rounds_are_interleaved_and_ratios_per_round():
  many = _many()
  calls = []
  cases = {name: (lambda name=name: calls.append(name)) for name in ("mixed", "single")}
  results = many.interleaved(cases, 3)
  assert calls == ["mixed", "single"] * 4  # a warm-up each, then rounds of every case
  results = {"mixed": (1.0, [2.0, 4.0, 1.0]), "single": (1.0, [1.0, 1.0, 1.0])}
  rows = many._rows("forward", results, 100)
  assert rows["forward_mixed"]["ratio_to_single_per_round"] == [0.5, 0.25, 1.0]
  assert rows["forward_mixed"]["ratio_to_single"] == 0.5
  assert rows["forward_single"]["tokens_per_s"] == 100.0


def test_many_adapters_memory_rows_measure_the_banks_arrays():
  import jax
  import numpy as np

  import lora_jax

  many = _many()
  base = {"w": np.ones((64, 32), np.float32), "v": np.ones((32, 16), np.float32)}
  config = lora_jax.LoraConfig(targets="w|v", rank=4, kernel_names=("w", "v"))
  make = lambda i: lora_jax.init(config, base, key=jax.random.key(i))  # noqa: E731
  rows = many.memory_rows("toy", base, make, [1, 3])
  for n in (1, 3):
    want = sum(x.nbytes for x in jax.tree_util.tree_leaves(
        lora_jax.bank.stack({str(i): make(i) for i in range(n)}, base)))
    row = rows[f"toy_n{n}"]
    assert row["bank_bytes"] == want == (n + 1) * 4 * 4 * (64 + 32 + 32 + 16) + (n + 1) * 4 * 2
    assert row["merged_copies_bytes"] == n * 4 * (64 * 32 + 32 * 16)
