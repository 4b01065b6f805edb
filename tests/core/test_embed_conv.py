"""LoRA on embedding tables and convolutions in the factored route: forward and gradients
against a dense float64 reference written from the formula (E' = E + s·A@B, a convolution with
W + s·A@B), analyze / plan routes, the merged fallback where it still applies, and PEFT both
ways with real PEFT (Embedding and Conv2d layers, counts)."""

import functools
import json
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import lora_jax
from _fixtures import FAMILY_MODEL, IDS, TINY, copy_torch_weights
from lora_jax import models
from lora_jax import peft as lora_peft

TINY, FAMILY_MODEL = TINY, FAMILY_MODEL
LLAMA_TARGETS = ["embed_tokens", "q_proj", "v_proj", "down_proj"]


def _random_factors(adapters, seed=0):
  """Adapters with random A and B (both nonzero, as after training)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), adapters)


def _delta64(lw):
  """float64 ``s·A@B`` laid out as the kernel, written from the formula: a (*in, r) and
  b (r, out) contract over r; a scanned stack (l, in, r), (l, r, out) per layer."""
  a, b = jnp.asarray(lw.a, jnp.float64), jnp.asarray(lw.b, jnp.float64)
  if lw.axes.startswith("l"):
    return lw.scale * jnp.einsum("lir,lro->lio", a, b)
  ins_outs = [j for j, r in enumerate(lw.axes) if r == "i"] + [
      j for j, r in enumerate(lw.axes) if r == "o"]
  return lw.scale * jnp.transpose(jnp.tensordot(a, b, axes=1), np.argsort(ins_outs))


def _reference_params(params, adapters):
  flat = lora_jax.adapters.split(adapters)[0]

  def update(path, w):
    w = jnp.asarray(w, jnp.float64)
    return w + _delta64(flat[path]) if path in flat else w

  return lora_jax._tree.map_with_path(update, params)


def _no_fallback(fn):
  """``fn`` with a merged fallback turned into an error."""

  def checked(*args, **kwargs):
    with warnings.catch_warnings():
      warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
      return fn(*args, **kwargs)

  return checked


def _check_against_reference(fn, params, adapters, x):
  loss = lambda p, x: jnp.mean(jnp.asarray(jax.tree_util.tree_leaves(fn(p, x))[0]) ** 2)  # noqa
  value, grads = _no_fallback(jax.jit(jax.value_and_grad(
      lambda a, x: lora_jax.lora(loss)(params, a, x))))(adapters, x)
  with jax.enable_x64(True):
    a64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), adapters)
    want, want_grads = jax.jit(jax.value_and_grad(
        lambda a, x: loss(_reference_params(params, a), x)))(a64, x)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for got, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  base = loss(params, x)
  assert abs(float(value) - float(base)) > 1e-3 * abs(float(base))  # the adapters matter


def _plan_is_factored(config, params, uses, axes):
  plan = lora_jax.plan(config, params, uses=uses)
  assert {t.path: t.axes for t in plan.targets if t.path in axes} == axes
  assert all(t.route == "factored" for t in plan.targets) and not plan.fallbacks
  assert all(uses[p].route == "factored" and uses[p].axes == a for p, a in axes.items())
  return plan


# ---- the reference Llama ---------------------------------------------------------------------

def _llama(scan, tied=False):
  name = "llama-3.2-1b" if tied else FAMILY_MODEL["llama"]  # llama-3.2: a tied head
  return models.get(name, **TINY["llama"], scan_layers=scan)


@functools.cache
def _llama_params(scan, tied=False):
  """The model, its random params and ``analyze``'s uses (made once per configuration)."""
  model = _llama(scan, tied)
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  return model, params, lora_jax.analyze(model.apply, params, IDS)


@pytest.mark.parametrize("scan,tied", [(True, False), (False, True)],
                         ids=["scanned-untied", "unrolled-tied"])
