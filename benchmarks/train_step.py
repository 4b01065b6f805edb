"""Training-step speed and memory: LoRA through lora_jax against the frozen bound and its peers.

Shaped like nanoGPT's bench.py: settings at the top, warm-up, timed steps (one helper,
``time_steps``, waiting on each with ``jax.block_until_ready`` or CUDA's synchronize), compile
time reported apart, median of many steps, JSON out. Rows are builders registered by name in
``ROWS`` (``@row``); the table, summary and markdown are ``report.py``'s. The model
is the project's reference Llama (``lora_jax.models.LlamaForCausalLM``, Flax linen, bf16), with
its layers under ``nn.scan`` (stacked kernels) and/or unrolled (a Python loop); LoRA rank 16,
alpha 32 on all seven projections (shared/docs/BENCHMARKS.md's recipe). Each row runs in its
own process, so a row's peak memory is its own.

Training rows, all on the same model, batch and AdamW:
  frozen_bound  backprop through every frozen layer (gradient w.r.t. the input embeddings): no
                adapters, no weight gradient. No LoRA step can be faster.
  lora          lora_jax's public path: LoraConfig -> analyze -> init -> train_step (its
                defaults: product="auto", siblings grouped, cheap inputs recomputed).
  lora_autodiff / lora_factored / lora_merged_weight / lora_siblings
                one change at a time: autodiff of the factored form (earlier versions), the
                hand-written backward, W' = W + s·A@B formed, + siblings grouped; nothing
                recomputed in any of them (``lora`` adds that).
  dora          the same with kind="dora": DoRA's magnitudes, the column norms factored.
  pissa         lora with init="pissa": the principal factors in A, B; the residual as the base.
  olora         the same with init="olora" (QR factors).
  merged        W + s·A@B formed each step and differentiated by autodiff (what LoRA avoids).
  full          full fine-tuning.
  qlora_nf4     lora with the frozen projections in NF4 (lora_jax.quant), dequantized per layer.
  qlora_int8    the same in int8 (per-output-channel scales).
  qwix          qwix.apply_lora_to_model on the same Flax model (if qwix is installed).
  qwix_qlora_nf4  qwix's QLoRA (NF4 base by qwix.quantize_params; unrolled layers only).
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
  python benchmarks/train_step.py --size 1b --layers unroll,scan --paired \
      --rows frozen_bound,lora,merged,full,qwix,peft_eager,peft_compiled \
      --json benchmarks/results/train_step_1b_gpu.json                 # the README's GPU table
  python benchmarks/readme_table.py benchmarks/results/train_step_1b_gpu.json   # written there
  python benchmarks/train_step.py --size 1b --compile-only --remat --rows frozen_bound,lora
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:  # report.py beside this file, also when this file is loaded by path
  sys.path.insert(0, _HERE)
import report  # noqa: E402

SIZES = {  # shared/docs/BENCHMARKS.md: "cpu" is its 2-core recipe, "1b" its H100 shape
    "cpu": dict(d=512, layers=4, heads=8, ffn=1408, vocab=8000, seq=256, batch=8),
    "1b": dict(d=2048, layers=16, heads=16, ffn=5632, vocab=32000, seq=1024, batch=8),
    "tiny": dict(d=64, layers=2, heads=4, ffn=128, vocab=256, seq=32, batch=2),  # for tests
}
RANK, ALPHA, LR = 16, 32.0, 1e-4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = r"(q|k|v|o|gate|up|down)_proj"
INFER_BATCHES = (1, 32)
TORCH = ("torch", "peft", "transformers")  # the PyTorch rows' packages


@dataclasses.dataclass(frozen=True)
class Shape:
  d: int
  layers: int
  heads: int
  ffn: int
  vocab: int
  seq: int
  batch: int


# ---------------------------------------------------------------------------- the registry

ROWS: dict[str, Callable] = {}  # row name -> builder, in registration order (--rows' default)


def row(name: str, *, kind: str = "train", needs: tuple[str, ...] = (), sharded: bool = False):
  """Registers a row's builder as ``ROWS[name]``, recording on it:

  kind: "train", a JAX training row: ``build(x: Setup)`` returns (jitted ``step(frozen, state,
    batch) -> (state, value)``, its args ``(frozen, state, batch)``, the trainable count), timed
    by ``measure_jax`` (and ``paired``); "torch" (run once, not per layer stack) or "infer":
    a row that times itself, ``build(s: Shape, *, scan, warmup, iters) -> result dict``. Only
    "train" rows run under --compile-only.
  needs: the optional packages the row imports; without one it is skipped.
  sharded: whether the row runs under --mesh.
  """
  def register(build: Callable) -> Callable:
    build.kind, build.needs, build.sharded = kind, needs, sharded
    ROWS[name] = build
    return build
  return register


def available(name: str) -> bool:
  """Whether the packages row ``name`` needs are installed."""
  return all(importlib.util.find_spec(m) is not None for m in ROWS[name].needs)


# ---------------------------------------------------------------------------- timing


def time_steps(run_step: Callable[[], Any], *, warmup: int, iters: int,
               sync: Callable[[Any], Any]) -> list[float]:
  """Calls ``run_step()`` ``warmup`` times, then ``iters`` times timed; ``sync`` takes a step's
  result and blocks until it is ready (``jax.block_until_ready``; CUDA's synchronize for
  torch). Returns the seconds of each timed step."""
  for _ in range(warmup):
    sync(run_step())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    sync(run_step())
    times.append(time.perf_counter() - t0)
  return times


def step_times(times: list[float]) -> dict:
  """The report's step times: their median and all of them, in milliseconds."""
  return {"ms_per_step": 1e3 * statistics.median(times), "ms_all": [1e3 * t for t in times]}


