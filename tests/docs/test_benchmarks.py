"""benchmarks/train_step.py runs end to end on a tiny shape and writes its JSON."""

import argparse
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
          "lora_siblings", "dora", "pissa", "olora", "merged", "full", "qlora_nf4",
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
      "unroll/lora_merged_weight", "unroll/lora_siblings", "unroll/dora", "unroll/pissa",
      "unroll/olora", "unroll/merged", "unroll/full",
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
  return _load("many_adapters")


def _load(name: str):
  """``benchmarks/<name>.py`` loaded as a module, by path."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
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


def _readme_table():
  return _load("readme_table")


def _gpu_report():
  """A hand-made GPU report: unroll meets the bound goal (paired) and qwix's, scan misses the
  bound, its qwix row failed, and neither stack reaches PEFT + torch.compile's 1.8."""
  gib, tokens = 2**30, 8 * 1024
  row = lambda ms, **kw: {"ms_per_step": ms, "tokens_per_s": tokens / (ms / 1e3),  # noqa: E731
                          "compile_s": 9.0, **kw}
  return {
      "size": "1b", "backend": "gpu", "device": "cuda:0", "device_kind": "NVIDIA H100 80GB HBM3",
      "device_count": 1, "versions": {"jax": "0.11.2", "qwix": "0.1.8", "torch": "2.11.0"},
      "shape": {"d": 2048, "layers": 16}, "layers": ["unroll", "scan"], "iters": 4, "warmup": 2,
      "rows": {
          "unroll/frozen_bound": row(60.0, peak_bytes=10 * gib, trainable=0),
          "unroll/lora": row(72.0, peak_bytes=10.5 * gib, trainable=10_092_544),
          "unroll/qwix": row(86.4, peak_bytes=13.5 * gib, trainable=10_092_544),
          "scan/frozen_bound": row(80.0, xla_peak_bytes=int(1.5 * gib), trainable=0),
          "scan/lora": row(96.0, xla_peak_bytes=3 * gib, trainable=10_092_544),
          "scan/qwix": {"error": "RESOURCE_EXHAUSTED | out of memory"},
          "torch/peft_compiled": row(100.0, peak_bytes=15 * gib, trainable=10_092_544)},
      "paired": {"unroll/lora": {"ratios": [1.02, 1.2, 1.05, 1.08]}}}


def test_readme_table_checks_every_goal_against_the_reports_numbers():
  import numpy as np
  report = _bench().report
  data = _gpu_report()
  pair = data["paired"]["unroll/lora"]
  median = float(np.median(pair["ratios"]))  # (1.05 + 1.08) / 2
  rows = data["rows"]
  want = {  # (value, state) per goal, from the rows' own numbers
      "unroll": [(median, "met"),  # the paired median, not 72 / 60 = 1.2
                 (rows["unroll/lora"]["tokens_per_s"] / rows["unroll/qwix"]["tokens_per_s"],
                  "met"),  # 86.4 / 72 = 1.2
                 (100 / 72, "not met"), (0.5, "met")],
      "scan": [(96 / 80, "not met"), (None, "not measured"), (100 / 96, "not met"),
               (1.5, "not met")]}  # XLA's estimates: 3 - 1.5 GiB
  for layers, expected in want.items():
    got = report.goals(data, layers)
    assert [(g["value"], g["state"]) for g in got] == [
        (pytest.approx(v) if v is not None else None, s) for v, s in expected]
  block = report.readme_table(data)
  assert block.splitlines()[0].startswith(
      "Machine: NVIDIA H100 80GB HBM3 (`cuda:0`), backend gpu, 1 device(s); jax 0.11.2, qwix "
      "0.1.8, torch 2.11.0.")
  q1, q3 = np.percentile(pair["ratios"], [25, 75])
  lora = rows["unroll/lora"]
  assert (f"| unroll | {report.DESCRIPTIONS['lora']} | 72.0 | {lora['tokens_per_s']:,.0f} | "
          f"{72 / 60:.3f} | {median:.3f} ({q1:.3f}–{q3:.3f}) | 10.50 | "
          "10,092,544 |") in block.splitlines()
  assert f"| scan | {report.DESCRIPTIONS['lora']} | 96.0 | {8192 / 0.096:,.0f} | 1.200 | - | " \
         "3.00 (XLA est.) | 10,092,544 |" in block.splitlines()
  assert (f"| scan | {report.DESCRIPTIONS['qwix']} | failed: RESOURCE_EXHAUSTED \\| out of "
          "memory | - | - | - | - | - |") in block.splitlines()
  assert f"| torch | {report.DESCRIPTIONS['peft_compiled']} | 100.0 | 81,920 | - | - | 15.00 |" \
      in block
  unroll, scan = block.splitlines()[-2:]
  assert unroll == (
      f"- unroll: LoRA step ÷ frozen bound {median:.3f} (paired median) ≤ 1.10: "
      f"**met**; LoRA tokens/s ÷ qwix's {86.4 / 72:.3f} ≥ 1.15: **met**; LoRA tokens/s ÷ PEFT + "
      f"torch.compile's {100 / 72:.3f} ≥ 1.80: **not met**; LoRA peak − frozen-bound peak 0.50 "
      "GiB (device peak) ≤ 1.00 GiB: **met**.")
  assert scan.startswith(f"- scan: LoRA step ÷ frozen bound {96 / 80:.3f} (separate processes)")
  assert "LoRA tokens/s ÷ qwix's ≥ 1.15: **not measured** (scan/qwix failed)" in scan
  assert "peak 1.50 GiB (XLA est.) ≤ 1.00 GiB: **not met**" in scan
  del rows["torch/peft_compiled"], rows["unroll/frozen_bound"]  # rows missing altogether
  unroll = report.goals_line(data, "unroll")
  assert "PEFT + torch.compile's ≥ 1.80: **not measured** (no torch/peft_compiled row)" in unroll
  assert f"frozen bound {median:.3f} (paired median)" in unroll  # needs no row
  assert "peak ≤ 1.00 GiB: **not measured** (no unroll/frozen_bound row)" in unroll