def test_llama_forward_and_gradients_equal_the_dense_float64_formula(scan, tied):
  model, params, uses = _llama_params(scan, tied)
  table = "params/model/embed_tokens/embedding"
  assert uses[table].consumers == (("dot_general", "gather") if tied else ("gather",))
  config = lora_jax.LoraConfig(targets=LLAMA_TARGETS, rank=4, alpha=8)
  _plan_is_factored(config, params, uses, {table: "io"})
  adapters = _random_factors(lora_jax.init(config, params, key=jax.random.key(1), uses=uses))
  _check_against_reference(model.apply, params, adapters, IDS)


def test_all_linear_leaves_embeddings_out_and_init_is_peft_embedding_init():
  model, params, uses = _llama_params(False, tied=True)
  linear = lora_jax.plan(lora_jax.LoraConfig(targets="all-linear"), params, uses=uses)
  assert not any("embed" in t.path for t in linear.targets)
  config = lora_jax.LoraConfig(targets=["embed_tokens"], rank=4, dropout=0.1)
  lw = lora_jax.init(config, params, key=jax.random.key(1), uses=uses)["params"]["model"][
      "embed_tokens"]["embedding"]
  assert lw.a.shape == (64, 4) and lw.b.shape == (4, 32) and lw.dropout == 0.0
  assert not np.any(lw.a) and 0.7 < np.std(lw.b) < 1.3  # PEFT: A zeros, B ~ N(0, 1)
  fresh = jax.jit(lora_jax.lora(model.apply))(params, {"params": {"model": {"embed_tokens": {
      "embedding": lw}}}}, IDS)
  np.testing.assert_array_equal(fresh, jax.jit(model.apply)(params, IDS))  # unchanged at init


# ---- NNX (nnx.Embed, nnx.Conv, a tied head) and linen (nn.Conv) ------------------------------

