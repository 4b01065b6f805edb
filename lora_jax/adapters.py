"""Adapter kinds and the adapter tree: init, merge and unmerge (Hu et al. 2021, arXiv:2106.09685).

Layout, for a kernel W with axis roles such as ``"io"`` (Dense), ``"ioo"`` (DenseGeneral
query, (d, heads, head_dim)) or ``"lio"`` (a scanned stack, (layers, d, k)):

    a: (*stack, *in, rank)      b: (*stack, rank, *out)
    W' = W + scale * a @ b      (contracting the rank axis, stack axes batched)

A stacked kernel (one ``l`` axis) may hold layers of different ranks and scales
(``LoraConfig.rank_pattern`` naming single layers): ``rank`` is then the largest, layer l's
unused columns of ``a`` and rows of ``b`` are zero (they get zero gradients, so they stay
zero), and ``scale`` and ``ranks`` are static tuples, one entry per layer:

    W'_l = W_l + scale[l] * a_l @ b_l = W_l + a_l @ (scale[l] * b_l)

Every use folds the scales into B along the stacked axis (``LoraWeights.folded``), so a
``lax.scan`` slices an adapter of scale 1 and nothing per layer is traced into static fields.

An adapter kind (``LoraWeights`` here, the reference; ``lora_jax.kinds`` lists the protocol
and the registered kinds) owns its factor shapes, its init, its delta ``W' - W`` (for merge
and the merged fallback), its factored product with an activation (for the transform), its
reshape, its sharding layout, its optimizer groups, its count and its PEFT tensors;
everything else handles it as an opaque pytree and rebuilds it with ``dataclasses.replace``.

The trainable tree mirrors the base tree's nesting: a ``LoraWeights`` at every adapted kernel
and, for ``LoraConfig.modules_to_save`` and the biases ``LoraConfig.bias`` trains, a trained
copy of the base leaf at its own path, so
optax, orbax and ``jax.tree_util`` see one tree of exactly what is trained.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _tree, kernels, kinds
from lora_jax._tree import listing
from lora_jax.kinds import is_adapter
from lora_jax.config import LoraConfig
from lora_jax.targets import Target, base_leaves, resolve

_LETTERS = string.ascii_uppercase  # one subscript per kernel axis; "r" is the rank axis


def factor_subscripts(roles: str, present=None) -> tuple[str, str]:
  """einsum subscripts of ``a`` and ``b`` for a kernel with axis ``roles``.

  ``present`` lists the original axes still there (a ``lax.scan`` slices stacked axes off).
  """
  present = range(len(roles)) if present is None else present
  stack = "".join(_LETTERS[j] for j, r in enumerate(roles) if r == "l" and j in present)
  ins = "".join(_LETTERS[j] for j, r in enumerate(roles) if r == "i")
  outs = "".join(_LETTERS[j] for j, r in enumerate(roles) if r == "o")
  return stack + ins + "r", stack + "r" + outs


def factor_shapes(target: Target) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shapes of ``a`` and ``b`` for ``target``."""
  dims = {r: [n for n, role in zip(target.shape, target.axes) if role == r] for r in "lio"}
  return ((*dims["l"], *dims["i"], target.rank), (*dims["l"], target.rank, *dims["o"]))


class Terms(NamedTuple):
  """One adapted product's factors and subscripts (``LoraWeights.terms``): ``first`` (A for
  ``x @ W``, B for ``x @ W.T``) is applied to x, giving t (``t_sub``, a rank axis ``r``),
  then ``second``; ``w_sub`` is the kernel operand's own layout, for ``W + s·A@B``."""

  first: jax.Array
  second: jax.Array
  first_sub: str
  t_sub: str
  second_sub: str
  w_sub: str


