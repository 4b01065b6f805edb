"""Training-step speed and memory: LoRA through lora_jax against the frozen bound and its peers.

Shaped like nanoGPT's bench.py: settings at the top, warm-up, timed steps with
``jax.block_until_ready``, compile time reported apart, median of many steps, JSON out. The model
is the project's reference Llama (``lora_jax.models.LlamaForCausalLM``, Flax linen, bf16), with
its layers under ``nn.scan`` (stacked kernels) and/or unrolled (a Python loop); LoRA rank 16,
alpha 32 on all seven projections (shared/docs/BENCHMARKS.md's recipe). Each row runs in its
own process, so a row's peak memory is its own.

Training rows, all on the same model, batch and AdamW:
  frozen_bound  backprop through every frozen layer (gradient w.r.t. the input embeddings): no
                adapters, no weight gradient. No LoRA step can be faster.
  lora          lora_jax's public path: LoraConfig -> analyze -> init -> train_step.
  merged        W + s·A@B formed each step and differentiated by autodiff (what LoRA avoids).
  full          full fine-tuning.
  qwix          qwix.apply_lora_to_model on the same Flax model (if qwix is installed).
  peft_eager    transformers LlamaForCausalLM (SDPA) + PEFT LoRA, eager (if torch and peft are
  peft_compiled installed); the same + torch.compile.
Inference rows (``infer``): the base model, the merged model and the unmerged (transformed)
model, forward only, at batch 1 and at batch 32.

Memory: ``peak_bytes`` is the device's own peak (``memory_stats``, GPU/TPU; torch's
``max_memory_allocated`` on CUDA); ``xla_peak_bytes`` is XLA's compiled estimate
(``memory_analysis().peak_memory_in_bytes``), available on every backend, also for
``--compile-only`` (which compiles without running: the 1b size's memory on a CPU).

Usage:
  python benchmarks/train_step.py --size cpu --json out.json
  python benchmarks/train_step.py --size cpu --rows frozen_bound,lora,qwix --rounds 3 --paired \
      --json out.json                                                  # a noisy, shared machine
  python benchmarks/train_step.py --size 1b --layers unroll,scan --json results/1b.json   # GPU
  python benchmarks/train_step.py --size 1b --compile-only --remat --rows frozen_bound,lora
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = {  # shared/docs/BENCHMARKS.md: "cpu" is its 2-core recipe, "1b" its H100 shape
    "cpu": dict(d=512, layers=4, heads=8, ffn=1408, vocab=8000, seq=256, batch=8),
    "1b": dict(d=2048, layers=16, heads=16, ffn=5632, vocab=32000, seq=1024, batch=8),
    "tiny": dict(d=64, layers=2, heads=4, ffn=128, vocab=256, seq=32, batch=2),  # for tests
}
RANK, ALPHA, LR = 16, 32.0, 1e-4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = r"(q|k|v|o|gate|up|down)_proj"
TRAIN_ROWS = ("frozen_bound", "lora", "merged", "full", "qwix")
TORCH_ROWS = ("peft_eager", "peft_compiled")
INFER_BATCHES = (1, 32)


@dataclasses.dataclass(frozen=True)
class Shape:
  d: int
  layers: int
  heads: int
  ffn: int
  vocab: int
  seq: int
  batch: int


# ---------------------------------------------------------------------------- JAX rows


def llama(s: Shape, *, scan: bool, remat: bool):
  import jax.numpy as jnp
  from lora_jax.models import LlamaConfig, LlamaForCausalLM
  return LlamaForCausalLM(LlamaConfig(
      vocab_size=s.vocab, hidden_size=s.d, intermediate_size=s.ffn, num_hidden_layers=s.layers,
      num_attention_heads=s.heads, num_key_value_heads=s.heads, scan_layers=scan, remat=remat,
      dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))


def cross_entropy(logits, targets):
  import jax.numpy as jnp
  import optax
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def place(args, *, mesh, fsdp: bool):
  """Puts a row's (frozen, state, batch) on ``mesh``: the base by the reference Llama's
  tensor-parallel (or FSDP) layout, adapters following it, the batch split over "data"."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lora_jax import sharding

  frozen, state, batch = args
  trained = frozen if frozen is not None else state[0]
  specs = sharding.named_shardings(sharding.llama_specs(trained, mesh=mesh, fsdp=fsdp), mesh)
  put = lambda tree, sh: jax.device_put(tree, sh) if tree is not None else None  # noqa: E731
  batch = put(batch, NamedSharding(mesh, P("data")))
  if frozen is None:  # full fine-tuning: the trained tree is the base
    params = put(state[0], specs)
    return None, (params, jax.jit(lambda p: state_init(p))(params)), batch
  frozen = put(frozen, specs)
  if isinstance(state, tuple):  # adapters and their optimizer state
    adapters = put(state[0], sharding.adapter_shardings(state[0], specs))
    return frozen, (adapters, jax.jit(lambda a: state_init(a))(adapters)), batch
  return frozen, state, batch


