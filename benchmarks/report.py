"""The train-step benchmark's report: rounds kept, ratios summed up, the table printed and the
README's markdown. Plain Python over the result dicts ``train_step.py`` writes (no JAX), so
``python benchmarks/train_step.py --markdown out.json`` runs without importing a framework.

A result dict maps a row key (``"<layers>/<row>"``: ``scan/lora``, ``unroll/frozen_bound``,
``torch/peft_compiled``, ``scan/infer``) to that row's measurements (``ms_per_step``,
``tokens_per_s``, ``compile_s``, ``peak_bytes``, ``xla_peak_bytes``, ``trainable``, ...), or
to ``{"error": ...}``.
"""

from __future__ import annotations

DESCRIPTIONS = {  # the README table's wording of each training row
    "frozen_bound": "frozen bound: backprop through every frozen layer, no weight gradient",
    "lora": "**LoRA with lora_jax** (`LoraConfig` → `analyze` → `init` → `train_step`)",
    "lora_autodiff": "lora_jax, `product=\"autodiff\"` (autodiff of the factored form)",
    "lora_factored": "lora_jax, `product=\"factored\"` (hand-written backward)",
    "lora_merged_weight": "lora_jax, `product=\"merged_weight\"` (W' formed, hand-written "
                          "backward)",
    "dora": "DoRA with lora_jax (`use_dora=True`; column norms factored)",
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