class NnxNet(nnx.Module):
  """Token embedding, a 1-D convolution along the sequence, and a head tied to the embedding."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(64, 16, rngs=rngs)
    self.conv = nnx.Conv(16, 12, kernel_size=(3,), padding="SAME", rngs=rngs)
    self.proj = nnx.Linear(12, 16, rngs=rngs)

  def __call__(self, ids):
    h = jnp.tanh(self.conv(self.embed(ids)))  # (batch, seq, 12)
    return self.embed.attend(self.proj(h))  # (batch, seq, vocab)


class LinenNet(nn.Module):
  """A strided, dilated 3x3 convolution, a 1x1 one, and a Dense head on the pooled features."""

  @nn.compact
  def __call__(self, x):  # (batch, h, w, 3)
    x = nn.Conv(8, (3, 3), strides=(2, 1), padding=((1, 2), (0, 1)), kernel_dilation=(1, 2),
                name="stem")(x)
    x = nn.Conv(6, (1, 1), name="mix")(jnp.tanh(x))
    return nn.Dense(5, name="head")(jnp.mean(jnp.tanh(x), axis=(1, 2)))


class Linen3d(nn.Module):
  @nn.compact
  def __call__(self, x):  # (batch, d, h, w, 2)
    return nn.Conv(4, (2, 3, 3), padding="SAME", name="conv")(x)


def _nnx_case():
  graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
  return (lambda state, ids: nnx.merge(graphdef, state)(ids)), state, IDS  # noqa: E731


def _linen_case(module=LinenNet, shape=(2, 9, 8, 3)):
  x = jax.random.normal(jax.random.key(3), shape)
  model = module()
  return model.apply, model.init(jax.random.key(0), x), x


def test_nnx_embed_conv_and_tied_head_equal_the_dense_float64_formula():
  fn, state, ids = _nnx_case()
  uses = lora_jax.analyze(fn, state, ids)
  assert uses["embed/embedding"].consumers == ("dot_general", "gather")
  config = lora_jax.LoraConfig(targets=["embed", "conv", "proj"], rank=3, alpha=6)
  _plan_is_factored(config, state, uses, {"embed/embedding": "io", "conv/kernel": "iio"})
  adapters = _random_factors(lora_jax.init(config, state, key=jax.random.key(1), uses=uses))
  _check_against_reference(fn, state, adapters, ids)


@pytest.mark.parametrize("case", [_linen_case, lambda: _linen_case(Linen3d, (2, 4, 5, 6, 2))],
                         ids=["2d", "3d"])
def test_linen_conv_equals_the_dense_float64_formula(case):
  fn, params, x = case()
  uses = lora_jax.analyze(fn, params, x)
  leaves = lora_jax.targets.leaves_by_path(params)
  convs = {p: "i" * (leaves[p].ndim - 1) + "o" for p, u in uses.items()
           if u.consumers == ("conv_general_dilated",)}  # (*window, in, out)
  assert convs
  config = lora_jax.LoraConfig(targets=".*", rank=2, alpha=4)
  _plan_is_factored(config, params, uses, convs)
  adapters = _random_factors(lora_jax.init(config, params, key=jax.random.key(1), uses=uses))
  _check_against_reference(fn, params, adapters, x)


def test_conv_dropout_drops_adapter_inputs_only():
  fn, params, x = _linen_case()
  uses = lora_jax.analyze(fn, params, x)
  config = lora_jax.LoraConfig(targets="stem", rank=2, dropout=0.5)
  adapters = _random_factors(lora_jax.init(config, params, key=jax.random.key(1), uses=uses))
  adapted = _no_fallback(lora_jax.lora(fn))
  plain = adapted(params, adapters, x)
  dropped = adapted(params, adapters, x, lora_dropout_key=jax.random.key(5))
  assert not np.allclose(plain, dropped)
  zero_b = jax.tree_util.tree_map(jnp.zeros_like, adapters)  # no adapter: nothing to drop
  np.testing.assert_allclose(adapted(params, zero_b, x, lora_dropout_key=jax.random.key(5)),
                             fn(params, x), rtol=1e-6, atol=1e-6)


def test_a_bank_runs_lookups_and_convolutions_per_example():
  fn, state, ids = _nnx_case()
  uses = lora_jax.analyze(fn, state, ids)
  config = lora_jax.LoraConfig(targets=["embed", "conv"], rank=2)
  trees = {n: _random_factors(lora_jax.init(config, state, key=jax.random.key(0), uses=uses),
                              seed=i) for i, n in enumerate("ab")}
  bank = lora_jax.bank.stack(trees, state)
  adapted = lora_jax.lora(fn)
  with pytest.raises(ValueError, match=r"used other than as x @ W .* pass per_example=True"):
    adapted(state, bank, ids, adapter_index=np.array([1, 0], np.int32))
  mixed = adapted(state, bank, ids, adapter_index=np.array([1, 0], np.int32), per_example=True)
  for row, name in enumerate("ba"):
    want = _no_fallback(adapted)(state, trees[name], ids[row:row + 1])[0]
    np.testing.assert_allclose(mixed[row], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _plain_uses(fn, w, *args):
  params = {"t": {"kernel": w}}
  return params, lora_jax.analyze(fn, params, *args)


def test_other_gathers_and_grouped_convolutions_fall_back_to_the_merged_kernel():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(10, 6)).astype(np.float32)
  ids = np.array([[1, 4], [9, 0]], np.int32)
  cases = [(lambda p, i: p["t"]["kernel"][i, :3], table, ids, "io"),  # part of each row
           (lambda p, x: jax.lax.conv_general_dilated(  # depthwise: 3 groups of one feature
               x, p["t"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
               feature_group_count=3), rng.normal(size=(3, 3, 1, 6)).astype(np.float32),
            rng.normal(size=(2, 5, 5, 3)).astype(np.float32), "iiio")]
  for fn, w, arg, axes in cases:
    params, uses = _plain_uses(fn, w, arg)
    assert uses["t/kernel"].route == "merged"
    config = lora_jax.LoraConfig(targets="t", rank=2, axes_pattern={"t": axes})
    plan = lora_jax.plan(config, params, uses=uses)
    assert [t.path for t in plan.fallbacks] == ["t/kernel"]
    adapters = _random_factors(lora_jax.init(config, params, key=jax.random.key(0), uses=uses))
    with pytest.warns(lora_jax.LoraFallbackWarning,
                      match=r"t/kernel \((gather|conv_general_dilated)\)"):
      got = lora_jax.lora(fn)(params, adapters, arg)
    np.testing.assert_allclose(got, fn(lora_jax.merge(params, adapters), arg), rtol=1e-5,
                               atol=1e-5)


def test_a_lookup_along_another_axis_is_factored_with_its_roles():
  rng = np.random.default_rng(0)
  params = {"t": {"kernel": rng.normal(size=(6, 10)).astype(np.float32)}}  # (features, vocab)
  fn = lambda p, i: jnp.take(p["t"]["kernel"], i, axis=1)  # noqa: E731  (6, *ids)
  ids = np.array([[1, 4, 9]], np.int32)
  uses = lora_jax.analyze(fn, params, ids)
  assert (uses["t/kernel"].axes, uses["t/kernel"].route) == ("oi", "factored")
  config = lora_jax.LoraConfig(targets="t", rank=2)
  adapters = _random_factors(lora_jax.init(config, params, key=jax.random.key(0), uses=uses))
  got = _no_fallback(lora_jax.lora(fn))(params, adapters, ids)
  with jax.enable_x64(True):
    want = fn(_reference_params(params, adapters), ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_an_embedding_pattern_selects_the_table_and_other_matrices_are_refused():
  params = {"embed": {"embedding": jnp.ones((10, 4))}, "pos": {"table": jnp.ones((5, 4))},
            "dense": {"kernel": jnp.ones((4, 4))}}
  shown = lora_jax.plan(lora_jax.LoraConfig(targets="embed", rank=2), params)
  assert [(t.path, t.axes, t.num_params) for t in shown.targets] == [
      ("embed/embedding", "io", 2 * (10 + 4))]
  with pytest.raises(ValueError, match=r"target pattern 'pos' matched 'pos/table' \(shape "
                                       r"\(5, 4\)\), which is not a matmul kernel .* nor an "
                                       r"embedding table \(a 2-D leaf named one of "
                                       r"\('embedding',\)\)"):
    lora_jax.plan(lora_jax.LoraConfig(targets="pos"), params)


# ---- PEFT files: layouts and errors (no torch) -------------------------------------------------

def test_exported_layouts_are_peft_embedding_and_conv2d_and_round_trip(tmp_path):
  fn, params, x = _linen_case()
  uses = lora_jax.analyze(fn, params, x)
  config = lora_jax.LoraConfig(targets=["stem", "mix", "head"], rank=2, alpha=4)
  adapters = _random_factors(lora_jax.init(config, params, key=jax.random.key(1), uses=uses))
  lora_peft.export_peft(tmp_path, adapters, config=config, uses=uses)
  tensors = load_file(tmp_path / "adapter_model.safetensors")
  stem = adapters["params"]["stem"]["kernel"]
  np.testing.assert_array_equal(tensors["base_model.model.stem.lora_A.weight"],
                                np.transpose(stem.a, (3, 2, 0, 1)))  # (r, in, kh, kw)
  np.testing.assert_array_equal(tensors["base_model.model.stem.lora_B.weight"],
                                np.asarray(stem.b).T[:, :, None, None])  # (out, r, 1, 1)
  assert tensors["base_model.model.head.lora_A.weight"].shape == (2, 6)
  config2, again = lora_peft.import_peft(tmp_path, params, uses=uses)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, adapters)
  assert config2.axes_pattern == {"^(?:params/mix/kernel)$": "iiio",
                                  "^(?:params/stem/kernel)$": "iiio"}


def _exported_llama(tmp_path):
  model = _llama(False)
  params = jax.eval_shape(model.init, jax.random.key(0), IDS)
  config = lora_jax.LoraConfig(targets=["embed_tokens", "q_proj"], rank=2, alpha=4, dropout=0.1)
  adapters = _random_factors(jax.eval_shape(lambda: lora_jax.init(
      config, params, key=jax.random.key(0))))
  lora_peft.export_peft(tmp_path, adapters, config=config)
  return params, config, adapters


def test_embedding_tensors_are_peft_names_and_round_trip(tmp_path):
  params, config, adapters = _exported_llama(tmp_path)
  tensors = load_file(tmp_path / "adapter_model.safetensors")
  table = adapters["params"]["model"]["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(tensors["base_model.model.model.embed_tokens.lora_embedding_A"],
                                np.asarray(table.a).T)  # (r, vocab)
  np.testing.assert_array_equal(tensors["base_model.model.model.embed_tokens.lora_embedding_B"],
                                np.asarray(table.b).T)  # (features, r)
  got_config, got = lora_peft.import_peft(tmp_path, params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, adapters)
  assert got["params"]["model"]["embed_tokens"]["embedding"].dropout == 0.0
  assert got["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].dropout == 0.1
  assert lora_jax.plan(got_config, params).counts == lora_jax.plan(config, params).counts


EMBED = "base_model.model.model.embed_tokens"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop(f"{EMBED}.lora_embedding_B"),
     rf"tensor '{EMBED}\.lora_embedding_A' has no lora_embedding_B partner"),
    (lambda t: t.update({f"{EMBED}.lora_A.weight": np.zeros((2, 64), np.float32),
                         f"{EMBED}.lora_B.weight": np.zeros((32, 2), np.float32)}),
     r"module 'model\.embed_tokens' has both lora_A / lora_B and lora_embedding_A"),
    (lambda t: t.update({f"{Q0}.lora_embedding_A": t.pop(f"{Q0}.lora_A.weight"),
                         f"{Q0}.lora_embedding_B": t.pop(f"{Q0}.lora_B.weight")}),
     r"lora_embedding_A' is an embedding factor, but 'params/model/layers_0/self_attn/q_proj/"
     r"kernel' is a kernel"),
    (lambda t: t.update({f"{EMBED}.base_layer.weight": np.zeros((60, 32), np.float32)}),
     r"base_layer\.weight' \(PEFT's copy of the base weight\) has shape \(60, 32\), but the "
     r"base 'params/model/embed_tokens/embedding' has \(64, 32\)"),
    (lambda t: t.update({f"{Q0}.lora_A.weight": np.zeros((2, 32, 1, 1), np.float32),
                         f"{Q0}.lora_B.weight": np.zeros((32, 2, 1, 1), np.float32)}),
     r"a convolution's factors, which do not fit 'params/model/layers_0/self_attn/q_proj/"
     r"kernel' of shape \(32, 32\) and axes 'io'"),
])
def test_peft_embedding_and_conv_files_that_do_not_fit_are_named(tmp_path, edit, match):
  params, _, _ = _exported_llama(tmp_path)
  file = tmp_path / "adapter_model.safetensors"
  tensors = dict(load_file(file))
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"adapter_model\.safetensors: .*" + match):
    lora_peft.import_peft(tmp_path, params)


def test_a_base_copy_that_is_not_the_base_and_dora_on_a_table_are_refused(tmp_path):
  _, params, _ = _llama_params(True)
  config = lora_jax.LoraConfig(targets=["embed_tokens"], rank=2)
  lora_peft.export_peft(tmp_path, lora_jax.init(config, params, key=jax.random.key(0)),
                        config=config)
  file = tmp_path / "adapter_model.safetensors"
  table = np.asarray(params["params"]["model"]["embed_tokens"]["embedding"])
  save_file({**load_file(file), f"{EMBED}.base_layer.weight": table}, file)
  lora_peft.import_peft(tmp_path, params)  # PEFT's copy of the base itself: fine
  save_file({**load_file(file), f"{EMBED}.base_layer.weight": table + 1}, file)
  with pytest.raises(ValueError, match=r"differs from the base params' 'params/model/"
                                       r"embed_tokens/embedding'; load onto the base"):
    lora_peft.import_peft(tmp_path, params)
  dora = lora_jax.LoraConfig(targets=["embed_tokens"], rank=2, kind="dora")
  with pytest.raises(ValueError, match=r"adapter at 'params/model/embed_tokens/embedding' "
                                       r"\(axes 'io', DoraWeights\) is on an embedding table, "
                                       r"which PEFT stores only as plain LoRA"):
    lora_peft.export_peft(tmp_path / "dora", lora_jax.init(dora, params, key=jax.random.key(0)),
                          config=dora)
  data = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "use_dora": True}))
  save_file({k: v for k, v in load_file(file).items() if "base_layer" not in k}
            | {f"{EMBED}.lora_magnitude_vector": np.ones(32, np.float32)}, file)
  with pytest.raises(ValueError, match=r"lora_magnitude_vector' is the adapter kind dora "
                                       r"\(use_dora true\) on 'params/model/embed_tokens/"
                                       r"embedding', an embedding table"):
    lora_peft.import_peft(tmp_path, params)


# ---- real PEFT both ways -----------------------------------------------------------------------

def interop():
  return (pytest.importorskip("torch"), pytest.importorskip("transformers"),
          pytest.importorskip("peft"))


def _hf_llama():
  torch, transformers, peft = interop()
  torch.manual_seed(0)
  return torch, peft, transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **TINY["llama"], bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-5)).eval()


def _counts(peft_model):
  return peft_model.get_nb_trainable_parameters()  # print_trainable_parameters' figures


@pytest.mark.interop
def test_peft_saved_embedding_adapter_imports_to_peft_outputs_and_counts(tmp_path):

  torch, peft, hf = _hf_llama()
  ours = {scan: _llama(scan) for scan in (True, False)}
  params = {scan: copy_torch_weights(hf, m) for scan, m in ours.items()}  # before PEFT wraps
  peft_model = peft.get_peft_model(hf, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False,
      rank_pattern={"v_proj": 2}))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "Setting save_embedding_layers to True"
    peft_model.save_pretrained(str(tmp_path))
  assert "base_model.model.model.embed_tokens.lora_embedding_A" in load_file(
      tmp_path / "adapter_model.safetensors")
  with torch.no_grad():
    want = peft_model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    with peft_model.disable_adapter():
      base = peft_model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  assert np.abs(want - base).max() > 1e-2
  for scan, model in ours.items():
    config, adapters = lora_peft.import_peft(tmp_path, params[scan])
    got = _no_fallback(jax.jit(lora_jax.lora(model.apply)))(params[scan], adapters, IDS)
    assert np.abs(want - np.asarray(got)).max() <= 1e-4
    counts = lora_jax.count(params[scan], adapters)
    assert (counts.trainable, counts.total) == _counts(peft_model)
    assert lora_jax.plan(config, params[scan], uses=lora_jax.analyze(
        model.apply, params[scan], IDS)).counts == counts


@pytest.mark.interop
def test_exported_embedding_adapter_gives_peft_our_outputs(tmp_path):

  torch, peft, hf = _hf_llama()
  model = _llama(True)
  params = copy_torch_weights(hf, model)
  uses = lora_jax.analyze(model.apply, params, IDS)
  config = lora_jax.LoraConfig(targets=LLAMA_TARGETS, rank=4, alpha=8)
  adapters = _random_factors(lora_jax.init(config, params, key=jax.random.key(0), uses=uses))
  ours = _no_fallback(jax.jit(lora_jax.lora(model.apply)))(params, adapters, IDS)
  lora_peft.export_peft(tmp_path, adapters, config=config)
  loaded = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
  with torch.no_grad():
    theirs = loaded(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  assert np.abs(theirs - np.asarray(ours)).max() <= 1e-4
  assert np.abs(theirs - np.asarray(model.apply(params, IDS))).max() > 1e-2
  assert type(loaded.base_model.model.model.embed_tokens).__name__ == "Embedding"


class TorchNet:
  """A torch Conv2d (stride 2, padding 1) + ReLU + mean pool + Linear, and its Flax twin."""

  @staticmethod
  def torch(torch):
    class Net(torch.nn.Module):
      def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1))
        self.fc = torch.nn.Linear(8, 5)

      def forward(self, x):  # (batch, 3, h, w)
        return self.fc(torch.relu(self.features(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Net().eval()


class FlaxNet(nn.Module):
  @nn.compact
  def __call__(self, x):  # (batch, h, w, 3)
    x = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="stem")(x)
    return nn.Dense(5, name="head")(jnp.mean(jax.nn.relu(x), axis=(1, 2)))


NAMES = {"params/stem/kernel": "features.0", "params/head/kernel": "fc"}


def _conv_pair(torch):
  net = TorchNet.torch(torch)
  sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  stem = sd["features.0.weight"].transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
  params = {"params": {"stem": {"kernel": jnp.asarray(stem),
                                "bias": jnp.asarray(sd["features.0.bias"])},
                       "head": {"kernel": jnp.asarray(sd["fc.weight"].T),
                                "bias": jnp.asarray(sd["fc.bias"])}}}
  x = np.random.default_rng(0).normal(size=(2, 3, 9, 7)).astype(np.float32)  # NCHW
  flax_x = jnp.asarray(x.transpose(0, 2, 3, 1))
  with torch.no_grad():
    assert np.abs(net(torch.tensor(x)).numpy() - FlaxNet().apply(params, flax_x)).max() < 1e-5
  return net, params, x, flax_x


@pytest.mark.interop
def test_conv2d_adapters_both_ways_with_peft(tmp_path):
  torch, _, peft = interop()
  net, params, x, flax_x = _conv_pair(torch)
  uses = lora_jax.analyze(FlaxNet().apply, params, flax_x)
  assert (uses["params/stem/kernel"].axes, uses["params/stem/kernel"].route) == ("iiio",
                                                                                "factored")
  peft_model = peft.get_peft_model(net, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["features.0", "fc"], init_lora_weights=False))
  peft_model.save_pretrained(str(tmp_path / "theirs"))
  with torch.no_grad():
    want = peft_model(torch.tensor(x)).numpy()
  assert np.abs(want - FlaxNet().apply(params, flax_x)).max() > 1e-2
  name_map = lambda path, layer: NAMES[path]  # noqa: E731
  config, adapters = lora_peft.import_peft(tmp_path / "theirs", params, uses=uses,
                                           name_map=name_map)
  adapted = _no_fallback(jax.jit(lora_jax.lora(FlaxNet().apply)))
  assert np.abs(want - np.asarray(adapted(params, adapters, flax_x))).max() <= 1e-4
  counts = lora_jax.count(params, adapters)
  assert (counts.trainable, counts.total) == _counts(peft_model)
  assert lora_jax.plan(config, params, uses=uses).counts == counts
  assert counts.trainable == 4 * (3 * 3 * 3) + 4 * 8 + 4 * (8 + 5)

  mine = _random_factors(adapters, seed=1)
  ours = adapted(params, mine, flax_x)
  lora_peft.export_peft(tmp_path / "ours", mine, config=config, uses=uses, name_map=name_map)
  loaded = peft.PeftModel.from_pretrained(TorchNet.torch(torch), str(tmp_path / "ours")).eval()
  with torch.no_grad():
    theirs = loaded(torch.tensor(x)).numpy()
  assert np.abs(theirs - np.asarray(ours)).max() <= 1e-4
  assert re.fullmatch(r"features\\\.0\|fc|fc\|features\\\.0", json.loads(
      (tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"])
