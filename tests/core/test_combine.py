"""Weighted combination of adapters (lora_jax.combine), as PEFT's add_weighted_adapter.

The formulas are checked in float64 NumPy from the factors (linear's cross terms, cat's exact
weighted sum, svd's best rank-R approximation and its clamp); the real PEFT is the reference
for all of them, on a tiny BERT whose adapters are exported to it and combined there.
"""

import math
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from _fixtures import TINY
from _utils import flat_adapters
from lora_jax import combine, models
from lora_jax import peft as lora_peft

# One kernel of each layout: (axes, in dims, out dims, stacked layers or None, einsum of a @ b).
KERNELS = {
    "dense": ("io", (6,), (5,), None, "ir,ro->io"),
    "stack": ("lio", (7,), (4,), 3, "lir,lro->lio"),
    "query": ("ioo", (6,), (2, 3), None, "ir,rxy->ixy"),
}


def _adapter(ranks, scale, seed, dtype=jnp.float32, dropout=0.0):
  """A trained-like adapter tree: ``{"params": {kernel: {"kernel": LoraWeights}}}`` with
  random A and B for the kernels of ``ranks`` (``{name: rank}``)."""
  rng = np.random.default_rng(seed)
  tree = {}
  for name, rank in ranks.items():
    axes, ins, outs, layers, _ = KERNELS[name]
    stack = () if layers is None else (layers,)
    a, b = (rng.normal(size=s).astype(np.float32) for s in ((*stack, *ins, rank),
                                                             (*stack, rank, *outs)))
    tree[name] = {"kernel": lora_jax.LoraWeights(a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype),
                                                 scale=scale, axes=axes, dropout=dropout)}
  return {"params": tree}


def _lw(tree, name):
  return tree["params"][name]["kernel"]


def _f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _product(name, a, b):
  """``a @ b`` of kernel ``name`` in float64 (layout of the kernel)."""
  return np.einsum(KERNELS[name][4], _f64(a), _f64(b))


def _weighted_sum(trees, weights, name):
  """``sum_i w_i s_i A_i @ B_i`` in float64 (adapters without the kernel add nothing)."""
  return sum(w * _lw(t, name).scale * _product(name, _lw(t, name).a, _lw(t, name).b)
             for t, w in zip(trees, weights) if name in t["params"])


def _matrices(name, delta):
  """The delta of kernel ``name`` as (layers, in, out) matrices."""
  _, ins, outs, layers, _ = KERNELS[name]
  return delta.reshape(layers or 1, math.prod(ins), math.prod(outs))


TREES = [_adapter({"dense": 4, "stack": 4, "query": 4}, 2.0, 0),
         _adapter({"dense": 4, "stack": 4, "query": 4}, 0.375, 1),
         _adapter({"dense": 2, "stack": 3}, 1.5, 2)]


# ---- the formulas ----------------------------------------------------------------------------

def test_linear_is_the_sum_with_cross_terms_from_the_factors():
  weights = [0.7, -0.4]
  got = combine.weighted(TREES[:2], weights, combination_type="linear")
  for name in KERNELS:
    lws = [_lw(t, name) for t in TREES[:2]]
    want = sum(np.sign(wi) * math.sqrt(abs(wi * li.scale * wj * lj.scale))
               * _product(name, li.a, lj.b)
               for wi, li in zip(weights, lws) for wj, lj in zip(weights, lws))
    lw = _lw(got, name)
    assert (lw.rank, lw.scale, lw.axes) == (4, 1.0, KERNELS[name][0])
    np.testing.assert_allclose(_f64(lw.delta()), want, rtol=1e-5, atol=1e-5)


