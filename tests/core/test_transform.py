"""The transform equals the float64 dense reference x @ (W + s·A@B), in every model style."""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from _fixtures import reference
from _models import ALL_CASES, D, linen_case, linen_stack_case, plain_case, plain_fn
from _utils import assert_trees_close, f64, randomize_b

TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=4e-2)}


def _setup(make_case, dtype="float32", *, rank=4, alpha=8.0, random_b=True):
  case = make_case(jnp.dtype(dtype))
  uses = lora_jax.analyze(case.fn, case.params, case.x)
  config = lora_jax.LoraConfig(targets="all-linear", rank=rank, alpha=alpha)
  adapters = lora_jax.init(config, case.params, key=jax.random.key(1), uses=uses)
  if random_b:
    adapters = randomize_b(adapters, jax.random.key(2))
  return case, adapters


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("make_case", ALL_CASES, ids=lambda c: c.__name__)
def test_matches_float64_reference(make_case, dtype):
  case, adapters = _setup(make_case, dtype)
  out = jax.jit(lora_jax.lora(case.fn))(case.params, adapters, case.x)
  assert out.dtype == case.x.dtype
  np.testing.assert_allclose(f64(out), reference(case, adapters), **TOL[dtype])


@pytest.mark.parametrize("make_case", ALL_CASES, ids=lambda c: c.__name__)
def test_identity_at_init(make_case):
  case, adapters = _setup(make_case, random_b=False)
  out = lora_jax.lora(case.fn)(case.params, adapters, case.x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(case.fn(case.params, case.x)))


def test_reference_check_can_fail():
  case, adapters = _setup(linen_case)
  wrong = jax.tree_util.tree_map(lambda t: 1.5 * t, adapters)
  out = lora_jax.lora(case.fn)(case.params, wrong, case.x)
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(f64(out), reference(case, adapters), **TOL["float32"])


@pytest.mark.parametrize("make_case", ALL_CASES, ids=lambda c: c.__name__)
def test_grad_matches_merged_autodiff(make_case):
  case, adapters = _setup(make_case)
  loss = lambda p, x: jnp.sum(jnp.sin(case.fn(p, x)))  # noqa: E731
  got = jax.jit(jax.grad(lambda a: lora_jax.lora(loss)(case.params, a, case.x)))(adapters)
  want = jax.grad(lambda a: loss(lora_jax.merge(case.params, a), case.x))(adapters)
  assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_vmap_over_inputs_and_over_adapters():
  case, adapters = _setup(linen_case)
  adapted = lora_jax.lora(case.fn)
  xs = jnp.stack([case.x, 2 * case.x])
  got = jax.vmap(adapted, in_axes=(None, None, 0))(case.params, adapters, xs)
  np.testing.assert_allclose(got[1], adapted(case.params, adapters, 2 * case.x), rtol=1e-5,
                             atol=1e-5)
  pair = jax.tree_util.tree_map(lambda t: jnp.stack([t, -t]), adapters)
  both = jax.vmap(adapted, in_axes=(None, 0, None))(case.params, pair, case.x)
  neg = jax.tree_util.tree_map(lambda t: -t, adapters)
  np.testing.assert_allclose(both[1], adapted(case.params, neg, case.x), rtol=1e-5, atol=1e-5)


