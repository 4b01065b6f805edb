"""Every configuration error names the problem, what was expected, and how to fix it."""

import jax
import numpy as np
import optax
import jax.numpy as jnp
import pytest

import lora_jax
from _models import linen_case, linen_stack_case


@pytest.fixture(scope="module")
def params():
  return linen_case().params  # dense (16,16), query (16,4,8), einsum (16,4,8)


def _plan(params, **config):
  return lora_jax.plan(lora_jax.LoraConfig(**config), params,
                       uses=lora_jax.analyze(linen_case().fn, params, linen_case().x))


def test_pattern_matching_nothing(params):
  with pytest.raises(ValueError, match=r"target pattern 'qeury' matched no parameter; available "
                                       r"paths include params/dense/bias, params/dense/kernel"):
    _plan(params, targets=["dense", "qeury"])


def test_rank_and_alpha_patterns_matching_nothing(params):
  with pytest.raises(ValueError, match=r"rank_pattern pattern 'mlp' matched no targeted kernel; "
                                       r"targeted paths include params/dense/kernel"):
    _plan(params, targets="dense", rank_pattern={"mlp": 2})
  with pytest.raises(ValueError, match=r"alpha_pattern pattern 'query' matched no targeted kernel"):
    _plan(params, targets="dense", alpha_pattern={"query": 2.0})


def test_matched_leaf_not_a_matmul_kernel():
  params = {"embed": {"table": jnp.ones((10, 4))}, "dense": {"kernel": jnp.ones((4, 4)),
                                                          "bias": jnp.ones((4,))}}
  with pytest.raises(ValueError, match=r"target pattern 'embed' matched 'embed/table' \(shape "
                                       r"\(10, 4\)\), which is not a matmul kernel .* kernels "
                                       r"include dense/kernel"):
    lora_jax.plan(lora_jax.LoraConfig(targets="embed"), params)
  with pytest.raises(ValueError, match=r"matched 'dense/bias' .* not a matmul kernel"):
    lora_jax.plan(lora_jax.LoraConfig(targets="dense/bias"), params)
  # a module pattern selects the module's kernel; its bias is not an error
  shown = lora_jax.plan(lora_jax.LoraConfig(targets="dense", rank=2), params)
  assert [t.path for t in shown.targets] == ["dense/kernel"]


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_rank_below_one_or_not_an_integer(rank):
  with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got"):
    lora_jax.LoraConfig(targets="dense", rank=rank)
  with pytest.raises(ValueError, match=r"rank_pattern\['q'\] must be an integer >= 1"):
    lora_jax.LoraConfig(targets="dense", rank_pattern={"q": rank})


def test_rank_larger_than_min_in_out(params):
  with pytest.raises(ValueError, match=r"rank 17 for kernel 'params/dense/kernel' is larger than "
                                       r"min\(in, out\) = 16 \(in 16, out 16\); use a rank <= 16"):
    _plan(params, targets="dense", rank=17)
  with pytest.raises(ValueError, match=r"rank 20 for kernel 'params/query/kernel' is larger than "
                                       r"min\(in, out\) = 16 \(in 16, out 32\)"):
    _plan(params, targets="all-linear", rank_pattern={"query": 20})


@pytest.mark.parametrize("alpha", [0, -2.0, float("nan"), "8"])
def test_alpha_not_positive(alpha):
  with pytest.raises(ValueError, match=r"alpha must be a finite number > 0, got"):
    lora_jax.LoraConfig(targets="dense", alpha=alpha)
  with pytest.raises(ValueError, match=r"alpha_pattern\[.q.\] must be a finite number > 0"):
    lora_jax.LoraConfig(targets="dense", alpha_pattern={"q": alpha})


def test_other_bad_options():
  with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got 1.0"):
    lora_jax.LoraConfig(targets="d", dropout=1.0)
  with pytest.raises(ValueError, match=r"init must be one of \('kaiming_uniform', 'gaussian', "
                                       r"'pissa', 'olora'\) or 'pissa_niter_<N>'"):
    lora_jax.LoraConfig(targets="d", init="xavier")
  with pytest.raises(ValueError, match=r"dtype must be a floating dtype such as float32"):
    lora_jax.LoraConfig(targets="d", dtype=jnp.int8)
  with pytest.raises(ValueError, match=r"pattern '\(q' is not a valid regular expression"):
    lora_jax.LoraConfig(targets="(q")
  with pytest.raises(ValueError, match=r"targets must name at least one pattern"):
    lora_jax.LoraConfig(targets=[])
  with pytest.raises(ValueError, match=r"axes_pattern\['q'\] must be a string of axis roles"):
    lora_jax.LoraConfig(targets="q", axes_pattern={"q": "iox"})


def test_everything_excluded(params):
  with pytest.raises(ValueError, match=r"targets 'dense' minus exclude 'dense' left no kernel"):
    _plan(params, targets="dense", exclude="dense")