def test_cat_is_the_weighted_sum_of_the_deltas():
  weights = [0.5, 1.5, -0.8]
  got = combine.weighted(TREES, weights, combination_type="cat")
  for name in KERNELS:
    lw = _lw(got, name)
    assert (lw.rank, lw.scale) == (4 + 4 + 3, 1.0)  # one rank: the sum of the adapters' ranks
    np.testing.assert_allclose(_f64(lw.delta()), _weighted_sum(TREES, weights, name),
                               rtol=1e-5, atol=1e-5)
  dense = _lw(got, "dense")  # ranks 4 + 4 + 2 here: a zero column of A and row of B pad it
  assert not np.any(dense.a[:, 10:]) and not np.any(dense.b[10:])
  np.testing.assert_allclose(dense.a[:, 8:10], -0.8 * 1.5 * _lw(TREES[2], "dense").a, rtol=1e-6)


def test_svd_at_full_rank_reproduces_the_weighted_sum():
  weights = [0.5, 1.5, -0.8]
  got = combine.weighted(TREES, weights, combination_type="svd", svd_rank=10)
  for name in KERNELS:
    lw = _lw(got, name)
    assert (lw.rank, lw.scale, lw.a.shape[:-1]) == (10, 1.0, _lw(TREES[0], name).a.shape[:-1])
    np.testing.assert_allclose(_f64(lw.delta()), _weighted_sum(TREES, weights, name),
                               rtol=1e-5, atol=1e-5)


def test_truncated_svd_is_the_best_rank_r_approximation_per_layer():
  weights = [1.0, -2.0]
  got = combine.weighted(TREES[:2], weights)  # svd, default rank: the largest, 4
  for name in KERNELS:
    u, s, vh = np.linalg.svd(_matrices(name, _weighted_sum(TREES[:2], weights, name)))
    want = (u[..., :4] * s[:, None, :4]) @ vh[:, :4]
    np.testing.assert_allclose(_matrices(name, _f64(_lw(got, name).delta())), want,
                               rtol=1e-4, atol=1e-4)
    assert _lw(got, name).rank == 4


def test_svd_clamp_clips_both_factors_at_the_quantile():
  weights = [1.0, -2.0, 0.5]
  free = combine.weighted(TREES, weights, svd_rank=3)
  clamped = combine.weighted(TREES, weights, svd_rank=3, svd_clamp=0.8)
  for name in KERNELS:
    a, b = (_f64(x).reshape(KERNELS[name][3] or 1, -1) for x in (_lw(free, name).a,
                                                                   _lw(free, name).b))
    hi = np.quantile(np.concatenate([a, b], axis=1), 0.8, axis=1)[:, None]
    got_a, got_b = (_f64(x).reshape(len(hi), -1) for x in (_lw(clamped, name).a,
                                                             _lw(clamped, name).b))
    np.testing.assert_allclose(got_a, np.clip(a, -hi, hi), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_b, np.clip(b, -hi, hi), rtol=1e-6, atol=1e-6)
    assert np.all(got_b <= hi + 1e-6) and np.any(np.abs(b) > hi)  # something was clipped
    rows = _f64(_lw(free, name).b).reshape(len(hi), 3, -1)  # each singular vector's sign is
    top = np.take_along_axis(rows, np.abs(rows).argmax(-1)[..., None], -1)  # fixed: largest
    assert np.all(top > 0)  # entry of each row of B (column of PEFT's U) positive


