"""The LoRA step's products (``lora(fn, product=..., siblings=..., recompute_inputs=...)``):
forward and A/B gradients of the hand-written backward ("factored", "merged_weight",
"auto"), of sibling groups and of recomputed inputs against a float64 dense reference
(merge in float64, then autodiff) and against autodiff of the factored form, in every model
style, on the reference Llama (scanned and unrolled), with dropout, DoRA and odd layouts."""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import lora_jax
from _fixtures import (BIG, FAMILY_MODEL, IDS, TINY, dense_reference, dots_into_big_weight,
                       reference)
from _models import ALL_CASES
from _utils import assert_trees_close, randomize_b
from lora_jax import _interpret, _product, models

HAND = ["factored", "merged_weight", "auto"]


def _loss(fn):
  return lambda p, x: jnp.mean(jnp.sin(jax.tree_util.tree_leaves(fn(p, x))[0]))


def _value_and_grad(fn, params, adapters, x, *, product, key=None, **options):
  f = lora_jax.value_and_grad(_loss(fn), product=product, **options)
  return jax.jit(f)(params, adapters, x, lora_dropout_key=key)


def _check(fn, params, adapters, x, product):
  value, grads = _value_and_grad(fn, params, adapters, x, product=product)
  want, want_grads = dense_reference(_loss(fn), params, adapters, x)
  np.testing.assert_allclose(float(value), want, rtol=1e-5, atol=1e-6)
  for got, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  auto_value, auto_grads = _value_and_grad(fn, params, adapters, x, product="autodiff")
  np.testing.assert_allclose(float(value), float(auto_value), rtol=1e-5, atol=1e-6)
  assert_trees_close(grads, auto_grads, rtol=1e-4, atol=1e-6)
  assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))


def _adapters(fn, params, x, *, rank=4, alpha=8.0, **options):
  uses = lora_jax.analyze(fn, params, x)
  config = lora_jax.LoraConfig(targets="all-linear", rank=rank, alpha=alpha, **options)
  return randomize_b(lora_jax.init(config, params, key=jax.random.key(1), uses=uses),
                     jax.random.key(2))


@pytest.mark.parametrize("product", HAND)
@pytest.mark.parametrize("make_case", ALL_CASES, ids=lambda c: c.__name__)
def test_each_model_style_equals_the_dense_reference(make_case, product):
  case = make_case(jnp.float32)  # forward: the case's float64 NumPy formula; gradients: the
  adapters = _adapters(case.fn, case.params, case.x)  # dense W + s·A@B, autodiff (float32)
  out = jax.jit(lora_jax.lora(case.fn, product=product))(case.params, adapters, case.x)
  np.testing.assert_allclose(np.asarray(out, np.float64), reference(case, adapters),
                             rtol=1e-5, atol=1e-5)
  _, grads = _value_and_grad(case.fn, case.params, adapters, case.x, product=product)
  want = jax.jit(jax.grad(lambda a: _loss(case.fn)(lora_jax.merge(case.params, a), case.x)))(
      adapters)
  assert_trees_close(grads, want, rtol=1e-4, atol=1e-5)
  _, auto = _value_and_grad(case.fn, case.params, adapters, case.x, product="autodiff")
  assert_trees_close(grads, auto, rtol=1e-4, atol=1e-6)


def _llama(scan):
  model = models.get(FAMILY_MODEL["llama"], **TINY["llama"],
                     scan_layers=scan)
  return model.apply, jax.jit(model.init)(jax.random.key(0), IDS)


@pytest.mark.parametrize("product", HAND)
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_llama_equals_the_float64_dense_reference(scan, product):
  fn, params = _llama(scan)
  _check(fn, params, _adapters(fn, params, IDS), IDS, product)


