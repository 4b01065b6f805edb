"""Initialisations that start A and B from the base kernel itself, and PEFT's conversion back.

- PiSSA (Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation",
  arXiv:2404.02948): with ``W = U S Vᵀ`` (W laid out (in, out)), ``A = U_r √(S_r / s)``,
  ``B = √(S_r / s) V_rᵀ``; ``init="pissa_niter_N"`` takes the top-r singular triplets from a
  randomized SVD with N subspace iterations (Halko et al. 2011), PEFT's fast option.
- OLoRA (Büyükakyüz 2024, arXiv:2406.01775): with the QR decomposition of PyTorch's weight
  ``Wᵀ = Q R``, ``A = R_rᵀ`` (the first r rows of R) and ``B = Q_rᵀ`` (the first r columns of Q).

Both move the principal part out of the base: the frozen kernel becomes the residual
``W - s·A₀@B₀``, so the model starts exactly where it was, as with B = 0. Because the base
changes, ``init_with_base`` returns both. A trained adapter is converted into a plain LoRA
adapter on the *original* base as PEFT does when saving (``path_initial_model_for_weight_
conversion``): ``ΔW = s·(A@B - A₀@B₀) = s·[A | A₀] @ [B ; -B₀]``, rank 2r at the same scale
(``convert_to_lora``, ``converted_config``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lora_jax import _tree, kernels, kinds
from lora_jax.adapters import LoraWeights, _keep_sharding, init as _init, split
from lora_jax.config import LoraConfig


def _matrix(w, roles: str):
  """``w`` as (stack, in, out) in float32 (float64 if ``w`` is): its axes ordered as A's and
  B's (stacked, input, output), so the factors reshape to ``factor_shapes``."""
  order = [j for r in "lio" for j, q in enumerate(roles) if q == r]
  size = {r: math.prod(n for n, q in zip(w.shape, roles) if q == r) for r in "lio"}
  m = jnp.transpose(w, order).reshape(size["l"], size["i"], size["o"])
  return m.astype(jnp.promote_types(w.dtype, jnp.float32))


def _top_singular(m, rank: int, niter: int | None, key):
  """(U_r, S_r, V_rᵀ) of each (in, out) matrix of ``m`` (stack, in, out): exact, or from a
  randomized range finder with ``niter`` subspace iterations."""
  if niter is None:
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]
  mt = jnp.swapaxes(m, -1, -2)
  omega = jax.random.normal(key, (m.shape[0], m.shape[2], rank), m.dtype)
  q, _ = jnp.linalg.qr(m @ omega)
  for _ in range(niter):
    z, _ = jnp.linalg.qr(mt @ q)
    q, _ = jnp.linalg.qr(m @ z)
  ub, s, vh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ m, full_matrices=False)
  return q @ ub, s, vh


def pissa_factors(m, rank: int, scale: float, *, niter: int | None = None, key=None):
  """PiSSA's ``(A₀, B₀)`` for (stack, in, out) matrices ``m``: ``s·A₀@B₀`` is their best
  rank-r approximation (exact SVD), or the randomized one with ``niter``."""
  u, s, vh = _top_singular(m, rank, niter, key)
  root = jnp.sqrt(s / scale)
  return u * root[..., None, :], root[..., :, None] * vh


def olora_factors(m, rank: int):
  """OLoRA's ``(A₀, B₀)`` for (stack, in, out) matrices ``m``: PyTorch's weight is ``mᵀ``
  (out, in) = Q R; ``A₀ = R_rᵀ``, ``B₀ = Q_rᵀ`` (no division by the scale, as PEFT)."""
  q, r = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))
  return jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)


def _factors(config: LoraConfig, lw: LoraWeights, w, key) -> tuple:
  if isinstance(lw.scale, tuple):
    raise ValueError(f"init={config.init!r} with per-layer ranks or alphas in one stacked kernel "
                     f"is not supported; use one rank and alpha per kernel, or an unrolled model.")
  m = _matrix(w, lw.axes)
  if config.init == "olora":
    a, b = olora_factors(m, lw.rank)
  else:
    niter = int(config.init.rsplit("_", 1)[1]) if config.init != "pissa" else None
    a, b = pissa_factors(m, lw.rank, lw.scale, niter=niter, key=key)
  return (a.reshape(lw.a.shape).astype(lw.a.dtype), b.reshape(lw.b.shape).astype(lw.b.dtype))