@dataclasses.dataclass(frozen=True)
class LoraWeights:
  """The low-rank factors of one kernel: the LoRA adapter kind.

  Attributes:
    a: (*stack, *in, rank), trained.
    b: (*stack, rank, *out), trained; zeros at init.
    scale: alpha / rank (or alpha / sqrt(rank) with rsLoRA); static, not trained. A tuple of
      one scale per layer when a stacked kernel's layers have different scales.
    axes: the kernel's axis roles (``l`` stacked layer, ``i`` input, ``o`` output); static.
    dropout: dropout rate on the adapter branch's input; static.
    ranks: None, or a tuple of each layer's true rank when a stacked kernel's layers have
      different ranks (``rank``, the factors' width, is then the largest); static.
  """

  name: ClassVar[str] = "lora"
  summary: ClassVar[str] = "lora: W + s·A@B"
  additive: ClassVar[bool] = True
  # PEFT's form (lora_jax.peft): the adapter_config.json flags that pick the kind (None on a
  # kind without one), and the names of its 1-D tensors per module (one value per output).
  peft: ClassVar[dict | None] = {}
  peft_vectors: ClassVar[tuple[str, ...]] = ()

  a: jax.Array
  b: jax.Array
  scale: float | tuple[float, ...]
  axes: str
  dropout: float = 0.0
  ranks: tuple[int, ...] | None = None

  @property
  def rank(self) -> int:
    """The width of the factors' rank axis (the largest layer rank when ``ranks`` is set)."""
    return self.a.shape[-1]

  @property
  def per_layer(self) -> bool:
    """Whether the layers of this stacked adapter have their own ranks or scales."""
    return isinstance(self.scale, tuple) or self.ranks is not None

  @property
  def num_params(self) -> int:
    """Trained parameters, as PEFT counts them: every array's size, less the zero padding of
    layers whose rank is below ``rank``."""
    size = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(self))
    if self.ranks is None:
      return size
    n = self.axes.count("l")
    width = math.prod(self.a.shape[n:-1]) + math.prod(self.b.shape[n + 1:])
    return size - sum(self.rank - r for r in self.ranks) * width

  def folded(self) -> "LoraWeights":
    """This adapter with per-layer scales folded into B along the stacked axis,
    ``scale[l] * a_l @ b_l = a_l @ (scale[l] * b_l)``, and scale 1: what every product,
    delta and ``lax.scan`` slice uses (gradients reach ``b`` through the product). Itself
    when the scale is one float."""
    if not isinstance(self.scale, tuple):
      return self
    dtype = jnp.promote_types(self.b.dtype, jnp.float32)
    s = jnp.asarray(self.scale, dtype).reshape((-1,) + (1,) * (self.b.ndim - 1))
    return dataclasses.replace(self, b=self.b.astype(dtype) * s, scale=1.0)

  @classmethod
  def create(cls, config: LoraConfig, target: Target, key, *, base=None) -> "LoraWeights":
    """A new adapter for ``target``: the LoRA factors (``lora_factors``), then ``of_factors``.

    Args:
      config: the LoraConfig (init, dtype, dropout).
      target: the kernel to adapt.
      key: a PRNG key for A.
      base: the kernel (an array, a kernel kind, or abstract); kinds that read W use it.
    """
    return cls.of_factors(lora_factors(config, target, key), base=base)

  @classmethod
  def of_factors(cls, lw: "LoraWeights", *, base) -> "LoraWeights":
    """This kind built on the LoRA factors ``lw`` of the kernel ``base``: LoRA's is ``lw``."""
    del base
    return lw

  @classmethod
  def extra_params(cls, target: Target) -> int:
    """Trained parameters beyond A and B for ``target``: none for LoRA."""
    del target
    return 0

  def peft_tensors(self, at: tuple) -> dict[str, np.ndarray]:
    """The ``peft_vectors`` of the layer ``at`` (``()`` unstacked): none for LoRA."""
    del at
    return {}

  @classmethod
  def from_peft(cls, lw: "LoraWeights", vectors: Mapping[tuple, Mapping], *, base
                ) -> "LoraWeights":
    """This kind from PEFT's factors ``lw`` and ``{layer at: {vector name: (out,)}}`` of the
    kernel ``base`` (layers without tensors at identity): LoRA's is ``lw``."""
    del vectors, base
    return lw

  def groups(self) -> "LoraWeights":
    """The LoRA+ group of each trained array: "a" for A, "b" for B and any other (PEFT's
    ``create_loraplus_optimizer`` puts lora_B and 1-D parameters in its fast group)."""
    data = fields_of(self)[0]
    return dataclasses.replace(self, **{f: "a" if f == "a" else "b" for f in data})

  def delta(self, *, axes=None, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """``scale * a @ b`` laid out as the kernel axes ``axes`` (default: all, in order)."""
    if isinstance(self.scale, tuple):
      return LoraWeights.delta(self.folded(), axes=axes, precision=precision)
    axes = tuple(range(len(self.axes))) if axes is None else tuple(axes)
    a_sub, b_sub = factor_subscripts(self.axes, axes)
    w_sub = "".join(_LETTERS[j] for j in axes)
    return self.scale * jnp.einsum(f"{a_sub},{b_sub}->{w_sub}", self.a, self.b,
                                   precision=precision)

  def merged(self, w, *, axes=None, sign: float = 1.0):
    """``w + sign * delta``, summed in the wider dtype and cast back to ``w``'s."""
    dtype = jnp.promote_types(w.dtype, self.a.dtype)
    return (w.astype(dtype) + sign * self.delta(axes=axes).astype(dtype)).astype(w.dtype)

  def product(self, x, *, x_sub: str, out_sub: str, present, contracted, batched, dtype,
              **opts):
    """The adapter's share of ``dot_general(x, W)``: ``s·((x@A)@B)``, or ``s·((x@Bᵀ)@Aᵀ)``
    for ``x @ W.T``, in the product's own subscripts; None if the contraction mixes roles.

    Args:
      x: the activation; ``x_sub`` its einsum subscripts, where an upper-case letter is
        original kernel axis ``j`` (``string.ascii_uppercase[j]``) and lower-case ones are
        the activation's own axes.
      out_sub: the product's subscripts.
      present: the original kernel axes the operand still has (``lax.scan`` slices some off).
      contracted, batched: the original kernel axes contracted with, or batched against, x.
      dtype: the dtype the factors are cast to (the kernel's).
      **opts: ``precision`` and ``preferred_element_type`` of the product.
    """
    if isinstance(self.scale, tuple):
      return self.folded().product(x, x_sub=x_sub, out_sub=out_sub, present=present,
                                   contracted=contracted, batched=batched, dtype=dtype, **opts)
    terms = self.terms(x_sub=x_sub, present=present, contracted=contracted, batched=batched)
    if terms is None:
      return None
    t = jnp.einsum(f"{x_sub},{terms.first_sub}->{terms.t_sub}", x,
                   terms.first.astype(dtype), **opts)
    t = t * jnp.asarray(self.scale, t.dtype)
    return jnp.einsum(f"{terms.t_sub},{terms.second_sub}->{out_sub}", t,
                      terms.second.astype(dtype), **opts)

  def terms(self, *, x_sub: str, present, contracted, batched) -> "Terms | None":
    """The two factors in the order ``product`` applies them, with the einsum subscripts of
    each and of the rank-sized intermediate t (the arguments as ``product``'s);
    None if the contraction mixes roles. ``lora_jax._product``'s hand-written backward
    works from these."""
    roles = self.axes
    free = [j for j in present if j not in contracted and j not in batched]
    if not {roles[j] for j in batched} <= {"l"}:
      return None
    order = self._order({roles[j] for j in contracted}, {roles[j] for j in free} - {"l"},
                        len(contracted), present)
    if order is None:
      return None
    (first, first_sub), (second, second_sub) = order
    kept = [c for c in x_sub if c.islower() or _LETTERS.index(c) in batched]
    t_sub = "".join(kept) + "".join(_LETTERS[j] for j in free if roles[j] == "l") + "r"
    w_sub = "".join(_LETTERS[j] for j in present)
    return Terms(first, second, first_sub, t_sub, second_sub, w_sub)

  def factors(self):
    """``(a, b, scale)`` as one adapter's, for the rules that use A and B themselves (a row
    lookup, a convolution); None where there is no one adapter (a bank's per-example slots),
    which makes such a use the merged fallback."""
    return self.a, self.b, self.scale

  def laid_out(self, a_spec, b_spec, wrap) -> "LoraWeights":
    """This adapter with every array replaced by its sharding, ``wrap(spec)``, given A's and
    B's PartitionSpecs (None: unspecified); ``lora_jax.sharding.adapter_shardings``."""
    return dataclasses.replace(self, a=wrap(a_spec), b=wrap(b_spec))

  def rescaled(self, y, *, w, present, out_sub: str):
    """The adapted product ``y = x@W + product(x)`` as the kind finally gives it: LoRA's as
    it is (a kind may rescale it per output column). ``w()`` is the dense base kernel."""
    return y

  def _order(self, contracted: set, free: set, n_contracted: int, present):
    a_sub, b_sub = factor_subscripts(self.axes, present)
    if contracted == {"i"} and free == {"o"} and n_contracted == self.axes.count("i"):
      return (self.a, a_sub), (self.b, b_sub)
    if contracted == {"o"} and free == {"i"} and n_contracted == self.axes.count("o"):
      return (self.b, b_sub), (self.a, a_sub)
    return None

  def reshaped(self, roles: str, shape) -> "LoraWeights":
    """The adapter of the kernel reshaped to ``shape`` with axis ``roles`` (a reshape that
    only splits or merges axes of one role; A and B are reshaped alike)."""
    if self.per_layer:  # the stacked axes may change: per-layer scales folded first
      return dataclasses.replace(self.folded(), ranks=None).reshaped(roles, shape)
    dims = {r: tuple(n for n, q in zip(shape, roles) if q == r) for r in "lio"}
    return dataclasses.replace(self, a=self.a.reshape(*dims["l"], *dims["i"], self.rank),
                               b=self.b.reshape(*dims["l"], self.rank, *dims["o"]), axes=roles)

  def check_fits(self, path: str, w) -> None:
    """Raises ValueError unless the factors fit the kernel ``w`` (anything with a shape)."""
    if not isinstance(self.axes, str) or len(self.axes) != len(w.shape):
      raise ValueError(f"adapter at {path!r} has axes {self.axes!r}, which must be a string of "
                       f"one role per axis of the base kernel of shape {tuple(w.shape)}; rebuild "
                       f"the adapters with lora_jax.init on this base.")
    t = Target(path=path, shape=tuple(w.shape), dtype=w.dtype, axes=self.axes, rank=self.rank,
               alpha=0.0, scale=0.0)
    if factor_shapes(t) != (tuple(self.a.shape), tuple(self.b.shape)):
      raise ValueError(f"adapter at {path!r} (a {tuple(self.a.shape)}, b {tuple(self.b.shape)}, "
                       f"axes {self.axes!r}) does not fit the base kernel of shape "
                       f"{tuple(w.shape)}; rebuild the adapters with lora_jax.init on this base.")
    if self.per_layer:
      self._check_layers(path, t.stack)

  def _check_layers(self, path: str, layers: int) -> None:
    """Raises ValueError unless per-layer scales and ranks give one value per layer."""
    scales = self.scale if isinstance(self.scale, tuple) else (self.scale,) * layers
    ranks = self.ranks if self.ranks is not None else (self.rank,) * layers
    if (self.axes.count("l") != 1 or len(scales) != layers or len(ranks) != layers
            or not all(0 < r <= self.rank for r in ranks)):
      raise ValueError(f"adapter at {path!r} has per-layer scales {self.scale!r} and ranks "
                       f"{self.ranks!r}, which must give one scale and one rank in [1, "
                       f"{self.rank}] to each of the {layers} layers of its one stacked axis "
                       f"(axes {self.axes!r}); rebuild the adapters with lora_jax.init.")


def lora_factors(config: LoraConfig, target: Target, key) -> LoraWeights:
  """A random (PEFT's kaiming-uniform, or gaussian), B zeros: the model starts unchanged.
  An embedding table gets PEFT's ``Embedding`` init instead (either ``init``): A zeros,
  B standard normal; and no dropout (its input is token ids)."""
  a_shape, b_shape = factor_shapes(target)
  if target.embedding:
    b = jax.random.normal(key, b_shape, config.dtype)
    return LoraWeights(a=jnp.zeros(a_shape, config.dtype), b=b, scale=target.scale,
                       axes=target.axes)
  if config.init == "gaussian":  # PEFT init_lora_weights="gaussian": std 1/r
    rank = _per_layer_ranks(target, a_shape) if target.ranks else target.rank
    a = jax.random.normal(key, a_shape, config.dtype) / rank
  else:  # kaiming_uniform_(a=sqrt(5)) on lora_A (r, in): U(-1/sqrt(in), 1/sqrt(in))
    bound = 1.0 / math.sqrt(target.in_features)
    a = jax.random.uniform(key, a_shape, config.dtype, -bound, bound)
  if target.ranks:  # each layer's columns beyond its rank: zero
    columns = jnp.arange(target.rank).reshape((1,) * (len(a_shape) - 1) + (-1,))
    a = jnp.where(columns < _per_layer_ranks(target, a_shape), a, 0)
  return LoraWeights(a=a, b=jnp.zeros(b_shape, config.dtype), axes=target.axes,
                     dropout=config.dropout, **static_scale(target))


def static_scale(target: Target) -> dict:
  """``{"scale": ..., "ranks": ...}`` of the adapter of ``target``: one scale and None, or a
  tuple per layer for whichever of the two differs between a stacked kernel's layers."""
  if not target.scales:
    return {"scale": target.scale, "ranks": None}
  return {"scale": target.scales if len(set(target.scales)) > 1 else target.scales[0],
          "ranks": target.ranks if len(set(target.ranks)) > 1 else None}


def _per_layer_ranks(target: Target, a_shape) -> jax.Array:
  """Each layer's rank, shaped to broadcast against ``a`` (its stacked axis first)."""
  return jnp.asarray(target.ranks).reshape((-1,) + (1,) * (len(a_shape) - 1))


jax.tree_util.register_dataclass(
    LoraWeights, data_fields=["a", "b"], meta_fields=["scale", "axes", "dropout", "ranks"])
kinds.register(LoraWeights)


def fields_of(adapter) -> tuple[dict, dict]:
  """``({data field: array}, {meta field: value})`` of an adapter (a registered dataclass)."""
  data = {_tree.keys_of(p)[0]: x
          for p, x in jax.tree_util.tree_flatten_with_path(adapter)[0]}
  meta = {f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter)
          if f.name not in data}
  return data, meta


