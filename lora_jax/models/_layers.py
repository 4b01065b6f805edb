"""Pieces the reference models share: a layer stack (scanned or unrolled) and attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def layer_stack(block: type[nn.Module], config, num_layers: int, name: str, x, *args,
                per_layer=None):
  """Runs ``num_layers`` blocks over ``x``.

  With ``config.scan_layers`` the blocks run under ``nn.scan`` and their kernels are stacked
  with a leading layer axis, ``{name}/{module}/kernel: (layers, in, out)``; otherwise each layer
  is its own module, ``{name}_{i}/{module}/kernel: (in, out)``.

  ``per_layer`` (optional): a pytree of arrays with a leading layer axis (a key-value cache);
  layer i receives its slice as the last argument and returns ``(x, out_i)``; the stacked outs
  come back as ``(x, outs)``.
  """
  if config.remat:
    block = nn.remat(block)
  if not config.scan_layers:
    outs = []
    for i in range(num_layers):
      layer = block(config, name=f"{name}_{i}")
      if per_layer is None:
        x = layer(x, *args)
      else:
        x, out = layer(x, *args, jax.tree.map(lambda a, i=i: a[i], per_layer))
        outs.append(out)
    return x if per_layer is None else (x, jax.tree.map(lambda *a: jnp.stack(a), *outs))
  body = nn.scan(_Unwrap.wrap(block, per_layer is not None), variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True}, length=num_layers)
  (x, _), outs = body(config, name=name)((x, args), per_layer)
  return x if per_layer is None else (x, outs)


class _Unwrap:
  """Builds a scan body whose parameters sit directly under the stack's name."""

  @staticmethod
  def wrap(block, sliced: bool = False):
    class Body(block):
      def __call__(self, carry, xs):
        x, args = carry
        if not sliced:
          return (super().__call__(x, *args), args), None
        x, out = super().__call__(x, *args, xs)
        return (x, args), out

    Body.__name__ = block.__name__
    return Body


def attention(q, k, v, *, mask=None, is_causal=False):
  """Scaled dot-product attention, (batch, seq, heads, head_dim); K/V may have fewer heads
  (grouped-query attention)."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)


def padding_mask(attention_mask):
  """(batch, seq) of 1/0 -> a boolean mask broadcastable to (batch, heads, q, k)."""
  return (attention_mask[:, None, None, :] > 0)


def gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def positions(batch: int, seq: int, offset: int = 0):
  return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None] + offset, (batch, seq))
