"""Adapter checkpoints with orbax: the trainable tree, its description, optimizer state, step
and data position. The frozen base is never written.

Saves are atomic (orbax's ``CheckpointManager`` renames a complete step into place; the newest
``keep`` are kept); ``restore`` refuses a base whose adapted leaves differ in name or shape from
the one the adapters were trained on. The folder's layout is specified in ``docs/formats.md``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lora_jax import _tree
from lora_jax._tree import listing
from lora_jax.adapters import fields_of, split
from lora_jax.kinds import by_class_name
from lora_jax.config import LoraConfig
from lora_jax.targets import base_leaves

FORMAT = "lora_jax.checkpoint/2"


class DamagedCheckpoint(ValueError):
  """A saved step cannot be read back as written (unreadable, or a checksum differs)."""


class CheckpointFallbackWarning(UserWarning):
  """``restore`` used an older step because the newer ones are damaged."""


class Restored(NamedTuple):
  """What ``restore`` returns: ``adapters`` is the trainable tree (LoraWeights and extras)."""

  adapters: dict
  opt_state: Any
  step: int
  data_position: Any
  config: LoraConfig
  meta: dict


# ----------------------------------------------------------------------- descriptions


def base_identity(base, *, name: str | None = None) -> dict:
  """``{"name", "sha256", "leaves"}``: a hash over every leaf's path, shape and dtype of the base
  tree (concrete or abstract); equal hashes mean the same architecture, not the same weights."""
  h = hashlib.sha256()
  leaves = base_leaves(base)
  for path in sorted(leaves):
    leaf = leaves[path]
    h.update(f"{json.dumps(path)}:{tuple(leaf.shape)}:{jnp.dtype(leaf.dtype).name};".encode())
  return {"name": name, "sha256": h.hexdigest(), "leaves": len(leaves)}


def _adapter_entry(path, adapter, kernel) -> dict:
  """An adapter's description: its kind, static fields and arrays' shapes (any adapter kind)."""
  data, meta = fields_of(adapter)
  return {"keys": list(path), "path": _tree.join(path), "kind": type(adapter).__name__,
          "meta": meta, "kernel_shape": list(kernel.shape),
          "arrays": {name: {"shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name}
                     for name, x in data.items()}}


def _extra_entry(path, x) -> dict:
  return {"keys": list(path), "path": _tree.join(path), "shape": list(x.shape),
          "dtype": jnp.dtype(x.dtype).name}


def describe(adapters, *, config: LoraConfig, base, base_name: str | None = None) -> dict:
  """The JSON description saved with the trainable tree."""
  leaves = base_leaves(base)
  lora, extras = split(adapters)
  missing = [p for p in (*lora, *extras) if p not in leaves]
  if missing:
    raise ValueError(f"adapters: paths {listing(missing, 4)} are not in base; pass the base "
                     "tree the adapters were made for.")
  return {
      "format": FORMAT,
      "config": config.to_dict(),
      "adapters": [_adapter_entry(p, lw, leaves[p]) for p, lw in lora.items()],
      "extras": [_extra_entry(p, x) for p, x in extras.items()],
      "base": base_identity(base, name=base_name),
  }


def _arrays(adapters) -> list:
  """The arrays written, in the description's order: each adapter's (A, B for LoRA), then
  the extras."""
  lora, extras = split(adapters)
  return [x for a in lora.values() for x in fields_of(a)[0].values()] + list(extras.values())


# ----------------------------------------------------------------------- save / restore


def _manager(directory, keep: int | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                         create=True)
  return ocp.CheckpointManager(pathlib.Path(directory).resolve(), options=options)


def save(directory, step: int, adapters, *, config: LoraConfig, base, opt_state=None,
         data_position=None, base_name: str | None = None, keep: int | None = 3) -> pathlib.Path:
  """Saves the trainable tree (adapters and ``modules_to_save`` extras; never the base), its
  description, ``opt_state``, ``step`` and ``data_position`` (any JSON value: an example
  index, an epoch and offset, ...) as step ``step`` under ``directory``, keeping the newest
  ``keep`` steps (None: all).

  ``base`` (concrete or ``jax.eval_shape`` output) is only read for its paths and shapes, to
  record which model the adapters belong to. Saving a step that exists replaces it. Returns
  the step's folder.
  """
  if not isinstance(step, int) or isinstance(step, bool) or step < 0:
    raise ValueError(f"step must be an integer >= 0, got {step!r}.")
  if keep is not None and (not isinstance(keep, int) or keep < 1):
    raise ValueError(f"keep must be an integer >= 1 or None, got {keep!r}.")
  if base_name is not None and not isinstance(base_name, str):
    raise ValueError(f"base_name must be a string or None, got {base_name!r}.")
  try:
    json.dumps(data_position)
  except (TypeError, ValueError) as e:
    raise ValueError(f"data_position must be JSON-serializable (ints, strings, lists, "
                     f"dicts), got {data_position!r}: {e}") from None
  meta = describe(adapters, config=config, base=base, base_name=base_name)
  meta.update(step=step, data_position=data_position, has_opt_state=opt_state is not None)
  arrays = {"trainable": _arrays(adapters)}
  if opt_state is not None:
    arrays["opt_state"] = jax.tree_util.tree_leaves(opt_state)
  meta["checksums"] = {k: [_checksum(x) for x in v] for k, v in arrays.items()}
  items = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
  items["meta"] = ocp.args.JsonSave(meta)
  with _manager(directory, keep) as manager:
    if step in manager.all_steps():  # saving a step again replaces it (a damaged one, say)
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    return pathlib.Path(manager.directory) / str(step)


def _checksum(x) -> str | None:
  """sha256 of an array's bytes (None for an array this process cannot see whole: a
  multi-host shard; orbax still checks its own metadata for those)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def _verify(where, name: str, arrays: list, sums: list | None) -> None:
  for i, (x, want) in enumerate(zip(arrays, sums or [])):
    if want is not None and _checksum(x) != want:
      raise DamagedCheckpoint(f"{where}: {name} array {i} does not match the checksum written "
                              f"with it; the step is damaged.")


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
    raise DamagedCheckpoint(f"{pathlib.Path(directory) / str(step)}: cannot read its "
                            f"description (meta: {type(e).__name__}: {str(e)[:200]}); the "
                            f"checkpoint is damaged or not a lora_jax checkpoint.") from e
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
  """Raises ValueError (naming the paths) unless ``base`` has the adapted kernels and the saved
  extras' leaves, with the shapes, that the checkpoint described by ``meta`` was trained on."""
  leaves = base_leaves(base)
  missing, wrong = [], []
  wanted = [(e["keys"], e["kernel_shape"]) for e in meta["adapters"]]
  wanted += [(e["keys"], e["shape"]) for e in meta.get("extras", [])]
  for keys, shape in wanted:
    path = tuple(keys)
    if path not in leaves:
      missing.append(path)
    elif list(leaves[path].shape) != shape:
      wrong.append(f"{_tree.join(path)} {tuple(leaves[path].shape)} (adapters need "
                   f"{tuple(shape)})")
  problems = [f"{label}: {listing(items, 4)}" for label, items in
              (("missing parameters", missing), ("mis-shaped parameters", wrong)) if items]
  if problems:
    name = meta["base"].get("name") or "another model"
    raise ValueError(f"{where} holds adapters for {name}, not for this base; "
                     + "; ".join(problems) + ".")