def test_under_outer_scan_checkpoint_and_cond():
  case, adapters = _setup(plain_case)

  def fn(params, x):
    body = jax.checkpoint(lambda c, _: (plain_fn(params, c)[..., 0, :D // 2].repeat(2, -1), None))
    y, _ = jax.lax.scan(body, x, None, length=2)
    return jax.lax.cond(jnp.sum(y) > 0, lambda: y, lambda: -y)

  got = jax.jit(lora_jax.lora(fn))(case.params, adapters, case.x)
  want = fn(lora_jax.merge(case.params, adapters), case.x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_transposed_use_is_factored():
  params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (6, 10))}}
  config = lora_jax.LoraConfig(targets="w", rank=2)
  adapters = randomize_b(lora_jax.init(config, params, key=jax.random.key(1)), jax.random.key(2))
  fn = lambda p, y: y @ p["w"]["kernel"].T  # noqa: E731
  y = jnp.ones((3, 10))
  with warnings.catch_warnings():
    warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
    got = lora_jax.lora(fn)(params, adapters, y)
  np.testing.assert_allclose(got, fn(lora_jax.merge(params, adapters), y), rtol=1e-5, atol=1e-5)


def test_fallback_is_taken_and_reported():
  params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}}
  config = lora_jax.LoraConfig(targets="w", rank=2)
  adapters = randomize_b(lora_jax.init(config, params, key=jax.random.key(1)), jax.random.key(2))
  fn = lambda p, x: x @ p["w"]["kernel"] + jnp.sum(p["w"]["kernel"] ** 2)  # noqa: E731
  x = jnp.ones((2, 8))
  with pytest.warns(lora_jax.LoraFallbackWarning, match=r"w/kernel \(integer_pow\)"):
    got = lora_jax.lora(fn)(params, adapters, x)
  np.testing.assert_allclose(got, fn(lora_jax.merge(params, adapters), x), rtol=1e-5)
  uses = lora_jax.analyze(fn, params, x)
  assert uses["w/kernel"].route == "merged"
  assert uses["w/kernel"].consumers == ("dot_general", "integer_pow")
  shown = lora_jax.plan(config, params, uses=uses)
  assert [t.path for t in shown.fallbacks] == ["w/kernel"]
  assert "1 used outside a matmul (merged fallback)" in str(shown)


def test_static_arguments_pass_through():
  case, adapters = _setup(linen_case)
  fn = lambda p, x, *, negate: -case.fn(p, x) if negate else case.fn(p, x)  # noqa: E731
  got = lora_jax.lora(fn)(case.params, adapters, case.x, negate=True)
  np.testing.assert_allclose(got, -lora_jax.lora(case.fn)(case.params, adapters, case.x))


def test_dropout_changes_only_the_adapter_branch():
  case = linen_stack_case()
  uses = lora_jax.analyze(case.fn, case.params, case.x)
  config = lora_jax.LoraConfig(targets="kernel", rank=4, dropout=0.5)
  adapters = lora_jax.init(config, case.params, key=jax.random.key(1), uses=uses)
  adapted = lora_jax.lora(case.fn)
  base_out = case.fn(case.params, case.x)
  key = jax.random.key(3)
  np.testing.assert_array_equal(adapted(case.params, adapters, case.x, lora_dropout_key=key),
                                base_out)  # B = 0: dropout on the adapter input changes nothing
  adapters = randomize_b(adapters, jax.random.key(2))
  plain = adapted(case.params, adapters, case.x)
  d1 = adapted(case.params, adapters, case.x, lora_dropout_key=key)
  d2 = adapted(case.params, adapters, case.x, lora_dropout_key=jax.random.key(4))
  assert not np.allclose(d1, plain) and not np.allclose(d1, d2)
  np.testing.assert_array_equal(d1, adapted(case.params, adapters, case.x, lora_dropout_key=key))


def test_nested_jit_and_custom_jvp_uses():
  params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}}
  config = lora_jax.LoraConfig(targets="w", rank=2)
  adapters = randomize_b(lora_jax.init(config, params, key=jax.random.key(1)), jax.random.key(2))
  x = jnp.ones((2, 8))
  inner = jax.jit(lambda w, x: jnp.einsum("bd,dk->bk", x, w.astype(jnp.float32)))
  nested = lambda p, x: inner(p["w"]["kernel"], x)  # noqa: E731
  with warnings.catch_warnings():
    warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
    got = jax.jit(lora_jax.lora(nested))(params, adapters, x)
  np.testing.assert_allclose(got, nested(lora_jax.merge(params, adapters), x), rtol=1e-5)
  custom = lambda p, x: x @ jax.nn.relu(p["w"]["kernel"])  # noqa: E731  relu is a custom_jvp
  with pytest.warns(lora_jax.LoraFallbackWarning, match="custom_jvp_call"):
    got = lora_jax.lora(custom)(params, adapters, x)
  np.testing.assert_allclose(got, custom(lora_jax.merge(params, adapters), x), rtol=1e-5)


