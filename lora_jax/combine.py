"""Weighted combination of LoRA adapters: Hugging Face PEFT's ``add_weighted_adapter``.

``weighted(adapters, weights, combination_type=...)`` makes one adapter tree from several
trained on the same base, as PEFT 0.21's ``LoraModel.add_weighted_adapter`` does. At a kernel,
adapter ``i`` has factors ``A_i (in, r_i)``, ``B_i (r_i, out)`` (``LoraWeights.a``, ``.b``),
scale ``s_i`` and weight ``w_i`` (negative weights subtract); a stacked kernel (``"lio"``) is
combined layer by layer, and several input or output axes are flattened into one.

  linear: ``A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i``, so
    ``A @ B = sum_ij sign(w_i) sqrt(|w_i s_i w_j s_j|) A_i @ B_j``: the weighted sum of the
    deltas plus cross terms (PEFT: "a very rough approximation"). Every rank must be equal.
  cat: ``A = [w_1 s_1 A_1, ..., w_n s_n A_n]`` along the rank, ``B = [B_1; ...; B_n]``, so
    ``A @ B = sum_i w_i s_i A_i @ B_i`` exactly; rank ``sum_i r_i``.
  svd: ``D = sum_i w_i s_i A_i @ B_i`` truncated to rank ``R``: with ``D.T = U S Vh`` (PEFT's
    (out, in) layout), ``lora_B = U[:, :R] diag(S[:R])`` and ``lora_A = Vh[:R]``, so
    ``A = Vh[:R].T``, ``B = (U[:, :R] S[:R]).T``; exact when ``R >= rank(D)``. ``svd_clamp=q``
    then clips both factors to ``[-h, h]``, ``h`` the ``q``-quantile of their entries together.
    That clip depends on the signs of the singular vectors, which an SVD leaves open (PEFT's
    differ between float32 and float64, CPU and GPU); here the largest entry of each column of
    U is positive, so the result is the same on every backend.

The weights and source scales live in the factors; the new adapter's own scale is PEFT's for
``lora_alpha = r = R``: ``R / R = 1``, or ``R / sqrt(R) = sqrt(R)`` with ``use_rslora`` (PEFT
inherits ``use_rslora`` from the first adapter, which makes its combined delta ``sqrt(R)``
times the formulas above: huggingface/peft#3449, #3761). ``R`` is one rank for the whole tree,
as PEFT's new config has one ``r``: linear the common rank, cat the sum of the adapters'
ranks, svd ``svd_rank`` or the largest rank; an adapter's rank is its largest kernel rank
(PEFT: ``max(r, *rank_pattern.values())``). Kernels of smaller rank are padded with zero
columns of A and rows of B, which leaves the delta alone, so the result is what
``LoraConfig(rank=R, alpha=R, use_rslora=...)`` describes (``lora_jax.peft.export_peft``).

A kernel that only some adapters adapt is combined from those (PEFT skips the others, as if
their factors were zero); the result adapts the union of the kernels. Trained extras
(``modules_to_save``) are not combined: PEFT refuses two adapters that train the same module
in full, and otherwise gives the new adapter an untrained copy of the base module, which is
the base; so two extras at one path raise ValueError and others are dropped with a warning.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from lora_jax import _tree
from lora_jax._tree import listing
from lora_jax.adapters import LoraWeights, split
from lora_jax.config import is_real

COMBINATION_TYPES = ("linear", "cat", "svd")
# PEFT's other types (ties, dare_linear, dare_ties, magnitude_prune and their *_svd) prune or
# randomly drop entries; lora_jax does not implement them.


def weighted(adapters: Sequence, weights: Sequence[float], *, combination_type: str = "svd",
             svd_rank: int | None = None, svd_clamp: float | None = None,
             svd_full_matrices: bool = True, use_rslora: bool = False) -> dict:
  """One adapter tree combining ``adapters`` with ``weights``, as PEFT's add_weighted_adapter.

  Args:
    adapters: adapter trees (``lora_jax.init`` / training) on one base; one adapter is always
      combined ``"linear"``, as PEFT does.
    weights: one real number per adapter; negative ones subtract.
    combination_type: ``"linear"``, ``"cat"`` or ``"svd"`` (see the module docstring).
    svd_rank: the rank of an ``"svd"`` result; None: the largest rank of the adapters.
    svd_clamp: a quantile in [0, 1] clipping the ``"svd"`` factors; None: no clipping.
    svd_full_matrices: PEFT's argument, accepted for parity: the result does not depend on it
      (the first ``svd_rank`` singular vectors are the same; PEFT's full SVD fails where
      ``svd_rank`` exceeds the smaller side of a non-square kernel).
    use_rslora: the new adapter's scale is ``R / sqrt(R) = sqrt(R)`` instead of ``R / R = 1``.
      PEFT takes it from the first adapter's config, so True reproduces PEFT for rsLoRA
      adapters, whose combined delta is then ``sqrt(R)`` times the weighted combination; the
      default False gives the combination itself.

  Returns:
    A nested dict with a ``LoraWeights`` at every kernel some adapter adapts, all of rank R,
    scale 1 (or ``sqrt(R)``), the first holder's axes, dropout and dtypes.

  Raises:
    ValueError: bad arguments, unequal ranks for ``"linear"``, adapters that do not fit each
      other at a kernel, or two adapters training the same extra (the message says which).
  Warns:
    UserWarning: trained extras (``modules_to_save``) were dropped.
  """
  _check_options(combination_type, svd_rank, svd_clamp, svd_full_matrices, use_rslora)
  flats = _flat_adapters(adapters)
  weights = _check_weights(weights, len(flats))
  kind = "linear" if len(flats) == 1 else combination_type
  rank = _new_rank(flats, kind, svd_rank)
  scale = rank / (math.sqrt(rank) if use_rslora else rank)
  out = {}
  for path in dict.fromkeys(p for flat in flats for p in flat):
    held = [(flat[path], w) for flat, w in zip(flats, weights) if path in flat]
    _check_fit(path, [lw for lw, _ in held], kind)
    a, b = _COMBINE[kind](held, rank, svd_clamp)
    out[path] = _leaf(a, b, held[0][0], rank, scale)
  return _tree.nest(out)


def _new_rank(flats: Sequence[Mapping], combination_type: str, svd_rank: int | None) -> int:
  """The result's rank R for ``{path: LoraWeights}`` adapters (PEFT's ``new_rank``)."""
  ranks = [max(lw.rank for lw in flat.values()) for flat in flats]
  if combination_type == "linear":
    if len(set(ranks)) > 1:
      raise ValueError(f"combination_type='linear' needs adapters of one rank, got ranks "
                       f"{ranks}; use 'cat' or 'svd' for adapters of different ranks.")
    return ranks[0]
  return sum(ranks) if combination_type == "cat" else int(svd_rank or max(ranks))


# ---- arguments -----------------------------------------------------------------------------------

def _check_options(combination_type, svd_rank, svd_clamp, svd_full_matrices, use_rslora):
  if combination_type not in COMBINATION_TYPES:
    raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got "
                     f"{combination_type!r} (PEFT's ties, dare and magnitude_prune types are "
                     f"not implemented).")
  if svd_rank is not None and (not isinstance(svd_rank, numbers.Integral)
                               or isinstance(svd_rank, bool) or svd_rank < 1):
    raise ValueError(f"svd_rank must be an integer >= 1 or None (the largest rank of the "
                     f"adapters), got {svd_rank!r}.")
  if svd_clamp is not None and not (is_real(svd_clamp) and 0 <= svd_clamp <= 1):
    raise ValueError(f"svd_clamp must be a quantile in [0, 1] or None (no clipping), got "
                     f"{svd_clamp!r}.")
  if combination_type != "svd" and (svd_rank, svd_clamp) != (None, None):
    raise ValueError(f"svd_rank and svd_clamp apply to combination_type='svd' only, got "
                     f"combination_type={combination_type!r}; leave them None.")
  for name, value in (("svd_full_matrices", svd_full_matrices), ("use_rslora", use_rslora)):
    if not isinstance(value, bool):
      raise ValueError(f"{name} must be True or False, got {value!r}.")


def _flat_adapters(adapters) -> list[dict]:
  """``{path: LoraWeights}`` of every tree; extras checked as PEFT does, then dropped."""
  if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or not adapters:
    raise ValueError(f"adapters must be a non-empty list of adapter trees, got "
                     f"{type(adapters).__name__}; wrap a single tree in a list.")
  flats, extras = [], {}
  for i, tree in enumerate(adapters):
    lora, extra = split(tree)
    other = [p for p, lw in lora.items() if type(lw) is not LoraWeights]
    if other or not lora:
      raise ValueError(f"adapters[{i}] holds " + (
          f"{type(lora[other[0]]).__name__} at {_tree.join(other[0])!r}; only LoraWeights "
          f"adapters can be combined." if other else "no LoraWeights; pass adapter trees "
          "made by lora_jax.init or training."))
    layered = [p for p, lw in lora.items() if isinstance(lw.scale, tuple)]
    if layered:
      raise ValueError(f"adapters[{i}] has one scale per layer at {_tree.join(layered[0])!r} "
                       f"(layers with their own alpha or rank), which combine does not weigh; "
                       f"combine adapters whose layers share one scale per kernel.")
    flats.append(lora)
    for path in extra:
      extras.setdefault(path, []).append(i)
  _check_extras(extras)
  return flats


def _check_extras(extras: Mapping[tuple, list[int]]) -> None:
  shared = {p: held for p, held in extras.items() if len(held) > 1}
  if shared:
    path, held = next(iter(shared.items()))
    raise ValueError(f"adapters {held} all train {_tree.join(path)!r} in full "
                     f"(modules_to_save), which cannot be combined (PEFT refuses this too); "
                     f"remove the trained extras from all but one adapter, or from all.")
  if extras:
    warnings.warn(f"trained extras (modules_to_save) at {listing(extras)} are not combined and "
                  f"are left out of the result, which keeps the base there (PEFT gives the new "
                  f"adapter an untrained copy of the base module).", UserWarning, stacklevel=3)


def _check_weights(weights, n: int) -> list[float]:
  weights = weights.tolist() if isinstance(weights, np.ndarray) else weights
  if isinstance(weights, (str, Mapping)) or not isinstance(weights, Sequence):
    raise ValueError(f"weights must be a list of numbers, one per adapter, got "
                     f"{type(weights).__name__}.")
  if len(weights) != n or not all(is_real(w) and math.isfinite(w) for w in weights):
    raise ValueError(f"weights must be {n} finite numbers, one per adapter, got "
                     f"{list(weights)!r}.")
  return [float(w) for w in weights]


def _check_fit(path, lws: list[LoraWeights], kind: str) -> None:
  """Raises ValueError unless the adapters at ``path`` fit one kernel (and, for linear, have
  one rank)."""
  first = lws[0]
  for lw in lws[1:]:
    same_kernel = (lw.axes == first.axes and lw.a.shape[:-1] == first.a.shape[:-1]
                   and _out_shape(lw) == _out_shape(first))
    if not same_kernel:
      raise ValueError(f"adapters at {_tree.join(path)!r} do not fit one kernel (axes "
                       f"{first.axes!r}, a {first.a.shape}, b {first.b.shape} against axes "
                       f"{lw.axes!r}, a {lw.a.shape}, b {lw.b.shape}); combine adapters made "
                       f"on the same base with the same axis roles.")
  if kind == "linear" and len({lw.rank for lw in lws}) > 1:
    raise ValueError(f"combination_type='linear' needs one rank at every kernel, but the "
                     f"adapters at {_tree.join(path)!r} have ranks {[lw.rank for lw in lws]}; "
                     f"use 'cat' or 'svd'.")


# ---- the combinations, on (layers, in, rank) and (layers, rank, out) factors --------------------

def _stack_dims(lw: LoraWeights) -> int:
  return lw.axes.count("l")


def _out_shape(lw: LoraWeights) -> tuple[int, ...]:
  return tuple(lw.b.shape[_stack_dims(lw) + 1:])


def _factors(lw: LoraWeights) -> tuple[jnp.ndarray, jnp.ndarray]:
  """``a`` as (layers, in, r) and ``b`` as (layers, r, out), float32."""
  n = _stack_dims(lw)
  layers = math.prod(lw.a.shape[:n])
  a = jnp.asarray(lw.a, jnp.float32).reshape(layers, -1, lw.rank)
  return a, jnp.asarray(lw.b, jnp.float32).reshape(layers, lw.rank, -1)


def _linear(held, rank, clamp):
  """PEFT's linear: ``sign(w s) sqrt(|w s|)`` on A, ``sqrt(|w s|)`` on B, summed."""
  a_sum = b_sum = 0.0
  for lw, w in held:
    a, b = _factors(lw)
    root = math.sqrt(abs(w * lw.scale))
    a_sum = a_sum + (root if w * lw.scale >= 0 else -root) * a
    b_sum = b_sum + root * b
  return a_sum, b_sum


