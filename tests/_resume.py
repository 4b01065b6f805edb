"""Training phases for the resume test, each run in its own process.

  python tests/_resume.py DIR straight N   2N steps, writes DIR/straight.npz
  python tests/_resume.py DIR first N      N steps, saves a checkpoint in DIR/ckpt
  python tests/_resume.py DIR second N     restores DIR/ckpt, N more steps, writes DIR/resumed.npz

A tiny reference Llama with LoRA dropout (a key folded from the step) and batches drawn from the
data position, so the whole run is a function of (checkpoint, step, position).
"""

import pathlib
import sys

import jax
import numpy as np
import optax

import lora_jax
from lora_jax import checkpoint
from lora_jax.models import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
LORA = lora_jax.LoraConfig(targets="(q|v|down)_proj", rank=4, alpha=8.0, dropout=0.1)
BATCH, SEQ = 4, 8


def setup():
  model = LlamaForCausalLM(CONFIG)
  tokens = np.zeros((BATCH, SEQ), np.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  uses = lora_jax.analyze(lambda p, x: model.apply({"params": p}, x), params, tokens)
  adapters = lora_jax.init(LORA, params, key=jax.random.key(1), uses=uses)
  return model, params, adapters


def batch_at(position: int):
  t = jax.random.randint(jax.random.fold_in(jax.random.key(2), position), (BATCH, SEQ + 1), 0,
                         CONFIG.vocab_size)
  return {"inputs": t[:, :-1], "targets": t[:, 1:]}


def run(model, params, adapters, opt_state, optimizer, start: int, n: int):
  def loss(p, b):
    logits = model.apply({"params": p}, b["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]).mean()

  step = lora_jax.train_step(loss, optimizer)
  for i in range(start, start + n):
    out = step(params, adapters, opt_state, batch_at(i),
               key=jax.random.fold_in(jax.random.key(3), i))
    adapters, opt_state = out.adapters, out.opt_state
  return adapters, opt_state


def write(path, adapters, opt_state):
  leaves = jax.tree_util.tree_leaves((adapters, opt_state))
  np.savez(path, *[np.asarray(x) for x in leaves])


def main(directory: str, phase: str, n: int):
  directory = pathlib.Path(directory)
  model, params, adapters = setup()
  optimizer = optax.adamw(1e-2)
  opt_state = optimizer.init(adapters)
  if phase == "straight":
    adapters, opt_state = run(model, params, adapters, opt_state, optimizer, 0, 2 * n)
    write(directory / "straight.npz", adapters, opt_state)
  elif phase == "first":
    adapters, opt_state = run(model, params, adapters, opt_state, optimizer, 0, n)
    checkpoint.save(directory / "ckpt", n, adapters, config=LORA, base=params,
                    opt_state=opt_state, data_position=n, base_name="tiny-llama")
  elif phase == "second":
    r = checkpoint.restore(directory / "ckpt", base=params,
                           opt_state=jax.eval_shape(optimizer.init, adapters))
    adapters, opt_state = run(model, params, r.adapters, r.opt_state, optimizer,
                              r.data_position, n)
    write(directory / "resumed.npz", adapters, opt_state)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