def state_init(tree):
  import optax
  return optax.adamw(LR).init(tree)


def jax_row(name: str, s: Shape, *, scan: bool, remat: bool, abstract: bool):
  """(jitted step(frozen, state, batch) -> (state, value), args, trainable count)."""
  import jax
  import jax.numpy as jnp
  import optax

  import lora_jax

  model = llama(s, scan=scan, remat=remat)
  tokens = jax.random.randint(jax.random.key(2), (s.batch, s.seq + 1), 0, s.vocab)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  make = lambda: model.init(jax.random.key(0), batch["inputs"])["params"]  # noqa: E731
  params = jax.eval_shape(make) if abstract else jax.jit(make)()
  optimizer = optax.adamw(LR)
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  loss = lambda p, b: cross_entropy(apply(p, b["inputs"]), b["targets"])  # noqa: E731
  size = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731

  def init_state(trained):
    state = (trained, optimizer.init(trained))
    return jax.eval_shape(lambda: state) if abstract else state

  def update(trained, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state

  if name == "frozen_bound":
    def step(frozen, state, b):
      h = frozen["model"]["embed_tokens"]["embedding"][b["inputs"]]
      g = jax.grad(lambda h: cross_entropy(
          model.apply({"params": frozen}, None, inputs_embeds=h), b["targets"]))(h)
      return state, jnp.sum(g.astype(jnp.float32))  # the gradient's sum: nothing is dead
    return jax.jit(step), (params, jnp.zeros(()), batch), 0

  if name in ("lora", "merged"):
    config = lora_jax.LoraConfig(targets=TARGETS, rank=RANK, alpha=ALPHA)
    uses = lora_jax.analyze(apply, params, batch["inputs"])
    adapters = lora_jax.init(config, params, key=jax.random.key(1), uses=uses)
    trainable = lora_jax.count(params, adapters).trainable
    if name == "lora":
      lora_step = lora_jax.train_step(loss, optimizer, jit=False)

      def step(frozen, state, b):
        out = lora_step(frozen, state[0], state[1], b)
        return (out.adapters, out.opt_state), out.loss
    else:
      def step(frozen, state, b):
        value, g = jax.value_and_grad(lambda a: loss(lora_jax.merge(frozen, a), b))(state[0])
        return update(state[0], state[1], g), value
    return jax.jit(step, donate_argnums=1), (params, init_state(adapters), batch), trainable

  if name == "full":
    def step(_, state, b):
      value, g = jax.value_and_grad(loss)(state[0], b)
      return update(state[0], state[1], g), value
    return jax.jit(step, donate_argnums=1), (None, init_state(params), batch), size(params)

  if name == "qwix":
    import flax.traverse_util as tu
    import qwix
    qmodel = qwix.apply_lora_to_model(
        model, qwix.LoraProvider(module_path=".*(" + "|".join(PROJECTIONS) + ")", rank=RANK,
                                 alpha=ALPHA))
    qinit = lambda: qmodel.init(jax.random.key(1), batch["inputs"])["params"]  # noqa: E731
    flat = tu.flatten_dict(jax.eval_shape(qinit) if abstract else jax.jit(qinit)())
    is_lora = lambda k: k[-1].endswith(("_lora_a", "_lora_b"))  # noqa: E731
    lora_params = tu.unflatten_dict({k: v for k, v in flat.items() if is_lora(k)})

    def qloss(lp, frozen, b):
      merged = tu.unflatten_dict({**tu.flatten_dict(frozen), **tu.flatten_dict(lp)})
      return cross_entropy(qmodel.apply({"params": merged}, b["inputs"]), b["targets"])

    def step(frozen, state, b):
      value, g = jax.value_and_grad(qloss)(state[0], frozen, b)
      return update(state[0], state[1], g), value
    return (jax.jit(step, donate_argnums=1), (params, init_state(lora_params), batch),
            size(lora_params))
  raise ValueError(f"unknown row {name!r}")


def device_peak_bytes():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def xla_memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {"xla_peak_bytes": m.peak_memory_in_bytes, "xla_temp_bytes": m.temp_size_in_bytes,
          "xla_argument_bytes": m.argument_size_in_bytes}


def measure_jax(step, args, *, warmup: int, iters: int, compile_only: bool) -> dict:
  import jax
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  result = {"compile_s": time.perf_counter() - t0, **xla_memory(compiled)}
  if compile_only:
    return result
  frozen, state, batch = args
  for _ in range(warmup):
    state, value = compiled(frozen, state, batch)
    jax.block_until_ready(value)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    state, value = compiled(frozen, state, batch)
    jax.block_until_ready((state, value))
    times.append(time.perf_counter() - t0)
  result.update(ms_per_step=1e3 * statistics.median(times), ms_all=[1e3 * t for t in times],
                loss=float(value), peak_bytes=device_peak_bytes())
  return result


def infer_rows(s: Shape, *, scan: bool, warmup: int, iters: int) -> dict:
  """Forward-only: base, merged and unmerged (transformed) model at batch 1 and 32."""
  import jax

  import lora_jax

  model = llama(s, scan=scan, remat=False)
  params = jax.jit(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 8), int)))()
  params = params["params"]
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  config = lora_jax.LoraConfig(targets=TARGETS, rank=RANK, alpha=ALPHA)
  tokens = jax.numpy.zeros((1, s.seq), int)
  adapters = lora_jax.init(config, params, key=jax.random.key(1),
                           uses=lora_jax.analyze(apply, params, tokens))
  merged = jax.jit(lora_jax.merge)(params, adapters)
  routes = {"base": (jax.jit(apply), (params,)), "merged": (jax.jit(apply), (merged,)),
            "unmerged": (jax.jit(lora_jax.lora(apply)), (params, adapters))}
  out = {}
  for batch in INFER_BATCHES:
    x = jax.random.randint(jax.random.key(3), (batch, s.seq), 0, s.vocab)
    for route, (fn, args) in routes.items():
      compiled = fn.lower(*args, x).compile()
      for _ in range(warmup):
        jax.block_until_ready(compiled(*args, x))
      times = []
      for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args, x))
        times.append(time.perf_counter() - t0)
      ms = 1e3 * statistics.median(times)
      out[f"{route}_b{batch}"] = {"ms": ms, "tokens_per_s": batch * s.seq / (ms / 1e3)}
    base = out[f"base_b{batch}"]["ms"]
    for route in ("merged", "unmerged"):
      out[f"{route}_b{batch}"]["ratio_to_base"] = out[f"{route}_b{batch}"]["ms"] / base
  return out


