"""Small test helpers (no chex dependency)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax


def assert_trees_close(actual, desired, *, rtol=1e-5, atol=1e-6):
  """Leaf-by-leaf ``np.testing.assert_allclose`` on two trees of the same structure."""
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(desired)
  for a, d in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(desired)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(d, np.float64),
                               rtol=rtol, atol=atol)


def randomize_b(adapters, key, scale=0.5):
  """Adapters with random (nonzero) B, so the adapter changes the output."""
  flat = jax.tree_util.tree_leaves(adapters, is_leaf=lambda x: isinstance(x, lora_jax.LoraWeights))
  keys = iter(jax.random.split(key, len(flat)))

  def fill(lw):
    if not isinstance(lw, lora_jax.LoraWeights):  # a trained extra stays as it is
      return lw
    b = scale * jax.random.normal(next(keys), lw.b.shape, lw.b.dtype)
    return dataclasses.replace(lw, b=b)

  return jax.tree_util.tree_map(fill, adapters,
                                is_leaf=lambda x: isinstance(x, lora_jax.LoraWeights))


def f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def flat_adapters(trainable):
  """``{'/'-joined path: LoraWeights}`` of a trainable tree (extras left out)."""
  lora, _ = lora_jax.adapters.split(trainable)
  return {"/".join(p): lw for p, lw in lora.items()}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
  """``lora-jax ARGV`` run in this process (no interpreter start-up): exit code, stdout, stderr
  (argparse's errors exit through ``SystemExit``)."""
  from lora_jax.app import cli
  try:
    code = cli.main(list(argv))
  except SystemExit as e:
    code = e.code
  captured = capsys.readouterr()
  return code, captured.out, captured.err
