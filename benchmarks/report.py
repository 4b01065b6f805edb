"""The train-step benchmark's report: rounds kept, ratios summed up, the table printed and the
README's markdown. Plain Python over the result dicts ``train_step.py`` writes (no JAX), so
``python benchmarks/train_step.py --markdown out.json`` runs without importing a framework.

A result dict maps a row key (``"<layers>/<row>"``: ``scan/lora``, ``unroll/frozen_bound``,
``torch/peft_compiled``, ``scan/infer``) to that row's measurements (``ms_per_step``,
``tokens_per_s``, ``compile_s``, ``peak_bytes``, ``xla_peak_bytes``, ``trainable``, ...), or
to ``{"error": ...}``.

``readme_table`` is the README's table of a whole report (``benchmarks/readme_table.py`` writes
it between two marker comments): the machine, every row with its paired ratio, and
``shared/docs/BENCHMARKS.md``'s GPU goals checked against the figures.
"""

from __future__ import annotations

import statistics

DESCRIPTIONS = {  # the README table's wording of each training row
    "frozen_bound": "frozen bound: backprop through every frozen layer, no weight gradient",
    "lora": "**LoRA with lora_jax** (`LoraConfig` → `analyze` → `init` → `train_step`)",
    "lora_autodiff": "lora_jax, `product=\"autodiff\"` (autodiff of the factored form)",
    "lora_factored": "lora_jax, `product=\"factored\"` (hand-written backward)",
    "lora_merged_weight": "lora_jax, `product=\"merged_weight\"` (W' formed, hand-written "
                          "backward)",
    "lora_siblings": "lora_jax, `recompute_inputs=False` (\"auto\" products, siblings)",
    "dora": "DoRA with lora_jax (`kind=\"dora\"`; column norms factored)",
    "pissa": "PiSSA with lora_jax (`init=\"pissa\"`; residual base)",
    "olora": "OLoRA with lora_jax (`init=\"olora\"`; residual base)",
    "merged": "W + s·A@B formed each step, autodiff (what LoRA avoids)",
    "full": "full fine-tuning",
    "qlora_nf4": "QLoRA with lora_jax: the frozen projections in NF4 (`lora_jax.quant`)",
    "qlora_int8": "lora_jax with the frozen projections in int8 (per-channel scales)",
    "qwix": "LoRA with qwix (`qwix.apply_lora_to_model`, same Flax model)",
    "qwix_qlora_nf4": "QLoRA with qwix (`LoraProvider(weight_qtype=\"nf4\")`, unrolled only)",
    "peft_eager": "PyTorch: transformers Llama + PEFT LoRA, eager",
    "peft_compiled": "PyTorch: transformers Llama + PEFT LoRA, `torch.compile`",
}


def gib(n) -> str:
  """Bytes as GiB with two decimals; "-" for None or 0."""
  return f"{n / 2**30:.2f}" if n else "-"


