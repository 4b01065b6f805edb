"""Training-step time: LoRA through lora_jax against the frozen bound and full fine-tuning.

Shaped like nanoGPT's bench.py: settings at the top, warm-up, timed steps with
``jax.block_until_ready``, compile time reported apart, median of many steps, JSON out.
The model is a Llama-style decoder in plain JAX (RMSNorm, RoPE, causal attention, SwiGLU,
untied head) with its layers under ``lax.scan`` (stacked kernels), the plain-JAX recipe of
shared/docs/BENCHMARKS.md; LoRA on all seven projections.

Rows, all on the same model and batch:
  frozen_bound  backprop through every frozen layer (gradient w.r.t. the input embeddings):
                no adapters, no weight gradient. No LoRA step can be faster.
  lora          lora_jax's public path: LoraConfig -> init -> train_step (optax AdamW).
  merged        W + s·A@B formed each step and differentiated by autodiff (what LoRA avoids).
  full          full fine-tuning with AdamW.

Usage: python benchmarks/train_step.py --size cpu --out benchmarks/results/train_step_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import lora_jax

SIZES = {  # shared/docs/BENCHMARKS.md: "cpu" is its 2-core recipe, "1b" its H100 shape
    "cpu": dict(d=512, layers=4, heads=8, ffn=1408, vocab=8000, seq=256, batch=8),
    "1b": dict(d=2048, layers=16, heads=16, ffn=5632, vocab=32000, seq=1024, batch=8),
}
RANK, ALPHA = 16, 32
TARGETS = r"(q|k|v|o|gate|up|down)_proj"


@dataclasses.dataclass(frozen=True)
class Shape:
  d: int
  layers: int
  heads: int
  ffn: int
  vocab: int
  seq: int
  batch: int


def init_params(s: Shape, key, dtype=jnp.bfloat16):
  keys = iter(jax.random.split(key, 16))
  normal = lambda *shape: (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)  # noqa
  L, d, f = s.layers, s.d, s.ffn
  proj = lambda i, o: {"kernel": normal(L, i, o)}  # noqa: E731  stacked: (layers, in, out)
  return {
      "embed": {"embedding": normal(s.vocab, d)},
      "layers": {
          "attn": {"q_proj": proj(d, d), "k_proj": proj(d, d), "v_proj": proj(d, d),
                   "o_proj": proj(d, d)},
          "mlp": {"gate_proj": proj(d, f), "up_proj": proj(d, f), "down_proj": proj(f, d)},
          "input_norm": {"scale": jnp.ones((L, d), dtype)},
          "post_norm": {"scale": jnp.ones((L, d), dtype)},
      },
      "norm": {"scale": jnp.ones((d,), dtype)},
      "lm_head": {"kernel": normal(d, s.vocab)},
  }


def rms_norm(x, scale):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
  return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x):  # x: (batch, seq, heads, head_dim)
  half = x.shape[-1] // 2
  freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freq[None, :]  # (seq, half)
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def block(s: Shape, h, p):
  b, t, d = h.shape
  x = rms_norm(h, p["input_norm"]["scale"])
  split = lambda y: y.reshape(b, t, s.heads, d // s.heads)  # noqa: E731
  a = p["attn"]
  q, k, v = (split(x @ a[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj"))
  o = jax.nn.dot_product_attention(rope(q), rope(k), v, is_causal=True).reshape(b, t, d)
  h = h + o @ a["o_proj"]["kernel"]
  x = rms_norm(h, p["post_norm"]["scale"])
  m = p["mlp"]
  gated = jax.nn.silu(x @ m["gate_proj"]["kernel"]) * (x @ m["up_proj"]["kernel"])
  return h + gated @ m["down_proj"]["kernel"], None


def loss_from_embeddings(s: Shape, params, h, targets):
  h, _ = jax.lax.scan(lambda h, p: block(s, h, p), h, params["layers"])
  logits = rms_norm(h, params["norm"]["scale"]) @ params["lm_head"]["kernel"]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def make_loss(s: Shape):
  def loss(params, batch):
    h = params["embed"]["embedding"][batch["inputs"]]
    return loss_from_embeddings(s, params, h, batch["targets"])
  return loss


def steps(s: Shape, params, batch):
  """{name: (jitted step, initial state)} for every row."""
  loss = make_loss(s)
  optimizer = optax.adamw(1e-4)
  config = lora_jax.LoraConfig(targets=TARGETS, rank=RANK, alpha=ALPHA,
                               axes_pattern={"layers": "lio"})
  adapters = lora_jax.init(config, params, key=jax.random.key(1))

  @jax.jit
  def frozen_bound(state, batch):
    h = params["embed"]["embedding"][batch["inputs"]]
    g = jax.grad(lambda h: loss_from_embeddings(s, params, h, batch["targets"]))(h)
    return state, jnp.sum(g.astype(jnp.float32))  # return the gradient's sum: nothing is dead

  lora_step = lora_jax.train_step(loss, optimizer)

  @jax.jit
  def lora_row(state, batch):
    out = lora_step(params, state[0], state[1], batch)
    return (out.adapters, out.opt_state), out.loss

  @jax.jit
  def merged_row(state, batch):
    value, g = jax.value_and_grad(lambda a: loss(lora_jax.merge(params, a), batch))(state[0])
    updates, opt_state = optimizer.update(g, state[1], state[0])
    return (optax.apply_updates(state[0], updates), opt_state), value

  @jax.jit
  def full_row(state, batch):
    value, g = jax.value_and_grad(loss)(state[0], batch)
    updates, opt_state = optimizer.update(g, state[1], state[0])
    return (optax.apply_updates(state[0], updates), opt_state), value

  lora_state = (adapters, optimizer.init(adapters))
  return {
      "frozen_bound": (frozen_bound, None, 0),
      "lora": (lora_row, lora_state, lora_jax.count(params, adapters).trainable),
      "merged": (merged_row, lora_state, lora_jax.count(params, adapters).trainable),
      "full": (full_row, (params, optimizer.init(params)),
               sum(x.size for x in jax.tree_util.tree_leaves(params))),
  }


def measure(step, state, batch, *, warmup: int, iters: int) -> dict:
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, value = compiled(state, batch)
    jax.block_until_ready(value)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    state, value = compiled(state, batch)
    jax.block_until_ready((state, value))
    times.append(time.perf_counter() - t0)
  stats = jax.devices()[0].memory_stats() or {}
  return {"compile_s": compile_s, "ms_per_step": 1e3 * statistics.median(times),
          "ms_all": [1e3 * t for t in times], "peak_bytes": stats.get("peak_bytes_in_use")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
  parser.add_argument("--out", default=None, help="path of the JSON file to write")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--rows", default="frozen_bound,lora,merged,full")
  args = parser.parse_args()
  s = Shape(**SIZES[args.size])
  params = init_params(s, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (s.batch, s.seq + 1), 0, s.vocab)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  rows = steps(s, params, batch)
  results = {}
  for name in args.rows.split(","):
    step, state, trainable = rows[name]
    r = measure(step, state, batch, warmup=args.warmup, iters=args.iters)
    r["tokens_per_s"] = s.batch * s.seq / (r["ms_per_step"] / 1e3)
    r["trainable"] = trainable
    results[name] = r
  bound = results.get("frozen_bound", {}).get("ms_per_step")
  print(f"{'row':<14}{'ms/step':>10}{'tokens/s':>11}{'÷ bound':>9}{'compile s':>11}"
        f"{'trainable':>14}")
  for name, r in results.items():
    r["ratio_to_bound"] = r["ms_per_step"] / bound if bound else None
    ratio = f"{r['ratio_to_bound']:.3f}" if bound else "-"
    print(f"{name:<14}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>11,.0f}{ratio:>9}"
          f"{r['compile_s']:>11.1f}{r['trainable']:>14,d}")
  report = {"size": args.size, "shape": dataclasses.asdict(s), "rank": RANK, "alpha": ALPHA,
            "targets": TARGETS, "dtype": "bfloat16", "device": str(jax.devices()[0]),
            "backend": jax.default_backend(), "jax": jax.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "rows": results}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