def test_readme_table_reads_the_recorded_cpu_report():
  report = _bench().report
  data = json.loads((ROOT / "benchmarks" / "results" / "train_step_cpu.json").read_text())
  rows = data["rows"]
  lora = rows["scan/lora"]["ms_per_step"] / rows["scan/frozen_bound"]["ms_per_step"]
  peft = rows["scan/lora"]["tokens_per_s"] / rows["torch/peft_compiled"]["tokens_per_s"]
  peak = (rows["scan/lora"]["xla_peak_bytes"] - rows["scan/frozen_bound"]["xla_peak_bytes"]) / 2**30
  assert report.table_name(data) == "cpu-cpu"
  assert report.goals_line(data, "scan") == (
      f"- scan: LoRA step ÷ frozen bound {lora:.3f} (separate processes) ≤ 1.10: **met**; LoRA "
      "tokens/s ÷ qwix's ≥ 1.15: **not measured** (no scan/qwix row); LoRA tokens/s ÷ PEFT + "
      f"torch.compile's {peft:.3f} ≥ 1.80: **met**; LoRA peak − frozen-bound peak "
      f"{peak:.2f} GiB (XLA est.) ≤ 1.00 GiB: **met**.")


def test_readme_table_replaces_only_between_its_markers(tmp_path, capsys):
  cli = _readme_table()
  report_json = tmp_path / "gpu.json"
  report_json.write_text(json.dumps(_gpu_report()))
  begin, end = "<!-- train_step table: 1b-gpu begin -->", "<!-- train_step table: 1b-gpu end -->"
  other = "<!-- train_step table: cpu-cpu begin -->\nkept\n<!-- train_step table: cpu-cpu end -->"
  head, tail = f"# Title\n\n{other}\n\nThe GPU table:\n", "\nAfter the table.\n"
  readme = tmp_path / "README.md"
  readme.write_text(f"{head}{begin}\nan old table\n| stale |\n{end}{tail}")
  cli.main([str(report_json), "--readme", str(readme)])
  text = readme.read_text()
  assert text.startswith(head + begin + "\n\nMachine: NVIDIA H100") and text.endswith(end + tail)
  block = text[len(head + begin):-len(end + tail)]
  assert block.startswith("\n\n") and block.endswith("**not met**.\n\n")
  assert "stale" not in block and "- scan: LoRA step ÷ frozen bound 1.200" in block
  assert block.count(begin) == block.count(end) == 0
  assert "wrote table 1b-gpu" in capsys.readouterr().out
  cli.main([str(report_json), "--readme", str(readme)])  # twice: the same file
  assert readme.read_text() == text
  cli.main([str(report_json), "--readme", str(readme), "--check"])
  assert "table 1b-gpu is up to date" in capsys.readouterr().out
  readme.write_text(text.replace("1.200", "1.199"))
  with pytest.raises(SystemExit) as e:
    cli.main([str(report_json), "--readme", str(readme), "--check"])
  assert e.value.code == 1 and "table 1b-gpu differs from" in capsys.readouterr().err
  assert "1.199" in readme.read_text()  # --check writes nothing


def _exit_2(cli, argv, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1  # one line
  return err


def test_readme_table_errors_exit_2_with_one_line(tmp_path, capsys):
  cli = _readme_table()
  readme = tmp_path / "README.md"
  readme.write_text("# no markers here\n")
  missing = tmp_path / "missing.json"
  assert _exit_2(cli, [str(missing)], capsys) == (
      f"error: {missing}: cannot read it (No such file or directory); pass a report of "
      "train_step.py --json\n")
  foreign = ROOT / "benchmarks" / "results" / "train_step_1b_compile_cpu.json"  # a summary file
  assert f"{foreign}: not a train_step report (missing size, backend, rows)" in _exit_2(
      cli, [str(foreign), "--readme", str(readme)], capsys)
  broken = tmp_path / "broken.json"
  broken.write_text('{"size": ')
  assert "broken.json: not JSON (Expecting value at line 1)" in _exit_2(cli, [str(broken)],
                                                                         capsys)
  keyed = tmp_path / "keyed.json"
  keyed.write_text(json.dumps({"size": "1b", "backend": "gpu", "rows": {"lora": {}}}))
  assert 'rows not keyed "<layers>/<row>"' in _exit_2(cli, [str(keyed)], capsys)
  report_json = tmp_path / "gpu.json"
  report_json.write_text(json.dumps(_gpu_report()))
  with pytest.raises(SystemExit) as e:  # no markers: the table on stdout, how to add them
    cli.main([str(report_json), "--readme", str(readme)])
  out, err = capsys.readouterr()
  assert e.value.code == 2 and err.count("\n") == 1 and out.startswith("Machine: NVIDIA H100")
  assert err == (f"error: {readme} has no markers for table 1b-gpu (printed above); add the lines "
                 "'<!-- train_step table: 1b-gpu begin -->' and "
                 "'<!-- train_step table: 1b-gpu end -->' where it belongs and rerun\n")
  assert readme.read_text() == "# no markers here\n"
  end = "<!-- train_step table: 1b-gpu end -->"
  readme.write_text(f"{end}\n<!-- train_step table: 1b-gpu begin -->\n")
  assert "found 1 begin and 1 end marker(s) (end first)" in _exit_2(
      cli, [str(report_json), "--readme", str(readme)], capsys)
