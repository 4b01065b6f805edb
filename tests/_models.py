"""Small models in the three styles lora_jax supports, each with a float64 NumPy reference.

Every case gives ``fn(params, x)``, its params, an input, and ``reference(P, A, x)`` that
computes the same output in float64 from the base leaves ``P[path]`` and adapter factors
``A[path] = (a, b, scale)``, forming ``W + scale * a @ b`` by hand for each kernel.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

D, H, K, L = 16, 4, 8, 3  # model width, heads, head size, stacked layers


@dataclasses.dataclass
class Case:
  name: str
  fn: Callable
  params: object
  x: jax.Array
  reference: Callable


def merged(P, A, path):
  """float64 ``W + s·a@b`` for a kernel whose axes are (*stack, in, *out)."""
  w = P[path]
  if path not in A:
    return w
  a, b, s = A[path]
  stack = w.shape[: a.ndim - 2]
  ab = np.einsum("...ir,...ro->...io", a, b.reshape(*stack, b.shape[len(stack)], -1))
  return w + s * ab.reshape(w.shape)


def _x(dtype):
  return jax.random.normal(jax.random.key(7), (2, 5, D), jnp.float32).astype(dtype)


# ---- Flax linen ----------------------------------------------------------------------------

class LinenModel(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    opts = dict(dtype=self.dtype, param_dtype=self.dtype)
    h = jnp.tanh(nn.Dense(D, name="dense", **opts)(x))
    q = nn.DenseGeneral((H, K), name="query", **opts)(h)  # kernel (D, H, K)
    e = nn.Einsum((D, H, K), "btd,dhk->bthk", use_bias=False, name="einsum", **opts)(h)
    return q + e


def _linen_reference(P, A, x):
  h = np.tanh(x @ merged(P, A, "params/dense/kernel") + P["params/dense/bias"])
  q = np.einsum("btd,dhk->bthk", h, merged(P, A, "params/query/kernel")) + P["params/query/bias"]
  return q + np.einsum("btd,dhk->bthk", h, merged(P, A, "params/einsum/kernel"))


class LinenBlock(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(D, dtype=self.dtype, param_dtype=self.dtype, name="mlp")(x)), None


class LinenStack(nn.Module):
  """Layers under nn.scan (stacked kernels (L, D, D)) with remat, as large models are built."""

  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(nn.remat(LinenBlock), variable_axes={"params": 0},
                   split_rngs={"params": True}, length=L)
    return scan(self.dtype, name="layers")(x, None)[0]


def _stack_reference(P, A, x, prefix):
  w = merged(P, A, f"{prefix}/kernel")
  for layer in range(L):
    x = np.tanh(x @ w[layer] + P[f"{prefix}/bias"][layer])
  return x


def linen_case(dtype=jnp.float32):
  model, x = LinenModel(dtype), _x(dtype)
  return Case("linen", model.apply, model.init(jax.random.key(0), x), x, _linen_reference)


def linen_stack_case(dtype=jnp.float32):
  model, x = LinenStack(dtype), _x(dtype)
  ref = lambda P, A, x: _stack_reference(P, A, x, "params/layers/mlp")  # noqa: E731
  return Case("linen-scan", model.apply, model.init(jax.random.key(0), x), x, ref)


# ---- Flax NNX ------------------------------------------------------------------------------

class NnxModel(nnx.Module):
  def __init__(self, dtype, rngs):
    opts = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.dense = nnx.Linear(D, D, **opts)
    self.query = nnx.LinearGeneral(D, (H, K), **opts)
    self.einsum = nnx.Einsum("btd,dhk->bthk", (D, H, K), None, **opts)  # no bias

  def __call__(self, x):
    h = jnp.tanh(self.dense(x))
    return self.query(h) + self.einsum(h)


def _nnx_reference(P, A, x):
  h = np.tanh(x @ merged(P, A, "dense/kernel") + P["dense/bias"])
  q = np.einsum("btd,dhk->bthk", h, merged(P, A, "query/kernel")) + P["query/bias"]
  return q + np.einsum("btd,dhk->bthk", h, merged(P, A, "einsum/kernel"))


class NnxStack(nnx.Module):
  """Layers created with nnx.vmap (stacked kernels) and run with nnx.scan."""

  def __init__(self, dtype, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(D, D, dtype=dtype, param_dtype=dtype, rngs=rngs)

    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return jnp.tanh(layer(x))

    return body(x, self.layers)


def _nnx(make, dtype, name, reference):
  graphdef, state = nnx.split(make(dtype, nnx.Rngs(0)))
  fn = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
  return Case(name, fn, state, _x(dtype), reference)


def nnx_case(dtype=jnp.float32):
  return _nnx(NnxModel, dtype, "nnx", _nnx_reference)


def nnx_stack_case(dtype=jnp.float32):
  ref = lambda P, A, x: _stack_reference(P, A, x, "layers")  # noqa: E731
  return _nnx(NnxStack, dtype, "nnx-scan", ref)


# ---- plain JAX -----------------------------------------------------------------------------

def plain_fn(params, x):
  h = x @ params["proj"]["kernel"]

  def layer(h, p):
    return jnp.tanh(h @ p["kernel"] + p["bias"].reshape(1, 1, -1)), None

  h, _ = jax.lax.scan(layer, h, params["layers"])
  return jnp.einsum("btd,dhk->bthk", h, params["heads"]["kernel"])


def _plain_reference(P, A, x):
  h = _stack_reference(P, A, x @ merged(P, A, "proj/kernel"), "layers")
  return np.einsum("btd,dhk->bthk", h, merged(P, A, "heads/kernel"))


def plain_case(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  normal = lambda k, shape: (jax.random.normal(k, shape) / np.sqrt(D)).astype(dtype)  # noqa
  params = {"proj": {"kernel": normal(keys[0], (D, D))},
            "layers": {"kernel": normal(keys[1], (L, D, D)), "bias": normal(keys[2], (L, D))},
            "heads": {"kernel": normal(keys[3], (D, H, K))}}
  return Case("plain", plain_fn, params, _x(dtype), _plain_reference)


ALL_CASES = [linen_case, linen_stack_case, nnx_case, nnx_stack_case, plain_case]
