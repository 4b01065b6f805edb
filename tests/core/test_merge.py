"""merge / unmerge: equal to the transform, round trip, pure, jit-able, sharding-preserving."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lora_jax
from _models import ALL_CASES, linen_case
from _utils import assert_trees_close, f64, flat_adapters, randomize_b


def _adapters(case, **config):
  uses = lora_jax.analyze(case.fn, case.params, case.x)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8.0, **config)
  adapters = lora_jax.init(config, case.params, key=jax.random.key(1), uses=uses)
  return randomize_b(adapters, jax.random.key(2))


@pytest.mark.parametrize("make_case", ALL_CASES, ids=lambda c: c.__name__)
def test_merged_output_equals_transformed(make_case):
  case = make_case()
  adapters = _adapters(case)
  merged_out = case.fn(lora_jax.merge(case.params, adapters), case.x)
  np.testing.assert_allclose(merged_out, lora_jax.lora(case.fn)(case.params, adapters, case.x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("make_case", ALL_CASES, ids=lambda c: c.__name__)
def test_unmerge_restores_base(make_case, dtype, tol):
  case = make_case(jnp.dtype(dtype))
  adapters = _adapters(case)
  merged = jax.jit(lora_jax.merge)(case.params, adapters)
  changed = [not np.array_equal(f64(a), f64(b)) for a, b in
             zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(case.params))]
  assert sum(changed) == len(flat_adapters(adapters))
  restored = jax.jit(lora_jax.unmerge)(merged, adapters)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(case.params)
  for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(case.params)):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(f64(got), f64(want), atol=tol * 10, rtol=tol)


def test_merge_scale_is_alpha_over_rank_and_rslora():
  case = linen_case()
  plain = flat_adapters(_adapters(case))["params/dense/kernel"]
  rs = flat_adapters(_adapters(case, use_rslora=True))["params/dense/kernel"]
  assert plain.scale == 8.0 / 4 and rs.scale == 8.0 / 2.0
  w = case.params["params"]["dense"]["kernel"]
  want = f64(w) + 2.0 * f64(plain.a) @ f64(plain.b)
  got = lora_jax.merge(case.params, _adapters(case))["params"]["dense"]["kernel"]
  np.testing.assert_allclose(f64(got), want, rtol=1e-5, atol=1e-6)


def test_merge_does_not_mutate_inputs():
  case = linen_case()
  adapters = _adapters(case)
  before = jax.tree_util.tree_map(np.array, (case.params, adapters))
  lora_jax.unmerge(lora_jax.merge(case.params, adapters), adapters)
  after = jax.tree_util.tree_map(np.array, (case.params, adapters))
  for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(x, y)


def test_merge_preserves_sharding():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  kernel = NamedSharding(mesh, P("data", "model"))
  params = {"w": {"kernel": jax.device_put(jnp.ones((8, 16)), kernel),
                  "bias": jax.device_put(jnp.zeros((16,)), NamedSharding(mesh, P("model")))}}
  config = lora_jax.LoraConfig(targets="w", rank=2)
  adapters = randomize_b(lora_jax.init(config, params, key=jax.random.key(0)), jax.random.key(1))
  merged = lora_jax.merge(params, adapters)
  assert merged["w"]["kernel"].sharding == kernel
  assert merged["w"]["bias"] is params["w"]["bias"]
  restored = lora_jax.unmerge(merged, adapters)
  assert restored["w"]["kernel"].sharding == kernel
  assert_trees_close(restored, params, atol=1e-6)
  jitted = jax.jit(lora_jax.merge, out_shardings=None)(params, adapters)
  assert jitted["w"]["kernel"].sharding.is_equivalent_to(kernel, 2)


def test_merge_rejects_adapters_of_another_tree():
  case = linen_case()
  adapters = _adapters(case)
  with pytest.raises(ValueError, match=r"adapters hold paths that are not in the base tree: "
                                       r"params/dense/kernel"):
    lora_jax.merge({"params": {"other": case.params["params"]["query"]}}, adapters)
  small = {"params": {**case.params["params"], "dense": {"kernel": jnp.ones((3, 3)),
                                                         "bias": jnp.ones((3,))}}}
  with pytest.raises(ValueError, match=r"adapter at 'params/dense/kernel' .* does not fit the base "
                                       r"kernel of shape \(3, 3\)"):
    lora_jax.merge(small, adapters)
  # a plain array is a trained extra (modules_to_save): it must have its base leaf's shape
  with pytest.raises(ValueError, match=r"trained extra at 'params/dense/kernel' has shape "
                                       r"\(2, 2\) but the base leaf has \(16, 16\)"):
    lora_jax.merge(case.params, {"params": {"dense": {"kernel": jnp.ones((2, 2))}}})