@pytest.mark.parametrize("product", HAND)
def test_transposed_generalized_and_batched_layouts(product):
  k = iter(jax.random.split(jax.random.key(0), 8))
  params = {"tied": {"kernel": jax.random.normal(next(k), (10, 6))},  # used as x @ W.T
            "heads": {"kernel": jax.random.normal(next(k), (10, 2, 3))},  # (d, heads, dim)
            "stack": {"kernel": jax.random.normal(next(k), (3, 10, 10))}}  # vmapped layers

  def fn(p, x):
    h = x @ p["tied"]["kernel"].T  # (4, 10)
    hs = jnp.stack([h, 2 * h, -h])  # one activation per layer: batched against the stack
    h = jax.vmap(lambda w, v: jnp.tanh(v @ w))(p["stack"]["kernel"], hs)
    return jnp.einsum("lbd,dhk->lbhk", h, p["heads"]["kernel"])

  x = jax.random.normal(next(k), (4, 6))
  uses = lora_jax.analyze(fn, params, x)
  assert uses["stack/kernel"].axes == "lio" and uses["tied/kernel"].axes == "oi"
  adapters = randomize_b(lora_jax.init(lora_jax.LoraConfig(targets=".*", rank=2), params,
                                       key=jax.random.key(1), uses=uses), jax.random.key(2))
  _check(fn, params, adapters, x, product)


@pytest.mark.parametrize("product", ["factored", "merged_weight"])
def test_dropout_draws_the_same_masks_as_autodiff(product):
  fn, params = _llama(True)
  adapters = _adapters(fn, params, IDS, dropout=0.5)
  key = jax.random.key(7)
  got = _value_and_grad(fn, params, adapters, IDS, product=product, key=key)
  want = _value_and_grad(fn, params, adapters, IDS, product="autodiff", key=key)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  assert_trees_close(got[1], want[1], rtol=1e-5, atol=1e-7)
  plain = _value_and_grad(fn, params, adapters, IDS, product=product)
  assert abs(float(plain[0]) - float(got[0])) > 1e-4  # the masks did change the loss


@pytest.mark.parametrize("product", HAND)
def test_dora_rescales_the_hand_written_product(product):
  fn, params = _llama(False)
  adapters = _adapters(fn, params, IDS, kind="dora")
  got = _value_and_grad(fn, params, adapters, IDS, product=product)
  want = _value_and_grad(fn, params, adapters, IDS, product="autodiff")
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  assert_trees_close(got[1], want[1], rtol=1e-4, atol=1e-6)


def test_auto_takes_the_merged_weight_where_it_costs_fewer_multiplies(monkeypatch):
  terms = lora_jax.adapters.Terms(None, None, "Ar", "abr", "rB", "AB")
  # N·(in + out) against 2·in·out: 2048·1024 > 2·512·512, 1·1024 < 2·512·512
  assert _product.cheaper_merged((8, 256, 512), (512, 512), x_sub="abA", terms=terms)
  assert not _product.cheaper_merged((1, 1, 512), (512, 512), x_sub="abA", terms=terms)
  assert not _product.cheaper_merged((1, 512, 512), (512, 512), x_sub="abA", terms=terms)
  taken = _spy(monkeypatch)
  params = {"w": {"kernel": jnp.ones((8, 8))}}
  adapters = lora_jax.init(lora_jax.LoraConfig(targets="w", rank=2), params,
                           key=jax.random.key(0))
  fn = lambda p, x: x @ p["w"]["kernel"]  # noqa: E731
  for rows, merged in ((4, False), (64, True)):  # 2·8·8 = 128 = 8·(8 + 8)
    taken.clear()
    lora_jax.lora(fn)(params, adapters, jnp.ones((rows, 8)))
    assert taken == [(merged,)]


def _spy(monkeypatch) -> list:
  """Records each ``_product.products`` group as its members' W' flags."""
  taken, original = [], _product.products

  def products(members, **kwargs):
    taken.append(tuple(m.merged for m in members))
    return original(members, **kwargs)

  monkeypatch.setattr(_product, "products", products)
  return taken


def test_merged_weight_builds_no_weight_gradient():
  base = {"proj": {"kernel": jax.ShapeDtypeStruct((BIG, BIG), jnp.float32)}}
  adapters = lora_jax.init(lora_jax.LoraConfig(targets="proj", rank=8), base,
                           key=jax.random.key(0))
  x = jax.ShapeDtypeStruct((2, 128, BIG), jnp.float32)  # 256 tokens
  loss = lambda p, x: jnp.mean((x @ p["proj"]["kernel"]) ** 2)  # noqa: E731
  step = lora_jax.value_and_grad(loss, product="merged_weight")
  jaxpr = jax.make_jaxpr(step)(base, adapters, x).jaxpr
  assert dots_into_big_weight(jaxpr, 256) == []  # W' contracts the rank (8), not tokens
  control = jax.make_jaxpr(lambda w, a, x: jax.grad(  # merge() + autodiff does build xᵀ·dy
      lambda a: loss(lora_jax.merge(w, a), x))(a))(base, adapters, x).jaxpr
  assert dots_into_big_weight(control, 256)