def _cat(held, rank, clamp):
  """PEFT's cat: ``w s A`` and ``B`` concatenated along the rank."""
  pairs = [_factors(lw) for lw, _ in held]
  a = jnp.concatenate([w * lw.scale * a for (lw, w), (a, _) in zip(held, pairs)], axis=-1)
  return a, jnp.concatenate([b for _, b in pairs], axis=1)


def _svd(held, rank, clamp):
  """PEFT's svd: the truncated SVD of the weighted delta in (out, in) layout, per layer."""
  delta = 0.0
  for lw, w in held:
    a, b = (np.asarray(x, np.float64) for x in _factors(lw))
    delta = delta + w * lw.scale * (a @ b)
  u, s, vh = _signed(*np.linalg.svd(np.swapaxes(delta, 1, 2), full_matrices=False))
  lora_b, lora_a = u[..., :rank] * s[:, None, :rank], vh[:, :rank]
  if clamp is not None:
    both = np.concatenate([lora_b.reshape(len(delta), -1), lora_a.reshape(len(delta), -1)], 1)
    hi = np.quantile(both, clamp, axis=1)[:, None, None]
    lora_b, lora_a = np.clip(lora_b, -hi, hi), np.clip(lora_a, -hi, hi)
  return (jnp.asarray(np.swapaxes(lora_a, 1, 2), jnp.float32),
          jnp.asarray(np.swapaxes(lora_b, 1, 2), jnp.float32))


def _signed(u, s, vh):
  """The SVD with each singular vector pair's sign fixed: the largest entry (in absolute
  value) of each column of ``u`` is positive, whatever the LAPACK routine returned."""
  top = np.take_along_axis(u, np.abs(u).argmax(axis=1)[:, None, :], axis=1)
  sign = np.where(top < 0, -1.0, 1.0)
  return u * sign, s, vh * np.swapaxes(sign, 1, 2)


_COMBINE = {"linear": _linear, "cat": _cat, "svd": _svd}


def _leaf(a, b, like: LoraWeights, rank: int, scale: float) -> LoraWeights:
  """The combined factors, zero-padded to ``rank`` and laid out as ``like``'s."""
  pad = rank - a.shape[-1]
  a = jnp.pad(a, ((0, 0), (0, 0), (0, pad)))
  b = jnp.pad(b, ((0, 0), (0, pad), (0, 0)))
  stack = like.a.shape[:_stack_dims(like)]
  return LoraWeights(a=a.reshape(*like.a.shape[:-1], rank).astype(like.a.dtype),
                     b=b.reshape(*stack, rank, *_out_shape(like)).astype(like.b.dtype),
                     scale=scale, axes=like.axes, dropout=like.dropout)
