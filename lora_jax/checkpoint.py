"""Adapter checkpoints with orbax: the adapter tree, its description, optimizer state, step and
data position. The frozen base is never written.

A checkpoint folder holds one sub-folder per saved step (orbax's ``CheckpointManager``: a save is
written to a temporary folder and renamed into place when complete, so an interrupted save never
replaces the last good one; the newest ``keep`` are kept). Each step holds:

  adapters    ``{path: {"a": A, "b": B}}`` arrays (orbax ``StandardSave``)
  opt_state   the optax state, if given
  meta        JSON: the LoraConfig, each adapter's scale / axis roles / dropout, the base
              model's identity (name, a hash of every leaf's path, shape and dtype, and the
              adapted kernels' shapes), the step and the data position.

``restore`` refuses a base whose adapted kernels differ (names or shapes) from the one the
adapters were trained on, and can place the restored arrays on any sharding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lora_jax.adapters import LoraWeights, _nest, flatten
from lora_jax.config import LoraConfig
from lora_jax.targets import leaves_by_path, listing

FORMAT = "lora_jax.checkpoint/1"


class Restored(NamedTuple):
  """What ``restore`` returns."""

  adapters: dict
  opt_state: Any
  step: int
  data_position: Any
  config: LoraConfig
  meta: dict


# ----------------------------------------------------------------------- descriptions


def config_to_json(config: LoraConfig) -> dict:
  """A LoraConfig as JSON-able values (``config_from_json`` reads it back)."""
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.name == "dtype":
      value = jnp.dtype(value).name
    elif isinstance(value, Mapping):
      value = dict(value)
    elif isinstance(value, tuple):
      value = list(value)
    out[field.name] = value
  return out


def config_from_json(data: Mapping) -> LoraConfig:
  known = {f.name for f in dataclasses.fields(LoraConfig)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ValueError(f"config has unknown fields {unknown}; it was written by a newer "
                     f"lora_jax (known fields: {sorted(known)}).")
  values = dict(data)
  if "dtype" in values:
    values["dtype"] = jnp.dtype(values["dtype"])
  for name in ("targets", "exclude", "kernel_names"):
    if isinstance(values.get(name), list):
      values[name] = tuple(values[name])
  return LoraConfig(**values)


def base_identity(base, *, name: str | None = None) -> dict:
  """``{"name", "sha256", "leaves"}``: a hash over every leaf's path, shape and dtype of the base
  tree (concrete or abstract); equal hashes mean the same architecture, not the same weights."""
  h = hashlib.sha256()
  leaves = leaves_by_path(base)
  for path in sorted(leaves):
    leaf = leaves[path]
    h.update(f"{path}:{tuple(leaf.shape)}:{jnp.dtype(leaf.dtype).name};".encode())
  return {"name": name, "sha256": h.hexdigest(), "leaves": len(leaves)}


def describe(adapters, *, config: LoraConfig, base, base_name: str | None = None) -> dict:
  """The JSON description saved with the adapters."""
  kernels = leaves_by_path(base)
  flat = flatten(adapters)
  missing = [p for p in flat if p not in kernels]
  if missing:
    raise ValueError(f"adapters: paths {listing(missing, 4)} are not in base; pass the base "
                     "tree the adapters were made for.")
  return {
      "format": FORMAT,
      "config": config_to_json(config),
      "adapters": {p: {"scale": lw.scale, "axes": lw.axes, "dropout": lw.dropout,
                       "rank": lw.rank, "kernel_shape": list(kernels[p].shape),
                       "a_shape": list(lw.a.shape), "b_shape": list(lw.b.shape),
                       "dtype": jnp.dtype(lw.a.dtype).name}
                   for p, lw in flat.items()},
      "base": base_identity(base, name=base_name),
  }


# ----------------------------------------------------------------------- save / restore


def _manager(directory, keep: int | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                         create=True)
  return ocp.CheckpointManager(pathlib.Path(directory).resolve(), options=options)


def _arrays(adapters) -> dict:
  """The nested tree of plain ``{"a": A, "b": B}`` dicts that is written."""
  return _nest({tuple(p.split("/")): {"a": lw.a, "b": lw.b}
                for p, lw in flatten(adapters).items()})


def _get(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def save(directory, step: int, adapters, *, config: LoraConfig, base, opt_state=None,
         data_position=None, base_name: str | None = None, keep: int | None = 3) -> pathlib.Path:
  """Saves the adapters (never the base), their description, ``opt_state``, ``step`` and
  ``data_position`` (any JSON value: an example index, an epoch and offset, ...) as step
  ``step`` under ``directory``, keeping the newest ``keep`` steps (None: all).

  ``base`` (concrete or ``jax.eval_shape`` output) is only read for its paths and shapes, to
  record which model the adapters belong to. Returns the step's folder.
  """
  if not isinstance(step, int) or isinstance(step, bool) or step < 0:
    raise ValueError(f"step must be an integer >= 0, got {step!r}.")
  if keep is not None and (not isinstance(keep, int) or keep < 1):
    raise ValueError(f"keep must be an integer >= 1 or None, got {keep!r}.")
  meta = describe(adapters, config=config, base=base, base_name=base_name)
  meta.update(step=step, data_position=data_position, has_opt_state=opt_state is not None)
  try:
    json.dumps(meta)
  except TypeError as e:
    raise ValueError(f"data_position must be JSON-serializable (ints, strings, lists, "
                     f"dicts), got {data_position!r}: {e}") from None
  items = {"adapters": ocp.args.StandardSave(_arrays(adapters)),
           "meta": ocp.args.JsonSave(meta)}
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  with _manager(directory, keep) as manager:
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    return pathlib.Path(manager.directory) / str(step)


def steps(directory) -> list[int]:
  """The complete checkpoints' steps under ``directory``, oldest first."""
  if not pathlib.Path(directory).is_dir():
    return []
  with _manager(directory, None) as manager:
    return sorted(manager.all_steps())