def split(trainable) -> tuple[dict[_tree.Path, LoraWeights], dict[_tree.Path, jax.Array]]:
  """``({path: adapter}, {path: trained extra})`` of a trainable tree, paths as key tuples."""
  adapters, extras = {}, {}
  for path, leaf in _tree.flatten(trainable, is_leaf=is_adapter).items():
    (adapters if is_adapter(leaf) else extras)[path] = leaf
  return adapters, extras


def init(config: LoraConfig, params, *, key: jax.Array, uses: Mapping | None = None) -> dict:
  """Builds the trainable tree for ``params``: A random, B zeros, so the model starts unchanged,
  and a copy of every ``modules_to_save`` leaf and of every bias ``bias`` trains.

  Args:
    config: the LoraConfig.
    params: the base parameter pytree, concrete or abstract (only shapes are read, except for
      ``modules_to_save``, whose values are copied).
    key: a PRNG key for A.
    uses: optional ``lora_jax.analyze(fn, params, ...)`` result, giving the axis roles of
      kernels with more than two axes.

  Returns:
    A nested dict mirroring ``params``' paths with an adapter of ``config.kind`` (a
    ``LoraWeights`` by default) at each targeted kernel,
    e.g. ``{"params": {"Dense_0": {"kernel": LoraWeights(a=(4, 8), b=(8, 3), ...)}}}``, plus
    the trained copies of ``modules_to_save`` leaves at their paths.

  Raises:
    ValueError: as ``lora_jax.plan`` does for patterns, ranks and axis roles.
  """
  if config.changes_base:
    raise ValueError(f"init={config.init!r} changes the base kernels too (their principal part "
                     f"moves into A and B): use base, adapters = lora_jax.init_with_base(config, "
                     f"params, key=key) and train on that base.")
  targets, extras = resolve(config, params, uses=uses)
  kind, leaves = kinds.named(config.kind), base_leaves(params)
  flat = {t.keys: kind.create(config, t, k, base=leaves[t.keys])
          for t, k in zip(targets, jax.random.split(key, max(len(targets), 1)))}
  for extra in extras:
    flat[extra.keys] = _copy(leaves[extra.keys], extra.path)
  return _tree.nest(flat)


