"""Reproducible LoRA parameter counts, from shapes alone (jax.eval_shape: no weights allocated).

For every (model, LoRA configuration) row: trainable and total counts with PEFT's convention
(total = base + adapters), the published figure where there is one, and whether they match.
A published figure given to one decimal in millions ("0.3M") matches when our count rounds to
it at that precision; rows from the tables where the LoRA paper truncates instead (Tables 5 and
15: 18,874,368 is "18.8M", 301,989,888 is "301.9M") are marked so and match when our count
truncates to it. The match column says which rule held. Figures no configuration reproduces
are listed with the closest one and why.

Usage: python benchmarks/param_counts.py [--out benchmarks/results] [--no-chart] [--rows N]
Writes param_counts.md, param_counts.csv and lora_share_vs_rank.png under --out.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import decimal
import functools
import os
import resource
import time

import lora_jax
from lora_jax import models

HU = "Hu et al. 2021 (LoRA)"


@dataclasses.dataclass(frozen=True)
class Row:
  model: str
  targets: str  # lora-jax count --targets syntax
  rank: int
  published: str = ""  # "0.3M", "4,194,304", or "" for none
  source: str = ""
  note: str = ""
  overrides: tuple = ()  # model config overrides, e.g. (("fused_qkv", False),)
  rule: str = "round"  # how the source rounds a figure in millions: "round" or "truncate"


TRUNC = "truncate"
UNFUSED = (("fused_qkv", False),)  # GPT-2 with separate Wq, Wk, Wv: the same base count
QV, QKVO = "q,v", "q,k,v,o"
ROWS = [
    # LoRA paper, Table 2 (GLUE): r = 8 on Wq, Wv.
    Row("roberta-base", QV, 8, "0.3M", f"{HU}, Table 2, RoB-base (LoRA)"),
    Row("roberta-large", QV, 8, "0.8M", f"{HU}, Table 2, RoB-large (LoRA)"),
    Row("roberta-large", QV, 8, "0.8M", f"{HU}, Table 2, RoB-large (LoRA)†"),
    # Table 3 (E2E): r_q = r_v = 4 (Table 11, GPT-2 hyperparameters).
    Row("gpt2-medium", QV, 4, "0.35M", f"{HU}, Table 3, GPT-2 M (LoRA)",
        "the paper's r=4 on Wq, Wv of 24 layers of width 1024 is 0.39M; no rank gives 0.35M",
        UNFUSED),
    Row("gpt2-large", QV, 4, "0.77M", f"{HU}, Table 3, GPT-2 L (LoRA)",
        "the paper's r=4 on Wq, Wv of 36 layers of width 1280 is 0.74M; no rank gives 0.77M",
        UNFUSED),
    # Table 4 (GPT-3 175B) and Table 15 (its hyperparameter analysis).
    Row("gpt-3-175b", "v", 2, "4.7M", f"{HU}, Table 15, r_v = 2 (= Table 4, LoRA 4.7M)"),
    Row("gpt-3-175b", QV, 1, "4.7M", f"{HU}, Table 15, r_q = r_v = 1"),
    Row("gpt-3-175b", QV, 2, "9.4M", f"{HU}, Table 15, r_q = r_v = 2"),
    Row("gpt-3-175b", QKVO, 1, "9.4M", f"{HU}, Table 15, r_q = r_k = r_v = r_o = 1"),
    Row("gpt-3-175b", QV, 4, "18.8M", f"{HU}, Table 15, r_q = r_v = 4", rule=TRUNC),
    Row("gpt-3-175b", QKVO, 2, "18.8M", f"{HU}, Table 15, r_q = r_k = r_v = r_o = 2",
        rule=TRUNC),
    Row("gpt-3-175b", QV, 8, "37.7M", f"{HU}, Table 15, r_q = r_v = 8 (= Table 4, LoRA 37.7M)"),
    Row("gpt-3-175b", QKVO, 4, "37.7M", f"{HU}, Table 15, r_q = r_k = r_v = r_o = 4"),
    Row("gpt-3-175b", QV, 64, "301.9M", f"{HU}, Table 15, r_q = r_v = 64", rule=TRUNC),
    Row("gpt-3-175b", QKVO, 64, "603.8M", f"{HU}, Table 15, r_q = r_k = r_v = r_o = 64",
        "603,979,776 is 604.0M (603.9M truncated); 603.8M is twice the truncated 301.9M of "
        "r_q = r_v = 64", rule=TRUNC),
    # Table 5: the 18M budget (section 7.1).
    *[Row("gpt-3-175b", t, r, "18M", f"{HU}, Table 5 (18M budget), {t} r={r}", rule=TRUNC)
      for t, r in (("q", 8), ("k", 8), ("v", 8), ("o", 8), ("q,k", 4), (QV, 4), (QKVO, 2))],
    # Common PEFT setups.
    Row("llama-2-7b", QV, 8, "4,194,304", "PEFT print_trainable_parameters, Llama-2-7b, "
        "target_modules=[q_proj, v_proj], r=8"),
    Row("llama-2-7b", "all-linear", 16),
    Row("llama-3-8b", QV, 8),
    Row("llama-3-8b", "all-linear", 16),
    Row("llama-3.2-1b", "all-linear", 16),
    Row("llama-2-70b", "all-linear", 16),
    Row("gpt2", "qkv", 8, "294,912", "PEFT print_trainable_parameters, gpt2, "
        "target_modules=[c_attn], r=8"),
    Row("bert-base-uncased", QV, 8),
    Row("minilm-l6-h384", QV, 8),
]

# Published figures that no LoRA configuration of our models can reproduce, stated plainly.
NOT_REPRODUCIBLE = [
    (f"{HU}, Table 2, DeB-XXL (LoRA) 4.7M", "DeBERTa is not among lora_jax.models."),
    (f"{HU}, Table 15, LoRA+PE 37.8M / 151.1M / 302.1M and LoRA+PL 52.8M",
     "these add prefix-embedding or prefix-layer parameters to the LoRA ones; their LoRA part "
     "alone is the r_q = r_v = 8 / 32 / 64 rows (37.7M / 151.0M / 302.0M)."),
    (f"{HU}, Table 4, GPT-3 (FT) 175,255.8M",
     "all parameters of GPT-3 as the paper counts them; the architecture of Brown et al. "
     "(96 layers, width 12288, 2048 positions, 50257 tokens) has 174,604,259,328 with the head "
     "tied to the embedding (175,221,817,344 untied), so its count includes something else."),
    (f"{HU}, Table 3, GPT-2 M (FT) 354.92M",
     "Hugging Face gpt2-medium has 354,823,168 parameters (354.82M)."),
]


UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


def _precision(published: str) -> tuple[decimal.Decimal, int]:
  """(value in units, unit) of a published figure: "0.35M" -> (0.35, 10**6)."""
  text = published.replace(",", "").strip().upper()
  suffix = text[-1:] if text[-1:] in UNITS else ""
  return decimal.Decimal(text[:len(text) - len(suffix)]), UNITS[suffix]


def match(count: int, published: str, rule: str = "round") -> str:
  """"exact", "rounded", "truncated" or "no" ("" when nothing was published). A figure with a
  unit is compared at its printed precision with the source's ``rule``; one without, exactly."""
  if not published:
    return ""
  value, unit = _precision(published)
  if unit == 1:
    return "exact" if decimal.Decimal(count) == value else "no"
  quantum = decimal.Decimal(1).scaleb(value.as_tuple().exponent)
  mode = decimal.ROUND_DOWN if rule == "truncate" else decimal.ROUND_HALF_UP
  if (decimal.Decimal(count) / unit).quantize(quantum, mode) == value:
    return "truncated" if rule == "truncate" else "rounded"
  return "no"