def carried(compiled, args) -> Callable[[], Any]:
  """``compiled(frozen, state, batch)`` as a step without arguments that carries its (donated)
  state on to the next call; the latest ``(state, value)`` stays in ``.out``."""
  frozen, state, batch = args

  def run_step():
    run_step.out = compiled(frozen, run_step.out[0], batch)
    return run_step.out
  run_step.out = (state, None)
  return run_step


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
  """Compiles ``step`` for ``args`` (the time apart, XLA's memory estimate), then times it:
  the median step, the last loss and the device's peak."""
  import jax
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  result = {"compile_s": time.perf_counter() - t0, **xla_memory(compiled)}
  if compile_only:
    return result
  run_step = carried(compiled, args)
  times = time_steps(run_step, warmup=warmup, iters=iters, sync=jax.block_until_ready)
  return {**result, **step_times(times), "loss": float(run_step.out[1]),
          "peak_bytes": device_peak_bytes()}


# ---------------------------------------------------------------------------- JAX training rows


def reference_llama(s: Shape, *, scan: bool, remat: bool):
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


def n_params(tree) -> int:
  import jax
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every JAX training row shares: the model, its params (shapes only under
  --compile-only), one batch of random tokens and AdamW."""

  model: Any
  params: Any
  batch: dict
  optimizer: Any
  abstract: bool

  def apply(self, params, inputs):
    return self.model.apply({"params": params}, inputs)

  def loss(self, params, batch):
    return cross_entropy(self.apply(params, batch["inputs"]), batch["targets"])

  def descend(self, loss: Callable) -> Callable:
    """``step(frozen, state, batch) -> (state, value)``: autodiff of ``loss(trained, frozen,
    batch)`` w.r.t. the trained tree, then an AdamW update; ``state`` is (trained, opt_state)."""
    import jax
    import optax

    def step(frozen, state, b):
      value, grads = jax.value_and_grad(loss)(state[0], frozen, b)
      updates, opt_state = self.optimizer.update(grads, state[1], state[0])
      return (optax.apply_updates(state[0], updates), opt_state), value
    return step

  def train(self, step: Callable, frozen, trained, count: int):
    """A training row: (``step`` jitted, donating its state; its args; the trainable count)."""
    import jax
    state = (trained, self.optimizer.init(trained))
    state = jax.eval_shape(lambda: state) if self.abstract else state
    return jax.jit(step, donate_argnums=1), (frozen, state, self.batch), count


def setup(s: Shape, *, scan: bool, remat: bool, abstract: bool) -> Setup:
  """The reference Llama of shape ``s``, its params (``jax.eval_shape``'s with ``abstract``),
  a batch and AdamW."""
  import jax
  import optax
  model = reference_llama(s, scan=scan, remat=remat)
  tokens = jax.random.randint(jax.random.key(2), (s.batch, s.seq + 1), 0, s.vocab)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  make = lambda: model.init(jax.random.key(0), batch["inputs"])["params"]  # noqa: E731
  params = jax.eval_shape(make) if abstract else jax.jit(make)()
  return Setup(model, params, batch, optax.adamw(LR), abstract)


def lora_adapters(x: Setup, *, dora: bool = False, init: str = "kaiming_uniform"):
  """lora_jax's base to train on (the residual for PiSSA / OLoRA, else the params), its
  adapters on the seven projections (DoRA's with ``dora``) and the trainable count."""
  import jax

  import lora_jax
  config = lora_jax.LoraConfig(targets=TARGETS, rank=RANK, alpha=ALPHA,
                               kind="dora" if dora else "lora", init=init)
  uses = lora_jax.analyze(x.apply, x.params, x.batch["inputs"])
  if x.abstract:  # shapes only: the residual and the factors have lora's shapes, so the
    config = dataclasses.replace(config, init="gaussian")  # compiled step is the same
  base, adapters = lora_jax.init_with_base(config, x.params, key=jax.random.key(1), uses=uses)
  return base, adapters, lora_jax.count(base, adapters).trainable


@row("frozen_bound", sharded=True)
def frozen_bound(x: Setup):
  """Backprop through every frozen layer (gradient w.r.t. the input embeddings): no adapters,
  no weight gradient. No LoRA step can be faster."""
  import jax
  import jax.numpy as jnp

  def step(frozen, state, b):
    h = frozen["model"]["embed_tokens"]["embedding"][b["inputs"]]
    g = jax.grad(lambda h: cross_entropy(
        x.model.apply({"params": frozen}, None, inputs_embeds=h), b["targets"]))(h)
    return state, jnp.sum(g.astype(jnp.float32))  # the gradient's sum: nothing is dead
  return jax.jit(step), (x.params, jnp.zeros(()), x.batch), 0


@row("lora", sharded=True)
def lora(x: Setup, *, dora: bool = False, init: str = "kaiming_uniform",
         product: str = "auto", siblings: bool = True, recompute_inputs: bool = True):
  """lora_jax's public path: LoraConfig -> analyze -> init -> train_step."""
  import lora_jax
  base, adapters, count = lora_adapters(x, dora=dora, init=init)
  lora_step = lora_jax.train_step(x.loss, x.optimizer, jit=False, product=product,
                                  siblings=siblings, recompute_inputs=recompute_inputs)

  def step(frozen, state, b):
    out = lora_step(frozen, state[0], state[1], b)
    return (out.adapters, out.opt_state), out.loss
  return x.train(step, base, adapters, count)


@row("lora_autodiff")
def lora_autodiff(x: Setup):
  """lora as earlier versions ran it: ``product="autodiff"``, nothing recomputed."""
  return lora(x, product="autodiff", recompute_inputs=False)


@row("lora_factored")
def lora_factored(x: Setup):
  """lora with ``product="factored"``: the hand-written backward, residuals x and x@A;
  each product on its own, nothing recomputed."""
  return lora(x, product="factored", siblings=False, recompute_inputs=False)


@row("lora_merged_weight")
def lora_merged_weight(x: Setup):
  """lora with ``product="merged_weight"``: W' = W + s·A@B formed for the forward and dx;
  each product on its own, nothing recomputed."""
  return lora(x, product="merged_weight", siblings=False, recompute_inputs=False)


@row("lora_siblings")
def lora_siblings(x: Setup):
  """lora's defaults but ``recompute_inputs=False``: "auto" products, siblings grouped."""
  return lora(x, recompute_inputs=False)


@row("dora")
def dora(x: Setup):
  """DoRA through lora_jax (``kind="dora"``): the column norms of W + s·A@B from the
  factored expansion, no dense sum."""
  return lora(x, dora=True)


@row("pissa")
def pissa(x: Setup):
  """PiSSA through lora_jax (``init="pissa"``, ``init_with_base``): the same product as lora's
  on the residual base, with nonzero B from the first step."""
  return lora(x, init="pissa")


@row("olora")
def olora(x: Setup):
  """OLoRA through lora_jax (``init="olora"``): the QR factors, the residual as the base."""
  return lora(x, init="olora")


@row("merged", sharded=True)
def merged(x: Setup):
  """W + s·A@B formed each step and differentiated by autodiff (what LoRA avoids)."""
  import lora_jax
  _, adapters, count = lora_adapters(x)
  step = x.descend(lambda a, frozen, b: x.loss(lora_jax.merge(frozen, a), b))
  return x.train(step, x.params, adapters, count)


@row("full", sharded=True)
def full(x: Setup):
  """Full fine-tuning: the base is the trained tree."""
  step = x.descend(lambda params, _, b: x.loss(params, b))
  return x.train(step, None, x.params, n_params(x.params))


def qlora(x: Setup, format: str):
  """lora_jax's LoRA on the seven projections kept in ``format`` (lora_jax.quant)."""
  import jax

  import lora_jax
  from lora_jax import quant
  uses = lora_jax.analyze(x.apply, x.params, x.batch["inputs"])
  to = lambda p: quant.quantize(p, format, targets=TARGETS, uses=uses)  # noqa: E731
  frozen = jax.eval_shape(to, x.params) if x.abstract else jax.jit(to)(x.params)
  return lora(dataclasses.replace(x, params=frozen))


@row("qlora_nf4")
def qlora_nf4(x: Setup):
  """QLoRA: the frozen projections in NF4 (blocks of 64, float32 absmax), dequantized per
  layer inside the step; adapters as in ``lora``."""
  return qlora(x, "nf4")


@row("qlora_int8")
def qlora_int8(x: Setup):
  """The frozen projections in int8 with per-output-channel scales; adapters as in ``lora``."""
  return qlora(x, "int8")


@row("qwix", needs=("qwix",))
def qwix_lora(x: Setup):
  """qwix.apply_lora_to_model on the same Flax model, its LoRA params trained."""
  import flax.traverse_util as tu
  import jax
  import qwix
  qmodel = qwix.apply_lora_to_model(
      x.model, qwix.LoraProvider(module_path=".*(" + "|".join(PROJECTIONS) + ")", rank=RANK,
                                 alpha=ALPHA))
  qinit = lambda: qmodel.init(jax.random.key(1), x.batch["inputs"])["params"]  # noqa: E731
  flat = tu.flatten_dict(jax.eval_shape(qinit) if x.abstract else jax.jit(qinit)())
  is_lora = lambda k: k[-1].endswith(("_lora_a", "_lora_b"))  # noqa: E731
  lora_params = tu.unflatten_dict({k: v for k, v in flat.items() if is_lora(k)})

  def qloss(lp, frozen, b):
    tree = tu.unflatten_dict({**tu.flatten_dict(frozen), **tu.flatten_dict(lp)})
    return cross_entropy(qmodel.apply({"params": tree}, b["inputs"]), b["targets"])
  return x.train(x.descend(qloss), x.params, lora_params, n_params(lora_params))


@row("qwix_qlora_nf4", needs=("qwix",))
def qwix_qlora(x: Setup):
  """qwix's QLoRA: LoraProvider(weight_qtype="nf4", tile_size=64), the base quantized by
  qwix.quantize_params (one 4-bit value per byte), its LoRA params trained. Unrolled layers
  only: qwix 0.1.8's PTQ tiles a scanned (stacked) kernel along its layer axis and fails."""
  import flax.traverse_util as tu
  import jax
  import jax.numpy as jnp
  import qwix
  if "layers" in x.params["model"]:
    raise ValueError("qwix 0.1.8 cannot quantize scanned (stacked) kernels; use --layers unroll")
  qmodel = qwix.apply_lora_to_model(
      x.model, qwix.LoraProvider(module_path=".*(" + "|".join(PROJECTIONS) + ")", rank=RANK,
                                 alpha=ALPHA, weight_qtype="nf4", tile_size=64))
  flat = tu.flatten_dict(jax.eval_shape(
      lambda: qmodel.init(jax.random.key(1), x.batch["inputs"])["params"]))
  is_lora = lambda k: k[-1].endswith(("_lora_a", "_lora_b"))  # noqa: E731
  base = tu.unflatten_dict({k: v for k, v in flat.items() if not is_lora(k)})
  lora_abs = {k: v for k, v in flat.items() if is_lora(k)}
  if x.abstract:
    frozen, lora_params = base, tu.unflatten_dict(lora_abs)
  else:  # A small random, B zero (as qwix initializes them)
    frozen = qwix.quantize_params(x.params, base)
    lora_params = tu.unflatten_dict({
        k: (jax.random.normal(jax.random.key(3), v.shape, v.dtype) * 0.01
            if k[-1].endswith("_lora_a") else jnp.zeros(v.shape, v.dtype))
        for k, v in lora_abs.items()})

  def qloss(lp, frozen, b):
    tree = tu.unflatten_dict({**tu.flatten_dict(frozen), **tu.flatten_dict(lp)})
    return cross_entropy(qmodel.apply({"params": tree}, b["inputs"]), b["targets"])
  return x.train(x.descend(qloss), frozen, lora_params, n_params(lora_params))


def place(args, *, mesh, fsdp: bool):
  """Puts a row's (frozen, state, batch) on ``mesh``: the base by the reference Llama's
  tensor-parallel (or FSDP) layout, adapters following it, the batch split over "data"."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lora_jax import sharding
  from lora_jax.models import llama

  frozen, state, batch = args
  trained = frozen if frozen is not None else state[0]
  rules = llama.FAMILY.partition_rules
  specs = sharding.named_shardings(
      sharding.tensor_parallel_specs(trained, rules, mesh=mesh, fsdp=fsdp), mesh)
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


# ---------------------------------------------------------------------------- PyTorch rows


def peft_row(s: Shape, *, compile: bool, warmup: int, iters: int) -> dict:
  """transformers LlamaForCausalLM (SDPA) + PEFT LoRA (rank 16, alpha 32, seven projections),
  eager or under ``torch.compile``; its first step (the compile) timed apart."""
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
  forward = torch.compile(model) if compile else model
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
    step.loss = loss
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  first_s = time_steps(step, warmup=0, iters=1, sync=sync)[0]
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = time_steps(step, warmup=max(0, warmup - 1), iters=iters, sync=sync)
  return {"compile_s": first_s, **step_times(times), "loss": float(step.loss),
          "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
          "trainable": sum(p.numel() for p in trainable), "torch": torch.__version__,
          "peft": peft.__version__, "transformers": transformers.__version__}


@row("peft_eager", kind="torch", needs=TORCH)
def peft_eager(s: Shape, *, scan: bool, warmup: int, iters: int) -> dict:
  """transformers Llama + PEFT LoRA, eager."""
  return peft_row(s, compile=False, warmup=warmup, iters=iters)


@row("peft_compiled", kind="torch", needs=TORCH)
def peft_compiled(s: Shape, *, scan: bool, warmup: int, iters: int) -> dict:
  """transformers Llama + PEFT LoRA under ``torch.compile``."""
  return peft_row(s, compile=True, warmup=warmup, iters=iters)


# ---------------------------------------------------------------------------- inference row


@row("infer", kind="infer")
def infer(s: Shape, *, scan: bool, warmup: int, iters: int) -> dict:
  """Forward only: base, merged and unmerged (transformed) model at batch 1 and 32."""
  import jax

  import lora_jax

  model = reference_llama(s, scan=scan, remat=False)
  params = jax.jit(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 8), int)))()
  params = params["params"]
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  config = lora_jax.LoraConfig(targets=TARGETS, rank=RANK, alpha=ALPHA)
  tokens = jax.numpy.zeros((1, s.seq), int)
  adapters = lora_jax.init(config, params, key=jax.random.key(1),
                           uses=lora_jax.analyze(apply, params, tokens))
  merged_params = jax.jit(lora_jax.merge)(params, adapters)
  routes = {"base": (jax.jit(apply), (params,)), "merged": (jax.jit(apply), (merged_params,)),
            "unmerged": (jax.jit(lora_jax.lora(apply)), (params, adapters))}
  out = {}
  for batch in INFER_BATCHES:
    x = jax.random.randint(jax.random.key(3), (batch, s.seq), 0, s.vocab)
    for route, (fn, args) in routes.items():
      forward = functools.partial(fn.lower(*args, x).compile(), *args, x)
      times = time_steps(forward, warmup=warmup, iters=iters, sync=jax.block_until_ready)
      ms = step_times(times)["ms_per_step"]
      out[f"{route}_b{batch}"] = {"ms": ms, "tokens_per_s": batch * s.seq / (ms / 1e3)}
    base = out[f"base_b{batch}"]["ms"]
    for route in ("merged", "unmerged"):
      out[f"{route}_b{batch}"]["ratio_to_base"] = out[f"{route}_b{batch}"]["ms"] / base
  return out


# ---------------------------------------------------------------------------- driver


def run_one(args) -> dict:
  """One row in this process (called by the driver in a subprocess)."""
  s = Shape(**SIZES[args.size])
  layers, name = args.one.split("/")
  build = ROWS[name]
  if build.kind == "train":
    step, row_args, trainable = build(setup(s, scan=layers == "scan", remat=args.remat,
                                            abstract=args.compile_only))
    if args.mesh:
      from lora_jax import sharding
      row_args = place(row_args, mesh=sharding.mesh(args.mesh), fsdp=args.fsdp)
    r = measure_jax(step, row_args, warmup=args.warmup, iters=args.iters,
                    compile_only=args.compile_only)
    r["trainable"] = trainable
  else:
    r = build(s, scan=layers == "scan", warmup=args.warmup, iters=args.iters)
  if "ms_per_step" in r:
    r["tokens_per_s"] = s.batch * s.seq / (r["ms_per_step"] / 1e3)
  r["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return r


def planned(args) -> list[str]:
  """The row keys ("<layers>/<row>", "torch/<row>") that --rows, --layers, --compile-only and
  --mesh ask for."""
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    raise ValueError(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
  out = []
  for layers in args.layers.split(","):
    out += [f"{layers}/{r}" for r in rows if ROWS[r].kind != "torch"]
  out += [f"torch/{r}" for r in rows if ROWS[r].kind == "torch"]
  if args.compile_only:  # compiled without running: the JAX training rows only
    out = [r for r in out if ROWS[r.split("/")[1]].kind == "train"]
  if args.mesh:  # the sharded rows: lora_jax's own; qwix, PEFT and inference run on one device
    out = [r for r in out if ROWS[r.split("/")[1]].sharded]
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
  every ratio. One row at a time beside its layer stack's bound: the GPU command's ten rows'
  params and states at once (about 26 GiB at the 1b size by XLA's CPU estimate) beside a full
  fine-tuning step's temporaries (53 GiB) would not fit the 60 GiB JAX takes of an 80 GB GPU.
  Returns, per row, the median of the adjacent ratios and all of them."""
  import jax
  s = Shape(**SIZES[args.size])

  def compiled(key):
    layers, name = key.split("/")
    step, row_args, _ = ROWS[name](setup(s, scan=layers == "scan", remat=args.remat,
                                         abstract=False))
    run_step = carried(step.lower(*row_args).compile(), row_args)
    time_steps(run_step, warmup=args.warmup, iters=0, sync=jax.block_until_ready)
    return run_step

  once = lambda run_step: time_steps(run_step, warmup=0, iters=1,  # noqa: E731
                                     sync=jax.block_until_ready)[0]
  out = {}
  for layers in dict.fromkeys(k.split("/")[0] for k in keys):
    rows = [k for k in keys if k.startswith(layers + "/") and not k.endswith("/frozen_bound")
            and ROWS[k.split("/")[1]].kind == "train"]
    if f"{layers}/frozen_bound" not in keys or not rows:
      continue
    bound = compiled(f"{layers}/frozen_bound")
    for key in rows:
      run_step, ratios = compiled(key), []
      for _ in range(args.iters):
        b = once(bound)
        ratios.append(once(run_step) / b)
      out[key] = {"ratio_to_bound": statistics.median(ratios), "ratios": ratios}
      del run_step  # its params and state leave the device before the next row's arrive
    del bound
  return out


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
  parser.add_argument("--rows", default=",".join(ROWS),
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
      print(report.markdown(json.load(f)))
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
  results = {key: report.median_round(r) for key, r in runs.items()}
  layer_modes = args.layers.split(",")
  summary = report.summarize(results, layer_modes)
  report.print_table(results)
  alternating = {}
  if args.paired and not (args.mesh or args.compile_only):
    alternating = paired(args, keys)
    report.print_paired(alternating)
  report.print_summary(summary)
  out = {"size": args.size, "shape": dataclasses.asdict(Shape(**SIZES[args.size])),
         "layers": layer_modes, "remat": args.remat, "compile_only": args.compile_only,
         "mesh": args.mesh, "fsdp": args.fsdp, "device_count": jax.device_count(),
         "rank": RANK, "alpha": ALPHA, "targets": list(PROJECTIONS), "dtype": "bfloat16",
         "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
         "backend": jax.default_backend(),
         "versions": versions(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
         "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds,
         "summary": summary, "rows": results, "paired": alternating}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