def test_svd_rank_above_the_kernel_size_is_padded_with_zeros():
  got = combine.weighted(TREES[:2], [1.0, 1.0], svd_rank=9)
  lw = _lw(got, "stack")  # (3 layers, 7, 4): at most rank 4 per layer
  assert lw.rank == 9 and not np.any(lw.a[..., 4:]) and not np.any(lw.b[:, 4:])
  np.testing.assert_allclose(_f64(lw.delta()), _weighted_sum(TREES[:2], [1.0, 1.0], "stack"),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_rslora_scale_is_peft_sqrt_of_the_new_rank(combination_type):
  trees = TREES[:2]
  plain = combine.weighted(trees, [0.3, 0.6], combination_type=combination_type)
  rs = combine.weighted(trees, [0.3, 0.6], combination_type=combination_type, use_rslora=True)
  for name in KERNELS:
    lw, lw_rs = _lw(plain, name), _lw(rs, name)
    assert lw_rs.scale == pytest.approx(math.sqrt(lw.rank))
    np.testing.assert_array_equal(lw_rs.a, lw.a)
    np.testing.assert_allclose(_f64(lw_rs.delta()), math.sqrt(lw.rank) * _f64(lw.delta()),
                               rtol=1e-5, atol=1e-5)


def test_one_adapter_is_combined_linearly():
  tree = TREES[2]
  for kind in ("svd", "cat"):  # PEFT switches a single adapter to linear
    got = combine.weighted([tree], [-0.5], combination_type=kind)
    for name in ("dense", "stack"):
      lw = _lw(got, name)
      assert lw.rank == 3  # the adapter's largest rank; dense (rank 2) is padded
      np.testing.assert_allclose(_f64(lw.delta()), -0.5 * _f64(_lw(tree, name).delta()),
                                 rtol=1e-5, atol=1e-5)


def test_a_kernel_of_some_adapters_is_combined_from_those():
  weights = [0.5, 2.0]
  trees = [TREES[0], TREES[2]]  # "query" only in the first
  for kind in ("cat", "svd"):
    got = combine.weighted(trees, weights, combination_type=kind, svd_rank=None)
    assert set(got["params"]) == set(KERNELS)
    np.testing.assert_allclose(_f64(_lw(got, "query").delta()),
                               _weighted_sum(trees, weights, "query"), rtol=1e-5, atol=1e-5)
  alone = combine.weighted([{"params": {"query": TREES[0]["params"]["query"]}}], [0.5])
  got = combine.weighted([TREES[0], _adapter({"dense": 4}, 1.0, 5)], [0.5, 1.0],
                         combination_type="linear")
  np.testing.assert_allclose(_f64(_lw(got, "query").delta()),
                             _f64(_lw(alone, "query").delta()), rtol=1e-6, atol=1e-6)


def test_dtypes_axes_and_dropout_come_from_the_first_holder():
  trees = [_adapter({"dense": 4}, 2.0, 0, dtype=jnp.bfloat16, dropout=0.1),
           _adapter({"dense": 4, "stack": 2}, 1.0, 1, dropout=0.2)]
  got = combine.weighted(trees, [1.0, 1.0], combination_type="cat")
  dense, stack = _lw(got, "dense"), _lw(got, "stack")
  assert (dense.a.dtype, dense.b.dtype, dense.dropout) == (jnp.bfloat16, jnp.bfloat16, 0.1)
  assert (stack.a.dtype, stack.dropout, stack.axes, stack.rank) == (jnp.float32, 0.2, "lio", 8)


def test_trained_extras_are_dropped_with_a_warning_or_refused_when_shared():
  head = {"classifier": {"kernel": jnp.ones((5, 2))}}
  with_head = {"params": {**TREES[0]["params"], **head}}
  with pytest.warns(UserWarning, match=r"extras \(modules_to_save\) at params/classifier/kernel "
                                       r"are not combined"):
    got = combine.weighted([with_head, TREES[1]], [1.0, 1.0], combination_type="cat")
  assert "classifier" not in got["params"]
  with pytest.raises(ValueError, match=r"adapters \[0, 1\] all train 'params/classifier/kernel' "
                                       r"in full \(modules_to_save\), which cannot be combined"):
    combine.weighted([with_head, with_head], [1.0, 1.0])


_OTHER_SHAPE = {"params": {"dense": {"kernel": lora_jax.LoraWeights(
    a=jnp.ones((7, 4)), b=jnp.ones((4, 5)), scale=1.0, axes="io")}}}


@pytest.mark.parametrize("args,kwargs,match", [
    ((TREES[:2], [1.0, 1.0]), dict(combination_type="ties"),
     r"combination_type must be one of \('linear', 'cat', 'svd'\), got 'ties'"),
    ((TREES[1:], [1.0, 1.0]), dict(combination_type="linear"),
     r"'linear' needs adapters of one rank, got ranks \[4, 3\]; use 'cat' or 'svd'"),
    (([TREES[0], _adapter({"dense": 2, "stack": 4}, 1.0, 3)], [1.0, 1.0]),
     dict(combination_type="linear"),
     r"one rank at every kernel, but the adapters at 'params/dense/kernel' have ranks \[4, 2\]"),
    ((TREES[:2], [1.0]), {}, r"weights must be 2 finite numbers, one per adapter, got \[1.0\]"),
    ((TREES[:2], [1.0, float("nan")]), {}, r"weights must be 2 finite numbers"),
    ((TREES[:2], 1.0), {}, r"weights must be a list of numbers, one per adapter, got float"),
    ((TREES[0], [1.0]), {}, r"adapters must be a non-empty list of adapter trees, got dict; "
                            r"wrap a single tree in a list"),
    (([], []), {}, r"adapters must be a non-empty list"),
    (([TREES[0], {"params": {}}], [1.0, 1.0]), {}, r"adapters\[1\] holds no LoraWeights"),
    ((TREES[:2], [1.0, 1.0]), dict(svd_rank=0), r"svd_rank must be an integer >= 1 or None"),
    ((TREES[:2], [1.0, 1.0]), dict(svd_clamp=1.5), r"svd_clamp must be a quantile in \[0, 1\]"),
    ((TREES[:2], [1.0, 1.0]), dict(combination_type="cat", svd_rank=2),
     r"svd_rank and svd_clamp apply to combination_type='svd' only"),
    ((TREES[:2], [1.0, 1.0]), dict(use_rslora=1), r"use_rslora must be True or False, got 1"),
    (([TREES[0], _OTHER_SHAPE], [1.0, 1.0]), {},
     r"adapters at 'params/dense/kernel' do not fit one kernel \(axes 'io', a \(6, 4\)"),
])
def test_bad_arguments_are_named(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    combine.weighted(*args, **kwargs)


# ---- against PEFT ------------------------------------------------------------------------------

SOURCES = {  # lora_jax configs of the adapters PEFT loads; kernels differ between them
    "p": dict(targets=["query", "value"], rank=4, alpha=8),
    "q": dict(targets=["query", "key"], rank=4, alpha=3),
    "s": dict(targets=["query", "value", "output/dense"], rank=2, alpha=5,
              rank_pattern={"value": 3}),
    "rs4": dict(targets=["query", "value"], rank=4, alpha=6, use_rslora=True),
    "rs2": dict(targets=["query", "intermediate"], rank=2, alpha=4, use_rslora=True),
    "rs4b": dict(targets=["query", "value"], rank=4, alpha=2, use_rslora=True),
}
# (name, adapters, weights, options shared by both, PEFT-only options, use_rslora).
CASES = [
    ("linear", ["p", "q"], [0.7, -0.4], dict(combination_type="linear"), {}, False),
    ("cat", ["p", "q", "s"], [0.5, 1.5, -0.8], dict(combination_type="cat"), {}, False),
    ("svd", ["s", "p", "q"], [0.5, 1.5, -0.8], dict(combination_type="svd"), {}, False),
    ("svd_rank3", ["p", "s"], [0.5, 1.5], dict(svd_rank=3), {}, False),
    ("svd_rank40", ["p", "s"], [1.0, -1.0], dict(svd_rank=40),
     dict(svd_full_matrices=False), False),  # PEFT's full SVD fails on the (32, 48) kernels
    ("svd_clamp", ["p", "q", "s"], [0.5, 1.5, -0.8], dict(svd_rank=3, svd_clamp=0.9), {}, False),
    ("rs_linear", ["rs4", "rs4b"], [1.0, 0.5], dict(combination_type="linear"), {}, True),
    ("rs_cat", ["rs4", "rs2"], [1.0, 0.5], dict(combination_type="cat"), {}, True),
    ("rs_svd", ["rs2", "rs4"], [1.0, 0.5], dict(combination_type="svd"), {}, True),
]


def _signed_torch_svd(svd):
  """``torch.linalg.svd`` with lora_jax's signs (largest entry of each column of U positive):
  PEFT's clamp depends on the signs, which its SVD leaves open."""
  import torch

  def signed(x, *args, **kwargs):
    u, s, vh = svd(x, *args, **kwargs)
    k = len(s)
    top = torch.gather(u[:, :k], 0, u[:, :k].abs().argmax(0, keepdim=True))
    sign = torch.where(top < 0, -1.0, 1.0)
    u, vh = u.clone(), vh.clone()
    u[:, :k], vh[:k] = u[:, :k] * sign, vh[:k] * sign.T
    return u, s, vh

  return signed


@pytest.fixture(scope="module")
def peft_sources():
  """A tiny BERT in PEFT with the SOURCES adapters loaded, and the same adapters in lora_jax
  (on the scanned Flax params: one stacked adapter per kernel)."""
  torch, transformers, peft = (pytest.importorskip(m) for m in ("torch", "transformers", "peft"))
  tiny = TINY["bert"]
  params = jax.eval_shape(models.get("bert-base-uncased", **tiny, scan_layers=True).init,
                          jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  uses = {p: "lio" for p, x in lora_jax.targets.leaves_by_path(params).items() if x.ndim == 3}
  rng = np.random.default_rng(0)
  trees = {}
  torch.manual_seed(0)
  hf = transformers.BertModel(transformers.BertConfig(**tiny))
  with tempfile.TemporaryDirectory() as folder:
    for name, options in SOURCES.items():
      config = lora_jax.LoraConfig(**options)
      layout = jax.eval_shape(lambda: lora_jax.init(config, params, key=jax.random.key(0),
                                                    uses=uses))
      trees[name] = jax.tree_util.tree_map(
          lambda x: jnp.asarray(0.5 * rng.normal(size=x.shape), jnp.float32), layout)
      lora_peft.export_peft(f"{folder}/{name}", trees[name], config=config)
      if name == "p":
        model = peft.PeftModel.from_pretrained(hf, f"{folder}/{name}", adapter_name=name)
      else:
        model.load_adapter(f"{folder}/{name}", adapter_name=name)
  return model, trees


def _peft_deltas(model, adapter):
  """``{module name: scaling * lora_B @ lora_A}`` of one PEFT adapter, as (in, out)."""
  from peft.tuners.lora import LoraLayer
  return {name: (m.scaling[adapter] * m.lora_B[adapter].weight @ m.lora_A[adapter].weight)
          .detach().numpy().T for name, m in model.base_model.model.named_modules()
          if isinstance(m, LoraLayer) and adapter in m.lora_A}


@pytest.mark.interop
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_combination_equals_peft_add_weighted_adapter(peft_sources, case, monkeypatch):
  import torch

  model, trees = peft_sources
  name, sources, weights, options, peft_only, use_rslora = case
  monkeypatch.setattr(torch.linalg, "svd", _signed_torch_svd(torch.linalg.svd))
  model.add_weighted_adapter(sources, weights, name, **options, **peft_only)
  want = _peft_deltas(model, name)
  got = combine.weighted([trees[s] for s in sources], weights, **options, use_rslora=use_rslora)
  deltas = {lora_peft.torch_name(path, layer): d
            for path, lw in flat_adapters(got).items()
            for layer, d in enumerate(np.asarray(lw.delta()))}
  assert deltas.keys() == want.keys()  # the union of the sources' kernels, every layer
  for module, delta in want.items():
    np.testing.assert_allclose(deltas[module], delta, rtol=1e-4, atol=1e-4, err_msg=module)
  config = model.peft_config[name]
  lw = next(iter(flat_adapters(got).values()))
  assert (lw.rank, config.use_rslora) == (config.r, use_rslora)
  if use_rslora:  # PEFT's rsLoRA scale sqrt(R) multiplies the combination (peft#3761)
    plain = combine.weighted([trees[s] for s in sources], weights, **options)
    for path, lw_plain in flat_adapters(plain).items():
      np.testing.assert_allclose(math.sqrt(config.r) * np.asarray(lw_plain.delta()),
                                 flat_adapters(got)[path].delta(), rtol=1e-5, atol=1e-5)