@functools.lru_cache(maxsize=None)
def _plan(model: str, targets: str, rank: int, overrides: tuple):
  config = lora_jax.LoraConfig(targets=models.targets_for(model, targets, **dict(overrides)),
                               rank=rank, alpha=2 * rank)
  return models.plan_model(model, config, **dict(overrides))


def closest(row: Row) -> str:
  """The rank, with the row's targets, whose count is nearest the published figure (the
  count is linear in the rank: r * count at r = 1)."""
  value, unit = _precision(row.published)
  per_rank = _plan(row.model, row.targets, 1, row.overrides).counts.trainable
  r = max(1, round(float(value) * unit / per_rank))
  return f"closest with {row.targets}: r={r}, {r * per_rank:,d}"


def evaluate(row: Row) -> dict:
  counts = _plan(row.model, row.targets, row.rank, row.overrides).counts
  matched = match(counts.trainable, row.published, row.rule)
  note = "; ".join(filter(None, [row.note, closest(row) if matched == "no" else ""]))
  targets = row.targets + (" (separate qkv)" if dict(row.overrides).get("fused_qkv") is False
                            else "")
  return {"model": row.model, "targets": targets, "rank": row.rank,
          "trainable": counts.trainable, "total": counts.total,
          "percent": f"{counts.percent:.4f}", "published": row.published,
          "match": matched, "source": row.source, "note": note}


def share_by_rank(names=("llama-3.2-1b", "llama-2-7b", "llama-2-70b"),
                  ranks=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> dict[str, list[float]]:
  return {n: [_plan(n, "all-linear", r, ()).counts.percent for r in ranks] for n in names}, ranks


def chart(path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  shares, ranks = share_by_rank()
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for name, values in shares.items():
    ax.plot(ranks, values, marker="o", label=name)
  ax.set(xscale="log", yscale="log", xlabel="LoRA rank r (all-linear)",
         ylabel="trainable share of all parameters (%)",
         title="LoRA trainable share against rank")
  ax.set_xticks(ranks, [str(r) for r in ranks])
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def markdown(results: list[dict]) -> str:
  head = "| model | targets | rank | trainable | total | % | published | match | figure from |"
  lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
  for r in results:
    lines.append(f"| {r['model']} | {r['targets']} | {r['rank']} | {r['trainable']:,d} | "
                 f"{r['total']:,d} | {r['percent']} | {r['published'] or '—'} | "
                 f"{r['match'] or '—'} | {r['source'] or '—'} |")
  notes = [f"- {r['model']} {r['targets']} r={r['rank']} ({r['source']}): {r['note']}"
           for r in results if r["note"]]
  notes += [f"- {source}: {why}" for source, why in NOT_REPRODUCIBLE]
  return "\n".join(lines + ["", "Not reproduced:", *notes]) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--no-chart", action="store_true")
  parser.add_argument("--rows", type=int, default=None, help="only the first N rows")
  args = parser.parse_args()
  start = time.perf_counter()
  results = [evaluate(row) for row in ROWS[:args.rows]]
  os.makedirs(args.out, exist_ok=True)
  table = markdown(results)
  print(table)
  with open(os.path.join(args.out, "param_counts.md"), "w") as f:
    f.write(table)
  with open(os.path.join(args.out, "param_counts.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(results[0]))
    writer.writeheader()
    writer.writerows(results)
  if not args.no_chart:
    chart(os.path.join(args.out, "lora_share_vs_rank.png"))
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"{len(results)} rows in {time.perf_counter() - start:.1f} s, peak RSS {rss_mb:.0f} MB; "
        f"wrote {args.out}/param_counts.md, .csv" + ("" if args.no_chart else
                                                      ", lora_share_vs_rank.png"))


if __name__ == "__main__":
  main()