def _placed(shape, dtype, sharding, path: str):
  s = sharding(path, tuple(shape)) if callable(sharding) else sharding
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=s)


def _targets(meta: dict, sharding) -> list:
  """Abstract arrays, placed, in the order ``_arrays`` wrote them."""
  out = []
  for e in meta["adapters"]:
    out += [_placed(a["shape"], a["dtype"], sharding, f"{e['path']}/{name}")
            for name, a in e["arrays"].items()]
  return out + [_placed(e["shape"], e["dtype"], sharding, e["path"])
                for e in meta.get("extras", [])]


def _rebuild(meta: dict, arrays: list) -> dict:
  """The trainable tree from the description and the restored arrays."""
  arrays = iter(arrays)
  flat = {}
  for e in meta["adapters"]:
    data = {name: next(arrays) for name in e["arrays"]}
    static = {k: tuple(v) if isinstance(v, list) else v for k, v in e["meta"].items()}
    flat[tuple(e["keys"])] = by_class_name(e["kind"])(**data, **static)  # JSON lists: tuples
  for e in meta.get("extras", []):
    flat[tuple(e["keys"])] = next(arrays)
  return _tree.nest(flat)


def restore(directory, *, base, step: int | None = None, opt_state=None,
            sharding: jax.sharding.Sharding | Callable | None = None) -> Restored:
  """Restores the trainable tree (latest intact step by default) for ``base``.

  Every array is checked against the checksum written with it. Without ``step``, a damaged
  newest step (unreadable files, a checksum that differs) falls back to the newest intact one,
  with a ``CheckpointFallbackWarning`` naming the step used and why.

  Args:
    directory: the folder given to ``save``.
    base: the frozen base tree (concrete or abstract): checked against the saved description
      (a different model, by adapted-kernel names or shapes, is refused).
    step: a saved step; default the latest intact one.
    opt_state: a template of the optimizer state (e.g. ``optimizer.init(adapters)`` or its
      ``jax.eval_shape``) to restore it; None skips it.
    sharding: where to place the restored arrays: one ``jax.sharding.Sharding`` for every
      array, or ``fn(path, shape) -> Sharding`` (path '/'-joined, ``.../a`` and ``.../b`` for
      factors); default: this process's first device. The optimizer state follows its
      template's shardings.

  Returns:
    ``Restored(adapters, opt_state, step, data_position, config, meta)``.

  Raises:
    FileNotFoundError: no complete checkpoint in ``directory``.
    DamagedCheckpoint: the step asked for, or every step, is damaged.
    ValueError: the checkpoint belongs to another base, or lacks the optimizer state asked for.
  """
  directory = pathlib.Path(directory)
  if step is not None:
    return _restore_step(directory, _pick_step(directory, step), base, opt_state, sharding)
  damaged = []
  for candidate in reversed(steps(directory) or [_pick_step(directory, None)]):
    try:
      restored = _restore_step(directory, candidate, base, opt_state, sharding)
    except DamagedCheckpoint as e:
      damaged.append(str(e))
      continue
    if damaged:
      warnings.warn(CheckpointFallbackWarning(
          f"restored step {candidate} of {directory}, the newest intact one; newer steps are "
          f"damaged: {' | '.join(damaged)}"), stacklevel=2)
    return restored
  raise DamagedCheckpoint(f"{directory}: every saved step is damaged: {' | '.join(damaged)}")


