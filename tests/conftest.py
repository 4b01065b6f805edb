"""Strict test environment: rank promotion raises, warnings are errors (pyproject.toml), and
eight simulated CPU devices exist for the sharding tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