def test_ambiguous_axes_need_analyze_or_axes_pattern():
  case = linen_stack_case()
  config = lora_jax.LoraConfig(targets="mlp")
  with pytest.raises(ValueError, match=r"kernel 'params/layers/mlp/kernel' has shape "
                                       r"\(3, 16, 16\): which axes are .* pass "
                                       r"uses=lora_jax.analyze"):
    lora_jax.init(config, case.params, key=jax.random.key(0))
  explicit = lora_jax.LoraConfig(targets="mlp", axes_pattern={"mlp": "lio"})
  assert lora_jax.plan(explicit, case.params).targets[0].axes == "lio"
  with pytest.raises(ValueError, match=r"axes 'io' for kernel 'params/layers/mlp/kernel' name 2 "
                                       r"axes but the kernel has shape \(3, 16, 16\)"):
    lora_jax.plan(lora_jax.LoraConfig(targets="mlp", axes_pattern={"mlp": "io"}), case.params)


def test_pattern_overrides_apply_first_match(params):
  shown = _plan(params, targets="all-linear", rank=4, alpha=8,
                rank_pattern={"query": 2, "query|einsum": 3}, alpha_pattern={"einsum": 1.0})
  by_path = {t.path: t for t in shown.targets}
  assert by_path["params/query/kernel"].rank == 2
  einsum = by_path["params/einsum/kernel"]
  assert einsum.rank == 3 and einsum.scale == 1 / 3
  assert by_path["params/dense/kernel"].scale == 8 / 4


@pytest.mark.parametrize("options,message", [
    (dict(targets=None), r"targets must be a string or a list of strings, got None"),
    (dict(targets=3), r"targets must be a string or a list of strings, got 3"),
    (dict(targets="d", exclude=None), r"exclude must be a string or a list of strings"),
    (dict(targets="d", rank_pattern=None), r"rank_pattern must be a dict from path patterns"),
    (dict(targets="d", alpha_pattern={3: 2.0}), r"alpha_pattern must be a dict from path "
                                                r"patterns \(strings\)"),
    (dict(targets="d", dropout="0.1"), r"dropout must be a number in \[0, 1\), got '0.1'"),
    (dict(targets="d", dtype="foo"), r"dtype must be a floating dtype such as float32"),
    (dict(targets="d", use_rslora="no"), r"use_rslora must be True or False, got 'no'"),
    (dict(targets="d", alpha=float("inf")), r"alpha must be a finite number > 0, got inf"),
    (dict(targets="d", kernel_names=None), r"kernel_names must be a string or a list"),
])
def test_wrong_types_are_value_errors(options, message):
  with pytest.raises(ValueError, match=message):
    lora_jax.LoraConfig(**options)


def test_numpy_scalars_strings_and_hashing():
  config = lora_jax.LoraConfig(targets="d", rank=np.int64(4), alpha=np.float32(8),
                               kernel_names="weight", rank_pattern={"d": 2})
  assert config.kernel_names == ("weight",) and config.scale_for("d/weight") == 4.0
  assert hash(config) == hash(lora_jax.LoraConfig(targets="d", rank=4, alpha=8.0,
                                                  kernel_names=("weight",), rank_pattern={"d": 2}))
  params = {"d": {"weight": jnp.ones((4, 4)), "e": jnp.ones((4, 4))}}
  assert [t.path for t in lora_jax.plan(config, params).targets] == ["d/weight"]
  with pytest.raises(ValueError, match=r"ratio must be > 0 \(lr_B / lr_A\), got None"):
    lora_jax.lora_plus(optax.adam, learning_rate=1e-3, ratio=None)


def test_scope_pattern_selects_kernels_of_a_block():
  params = {"block_0": {"ln": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
                        "mlp": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}},
            "block_1": {"mlp": {"kernel": jnp.ones((8, 8))}}, "temp": 1.0}
  shown = lora_jax.plan(lora_jax.LoraConfig(targets="block_0", rank=2), params)
  assert [t.path for t in shown.targets] == ["block_0/mlp/kernel"]
  with pytest.raises(ValueError, match=r"target pattern 'temp' matched 'temp' \(shape \(\)\), "
                                       r"which is not a matmul kernel"):
    lora_jax.plan(lora_jax.LoraConfig(targets="temp"), params)
  assert lora_jax.count(params, {}).total == 3 * 8 + 2 * 64 + 1  # vectors, kernels, temp


def test_adapters_with_bad_axes_are_rejected():
  params = {"d": {"kernel": jnp.ones((4, 4))}}
  bad = {"d": {"kernel": lora_jax.LoraWeights(a=jnp.ones((4, 2)), b=jnp.ones((2, 4)), scale=1.0,
                                              axes=None)}}
  with pytest.raises(ValueError, match=r"adapter at 'd/kernel' has axes None, which must be a "
                                       r"string of one role per axis"):
    lora_jax.merge(params, bad)