# ---------------------------------------------------------------------------- PyTorch rows


def torch_row(name: str, s: Shape, *, warmup: int, iters: int) -> dict:
  """transformers LlamaForCausalLM + PEFT LoRA (rank 16, alpha 32, seven projections)."""
  import peft
  import torch
  import transformers

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=s.vocab, hidden_size=s.d, intermediate_size=s.ffn, num_hidden_layers=s.layers,
      num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=s.seq,
      tie_word_embeddings=False, attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
  model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                     target_modules=list(PROJECTIONS)))
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=LR)
  forward = torch.compile(model) if name == "peft_compiled" else model
  g = torch.Generator().manual_seed(2)
  tokens = torch.randint(0, s.vocab, (s.batch, s.seq + 1), generator=g).to(device)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def step():
    logits = forward(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, s.vocab),
                                             targets.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  t0 = time.perf_counter()
  step()
  sync()
  first_s = time.perf_counter() - t0
  for _ in range(max(0, warmup - 1)):
    step()
  sync()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)
  return {"compile_s": first_s, "ms_per_step": 1e3 * statistics.median(times),
          "ms_all": [1e3 * t for t in times], "loss": float(loss),
          "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
          "trainable": sum(p.numel() for p in trainable), "torch": torch.__version__,
          "peft": peft.__version__, "transformers": transformers.__version__}


# ---------------------------------------------------------------------------- driver


