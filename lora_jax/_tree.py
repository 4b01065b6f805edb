"""Key paths: the one implementation of flatten / nest / join for the library's trees.

Inside the library a tree path is a tuple of string keys, ``("params", "blk/0", "kernel")``,
so a key that itself holds a '/' stays one key. Paths are joined with '/' only for regular
expression matching (``LoraConfig.targets``) and for display (``join``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

Path = tuple[str, ...]


def key_str(key) -> str:
  """The string of one ``jax.tree_util`` key (dict key, attribute name or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def keys_of(key_path) -> Path:
  """The string keys of a ``jax.tree_util`` key path, without NNX's trailing ``value``."""
  keys = [key_str(k) for k in key_path]
  if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
    keys.pop()
  return tuple(keys)


def join(path: Iterable[str]) -> str:
  """``'/'``-joined path, for regular expressions and messages only."""
  return "/".join(path)


def flatten(tree, *, is_leaf: Callable[[Any], bool] | None = None) -> dict[Path, Any]:
  """``{path tuple: leaf}`` for every leaf of ``tree``, in tree order."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {keys_of(p): leaf for p, leaf in flat}


def nest(flat: Mapping[Path, Any]) -> dict:
  """The nested dict holding ``flat``'s values at their paths (the inverse of ``flatten`` for
  trees of dicts)."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, last = path
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = value
  return tree


def map_with_path(fn: Callable[[Path, Any], Any], tree, *,
                  is_leaf: Callable[[Any], bool] | None = None):
  """``jax.tree_util.tree_map_with_path`` with path tuples for ``fn``."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(keys_of(p), x), tree, is_leaf=is_leaf)


def listing(paths: Iterable, limit: int = 6) -> str:
  """A short, comma-separated listing of paths (tuples are '/'-joined) for error messages."""
  paths = [p if isinstance(p, str) else join(p) for p in paths]
  shown = ", ".join(paths[:limit])
  more = len(paths) - limit
  return shown + (f", ... ({more} more; use lora_jax.plan() to list all)" if more > 0 else "")