def _restore_step(directory: pathlib.Path, step: int, base, opt_state, sharding) -> Restored:
  meta = read_meta(directory, step=step)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{directory / str(step)} is not a lora_jax adapter checkpoint of this "
                     f"version (format {meta.get('format')!r}, expected {FORMAT!r}).")
  check_base(meta, base, where=str(directory / str(step)))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  items = {"trainable": ocp.args.StandardRestore(_targets(meta, sharding))}
  if opt_state is not None:
    if not meta["has_opt_state"]:
      raise ValueError(f"{directory / str(step)} has no optimizer state; restore with "
                       "opt_state=None and initialise a fresh one.")
    template = _abstract(jax.tree_util.tree_leaves(opt_state))
    items["opt_state"] = ocp.args.StandardRestore(template)
  try:
    with _manager(directory, None) as manager:
      out = manager.restore(step, args=ocp.args.Composite(**items))
  except (OSError, ValueError, KeyError, RuntimeError) as e:
    raise DamagedCheckpoint(f"{directory / str(step)}: cannot read the saved arrays "
                            f"({type(e).__name__}: {str(e)[:300]}); the step is damaged "
                            f"(saved steps: {steps(directory)}).") from e
  sums = meta.get("checksums", {})
  for name in items:
    _verify(directory / str(step), name, out[name], sums.get(name))
  state = None
  if opt_state is not None:
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(opt_state),
                                         out["opt_state"])
  return Restored(_rebuild(meta, out["trainable"]), state, meta["step"],
                  meta["data_position"], LoraConfig.from_dict(meta["config"]), meta)


def _abstract(tree):
  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree_util.tree_map(leaf, tree)
