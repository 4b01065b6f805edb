"""Strict test environment: rank promotion raises, warnings are errors (pyproject.toml), and
eight simulated CPU devices exist for the sharding tests.

One persistent XLA compilation cache serves the whole session, this process and the ``lora-jax``
processes the tests start (they inherit its environment variables): the same train step
compiled by twenty command-line runs is compiled once. Every compile is kept, however short
(a threshold of 0.5 s made a two-step ``lora-jax train`` take 12.3 s on a warm cache instead
of 8.4 s: its many small programs add up). It is a fresh folder per session, removed at exit
(a ``JAX_COMPILATION_CACHE_DIR`` the user set is used as it is, and kept).
"""

import atexit
import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # keep the user's other XLA flags
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="lora_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