def _copy(leaf, path: str):
  if kernels.is_kind(leaf):
    raise ValueError(f"modules_to_save selects {path!r}, a {type(leaf).__name__} kernel kind; "
                     f"only dense parameters can be trained in full.")
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jnp.zeros(leaf.shape, leaf.dtype)  # under jax.eval_shape: shapes only
  return jnp.array(leaf, copy=True)


def match(base, trainable) -> tuple[dict, dict]:
  """The flat adapters and extras of ``trainable`` (key-tuple paths), checked against
  ``base``: every path exists and every shape fits."""
  adapters, extras = split(trainable)
  leaves = base_leaves(base)
  missing = [p for p in (*adapters, *extras) if p not in leaves]
  if missing:
    raise ValueError(f"adapters hold paths that are not in the base tree: {listing(missing)}; "
                     f"base paths include {listing(leaves)}.")
  for path, lw in adapters.items():
    lw.check_fits(_tree.join(path), leaves[path])
  for path, x in extras.items():
    if tuple(x.shape) != tuple(leaves[path].shape):
      raise ValueError(f"trained extra at {_tree.join(path)!r} has shape {tuple(x.shape)} but "
                       f"the base leaf has {tuple(leaves[path].shape)}; rebuild it with "
                       f"lora_jax.init on this base.")
  return adapters, extras