def run_one(args) -> dict:
  """One row in this process (called by the driver in a subprocess)."""
  s = Shape(**SIZES[args.size])
  layers, name = args.one.split("/")
  if name in TORCH_ROWS:
    r = torch_row(name, s, warmup=args.warmup, iters=args.iters)
  elif name == "infer":
    r = infer_rows(s, scan=layers == "scan", warmup=args.warmup, iters=args.iters)
  else:
    step, row_args, trainable = jax_row(name, s, scan=layers == "scan", remat=args.remat,
                                        abstract=args.compile_only)
    if args.mesh:
      from lora_jax import sharding
      row_args = place(row_args, mesh=sharding.mesh(args.mesh), fsdp=args.fsdp)
    r = measure_jax(step, row_args, warmup=args.warmup, iters=args.iters,
                    compile_only=args.compile_only)
    r["trainable"] = trainable
  if "ms_per_step" in r:
    r["tokens_per_s"] = s.batch * s.seq / (r["ms_per_step"] / 1e3)
  r["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return r


def available(name: str) -> bool:
  needs = {"qwix": ("qwix",), "peft_eager": ("torch", "peft", "transformers"),
           "peft_compiled": ("torch", "peft", "transformers")}.get(name, ())
  return all(importlib.util.find_spec(m) is not None for m in needs)


def planned(args) -> list[str]:
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  unknown = sorted(set(rows) - set(TRAIN_ROWS + TORCH_ROWS + ("infer",)))
  if unknown:
    raise ValueError(f"--rows: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(TRAIN_ROWS + TORCH_ROWS + ('infer',))}")
  out = []
  for layers in args.layers.split(","):
    out += [f"{layers}/{r}" for r in rows if r not in TORCH_ROWS]
  out += [f"torch/{r}" for r in rows if r in TORCH_ROWS and not args.compile_only]
  out = [r for r in out if not (args.compile_only and r.endswith("/infer"))]
  if args.mesh:  # the sharded rows: lora_jax's own; qwix, PEFT and inference run on one device
    out = [r for r in out if r.split("/")[1] in ("frozen_bound", "lora", "merged", "full")]
  return out


def spawn(key: str, args) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "row.json")
    cmd = [sys.executable, __file__, "--size", args.size, "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--one", key, "--one-out", path]
    cmd += ["--remat"] * args.remat + ["--compile-only"] * args.compile_only
    cmd += ["--mesh", args.mesh] * bool(args.mesh) + ["--fsdp"] * args.fsdp
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
      return {"error": lines[-1][:300]}
    with open(path) as f:
      return json.load(f)


def paired(args, keys: list[str]) -> dict:
  """Each JAX training row against its frozen bound in one process, their steps alternating
  (bound, row, bound, row, ...): a slow spell of a shared machine then slows both sides of
  every ratio. Returns, per row, the median of the adjacent ratios and all of them."""
  import jax
  s = Shape(**SIZES[args.size])
  built = {}
  for key in keys:
    layers, name = key.split("/")
    if name in TRAIN_ROWS and f"{layers}/frozen_bound" in keys:
      step, row_args, _ = jax_row(name, s, scan=layers == "scan", remat=args.remat,
                                  abstract=False)
      built[key] = [step.lower(*row_args).compile(), row_args]

  def timed(key) -> float:
    compiled, (frozen, state, batch) = built[key]
    t0 = time.perf_counter()
    state, value = compiled(frozen, state, batch)  # the state is donated: carry it on
    jax.block_until_ready((state, value))
    built[key][1] = (frozen, state, batch)
    return time.perf_counter() - t0

  rows = [k for k in built if not k.endswith("/frozen_bound")]
  for _ in range(args.warmup):
    for key in built:
      timed(key)
  ratios = {key: [] for key in rows}
  for _ in range(args.iters):
    for key in rows:
      bound = timed(key.split("/")[0] + "/frozen_bound")
      ratios[key].append(timed(key) / bound)
  return {key: {"ratio_to_bound": statistics.median(r), "ratios": r}
          for key, r in ratios.items()}