def _stacked(roles, fn, x):
  params = {"ens": {"kernel": jax.random.normal(jax.random.key(0), (3, 8, 6))}}
  config = lora_jax.LoraConfig(targets="ens", rank=2, axes_pattern={"ens": roles})
  adapters = randomize_b(lora_jax.init(config, params, key=jax.random.key(1)), jax.random.key(2))
  want = fn(lora_jax.merge(params, adapters), x)
  return lora_jax.lora(fn), params, adapters, want


def test_vmap_over_stacked_kernel_inside_fn_is_factored():
  fn = lambda p, x: jax.vmap(lambda w: jnp.tanh(x @ w))(p["ens"]["kernel"])  # noqa: E731
  x = jnp.ones((5, 8))
  adapted, params, adapters, want = _stacked("lio", fn, x)  # one adapter per ensemble member
  with warnings.catch_warnings():
    warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
    np.testing.assert_allclose(adapted(params, adapters, x), want, rtol=1e-5, atol=1e-6)


def test_reshape_within_one_role_is_factored_and_across_roles_falls_back():
  merge_inputs = lambda p, x: x @ p["ens"]["kernel"].reshape(24, 6)  # noqa: E731
  x = jnp.ones((5, 24))
  adapted, params, adapters, want = _stacked("iio", merge_inputs, x)
  with warnings.catch_warnings():
    warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
    np.testing.assert_allclose(adapted(params, adapters, x), want, rtol=1e-5, atol=1e-5)
  adapted, params, adapters, want = _stacked("lio", merge_inputs, x)  # merges a layer axis in
  with pytest.warns(lora_jax.LoraFallbackWarning, match=r"ens/kernel \(reshape\)"):
    np.testing.assert_allclose(adapted(params, adapters, x), want, rtol=1e-5, atol=1e-5)


def test_reshape_splitting_heads_is_factored_and_analyzed():
  params = {"q": {"kernel": jax.random.normal(jax.random.key(0), (8, 12))}}
  fn = lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["q"]["kernel"].reshape(8, 3, 4))  # noqa
  x = jnp.ones((2, 8))
  uses = lora_jax.analyze(fn, params, x)
  assert (uses["q/kernel"].axes, uses["q/kernel"].route) == ("io", "factored")
  config = lora_jax.LoraConfig(targets="q", rank=2)
  adapters = randomize_b(lora_jax.init(config, params, key=jax.random.key(1), uses=uses),
                         jax.random.key(2))
  with warnings.catch_warnings():
    warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
    got = lora_jax.lora(fn)(params, adapters, x)
  np.testing.assert_allclose(got, fn(lora_jax.merge(params, adapters), x), rtol=1e-5, atol=1e-6)


def test_adapted_signature_works_with_jit_argnames():
  case, adapters = _setup(linen_case)
  fn = lambda p, x, train: case.fn(p, x) * (2.0 if train else 1.0)  # noqa: E731
  adapted = lora_jax.lora(fn)
  assert list(inspect.signature(adapted).parameters)[:2] == ["base", "adapters"]
  got = jax.jit(adapted, static_argnames="train")(case.params, adapters, case.x, train=True)
  np.testing.assert_allclose(got, 2.0 * lora_jax.lora(case.fn)(case.params, adapters, case.x),
                             rtol=1e-6)
  assert adapted.__name__ == "<lambda>" and not hasattr(adapted, "__wrapped__")