def _apply(base, trainable, sign: float):
  adapters, extras = match(base, trainable)

  def update(path, w):
    if path in extras:
      return extras[path] if sign > 0 else w
    lw = adapters.get(path)
    if lw is None:
      return kernels.dense(w)
    return _keep_sharding(lw.merged(kernels.dense(w), sign=sign), w)

  return _tree.map_with_path(update, base, is_leaf=kernels.is_kind)


def _keep_sharding(out, w):
  if isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer):
    return jax.device_put(out, w.sharding)
  return out


def merge(base, adapters):
  """``W + scale * A @ B`` for every adapted kernel, and the trained copy for every
  ``modules_to_save`` leaf; other leaves are returned as they are.

  Pure: neither input is modified. Jit-able; a concrete sharded kernel keeps its sharding.
  The sum is formed in the wider of the two dtypes and cast back to the kernel's dtype. Every
  kernel-kind leaf (a quantized kernel) comes back dense, so the result is a plain tree.
  """
  return _apply(base, adapters, 1.0)


def unmerge(merged, adapters):
  """``W' - scale * A @ B``: undoes ``merge`` on adapted kernels up to floating-point rounding.
  Leaves trained in full (``modules_to_save``) keep their merged (trained) values: the
  originals are not in a merged tree."""
  return _apply(merged, adapters, -1.0)