def median_round(runs: list[dict]) -> dict:
  """The round with the median step time (the lower one of an even count), with every
  round's time beside it; a row without a step time (inference, an error) keeps its last."""
  timed = sorted((r for r in runs if "ms_per_step" in r), key=lambda r: r["ms_per_step"])
  if not timed:
    return runs[-1]
  return {**timed[(len(timed) - 1) // 2],
          "ms_per_step_rounds": [r["ms_per_step"] for r in runs if "ms_per_step" in r]}


def summarize(results: dict, layer_modes: list[str]) -> dict:
  """Ratios against each layer mode's frozen bound, qwix and PEFT compiled. Also writes each
  timed row's ``ratio_to_bound`` into ``results``."""
  summary = {}
  peft = results.get("torch/peft_compiled", {}).get("tokens_per_s")
  for layers in layer_modes:
    bound, lora = results.get(f"{layers}/frozen_bound", {}), results.get(f"{layers}/lora", {})
    for key, r in results.items():
      if key.startswith(layers + "/") and "ms_per_step" in r and bound.get("ms_per_step"):
        r["ratio_to_bound"] = r["ms_per_step"] / bound["ms_per_step"]
    qwix = results.get(f"{layers}/qwix", {}).get("tokens_per_s")
    if "tokens_per_s" in lora:
      summary[layers] = {
          "lora_over_bound": lora.get("ratio_to_bound"),
          "lora_tokens_over_qwix": lora["tokens_per_s"] / qwix if qwix else None,
          "lora_tokens_over_peft_compiled": lora["tokens_per_s"] / peft if peft else None,
          "lora_minus_bound_peak_bytes": _minus(lora, bound, "peak_bytes"),
          "lora_minus_bound_xla_peak_bytes": _minus(lora, bound, "xla_peak_bytes")}
  return summary


def _minus(a: dict, b: dict, key: str):
  return a[key] - b[key] if a.get(key) is not None and b.get(key) is not None else None


def print_table(results: dict):
  """One line per training row, one per inference route."""
  print(f"{'row':<22}{'ms/step':>10}{'tokens/s':>11}{'÷ bound':>9}{'compile s':>11}"
        f"{'peak GiB':>10}{'XLA GiB':>9}{'trainable':>13}")
  for key, r in results.items():
    if "error" in r:
      print(f"{key:<22}  failed: {r['error']}")
      continue
    if key.endswith("/infer"):
      for route, v in r.items():
        if isinstance(v, dict):
          ratio = f"{v['ratio_to_base']:.3f}" if "ratio_to_base" in v else "-"
          print(f"  {key[:-6] + ' ' + route:<20}{v['ms']:>10.1f}{v['tokens_per_s']:>11,.0f}"
                f"{'÷ base ' + ratio:>20}")
      continue
    ms = f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else "-"
    tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
    ratio = f"{r['ratio_to_bound']:.3f}" if r.get("ratio_to_bound") else "-"
    print(f"{key:<22}{ms:>10}{tps:>11}{ratio:>9}{r['compile_s']:>11.1f}"
          f"{gib(r.get('peak_bytes')):>10}{gib(r.get('xla_peak_bytes')):>9}"
          f"{r.get('trainable', 0):>13,d}")


def print_paired(alternating: dict):
  """One line per row timed against its frozen bound, steps alternating."""
  for key, v in alternating.items():
    print(f"{key}: {v['ratio_to_bound']:.3f} x the frozen bound, steps alternating "
          f"(median of {len(v['ratios'])})")


def print_summary(summary: dict):
  """One line per layer mode: ``summarize``'s ratios and differences."""
  for layers, v in summary.items():
    print(f"{layers}: " + ", ".join(f"{k} {x:.3f}" if isinstance(x, float) else f"{k} {x}"
                                    for k, x in v.items()))


def markdown(report: dict) -> str:
  """The README's table for a report: one line per training row, then inference."""
  lines = ["| layers | row | ms/step | tokens/s | ÷ frozen bound | peak GiB (XLA est.) |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
  for key, r in report["rows"].items():
    layers, name = key.split("/")
    if name == "infer" or "ms_per_step" not in r:
      continue
    ratio = f"{r['ratio_to_bound']:.3f}" if r.get("ratio_to_bound") else "-"
    peak = r.get("peak_bytes") or r.get("xla_peak_bytes")
    lines.append(f"| {layers} | {DESCRIPTIONS[name]} | {r['ms_per_step']:.0f} | "
                 f"{r['tokens_per_s']:,.0f} | {ratio} | {gib(peak)} |")
  for key, r in report["rows"].items():
    if key.endswith("/infer") and "error" not in r:
      cells = ", ".join(f"{route} {v['ratio_to_base']:.3f}" for route, v in r.items()
                        if isinstance(v, dict) and "ratio_to_base" in v)
      lines.append(f"\nInference ({key.split('/')[0]}), time ÷ base model: {cells}.")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- the README's table

GOALS = {  # shared/docs/BENCHMARKS.md's GPU targets
    "bound": 1.10,  # LoRA step ÷ frozen-bound step, at most
    "qwix": 1.15,  # LoRA tokens/s ÷ qwix's, at least
    "peft_compiled": 1.8,  # LoRA tokens/s ÷ PEFT + torch.compile's, at least
    "peak_gib": 1.0,  # LoRA peak − frozen-bound peak, GiB, at most
}


def check_report(report, *, source: str):
  """Raises ValueError unless ``report`` is what ``train_step.py --json`` writes (an object
  with ``size``, ``backend`` and a ``rows`` object); ``source`` names it in the message."""
  keys = ("size", "backend", "rows")
  missing = [k for k in keys if k not in report] if isinstance(report, dict) else list(keys)
  rows = {} if missing else report["rows"]
  if missing or not isinstance(rows, dict) or any(str(k).count("/") != 1 for k in rows):
    what = f"missing {', '.join(missing)}" if missing else 'rows not keyed "<layers>/<row>"'
    raise ValueError(f"{source}: not a train_step report ({what}); expected the JSON that "
                     "`benchmarks/train_step.py --json` writes")


def table_name(report: dict) -> str:
  """The name of a report's README markers: its size and backend, e.g. ``1b-gpu``."""
  return f"{report['size']}-{report['backend']}"


def markers(name: str) -> tuple[str, str]:
  """The README's begin and end comments around table ``name``."""
  return (f"<!-- train_step table: {name} begin -->", f"<!-- train_step table: {name} end -->")


def replace_block(text: str, name: str, block: str) -> str | None:
  """``text`` with ``block`` between the markers of ``name`` (a blank line either side),
  whatever was between them replaced; None when ``text`` has neither marker. Raises
  ValueError unless there is exactly one begin marker and one end marker after it."""
  begin, end = markers(name)
  n_begin, n_end = text.count(begin), text.count(end)
  if n_begin == n_end == 0:
    return None
  if n_begin != 1 or n_end != 1 or text.index(end) < text.index(begin):
    raise ValueError(f"expected one {begin!r} line, then one {end!r} line; found {n_begin} "
                     f"begin and {n_end} end marker(s)" + " (end first)" * (n_begin == n_end == 1))
  head, rest = text.split(begin, 1)
  return f"{head}{begin}\n\n{block}\n\n{end}{rest.split(end, 1)[1]}"  # blank lines: markdown


def quartiles(values: list[float]) -> tuple[float, float]:
  """The first and third quartiles, interpolated linearly between the sorted values."""
  if len(values) == 1:
    return values[0], values[0]
  q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
  return q1, q3


def peak(r: dict) -> tuple[int | None, str]:
  """A row's peak bytes and where they come from: the device's, else XLA's estimate."""
  if r.get("peak_bytes"):
    return r["peak_bytes"], "device peak"
  if r.get("xla_peak_bytes"):
    return r["xla_peak_bytes"], "XLA est."
  return None, ""


def _cells(r: dict, bound: dict, pair: dict | None) -> list[str]:
  """A training row's table cells after its layers and description; ``bound`` is its layer
  stack's frozen-bound row ({} if none)."""
  ms = f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else "-"
  tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
  timed = "ms_per_step" in r and bound.get("ms_per_step")
  ratio = f"{r['ms_per_step'] / bound['ms_per_step']:.3f}" if timed else "-"
  paired = "-"
  if pair:
    q1, q3 = quartiles(pair["ratios"])
    paired = f"{statistics.median(pair['ratios']):.3f} ({q1:.3f}–{q3:.3f})"
  size, source = peak(r)
  peak_cell = gib(size) + (" (XLA est.)" if source == "XLA est." else "")
  trainable = f"{r['trainable']:,d}" if "trainable" in r else "-"
  return [ms, tps, ratio, paired, peak_cell, trainable]


def _table(report: dict) -> list[str]:
  lines = ["| layers | row | ms/step | tokens/s | ÷ frozen bound | paired ÷ bound, median (IQR) "
           "| peak GiB | trainable |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  pairs = report.get("paired") or {}
  for key, r in report["rows"].items():
    layers, name = key.split("/")
    if name == "infer":
      continue
    words = DESCRIPTIONS.get(name, name)
    if "error" in r:
      error = str(r["error"])[:100].replace("|", "\\|")
      cells = [f"failed: {error}"] + ["-"] * 5
    else:
      cells = _cells(r, report["rows"].get(f"{layers}/frozen_bound", {}), pairs.get(key))
    lines.append(f"| {layers} | {words} | " + " | ".join(cells) + " |")
  return lines


def _row(report: dict, key: str, *, timed: bool = True) -> tuple[dict | None, str]:
  """Row ``key`` when it ran (and, with ``timed``, has a step time), else None and why it is
  not measured."""
  r = report["rows"].get(key)
  if r is None:
    return None, f"no {key} row"
  if "error" in r:
    return None, f"{key} failed"
  if timed and "ms_per_step" not in r:
    return None, f"{key} has no step time"
  return r, ""


def goals(report: dict, layers: str) -> list[dict]:
  """The GPU goals (``GOALS``) checked against layer stack ``layers``' rows: per goal its
  ``what``, ``value`` (None when a row is missing), ``goal``, ``how`` (the source, or why it
  is not measured) and ``state``: "met", "not met" or "not measured"."""
  lora, why = _row(report, f"{layers}/lora")
  out = [_bound_goal(report, layers, lora, why)]
  for peer, words in (("qwix", "qwix's"), ("peft_compiled", "PEFT + torch.compile's")):
    key = f"{layers}/qwix" if peer == "qwix" else "torch/peft_compiled"
    other, other_why = _row(report, key)
    value = lora["tokens_per_s"] / other["tokens_per_s"] if lora and other else None
    out.append(_goal(f"LoRA tokens/s ÷ {words}", value, ">=", GOALS[peer], "",
                     why or other_why))
  out.append(_peak_goal(report, layers))
  return out


def _goal(what: str, value, op: str, goal: float, how: str, why: str) -> dict:
  if value is None:
    return {"what": what, "value": None, "op": op, "goal": goal, "how": why,
            "state": "not measured"}
  met = value <= goal if op == "<=" else value >= goal
  return {"what": what, "value": value, "op": op, "goal": goal, "how": how,
          "state": "met" if met else "not met"}


def _bound_goal(report: dict, layers: str, lora: dict | None, why: str) -> dict:
  bound, bound_why = _row(report, f"{layers}/frozen_bound")
  pair = (report.get("paired") or {}).get(f"{layers}/lora")
  if pair:  # the paired median: both steps alternating in one process
    value, how = statistics.median(pair["ratios"]), "paired median"
    why = bound_why = ""
  elif lora and bound:
    value, how = lora["ms_per_step"] / bound["ms_per_step"], "separate processes"
  else:
    value, how = None, ""
  return _goal("LoRA step ÷ frozen bound", value, "<=", GOALS["bound"], how, why or bound_why)


def _peak_goal(report: dict, layers: str) -> dict:
  """Also from a --compile-only report: XLA's estimate needs no step run."""
  lora, why = _row(report, f"{layers}/lora", timed=False)
  bound, bound_why = _row(report, f"{layers}/frozen_bound", timed=False)
  value, how = None, ""
  if lora and bound:
    for key, source in (("peak_bytes", "device peak"), ("xla_peak_bytes", "XLA est.")):
      if lora.get(key) and bound.get(key):
        value, how = (lora[key] - bound[key]) / 2**30, source
        break
    else:
      bound_why = "no peak recorded"
  return {**_goal("LoRA peak − frozen-bound peak", value, "<=", GOALS["peak_gib"], how,
                 why or bound_why), "unit": " GiB"}


def goals_line(report: dict, layers: str) -> str:
  """One line: each goal of ``goals`` with its figure, limit and state."""
  parts = []
  for g in goals(report, layers):
    op, unit = "≤" if g["op"] == "<=" else "≥", g.get("unit", "")
    goal = f"{op} {g['goal']:.2f}{unit}"
    if g["value"] is None:
      parts.append(f"{g['what']} {goal}: **not measured** ({g['how']})")
    else:
      value = f"{g['value']:.2f}" if unit else f"{g['value']:.3f}"
      how = f" ({g['how']})" if g["how"] else ""
      parts.append(f"{g['what']} {value}{unit}{how} {goal}: **{g['state']}**")
  return f"- {layers}: " + "; ".join(parts) + "."


def machine_line(report: dict) -> str:
  """The device, backend and package versions a report was measured with, and its recipe."""
  kind = report.get("device_kind")
  device = f"{kind} (`{report.get('device')}`)" if kind else f"`{report.get('device')}`"
  versions = ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items() if v)
  shape = report.get("shape") or {}
  recipe = ", ".join(f"{k} {v}" for k, v in shape.items())
  return (f"Machine: {device}, backend {report['backend']}, {report.get('device_count', 1)} "
          f"device(s); {versions}. Size {report['size']} ({recipe}), median of "
          f"{report.get('iters', '?')} steps after {report.get('warmup', '?')} warm-up"
          + (", compiled only (no steps run)" if report.get("compile_only") else "") + ".")


def readme_table(report: dict) -> str:
  """The README's block for a report: the machine line, one table line per training row (ms
  and tokens/s, ratio to the bound, the paired median with its interquartile range, peak,
  trainable count), the inference ratios, and a line per layer stack checking the GPU goals."""
  lines = [machine_line(report), ""] + _table(report)
  lines += ["", "Peak GiB: the device's own peak; \"(XLA est.)\" marks XLA's compiled estimate "
            "where the device reports none. Paired: the row's step and the bound's alternating "
            "in one process."]
  for key, r in report["rows"].items():
    if key.endswith("/infer") and "error" not in r:
      cells = ", ".join(f"{route} {v['ratio_to_base']:.3f}" for route, v in r.items()
                        if isinstance(v, dict) and "ratio_to_base" in v)
      lines += ["", f"Inference ({key.split('/')[0]}), time ÷ base model: {cells}."]
  modes = report.get("layers") or list(dict.fromkeys(
      k.split("/")[0] for k in report["rows"] if not k.startswith("torch/")))
  lines += ["", "GPU goals (`shared/docs/BENCHMARKS.md`) against these figures:", ""]
  return "\n".join(lines + [goals_line(report, layers) for layers in modes])