def read_meta(directory, *, step: int | None = None) -> dict:
  """The JSON description of a checkpoint (latest step by default), without reading arrays."""
  step = _pick_step(directory, step)
  try:
    with _manager(directory, None) as manager:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  except (OSError, ValueError, KeyError, RuntimeError) as e:
    raise ValueError(f"{pathlib.Path(directory) / str(step)}: cannot read its description "
                     f"(meta: {type(e).__name__}: {str(e)[:200]}); the checkpoint is damaged or "
                     f"not a lora_jax checkpoint.") from e
  return meta["meta"]


def _pick_step(directory, step: int | None) -> int:
  directory = pathlib.Path(directory)
  available = steps(directory)
  if not available:
    raise FileNotFoundError(f"no complete lora_jax checkpoint in {directory}; save one with "
                            "lora_jax.checkpoint.save.")
  if step is None:
    return available[-1]
  if step not in available:
    raise ValueError(f"step {step} is not in {directory}; saved steps: {available}.")
  return step


def check_base(meta: dict, base, *, where: str = "checkpoint") -> None:
  """Raises ValueError (naming the paths) unless ``base`` has the adapted kernels, with the
  shapes, that the adapters described by ``meta`` were trained on."""
  kernels = leaves_by_path(base)
  missing, wrong = [], []
  for path, info in meta["adapters"].items():
    if path not in kernels:
      missing.append(path)
    elif list(kernels[path].shape) != info["kernel_shape"]:
      wrong.append(f"{path} {tuple(kernels[path].shape)} (adapters need "
                   f"{tuple(info['kernel_shape'])})")
  problems = [f"{label}: {listing(items, 4)}" for label, items in
              (("missing kernels", missing), ("mis-shaped kernels", wrong)) if items]
  if problems:
    name = meta["base"].get("name") or "another model"
    raise ValueError(f"{where} holds adapters for {name}, not for this base; "
                     + "; ".join(problems) + ".")


def _placed(shape, dtype, sharding, path: str):
  s = sharding(path, tuple(shape)) if callable(sharding) else sharding
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=s)


def restore(directory, *, base, step: int | None = None, opt_state=None,
            sharding: jax.sharding.Sharding | Callable | None = None) -> Restored:
  """Restores the adapters (latest step by default) for ``base``.

  Args:
    directory: the folder given to ``save``.
    base: the frozen base tree (concrete or abstract): checked against the saved description
      (a different model, by adapted-kernel names or shapes, is refused).
    step: a saved step; default the latest complete one.
    opt_state: a template of the optimizer state (e.g. ``optimizer.init(adapters)`` or its
      ``jax.eval_shape``) to restore it; None skips it.
    sharding: where to place the restored adapters: one ``jax.sharding.Sharding`` for every
      array, or ``fn(path, shape) -> Sharding``; default: the default device. The optimizer
      state follows its template's shardings.

  Returns:
    ``Restored(adapters, opt_state, step, data_position, config, meta)``.
  """
  directory = pathlib.Path(directory)
  step = _pick_step(directory, step)
  meta = read_meta(directory, step=step)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{directory / str(step)} is not a lora_jax adapter checkpoint "
                     f"(format {meta.get('format')!r}, expected {FORMAT!r}).")
  check_base(meta, base, where=str(directory / str(step)))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = _nest({tuple(p.split("/")): {
      "a": _placed(i["a_shape"], i["dtype"], sharding, p + "/a"),
      "b": _placed(i["b_shape"], i["dtype"], sharding, p + "/b")}
      for p, i in meta["adapters"].items()})
  items = {"adapters": ocp.args.StandardRestore(target)}
  if opt_state is not None:
    if not meta["has_opt_state"]:
      raise ValueError(f"{directory / str(step)} has no optimizer state; restore with "
                       "opt_state=None and initialise a fresh one.")
    items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
  try:
    with _manager(directory, None) as manager:
      out = manager.restore(step, args=ocp.args.Composite(**items))
  except (OSError, ValueError, KeyError, RuntimeError) as e:
    raise ValueError(f"{directory / str(step)}: cannot read the saved arrays "
                     f"({type(e).__name__}: {str(e)[:300]}); the checkpoint is damaged, restore "
                     f"an earlier step (saved: {steps(directory)}).") from e
  adapters = _nest({tuple(p.split("/")): LoraWeights(
      a=_get(out["adapters"], p)["a"], b=_get(out["adapters"], p)["b"], scale=i["scale"],
      axes=i["axes"], dropout=i["dropout"]) for p, i in meta["adapters"].items()})
  return Restored(adapters, out["opt_state"] if opt_state is not None else None, meta["step"],
                  meta["data_position"], config_from_json(meta["config"]), meta)


def _abstract(tree):
  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree_util.tree_map(leaf, tree)
