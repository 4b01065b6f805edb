"""Resident bytes of a frozen base in each lora_jax.quant format (QLoRA's memory saving).

Two models: the bundled SmolLM2-135M-Instruct (real weights; ``q4_1`` keeps the GGUF's own
blocks, the other formats quantize each projection) and the ``1b`` shape of
``benchmarks/train_step.py`` (BENCHMARKS.md's GPU shape, a Llama of d 2048 and 16 layers, from
abstract shapes: nothing allocated). Bytes are the leaves' own: "projections" are the seven
projection kernels (dense, or codes and scales), "other" the rest (embedding, norms, head).
Also the dequantization error of each format on SmolLM2's projections, against the float32
values of the file.

Usage:
  python benchmarks/quant_bytes.py --json benchmarks/results/quant_bytes.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

FORMATS = ("none", "q4_1", "q8_0", "nf4", "nf4-dq", "int8")
GIB = 2 ** 30


PROJECTION = r"(q|k|v|o|gate|up|down)_proj"


def bytes_of(params) -> dict:
  """Bytes of the projection kernels (dense or quantized: codes and scales) and of the other
  leaves, and the projections' bits per weight."""
  import math
  import re

  import jax
  import jax.numpy as jnp

  from lora_jax.targets import leaves_by_path

  size = lambda x: math.prod(x.shape) * jnp.dtype(x.dtype).itemsize  # noqa: E731
  proj = other = weights = 0
  for path, leaf in leaves_by_path(params).items():
    n = sum(size(x) for x in jax.tree_util.tree_leaves(leaf))
    if re.search(PROJECTION, path):
      proj, weights = proj + n, weights + math.prod(leaf.shape)
    else:
      other += n
  return {"projections": proj, "other": other, "total": proj + other,
          "projection_weights": weights, "bits_per_weight": 8 * proj / weights}


def _fmt(name: str) -> tuple[str | None, bool]:
  return (None, False) if name == "none" else (name.removesuffix("-dq"), name.endswith("-dq"))


def smollm2(formats) -> dict:
  import jax
  import jax.numpy as jnp

  from lora_jax import kernels
  from lora_jax.app.causal import load_model

  out = {}
  dense = load_model("smollm2-135m-instruct").params
  flat_dense = dict(jax.tree_util.tree_leaves_with_path(dense))
  for dtype in ("float32", "bfloat16"):
    out[dtype] = bytes_of(load_model("smollm2-135m-instruct", dtype=dtype).params)
  for name in formats:
    if name == "none":
      continue
    start = time.perf_counter()
    params = load_model("smollm2-135m-instruct", quantize=name).params
    seconds = time.perf_counter() - start
    err2 = ref2 = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=kernels.is_kind):
      if kernels.is_kind(leaf):
        ref = flat_dense[path]
        err2 += float(jnp.sum((kernels.dense(leaf) - ref) ** 2))
        ref2 += float(jnp.sum(ref ** 2))
    out[name] = {**bytes_of(params), "load_s": seconds,
                 "relative_rms_error": (err2 / ref2) ** 0.5}
  return out


def one_b(formats) -> dict:
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  import jax
  import train_step as ts

  import lora_jax
  from lora_jax import quant

  s = ts.Shape(**ts.SIZES["1b"])
  x = ts.setup(s, scan=True, remat=False, abstract=True)
  uses = lora_jax.analyze(x.apply, x.params, x.batch["inputs"])
  out = {"bfloat16": bytes_of(x.params)}
  for name in formats:
    fmt, dq = _fmt(name)
    if fmt is None:
      continue
    q = jax.eval_shape(lambda p: quant.quantize(p, fmt, targets=ts.TARGETS, double_quant=dq,
                                                uses=uses), x.params)
    out[name] = bytes_of(q)
  # bitsandbytes (and so PEFT's QLoRA) keeps the head in 16 bits; in NF4 too it is this much:
  q = jax.eval_shape(lambda p: quant.quantize(p, "nf4", targets=[ts.TARGETS, "lm_head"],
                                              double_quant=True, uses=uses), x.params)
  out["nf4-dq+head"] = {**bytes_of(q), "head_quantized": True}
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--formats", default=",".join(FORMATS))
  args = parser.parse_args(argv)
  formats = [f for f in args.formats.split(",") if f]
  report = {"smollm2_135m": smollm2(formats), "llama_1b_shape": one_b(formats)}
  for model, rows in report.items():
    print(model)
    for name, b in rows.items():
      extra = f"  rel. RMS error {b['relative_rms_error']:.4f}" if "relative_rms_error" in b else ""
      print(f"  {name:9s} projections {b['projections'] / GIB:7.3f} GiB "
            f"({b['bits_per_weight']:.3f} bits/weight)  other {b['other'] / GIB:6.3f} GiB  "
            f"total {b['total'] / GIB:7.3f} GiB{extra}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
  main()