def median_round(runs: list[dict]) -> dict:
  """The round with the median step time (the lower one of an even count), with every
  round's time beside it; a row without a step time (inference, an error) keeps its last."""
  timed = sorted((r for r in runs if "ms_per_step" in r), key=lambda r: r["ms_per_step"])
  if not timed:
    return runs[-1]
  return {**timed[(len(timed) - 1) // 2],
          "ms_per_step_rounds": [r["ms_per_step"] for r in runs if "ms_per_step" in r]}


def gib(n) -> str:
  return f"{n / 2**30:.2f}" if n else "-"


def summarize(results: dict, layer_modes: list[str]) -> dict:
  """Ratios against each layer mode's frozen bound, qwix and PEFT compiled."""
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


DESCRIPTIONS = {
    "frozen_bound": "frozen bound: backprop through every frozen layer, no weight gradient",
    "lora": "**LoRA with lora_jax** (`LoraConfig` → `analyze` → `init` → `train_step`)",
    "merged": "W + s·A@B formed each step, autodiff (what LoRA avoids)",
    "full": "full fine-tuning",
    "qwix": "LoRA with qwix (`qwix.apply_lora_to_model`, same Flax model)",
    "peft_eager": "PyTorch: transformers Llama + PEFT LoRA, eager",
    "peft_compiled": "PyTorch: transformers Llama + PEFT LoRA, `torch.compile`",
}


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


def versions() -> dict:
  out = {}
  for name in ("jax", "flax", "optax", "qwix", "torch", "peft", "transformers"):
    if importlib.util.find_spec(name) is not None:
      try:
        from importlib.metadata import version
        out[name] = version(name)
      except Exception:  # noqa: BLE001  a package without metadata
        out[name] = None
  return out


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
  parser.add_argument("--json", default=None, help="path of the JSON file to write")
  parser.add_argument("--layers", default="scan",
                      help="comma-separated layer stacks to measure: scan, unroll (default scan)")
  parser.add_argument("--rows", default=",".join(TRAIN_ROWS + TORCH_ROWS + ("infer",)),
                      help="comma-separated rows (default all; missing packages are skipped)")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--paired", action="store_true",
                      help="also time each JAX training row against the frozen bound in one "
                           "process, steps alternating (ratios robust to a noisy machine)")
  parser.add_argument("--rounds", type=int, default=1,
                      help="run the rows this many times, interleaved, and keep each row's "
                           "median round (for noisy, shared machines)")
  parser.add_argument("--remat", action="store_true",
                      help="rematerialize each layer in the backward pass (gradient checkpointing)")
  parser.add_argument("--compile-only", action="store_true",
                      help="compile and report XLA's memory estimate without running")
  parser.add_argument("--mesh", default=None,
                      help='a (data x model) device mesh, e.g. "4x2": base tensor-parallel over '
                           '"model", batch over "data" (the lora_jax rows only)')
  parser.add_argument("--fsdp", action="store_true",
                      help="with --mesh: also shard each kernel's other axis over data (FSDP)")
  parser.add_argument("--markdown", metavar="JSON", default=None,
                      help="print the README table of a written report and exit")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  parser.add_argument("--one-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
  for layers in args.layers.split(","):
    if layers not in ("scan", "unroll"):
      parser.error(f"--layers: expected scan and/or unroll, got {layers!r}")
  return args


def main(argv=None):
  args = parse(argv)
  if args.markdown:
    with open(args.markdown) as f:
      print(markdown(json.load(f)))
    return
  if args.one:
    with open(args.one_out, "w") as f:
      json.dump(run_one(args), f)
    return
  try:
    keys = planned(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  import jax
  for key in [k for k in keys if not available(k.split("/")[1])]:
    print(f"{key}: skipped (package not installed)", flush=True)
  keys = [k for k in keys if available(k.split("/")[1])]
  runs = {key: [] for key in keys}
  for round_ in range(args.rounds):  # interleaved: a slow spell of the machine hits every row
    for key in keys:
      print(f"{key} ..." + (f" (round {round_ + 1} of {args.rounds})" * (args.rounds > 1)),
            flush=True)
      runs[key].append(spawn(key, args))
  results = {key: median_round(r) for key, r in runs.items()}
  layer_modes = args.layers.split(",")
  summary = summarize(results, layer_modes)
  print_table(results)
  alternating = {}
  if args.paired and not (args.mesh or args.compile_only):
    alternating = paired(args, keys)
    for key, v in alternating.items():
      print(f"{key}: {v['ratio_to_bound']:.3f} x the frozen bound, steps alternating "
            f"(median of {len(v['ratios'])})")
  for layers, v in summary.items():
    print(f"{layers}: " + ", ".join(f"{k} {x:.3f}" if isinstance(x, float) else f"{k} {x}"
                                    for k, x in v.items()))
  report = {"size": args.size, "shape": dataclasses.asdict(Shape(**SIZES[args.size])),
            "layers": layer_modes, "remat": args.remat, "compile_only": args.compile_only,
            "mesh": args.mesh, "fsdp": args.fsdp, "device_count": jax.device_count(),
            "rank": RANK, "alpha": ALPHA, "targets": list(PROJECTIONS), "dtype": "bfloat16",
            "device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "versions": versions(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds,
            "summary": summary, "rows": results, "paired": alternating}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
