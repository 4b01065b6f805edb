"""The adapter tree: init, merge and unmerge (Hu et al. 2021, arXiv:2106.09685).

Layout, for a kernel W with axis roles such as ``"io"`` (Dense), ``"ioo"`` (DenseGeneral
query, (d, heads, head_dim)) or ``"lio"`` (a scanned stack, (layers, d, k)):

    a: (*stack, *in, rank)      b: (*stack, rank, *out)
    W' = W + scale * a @ b      (contracting the rank axis, stack axes batched)

The adapter tree mirrors the base tree's nesting, holding a ``LoraWeights`` at every
targeted kernel and nothing else, so optax, orbax and ``jax.tree_util`` see only A and B.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.targets import Target, leaves_by_path, listing, path_keys, resolve

_LETTERS = string.ascii_uppercase  # one subscript per kernel axis; "r" is the rank axis


@dataclasses.dataclass(frozen=True)
class LoraWeights:
  """The low-rank factors of one kernel.

  Attributes:
    a: (*stack, *in, rank), trained.
    b: (*stack, rank, *out), trained; zeros at init.
    scale: alpha / rank (or alpha / sqrt(rank) with rsLoRA); static, not trained.
    axes: the kernel's axis roles (``l`` stacked layer, ``i`` input, ``o`` output); static.
    dropout: dropout rate on the adapter branch's input; static.
  """

  a: jax.Array
  b: jax.Array
  scale: float
  axes: str
  dropout: float = 0.0

  @property
  def rank(self) -> int:
    return self.a.shape[-1]


jax.tree_util.register_dataclass(
    LoraWeights, data_fields=["a", "b"], meta_fields=["scale", "axes", "dropout"])


def _is_lora(x) -> bool:
  return isinstance(x, LoraWeights)


def flatten(adapters) -> dict[str, LoraWeights]:
  """``{'/'-joined path: LoraWeights}`` for an adapter tree."""
  flat = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_lora)[0]
  out = {}
  for key_path, leaf in flat:
    path = "/".join(path_keys(key_path))
    if not isinstance(leaf, LoraWeights):
      raise TypeError(f"adapters must hold only LoraWeights leaves (as made by lora_jax.init); "
                      f"found {type(leaf).__name__} at {path!r}.")
    out[path] = leaf
  return out


def _nest(flat: Mapping[tuple[str, ...], LoraWeights]) -> dict:
  tree: dict = {}
  for keys, value in flat.items():
    *parents, last = keys
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = value
  return tree


def factor_subscripts(roles: str, present=None) -> tuple[str, str]:
  """einsum subscripts of ``a`` and ``b`` for a kernel with axis ``roles``.

  ``present`` lists the original axes still there (a ``lax.scan`` slices stacked axes off).
  """
  present = range(len(roles)) if present is None else present
  stack = "".join(_LETTERS[j] for j, r in enumerate(roles) if r == "l" and j in present)
  ins = "".join(_LETTERS[j] for j, r in enumerate(roles) if r == "i")
  outs = "".join(_LETTERS[j] for j, r in enumerate(roles) if r == "o")
  return stack + ins + "r", stack + "r" + outs


def delta(a, b, *, scale: float, roles: str, axes=None,
          precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """``scale * a @ b`` laid out as the kernel axes ``axes`` (default: all, in order)."""
  axes = tuple(range(len(roles))) if axes is None else tuple(axes)
  a_sub, b_sub = factor_subscripts(roles, axes)
  w_sub = "".join(_LETTERS[j] for j in axes)
  return scale * jnp.einsum(f"{a_sub},{b_sub}->{w_sub}", a, b, precision=precision)


def add_delta(w, a, b, *, scale: float, roles: str, axes=None, sign: float = 1.0):
  """``w + sign * scale * a @ b``, summed in the wider dtype and cast back to ``w``'s."""
  dtype = jnp.promote_types(w.dtype, a.dtype)
  d = delta(a, b, scale=scale, roles=roles, axes=axes).astype(dtype)
  return (w.astype(dtype) + sign * d).astype(w.dtype)


