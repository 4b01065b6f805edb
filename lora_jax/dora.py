"""DoRA (Liu et al. 2024, arXiv:2402.09353): weight-decomposed low-rank adaptation.

    W' = m ⊙ (W + s·A@B) / ||W + s·A@B||_c

with ``m`` a trained magnitude per output column (initialised to the column norms of W, so
training starts from the pretrained model) and ``||·||_c`` the norm of each output column over
the input axes, treated as a constant in the backward pass (the paper's §4.3, as PEFT does).

The column norms need no dense ``W + s·A@B``: for output column j,

    ||w_j + s·A b_j||² = ||w_j||² + 2s·(WᵀA)_j · b_j + s²·b_jᵀ (AᵀA) b_j

so a step costs one (out × r) product ``WᵀA`` and an (r × r) Gram matrix beyond LoRA's, where
PEFT forms the full adapted weight. A product ``x @ W'`` is then
``(m / n) ⊙ (x@W + s·(x@A)@B)``: the LoRA product, rescaled per output column.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import kernels, kinds
from lora_jax.adapters import _LETTERS, LoraWeights, factor_subscripts


@dataclasses.dataclass(frozen=True)
class DoraWeights(LoraWeights):
  """A LoRA adapter plus DoRA's trained magnitude.

  Attributes:
    magnitude: (*stack, *out), trained; ``||W||_c`` at init.
    (the rest as ``LoraWeights``)
  """

  name: ClassVar[str] = "dora"
  summary: ClassVar[str] = ("dora: a trained magnitude per output column rescales W + s·A@B "
                            "(PEFT's use_dora)")
  additive: ClassVar[bool] = False
  peft: ClassVar[dict | None] = {"use_dora": True}
  peft_vectors: ClassVar[tuple[str, ...]] = ("lora_magnitude_vector",)

  magnitude: jax.Array = None

  @classmethod
  def of_factors(cls, lw: LoraWeights, *, base) -> "DoraWeights":
    """``lw`` with its magnitude: the column norms of ``W + s·A@B`` for the kernel ``base``
    (an array or a kernel kind); an abstract ``base`` (shapes only) gets zeros."""
    return with_magnitude(lw, base)

  @classmethod
  def extra_params(cls, target) -> int:
    """The magnitudes: one per output column of every layer (``stack * out``)."""
    return target.stack * target.out_features

  def peft_tensors(self, at: tuple) -> dict[str, np.ndarray]:
    """PEFT's ``lora_magnitude_vector`` (out,) of the layer ``at``."""
    return {"lora_magnitude_vector": np.asarray(self.magnitude, np.float32)[at].reshape(-1)}

  @classmethod
  def from_peft(cls, lw: LoraWeights, vectors, *, base) -> "DoraWeights":
    """``lw`` with the magnitudes of ``vectors``; a layer without one keeps the column norms
    of its base (the identity)."""
    identity = with_magnitude(dataclasses.replace(lw, b=jnp.zeros_like(lw.b)), base)
    m = np.array(identity.magnitude, np.float32)
    for at, v in vectors.items():
      m[at] = v["lora_magnitude_vector"].reshape(m.shape[len(at):])
    return dataclasses.replace(identity, b=lw.b, magnitude=jnp.asarray(m, lw.a.dtype))

  @classmethod
  def of(cls, lw: LoraWeights, w) -> "DoraWeights":
    """``lw`` with DoRA's magnitude initialised to the columns' norms of ``W + s·A@B``."""
    out = cls(a=lw.a, b=lw.b, scale=lw.scale, axes=lw.axes, dropout=lw.dropout,
              ranks=lw.ranks, magnitude=jnp.zeros((), lw.a.dtype))
    return dataclasses.replace(out, magnitude=out.column_norm(w).astype(lw.a.dtype))

  def _subscripts(self, present):
    present = tuple(present)
    a_sub, b_sub = factor_subscripts(self.axes, present)
    w_sub = "".join(_LETTERS[j] for j in present)
    stack = "".join(_LETTERS[j] for j in present if self.axes[j] == "l")
    outs = "".join(_LETTERS[j] for j in present if self.axes[j] == "o")
    return a_sub, b_sub, w_sub, stack + outs

  def column_norm(self, w, present=None) -> jax.Array:
    """``||W + s·A@B||`` per output column, (*stack, *out), in float32, from the factored
    expansion (no W-sized sum is formed; the per-column parts are elementwise reductions)."""
    if isinstance(self.scale, tuple):  # per-layer scales: folded into B along the stack
      return self.folded().column_norm(w, present)
    present = range(len(self.axes)) if present is None else present
    a_sub, b_sub, w_sub, n_sub = self._subscripts(present)
    f32 = jnp.float32
    w, a, b = w.astype(f32), self.a.astype(f32), self.b.astype(f32)
    s = jnp.asarray(self.scale, f32)
    hi = jax.lax.Precision.HIGHEST
    stack = n_sub[:len(n_sub) - sum(self.axes[j] == "o" for j in present)]
    squares = jnp.einsum(f"{w_sub}->{n_sub}", w * w)
    wa = jnp.einsum(f"{w_sub},{a_sub}->{b_sub}", w, a, precision=hi)  # (Wᵀ A), laid out as B
    gram = jnp.einsum(f"{a_sub},{a_sub.replace('r', 'q')}->{stack}rq", a, a, precision=hi)
    gb = jnp.einsum(f"{stack}rq,{b_sub.replace('r', 'q')}->{b_sub}", gram, b, precision=hi)
    per_column = jnp.einsum(f"{b_sub}->{n_sub}", b * (2 * s * wa + s * s * gb))
    return jnp.sqrt(jnp.maximum(squares + per_column, 0.0))

  def terms(self, *, contracted, **kwargs):
    """LoRA's factored terms for ``x @ W``; None (the merged kernel, correct) when the product
    contracts W's output axes (``x @ W.T``), where the rescaling would fall on x."""
    if {self.axes[j] for j in contracted} != {"i"}:
      return None
    return LoraWeights.terms(self, contracted=contracted, **kwargs)

  def rescaled(self, y, *, w, present, out_sub: str):
    """``y = x@W + s·(x@A)@B`` (subscripts ``out_sub``) times ``m / n`` per output column,
    the norm ``n`` (of ``w()``, the dense base kernel) held constant in the backward pass."""
    _, _, _, n_sub = self._subscripts(present)
    norm = jax.lax.stop_gradient(self.column_norm(w(), present))
    factor = (self.magnitude.astype(jnp.float32) / norm).astype(y.dtype)
    return y * _broadcast(factor, n_sub, out_sub)

  def delta(self, *, axes=None, precision=jax.lax.Precision.HIGHEST):
    raise ValueError("a DoRA adapter's change to W depends on W itself (its column norms); "
                     "use merged(w) (lora_jax.merge does).")

  def merged(self, w, *, axes=None, sign: float = 1.0):
    """``m ⊙ (W + s·A@B) / ||W + s·A@B||_c``, in the wider dtype, cast to ``w``'s."""
    if sign < 0:
      raise ValueError("a merged DoRA kernel cannot be unmerged: the column norms of the "
                       "original W + s·A@B are not in it; keep the base and merge again.")
    present = tuple(range(len(self.axes))) if axes is None else tuple(axes)
    dtype = jnp.promote_types(w.dtype, self.a.dtype)
    lora = LoraWeights.delta(self, axes=present).astype(dtype)
    _, _, w_sub, n_sub = self._subscripts(present)
    factor = (self.magnitude.astype(jnp.float32) / self.column_norm(w, present)).astype(dtype)
    out = (w.astype(dtype) + lora) * _broadcast(factor, n_sub, w_sub)
    return out.astype(w.dtype)

  def laid_out(self, a_spec, b_spec, wrap) -> "DoraWeights":
    """The magnitudes are laid out as B without its rank axis."""
    n = self.axes.count("l")
    m_spec = None if b_spec is None else jax.sharding.PartitionSpec(*b_spec[:n], *b_spec[n + 1:])
    return dataclasses.replace(LoraWeights.laid_out(self, a_spec, b_spec, wrap),
                               magnitude=wrap(m_spec))

  def reshaped(self, roles: str, shape) -> "DoraWeights":
    out = LoraWeights.reshaped(self, roles, shape)
    dims = {r: tuple(n for n, q in zip(shape, roles) if q == r) for r in "lo"}
    return dataclasses.replace(out, magnitude=self.magnitude.reshape(*dims["l"], *dims["o"]))


