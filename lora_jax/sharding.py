"""Sharded LoRA: adapter shardings that follow the base's, meshes, and a sharded train step.

For a kernel W with axis roles ``axes`` (``l`` stacked layer, ``i`` input, ``o`` output) and
partition spec ``spec`` (one entry per axis of W), the factors are laid out as

    a: (*stack, *in, rank)  ->  (*spec[l], *spec[i], None)
    b: (*stack, rank, *out) ->  (*spec[l], None, *spec[o])

so ``x @ A`` contracts A's input axes where W's are split, ``(x @ A) @ B`` produces output
split like ``x @ W``'s, and the rank axis (small) is replicated. JAX's SPMD partitioner does
the rest: everything here is ``jax.sharding``, ``jax.jit`` in/out shardings and
``jax.device_put``.

Recipe (a 4x2 mesh of ("data", "model"), tensor parallel, batch split over "data"):

    >>> mesh = sharding.mesh("4x2")
    >>> specs = sharding.tensor_parallel_specs(params, llama.FAMILY.partition_rules, mesh=mesh)
    >>> base = jax.device_put(params, sharding.named_shardings(specs, mesh))
    >>> adapters = sharding.init_sharded(config, params, key=key, shardings=specs, mesh=mesh,
    ...                                  uses=lora_jax.analyze(model.apply, params, ids))
    >>> step = sharding.sharded_train_step(loss_fn, optimizer, adapters, mesh=mesh,
    ...                                    base_shardings=specs, batch_spec=P("data"))
    >>> opt_state = jax.jit(optimizer.init, out_shardings=step.shardings.opt_state)(adapters)
    >>> adapters, opt_state, loss, _ = step(base, adapters, opt_state, batch)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, Sharding

from lora_jax import _tree, kernels
from lora_jax.adapters import fields_of, init, is_adapter, split
from lora_jax.config import LoraConfig
from lora_jax.train import StepOutput, train_step

P = PartitionSpec
SIMULATE = "XLA_FLAGS=--xla_force_host_platform_device_count=8"


# ----------------------------------------------------------------------- spec trees


def _is_spec(x) -> bool:
  return x is None or isinstance(x, (PartitionSpec, Sharding))


def _by_path(tree) -> dict[_tree.Path, Any]:
  return _tree.flatten(tree, is_leaf=lambda x: _is_spec(x) or kernels.is_kind(x))


def named_shardings(specs, mesh: Mesh):
  """``specs`` (a pytree of PartitionSpecs, e.g. ``tensor_parallel_specs``', or of LoraWeights
  holding them) with every PartitionSpec made a ``NamedSharding`` on ``mesh``; other leaves kept."""
  def named(s):
    return NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s

  return jax.tree_util.tree_map(named, specs, is_leaf=_is_spec)


def _spec_of(leaf, path: str):
  """``(spec, wrap)``: the leaf's PartitionSpec and how to make a factor's sharding of the same
  kind (a PartitionSpec, a NamedSharding on the same mesh, or the same replicated sharding)."""
  if leaf is None or isinstance(leaf, PartitionSpec):
    return leaf, lambda spec: spec
  if isinstance(leaf, NamedSharding):
    return leaf.spec, lambda spec: NamedSharding(leaf.mesh, spec, memory_kind=leaf.memory_kind)
  if isinstance(leaf, Sharding) and leaf.is_fully_replicated:
    return None, lambda spec: leaf
  if isinstance(getattr(leaf, "sharding", None), Sharding):  # a placed array
    return _spec_of(leaf.sharding, path)
  raise TypeError(f"base sharding at {path!r} is a {type(leaf).__name__}; expected a "
                  f"PartitionSpec, a NamedSharding, a replicated Sharding or a placed array.")


def factor_specs(spec: PartitionSpec, axes: str, *, path: str = "kernel"):
  """``(a_spec, b_spec)`` for a kernel with axis roles ``axes`` sharded as ``spec``.

  Example: ``factor_specs(P(None, "data", "model"), "lio")`` is
  ``(P(None, "data", None), P(None, None, "model"))``.
  """
  if len(spec) > len(axes):
    raise ValueError(f"partition spec {spec} at {path!r} has {len(spec)} entries but the kernel "
                     f"has {len(axes)} axes ({axes!r}).")
  entries = tuple(spec) + (None,) * (len(axes) - len(spec))
  role = lambda r: tuple(e for e, x in zip(entries, axes) if x == r)  # noqa: E731
  return P(*role("l"), *role("i"), None), P(*role("l"), None, *role("o"))


def adapter_shardings(adapters, base_shardings):
  """The adapter tree's shardings, derived from the base tree's.

  Args:
    adapters: the adapter tree (``lora_jax.init``'s, concrete or its ``jax.eval_shape``).
    base_shardings: a pytree matching the base params whose leaves are ``PartitionSpec``s,
      ``NamedSharding``s (e.g. ``nn.logical_to_mesh_sharding(...)``), replicated shardings,
      placed arrays (their ``.sharding`` is read) or None (unspecified).

  Returns:
    The adapter tree with ``LoraWeights(a=..., b=...)`` holding shardings of the leaf's kind:
    A takes W's stacked and input axes' entries, B its stacked and output ones, the rank axis
    None; a trained extra (``modules_to_save``) takes its base leaf's sharding. Pass it to
    ``jax.device_put`` or ``jax.jit(out_shardings=...)``.

  Raises:
    ValueError: an adapted kernel has no entry in ``base_shardings``, or its spec is too long.
    TypeError: an entry is not a spec or sharding.
  """
  specs = _by_path(base_shardings)

  def one(keys, leaf):
    path = _tree.join(keys)
    if keys not in specs:
      raise ValueError(f"base_shardings has no entry for the adapted kernel {path!r}; pass a "
                       f"tree matching the base params (it has {len(specs)} leaves).")
    spec, wrap = _spec_of(specs[keys], path)
    if not is_adapter(leaf):  # a trained extra is laid out as its base leaf
      return wrap(spec)
    a, b = (None, None) if spec is None else factor_specs(spec, leaf.axes, path=path)
    return leaf.laid_out(a, b, wrap)

  return _tree.map_with_path(one, adapters, is_leaf=is_adapter)


def _need_named(tree, what: str) -> None:
  if any(isinstance(s, PartitionSpec) for s in jax.tree_util.tree_leaves(tree, is_leaf=_is_spec)):
    raise ValueError(f"{what} holds PartitionSpecs; pass mesh= (or NamedShardings) so they can "
                     "be placed.")


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def init_sharded(config: LoraConfig, params, *, key: jax.Array, shardings, mesh: Mesh | None = None,
                 uses=None):
  """``lora_jax.init`` compiled with the adapters' shardings as ``out_shardings``: each device
  creates only its shards of A and B, nothing full-size lands on one device. Values equal
  ``lora_jax.init``'s.

  Args:
    config, key, uses: as for ``lora_jax.init``.
    params: the base tree, concrete or abstract (only shapes are read; concrete with
      ``modules_to_save``, whose leaves are copied).
    shardings: the base tree's shardings (see ``adapter_shardings``).
    mesh: needed when ``shardings`` holds PartitionSpecs.
  """
  shardings = shardings if mesh is None else named_shardings(shardings, mesh)
  _need_named(shardings, "shardings")
  if config.save_patterns:  # trained copies of base leaves: the values are needed
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(params)):
      raise ValueError("init_sharded with modules_to_save copies base values, so params must "
                       "be concrete arrays, not jax.eval_shape output; pass the loaded params.")
    make = lambda k, p: init(config, p, key=k, uses=uses)  # noqa: E731
    out = adapter_shardings(jax.eval_shape(make, key, _abstract(params)), shardings)
    return jax.jit(make, out_shardings=out)(key, params)
  abstract = _abstract(params)
  make = lambda k: init(config, abstract, key=k, uses=uses)  # noqa: E731
  out = adapter_shardings(jax.eval_shape(make, key), shardings)
  return jax.jit(make, out_shardings=out)(key)


def opt_state_shardings(opt_state, adapters, shardings, *, mesh: Mesh):
  """Shardings for an optax state: a leaf whose key path ends with an adapter factor's path
  (``.../q_proj/kernel/a``, as optax's ``mu``/``nu`` trees, masked ones included) and has its
  shape gets that factor's sharding; every other leaf (step counts, factored statistics) is
  replicated on ``mesh``.

  Args:
    opt_state: ``optimizer.init(adapters)`` or its ``jax.eval_shape``.
    adapters: the adapter tree (concrete or abstract).
    shardings: ``adapter_shardings(adapters, ...)``.
    mesh: the mesh for PartitionSpecs and replicated leaves.
  """
  shardings = named_shardings(shardings, mesh)
  leaves = _tree.flatten(adapters)
  placed = jax.tree_util.tree_leaves(shardings, is_leaf=_is_spec)
  table = {p: (np.shape(x), s) for (p, x), s in zip(leaves.items(), placed)}
  replicated = NamedSharding(mesh, P())

  def leaf(keys, x):
    for n in range(len(keys)):
      shape, s = table.get(keys[n:], (None, None))
      if shape == np.shape(x):
        return s
    return replicated

  return _tree.map_with_path(leaf, opt_state)


def restore_sharding(shardings, *, mesh: Mesh | None = None) -> Callable:
  """``fn(path, shape) -> Sharding`` for ``lora_jax.checkpoint.restore(sharding=...)`` from an
  adapter sharding tree (``adapter_shardings``'s; PartitionSpecs need ``mesh``).

  Raises:
    ValueError: ``restore`` asks for a path the tree does not hold (other adapters).
  """
  shardings = shardings if mesh is None else named_shardings(shardings, mesh)
  _need_named(shardings, "shardings")
  lora, extras = split(shardings)
  table = {_tree.join(p): s for p, s in extras.items()}
  for path, lw in lora.items():
    for name, value in fields_of(lw)[0].items():
      table[_tree.join((*path, name))] = value

  def sharding(path: str, shape) -> Sharding:
    if path not in table:
      raise ValueError(f"the checkpoint holds {path!r} {tuple(shape)}, which the sharding tree "
                       f"does not; build it from the adapters of this checkpoint's config.")
    return table[path]

  return sharding


# ----------------------------------------------------------------------- meshes and base specs


def _dims(shape) -> tuple[int, ...]:
  if isinstance(shape, str):
    parts = shape.lower().replace(" ", "").split("x")
    if not all(p.isdigit() for p in parts):
      raise ValueError(f"mesh shape {shape!r} is not like '4x2' (sizes joined by 'x').")
    shape = [int(p) for p in parts]
  dims = tuple(shape)
  if not dims or not all(isinstance(d, int) and d >= 1 for d in dims):
    raise ValueError(f"mesh shape {shape!r} must be positive integers, like '4x2' or (4, 2).")
  return dims


def mesh(shape: str | Sequence[int], axis_names: Sequence[str] = ("data", "model"), *,
         devices: Sequence | None = None) -> Mesh:
  """A ``jax.sharding.Mesh`` of shape ``"4x2"`` (or ``(4, 2)``) over ``jax.devices()``.

  Raises:
    ValueError: a malformed shape, one size per axis name missing, or a product that is not
      the number of devices (on CPU, simulate devices with XLA_FLAGS, set before importing jax).
  """
  dims = _dims(shape)
  devices = list(jax.devices() if devices is None else devices)
  if len(dims) != len(axis_names):
    raise ValueError(f"mesh shape {shape!r} has {len(dims)} sizes for {len(axis_names)} axis "
                     f"names {tuple(axis_names)}.")
  if math.prod(dims) != len(devices):
    raise ValueError(f"mesh shape {shape!r} needs {math.prod(dims)} devices but there are "
                     f"{len(devices)}; pick sizes whose product is {len(devices)}, or on CPU "
                     f"simulate devices with {SIMULATE} set before jax is imported.")
  return jax.make_mesh(dims, tuple(axis_names), axis_types=(AxisType.Auto,) * len(dims),
                       devices=devices)


def initialize(*, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """``jax.distributed.initialize`` for a multi-host (multi-process) run: every process calls it
  first, then builds the same mesh over all processes' devices. Arguments left None are
  detected from the cluster (TPU pods, SLURM, ...). CPU processes exchange data through gloo
  (how the tests run two processes on one machine)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def leaf_shardings(tree, shardings):
  """``shardings`` (NamedShardings matching ``tree``, a kernel kind's position holding its
  dense kernel's) with each kernel-kind position expanded to one NamedSharding per leaf of the
  kind (``kernels.leaf_specs``: codes and scales split like W). An axis a leaf cannot split
  evenly (a 4-bit kernel's packed input axis over a large mesh axis) stays whole."""
  flat = _tree.flatten(tree, is_leaf=kernels.is_kind)
  if isinstance(shardings, Sharding) or not any(kernels.is_kind(x) for x in flat.values()):
    return shardings
  given = _by_path(shardings)

  def one(keys, leaf):
    s = given[keys]
    if not kernels.is_kind(leaf) or not isinstance(s, NamedSharding):
      return s
    specs = kernels.leaf_specs(leaf, s.spec)
    return jax.tree_util.tree_map(lambda x, p: NamedSharding(s.mesh, _fitting(x, p, s.mesh)),
                                  leaf, specs, is_leaf=lambda p: isinstance(p, PartitionSpec))

  return _tree.map_with_path(one, tree, is_leaf=kernels.is_kind)


def _fitting(x, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  axes = list(spec) + [None] * (np.ndim(x) - len(spec))
  for d, name in enumerate(axes):
    names = name if isinstance(name, tuple) else (name,)
    size = int(np.prod([mesh.shape[n] for n in names if n is not None]))
    if size > 1 and np.shape(x)[d] % size:
      axes[d] = None
  return PartitionSpec(*axes)


def put(tree, shardings):
  """``jax.device_put(tree, shardings)`` that also works across processes: every process
  holds the same host values and supplies its own devices' shards (``shardings``: one
  Sharding, or a tree matching ``tree``; at a kernel kind, its dense kernel's sharding, which
  ``leaf_shardings`` expands over the kind's codes and scales)."""
  shardings = leaf_shardings(tree, shardings)
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, s):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  if isinstance(shardings, Sharding):
    return jax.tree_util.tree_map(lambda x: one(x, shardings), tree)
  return jax.tree_util.tree_map(one, tree, shardings)


def _layout(rules, path: str) -> str | None:
  return next((layout for pattern, layout in rules if re.search(pattern, path)), None)


def _kernel_spec(path: str, shape, layout: str, *, fsdp: bool) -> PartitionSpec:
  if len(shape) < 2:
    raise ValueError(f"{path} of shape {tuple(shape)} has a {layout!r} rule but fewer than 2 "
                     "axes.")
  last = ("model", "data" if fsdp else None)  # (second-to-last, last)
  pair = last if layout == "row" else last[::-1]
  return P(*([None] * (len(shape) - 2)), *pair)


def _check_divisible(path: str, shape, spec: PartitionSpec, mesh: Mesh) -> None:
  for axis, (n, name) in enumerate(zip(shape, spec)):
    if name is not None and n % mesh.shape[name]:
      raise ValueError(f"{path} of shape {tuple(shape)}: axis {axis} ({n}) is not divisible by "
                       f"mesh axis {name!r} of size {mesh.shape[name]}; choose a mesh whose "
                       f"{name!r} size divides it.")


def tensor_parallel_specs(params, rules: Sequence[tuple[str, str]], *, mesh: Mesh,
                          fsdp: bool = False):
  """PartitionSpecs for ``params`` on a ("data", "model") mesh from ``(regex, layout)`` rules.

  ``"column"`` splits a kernel's last axis over "model", ``"row"`` its second-to-last; with
  ``fsdp`` the other of the two is split over "data". Leading (stacked layer) axes and
  parameters no rule matches are replicated. The first matching rule wins.

  Raises:
    ValueError: the mesh lacks "data" or "model", no rule matches any parameter, a layout is
      unknown, or a split axis is not divisible by its mesh axis (naming the parameter).
  """
  missing = {"data", "model"} - set(mesh.axis_names)
  if missing:
    raise ValueError(f"mesh axes {mesh.axis_names} lack {sorted(missing)}; make it with "
                     "lora_jax.sharding.mesh('4x2') (axes ('data', 'model')).")
  bad = [layout for _, layout in rules if layout not in ("row", "column")]
  if bad:
    raise ValueError(f"rule layouts must be 'row' or 'column', got {bad}.")
  found = []

  def spec(keys, x):
    path, shape = _tree.join(keys), np.shape(x)
    layout = _layout(rules, path)
    if layout is None:
      return P()
    found.append(path)
    out = _kernel_spec(path, shape, layout, fsdp=fsdp)
    _check_divisible(path, shape, out, mesh)
    return out

  specs = _tree.map_with_path(spec, params, is_leaf=kernels.is_kind)
  if not found:
    raise ValueError(f"no parameter matches the rules {[p for p, _ in rules]}; is this the "
                     "model they were written for?")
  return specs


# ----------------------------------------------------------------------- the train step


class StepShardings(NamedTuple):
  """The NamedShardings a ``ShardedStep`` takes and returns."""

  base: Any
  adapters: Any
  opt_state: Any
  batch: Any


@dataclasses.dataclass(frozen=True)
class ShardedStep:
  """``step(base, adapters, opt_state, batch, *, key=None) -> StepOutput``, jitted with
  in/out shardings; ``lower`` takes the same arguments (for ``.compile().as_text()``)."""

  jitted: Callable
  shardings: StepShardings

  def __call__(self, base, adapters, opt_state, batch, *, key=None) -> StepOutput:
    return self.jitted(base, adapters, opt_state, batch, key)

  def lower(self, base, adapters, opt_state, batch, *, key=None):
    return self.jitted.lower(base, adapters, opt_state, batch, key)


def sharded_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, adapters, *,
                       mesh: Mesh, base_shardings, batch_spec=P("data"), has_aux: bool = False,
                       donate: bool = False) -> ShardedStep:
  """``lora_jax.train_step(..., jit=False)`` under ``jax.jit`` with in/out shardings.

  Args:
    loss_fn, optimizer, has_aux: as for ``lora_jax.train_step``.
    adapters: the adapter tree or its ``jax.eval_shape`` (read for paths, shapes, roles).
    mesh: the device mesh.
    base_shardings: the base tree's PartitionSpecs or NamedShardings (e.g.
      ``tensor_parallel_specs``').
    batch_spec: a PartitionSpec for every batch leaf (a tree prefix of the batch); default
      the leading axis over "data".
    donate: donate the adapters' and optimizer state's buffers.

  Returns:
    A ``ShardedStep``: adapters follow the base (``adapter_shardings``), the optimizer state
    follows the adapters (``opt_state_shardings``), the loss is replicated.
  """
  base = named_shardings(base_shardings, mesh)
  lora_sh = adapter_shardings(adapters, base)
  opt_sh = opt_state_shardings(jax.eval_shape(optimizer.init, adapters), adapters, lora_sh,
                               mesh=mesh)
  batch = named_shardings(batch_spec, mesh)
  replicated = NamedSharding(mesh, P())
  step = train_step(loss_fn, optimizer, has_aux=has_aux, jit=False)
  body = lambda base, adapters, opt_state, batch, key: step(  # noqa: E731
      base, adapters, opt_state, batch, key=key)
  jitted = jax.jit(body, in_shardings=(base, lora_sh, opt_sh, batch, replicated),
                   out_shardings=StepOutput(lora_sh, opt_sh, replicated, None),
                   donate_argnums=(1, 2) if donate else ())
  return ShardedStep(jitted, StepShardings(base, lora_sh, opt_sh, batch))