def factor_shapes(target: Target) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shapes of ``a`` and ``b`` for ``target``."""
  dims = {r: [n for n, role in zip(target.shape, target.axes) if role == r] for r in "lio"}
  return ((*dims["l"], *dims["i"], target.rank), (*dims["l"], target.rank, *dims["o"]))


def _init_a(config: LoraConfig, target: Target, key) -> jax.Array:
  shape = factor_shapes(target)[0]
  if config.init == "gaussian":  # PEFT init_lora_weights="gaussian": std 1/r
    return jax.random.normal(key, shape, config.dtype) / target.rank
  # PEFT default: kaiming_uniform_(a=sqrt(5)) on lora_A (r, in), i.e. U(-1/sqrt(in), 1/sqrt(in)).
  bound = 1.0 / math.sqrt(target.in_features)
  return jax.random.uniform(key, shape, config.dtype, -bound, bound)


def init(config: LoraConfig, params, *, key: jax.Array, uses: Mapping | None = None) -> dict:
  """Builds the adapter tree for ``params``: A random, B zeros, so the model starts unchanged.

  Args:
    config: the LoraConfig.
    params: the base parameter pytree, concrete or abstract (only shapes are read).
    key: a PRNG key for A.
    uses: optional ``lora_jax.analyze(fn, params, ...)`` result, giving the axis roles of
      kernels with more than two axes.

  Returns:
    A nested dict mirroring ``params``' paths with a ``LoraWeights`` at each targeted kernel,
    e.g. ``{"params": {"Dense_0": {"kernel": LoraWeights(a=(4, 8), b=(8, 3), ...)}}}``.

  Raises:
    ValueError: as ``lora_jax.plan`` does for patterns, ranks and axis roles.
  """
  targets = resolve(config, params, uses=uses)
  key_paths = [path_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  keys_of = {"/".join(k): k for k in key_paths}  # keep keys whole, even ones holding a '/'
  flat = {}
  for t, k in zip(targets, jax.random.split(key, len(targets))):
    b = jnp.zeros(factor_shapes(t)[1], config.dtype)
    flat[keys_of[t.path]] = LoraWeights(a=_init_a(config, t, k), b=b, scale=t.scale,
                                        axes=t.axes, dropout=config.dropout)
  return _nest(flat)


def check_pair(path: str, w, lw: LoraWeights) -> None:
  """Raises ValueError unless ``lw``'s factors fit the kernel ``w``."""
  if not isinstance(lw.axes, str) or len(lw.axes) != len(w.shape):
    raise ValueError(f"adapter at {path!r} has axes {lw.axes!r}, which must be a string of one "
                     f"role per axis of the base kernel of shape {tuple(w.shape)}; rebuild the "
                     f"adapters with lora_jax.init on this base.")
  t = Target(path=path, shape=tuple(w.shape), dtype=w.dtype, axes=lw.axes, rank=lw.rank,
             alpha=0.0, scale=lw.scale)
  if factor_shapes(t) != (tuple(lw.a.shape), tuple(lw.b.shape)):
    raise ValueError(f"adapter at {path!r} (a {tuple(lw.a.shape)}, b {tuple(lw.b.shape)}, axes "
                     f"{lw.axes!r}) does not fit the base kernel of shape {tuple(w.shape)}; "
                     f"rebuild the adapters with lora_jax.init on this base.")


def match(base, adapters) -> dict[str, LoraWeights]:
  """The flat adapters, checked against ``base``: every path exists and every shape fits."""
  flat = flatten(adapters)
  leaves = leaves_by_path(base)
  missing = [p for p in flat if p not in leaves]
  if missing:
    raise ValueError(f"adapters hold paths that are not in the base tree: {listing(missing)}; "
                     f"base paths include {listing(leaves)}.")
  for path, lw in flat.items():
    check_pair(path, leaves[path], lw)
  return flat


def _apply(base, adapters, sign: float):
  flat = match(base, adapters)

  def update(key_path, w):
    lw = flat.get("/".join(path_keys(key_path)))
    if lw is None:
      return w
    out = add_delta(w, lw.a, lw.b, scale=lw.scale, roles=lw.axes, sign=sign)
    return _keep_sharding(out, w)

  return jax.tree_util.tree_map_with_path(update, base)


def _keep_sharding(out, w):
  if isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer):
    return jax.device_put(out, w.sharding)
  return out


def merge(base, adapters):
  """``W + scale * A @ B`` for every adapted kernel; other leaves are returned as they are.

  Pure: neither input is modified. Jit-able; a concrete sharded kernel keeps its sharding.
  The sum is formed in the wider of the two dtypes and cast back to the kernel's dtype.
  """
  return _apply(base, adapters, 1.0)


def unmerge(merged, adapters):
  """``W' - scale * A @ B``: undoes ``merge`` up to floating-point rounding."""
  return _apply(merged, adapters, -1.0)