def init_with_base(config: LoraConfig, params, *, key: jax.Array, uses=None) -> tuple:
  """The base to train on and the trainable tree, for any ``config.init``.

  With ``"pissa"``, ``"pissa_niter_N"`` or ``"olora"`` each adapted kernel of the returned base
  is the residual ``W - s·A₀@B₀`` (in W's dtype; the factors are computed in float32) and the
  adapters hold ``A₀``, ``B₀``, so the adapted model equals the original one; other inits
  return ``params`` unchanged and ``lora_jax.init``'s tree. Keep the returned adapters (the
  initial ones) to convert a trained adapter with ``convert_to_lora``.

  Args:
    config: the LoraConfig.
    params: the concrete, dense base params (a quantized kernel cannot give up its principal
      part: initialise on the dense base, then quantize the residual).
    key: a PRNG key (A's random init, or the randomized SVD's sketch).
    uses: optional ``lora_jax.analyze`` result (axis roles of kernels with more than 2 axes).

  Returns:
    ``(base, adapters)``.

  Raises:
    ValueError: as ``lora_jax.init``; or an adapted kernel that is quantized or abstract.
  """
  if not config.changes_base:
    return params, _init(config, params, key=key, uses=uses)
  plain = dataclasses.replace(config, init="gaussian", kind="lora")
  adapters, extras = split(_init(plain, params, key=key, uses=uses))
  leaves = _tree.flatten(params, is_leaf=kernels.is_kind)
  keys = dict(zip(adapters, jax.random.split(key, max(len(adapters), 1))))
  initial, residual = {}, {}
  for path, lw in adapters.items():
    w = leaves[path]
    if kernels.is_kind(w) or isinstance(w, jax.ShapeDtypeStruct):
      raise ValueError(f"init={config.init!r} needs the dense values of the kernel at "
                       f"{_tree.join(path)!r}, which is {type(w).__name__}; initialise on the "
                       f"dense base, then quantize the residual base it returns.")
    a, b = _factors(config, lw, w, keys[path])
    lw = dataclasses.replace(lw, a=a, b=b)
    residual[path] = _keep_sharding(lw.merged(w, sign=-1.0), w)
    initial[path] = lw
  kind = kinds.named(config.kind)  # built on residual + s·A₀@B₀, which is W
  initial = {p: kind.of_factors(lw, base=residual[p]) for p, lw in initial.items()}
  base = _tree.map_with_path(lambda p, w: residual.get(p, w), params, is_leaf=kernels.is_kind)
  return base, _tree.nest({**initial, **extras})


def convert_to_lora(adapters, *, initial):
  """A trained PiSSA / OLoRA tree as a plain LoRA tree on the *original* base (PEFT's
  conversion when saving): each adapter becomes ``[A | A₀]``, ``[B ; -B₀]`` (rank 2r, same
  scale), so ``merge(original, converted) == merge(residual, adapters)``; trained extras are
  kept as they are.

  Raises:
    ValueError: ``initial`` does not hold the same adapted paths and shapes, or an adapter is
      not plain LoRA (a kind that is not additive changes W by an amount that depends on W,
      so it has no such form).
  """
  trained, extras = split(adapters)
  start, _ = split(initial)
  if set(trained) != set(start):
    raise ValueError(f"initial holds adapters at {sorted(map(_tree.join, start))[:3]}..., "
                     f"which are not the trained tree's adapted paths; pass the adapters "
                     f"init_with_base returned with this base.")
  out = {}
  for path, lw in trained.items():
    lw0 = start[path]
    if type(lw) is not LoraWeights or type(lw0) is not LoraWeights:
      raise ValueError(f"the adapter at {_tree.join(path)!r} is a {type(lw).__name__}; only "
                       f"plain LoRA adapters convert (its change to W depends on W).")
    if lw.a.shape != lw0.a.shape or lw.b.shape != lw0.b.shape or lw.scale != lw0.scale:
      raise ValueError(f"the initial adapter at {_tree.join(path)!r} (a {lw0.a.shape}, b "
                       f"{lw0.b.shape}, scale {lw0.scale:g}) is not the trained one's shape and "
                       f"scale (a {lw.a.shape}, b {lw.b.shape}, scale {lw.scale:g}).")
    n = lw.axes.count("l") + lw.axes.count("i")  # the rank axis of a; of b it is after the stack
    out[path] = dataclasses.replace(
        lw, a=jnp.concatenate([lw.a, lw0.a.astype(lw.a.dtype)], axis=n),
        b=jnp.concatenate([lw.b, -lw0.b.astype(lw.b.dtype)], axis=lw.axes.count("l")))
  return _tree.nest({**out, **extras})


def converted_config(config: LoraConfig) -> LoraConfig:
  """The LoraConfig of ``convert_to_lora``'s tree: ranks doubled, alphas doubled (with rsLoRA
  multiplied by √2), so every scale is unchanged; a plain init."""
  factor = math.sqrt(2.0) if config.use_rslora else 2.0
  return dataclasses.replace(
      config, init="kaiming_uniform", rank=2 * config.rank, alpha=factor * config.alpha,
      rank_pattern={p: 2 * r for p, r in config.rank_pattern.items()},
      alpha_pattern={p: factor * a for p, a in config.alpha_pattern.items()})