jax.tree_util.register_dataclass(
    DoraWeights, data_fields=["a", "b", "magnitude"],
    meta_fields=["scale", "axes", "dropout", "ranks"])
kinds.register(DoraWeights)


def with_magnitude(lw: LoraWeights, w) -> DoraWeights:
  """``lw`` as a DoRA adapter on the kernel ``w`` (an array or a kernel kind); an abstract
  ``w`` (``jax.ShapeDtypeStruct``: shapes only) gets a zero magnitude of the right shape."""
  if isinstance(w, jax.ShapeDtypeStruct):
    shape = lw.b.shape[:lw.axes.count("l")] + lw.b.shape[lw.axes.count("l") + 1:]
    return DoraWeights(a=lw.a, b=lw.b, scale=lw.scale, axes=lw.axes, dropout=lw.dropout,
                       ranks=lw.ranks, magnitude=jnp.zeros(shape, lw.a.dtype))
  return DoraWeights.of(lw, kernels.dense(w))


def _broadcast(x, x_sub: str, to_sub: str):
  """``x`` (subscripts ``x_sub``, each also in ``to_sub``) transposed and reshaped to
  broadcast against an array with subscripts ``to_sub`` (a plain multiply, not a dot)."""
  order = sorted(x_sub, key=to_sub.index)
  x = jnp.transpose(x, [x_sub.index(c) for c in order])
  return x.reshape([x.shape[order.index(c)] if c in x_sub else 1 for c in to_sub])
