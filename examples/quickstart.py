"""The README's quickstart: LoRA on a small Flax model, trained, merged and checked.

Run it with ``python examples/quickstart.py``; ``tests/test_readme.py`` checks that the README
shows exactly this code and that it runs.
"""
# --- quickstart (the README shows the code below) ---
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(256, name="fc1")(x))
    x = nn.relu(nn.Dense(256, name="fc2")(x))
    return nn.Dense(1, name="head")(x)


model = MLP()
x = jax.random.normal(jax.random.key(0), (512, 16))
y = jnp.sin(x @ jnp.linspace(-1.0, 1.0, 16))[:, None]
params = model.init(jax.random.key(1), x)  # stands in for pretrained weights: stays frozen

config = lora_jax.LoraConfig(targets=["fc1", "fc2"], rank=8, alpha=16)
print(lora_jax.plan(config, params))  # matched kernels, shapes, ranks and PEFT-style counts
adapters = lora_jax.init(config, params, key=jax.random.key(2))  # A random, B = 0


def loss_fn(params, batch):  # written against ordinary params
  return jnp.mean((model.apply(params, batch[0]) - batch[1]) ** 2)


optimizer = optax.adam(3e-3)
step = lora_jax.train_step(loss_fn, optimizer)  # jitted; gradients for A and B only
opt_state = optimizer.init(adapters)
loss_before = loss_fn(params, (x, y))
for _ in range(300):
  adapters, opt_state, loss, _ = step(params, adapters, opt_state, (x, y))
print(f"loss {loss_before:.4f} -> {loss:.2e}")

merged = lora_jax.merge(params, adapters)  # plain params for inference: W + s·A@B
y_lora = lora_jax.lora(model.apply)(params, adapters, x)  # factored, unmerged
gap = float(jnp.max(jnp.abs(model.apply(merged, x) - y_lora)))
print(f"max |merged - unmerged| = {gap:.2e}")