def test_a_quantized_base_keeps_the_factored_form():
  from lora_jax import quant
  fn, params = _llama(True)
  uses = lora_jax.analyze(fn, params, IDS)
  q = quant.quantize(params, "int8", targets="all-linear", uses=uses)
  adapters = _adapters(fn, params, IDS)
  got = _value_and_grad(fn, q, adapters, IDS, product="merged_weight")
  want = _value_and_grad(fn, q, adapters, IDS, product="autodiff")
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  assert_trees_close(got[1], want[1], rtol=1e-4, atol=1e-6)


def test_an_unknown_product_is_named():
  with pytest.raises(ValueError, match="product must be one of .*'factored'.*got 'fast'"):
    lora_jax.lora(lambda p, x: x, product="fast")
  with pytest.raises(ValueError, match="product must be one of"):
    lora_jax.train_step(lambda p, b: 0.0, None, product="fast")


def test_the_hand_written_backward_is_the_one_that_runs(monkeypatch):
  fn, params = _llama(True)  # a wrong bwd must show: scale its dA by 2 and the check fails
  adapters = _adapters(fn, params, IDS)
  original = _product._backward_terms

  def doubled(*args):
    dt, d_second = original(*args)
    return dt, 2 * d_second

  monkeypatch.setattr(_product, "_backward_terms", doubled)
  _, grads = _value_and_grad(fn, params, adapters, IDS, product="factored")
  monkeypatch.undo()
  _, want = _value_and_grad(fn, params, adapters, IDS, product="autodiff")
  b_of = lambda g: [x.b for x in jax.tree_util.tree_leaves(  # noqa: E731
      g, is_leaf=lambda x: isinstance(x, lora_jax.LoraWeights))]
  for got, ref in zip(b_of(grads), b_of(want)):
    np.testing.assert_allclose(got, 2 * ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("product", ["factored", "merged_weight"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_siblings_share_one_product_and_equal_separate_ones(scan, product, monkeypatch):
  fn, params = _llama(scan)
  adapters = _adapters(fn, params, IDS)
  taken = _spy(monkeypatch)
  adapted = lora_jax.lora(_loss(fn), product=product)
  together = jax.jit(jax.value_and_grad(lambda a: adapted(params, a, IDS)))(adapters)
  layers = 1 if scan else 2  # a scanned body is traced once
  merged = product == "merged_weight"
  assert sorted(taken) == sorted([(merged,) * 3, (merged,) * 2, (merged,), (merged,)] * layers)
  adapted = lora_jax.lora(_loss(fn), product=product, siblings=False)
  apart = jax.jit(jax.value_and_grad(lambda a: adapted(params, a, IDS)))(adapters)
  np.testing.assert_allclose(float(together[0]), float(apart[0]), rtol=1e-6)
  assert_trees_close(together[1], apart[1], rtol=1e-5, atol=1e-7)


def test_partial_siblings_group_the_adapted_ones_only(monkeypatch):
  fn, params = _llama(False)
  uses = lora_jax.analyze(fn, params, IDS)
  config = lora_jax.LoraConfig(targets=["q_proj", "v_proj", "up_proj"], rank=4, alpha=8.0)
  adapters = randomize_b(lora_jax.init(config, params, key=jax.random.key(1), uses=uses),
                         jax.random.key(2))
  taken = _spy(monkeypatch)
  _check(fn, params, adapters, IDS, "factored")  # against the float64 dense reference
  assert taken[:3] == [(False, False), (False,), (False, False)]  # q+v, up; then layer 1


def test_siblings_with_dropout_run_apart_with_the_same_masks(monkeypatch):
  fn, params = _llama(True)
  adapters = _adapters(fn, params, IDS, dropout=0.3)
  key = jax.random.key(3)
  taken = _spy(monkeypatch)
  got = _value_and_grad(fn, params, adapters, IDS, product="factored", key=key)
  assert taken and all(len(group) == 1 for group in taken)
  f = lora_jax.value_and_grad(_loss(fn), product="factored", siblings=False)
  want = jax.jit(f)(params, adapters, IDS, lora_dropout_key=key)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  assert_trees_close(got[1], want[1], rtol=1e-5, atol=1e-7)


def _activations_kept(fn, params, adapters, capsys, **options) -> int:
  """How many activation-sized values ((2, 8, d) or (2, 8, ffn)) the backward pass keeps."""
  capsys.readouterr()
  print_saved_residuals(
      lambda a: lora_jax.lora(_loss(fn), **options)(params, a, IDS), adapters)
  lines = capsys.readouterr().out.splitlines()
  shape = re.compile(r"[\[,]2,8,(32|48)\]")
  return sum(bool(shape.search(line)) and "argument" not in line for line in lines)


@pytest.mark.parametrize("product", ["factored", "merged_weight", "autodiff"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_recomputed_inputs_equal_the_reference_and_are_not_kept(scan, product, capsys):
  fn, params = _llama(scan)
  adapters = _adapters(fn, params, IDS)
  got = _value_and_grad(fn, params, adapters, IDS, product=product, recompute_inputs=True)
  want, want_grads = dense_reference(_loss(fn), params, adapters, IDS)
  np.testing.assert_allclose(float(got[0]), want, rtol=1e-5, atol=1e-6)
  for g, ref in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  kept = _activations_kept(fn, params, adapters, capsys, product=product,
                           recompute_inputs=False)
  fewer = _activations_kept(fn, params, adapters, capsys, product=product,
                            recompute_inputs=True)
  layers = TINY["llama"]["num_hidden_layers"]
  assert kept - fewer >= 3 * (1 if scan else layers)  # two norm outputs and silu(g)·u a layer


@pytest.mark.parametrize("product", HAND)
def test_siblings_whose_factors_differ_beyond_the_rank_run_apart(product):
  k = iter(jax.random.split(jax.random.key(0), 4))  # two stacks of 2 and 3 layers, one x:
  params = {"two": {"kernel": jax.random.normal(next(k), (2, 8, 8))},  # A (2, 8, r) and
            "three": {"kernel": jax.random.normal(next(k), (3, 8, 8))}}  # (3, 8, r): apart

  def fn(p, x):
    h = jnp.tanh(x)
    return jnp.concatenate([jnp.einsum("nd,ldk->lnk", h, p["two"]["kernel"]),
                            jnp.einsum("nd,ldk->lnk", h, p["three"]["kernel"])])

  x = jax.random.normal(next(k), (16, 8))
  config = lora_jax.LoraConfig(targets=".*", rank=2, axes_pattern={".*": "lio"})
  adapters = randomize_b(lora_jax.init(config, params, key=jax.random.key(1)),
                         jax.random.key(2))
  _check(fn, params, adapters, x, product)


@pytest.mark.parametrize("product", HAND)
def test_an_integer_activation_gets_no_cotangent(product):
  k = iter(jax.random.split(jax.random.key(0), 2))
  params = {"w": {"kernel": jax.random.normal(next(k), (8, 8))},
            "v": {"kernel": jax.random.normal(next(k), (8, 8))}}

  def fn(p, x):  # int32 x with a float kernel (64 rows: "auto" takes W')
    dot = lambda w: jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),  # noqa: E731
                                        preferred_element_type=w.dtype)
    return dot(p["w"]["kernel"]) * dot(p["v"]["kernel"])

  x = jnp.asarray(np.random.RandomState(0).randint(-2, 3, (64, 8)), jnp.int32)
  _check(fn, params, _adapters(fn, params, x, rank=2), x, product)


def _one_product():
  k = iter(jax.random.split(jax.random.key(0), 3))
  params = {"w": {"kernel": jax.random.normal(next(k), (8, 8))}}
  fn = lambda p, x: jnp.tanh(x) @ p["w"]["kernel"]  # noqa: E731
  x = jax.random.normal(next(k), (64, 8))  # 64·16 > 2·8·8: "auto" takes W'
  return fn, params, _adapters(fn, params, x, rank=2), x


@pytest.mark.parametrize("product", HAND)
def test_the_base_kernels_gradient_equals_the_merged_models(product):
  fn, params, adapters, x = _one_product()
  got = jax.grad(lambda p: jnp.sum(jnp.sin(lora_jax.lora(fn, product=product)(
      p, adapters, x))))(params)
  want = jax.grad(lambda p: jnp.sum(jnp.sin(fn(lora_jax.merge(p, adapters), x))))(params)
  assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_forward_mode_needs_autodiff_which_equals_the_merged_model():
  fn, params, adapters, x = _one_product()  # a custom_vjp has no forward mode (documented)
  tangent = jax.tree_util.tree_map(jnp.ones_like, adapters)
  ref = lambda a: jnp.sum(jnp.sin(fn(lora_jax.merge(params, a), x)))  # noqa: E731
  for product in ("autodiff", *HAND):
    f = lambda a, p=product: jnp.sum(jnp.sin(  # noqa: E731
        lora_jax.lora(fn, product=p)(params, a, x)))
    if product != "autodiff":
      with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (adapters,), (tangent,))
      continue
    got = jax.jvp(f, (adapters,), (tangent,))[1]
    np.testing.assert_allclose(got, jax.jvp(ref, (adapters,), (tangent,))[1], rtol=1e-4)


class _Tagged:
  """A value a toy context tracks, for the interpreter alone."""

  def __init__(self, v):
    self.v = v


class _Toy:
  """A context with its own table: ``sin`` of a tagged value is its cosine instead."""

  tracks = staticmethod(lambda x: isinstance(x, _Tagged))

  def __init__(self, rules):
    self.rules, self.seen = rules, []

  def materialize(self, x, consumer):
    if not isinstance(x, _Tagged):
      return x
    self.seen.append(consumer)
    return x.v


def _cos_rule(eqn, invals, ctx):
  ctx.seen.append(eqn.primitive.name)
  return [jnp.cos(invals[0].v)]


def test_the_interpreter_runs_any_table_and_claims_later_equations():
  x, y = jnp.float32(0.5), jnp.float32(2.0)
  closed = jax.make_jaxpr(lambda x, y: jnp.sin(x) * y + jnp.exp(x))(x, y)
  ctx = _Toy({"sin": _cos_rule})
  (out,) = _interpret.run(closed, [_Tagged(x), y], ctx)
  np.testing.assert_allclose(out, np.cos(0.5) * 2.0 + np.exp(0.5), rtol=1e-6)
  assert ctx.seen == ["sin", "exp"]  # exp of a tagged value has no rule: its fallback
  (plain,) = _interpret.run(closed, [x, y], ctx)  # nothing tracked: bound unchanged
  np.testing.assert_allclose(plain, np.sin(0.5) * 2.0 + np.exp(0.5), rtol=1e-6)

  def claims_exp(eqn, invals, ctx, frame):  # a FrameRule: gives the later exp of x now
    (j,) = [j for j in frame.users(eqn.invars[0]) if frame.jaxpr.eqns[j].primitive.name == "exp"]
    assert j > frame.index and frame.producer(eqn.outvars[0]) == frame.index
    frame.claim(j, [jnp.float32(10.0)])
    with pytest.raises(ValueError, match="claim each later equation once"):
      frame.claim(j, [jnp.float32(0.0)])
    with pytest.raises(ValueError, match="not a later"):
      frame.claim(frame.index, [jnp.float32(0.0)])
    return _cos_rule(eqn, invals, ctx)

  ctx = _Toy({"sin": _interpret.FrameRule(claims_exp)})
  (out,) = _interpret.run(closed, [_Tagged(x), y], ctx)
  np.testing.assert_allclose(out, np.cos(0.5) * 2.0 + 10.0, rtol=1e-6)
  assert ctx.seen == ["sin"]  # the claimed exp never ran


def test_the_interpreter_imports_no_lora_jax_module():
  tree = ast.parse(pathlib.Path(_interpret.__file__).read_text())  # so none of the rules
  imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  assert "jax.extend" in imported  # core: the jaxpr types
  assert not any(m.startswith("lora_jax") for m in imported), imported
