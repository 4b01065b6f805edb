"""Hugging Face PEFT interoperability: lora_jax adapters to and from PEFT's saved LoRA format.

The torch models (transformers + PEFT) are the independent reference: an adapter exported by
lora_jax must give PEFT's outputs when PEFT loads it, and one saved by PEFT must give lora_jax
PEFT's outputs when imported.
"""

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax
from _fixtures import (IDS, TINY, abstract, copy_torch_weights, edit_config, edit_tensors,
                       interop, minilm, needs_minilm, tiny_model)  # noqa: F401  (minilm: a fixture)
from _utils import assert_trees_close, flat_adapters
from lora_jax import models
from lora_jax import peft as lora_peft
from lora_jax.models import bert



def _stack_axes(params):
  """The axis roles of the tiny models' 3-D kernels: scanned Dense stacks (what analyze finds)."""
  return {p: "lio" for p, x in lora_jax.targets.leaves_by_path(params).items() if x.ndim == 3}


def _trained_like(params, config, seed=0):
  """Adapters with random A and B (nonzero, as after training), in lora_jax.init's layout."""
  layout = jax.eval_shape(lambda: lora_jax.init(config, params, key=jax.random.key(0),
                                                uses=_stack_axes(params)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), layout)


def _flat(adapters):
  return flat_adapters(adapters)


def _assert_same_adapters(got, want):
  got, want = _flat(got), _flat(want)
  assert list(got) == list(want)
  for path in want:
    g, w = got[path], want[path]
    assert (g.scale, g.axes, g.dropout) == (w.scale, w.axes, w.dropout), path
    np.testing.assert_array_equal(g.a, w.a)
    np.testing.assert_array_equal(g.b, w.b)


def _plan_rows(config, params, uses=None):
  return [(t.path, t.axes, t.rank, t.alpha, t.scale)
          for t in lora_jax.plan(config, params, uses=uses).targets]


# ---- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,layer,name", [
    ("params/encoder/layer/attention/self/query/kernel", 3, "encoder.layer.3.attention.self.query"),
    ("params/encoder/layer_4/output/dense/kernel", None, "encoder.layer.4.output.dense"),
    ("params/bert/encoder/layer/intermediate/dense/kernel", 0, "bert.encoder.layer.0.intermediate"
     ".dense"),
    ("params/classifier/kernel", None, "classifier"),
    ("params/pooler/dense/kernel", None, "pooler.dense"),
    ("params/model/layers_5/self_attn/q_proj/kernel", None, "model.layers.5.self_attn.q_proj"),
    ("params/model/layers/mlp/down_proj/kernel", 11, "model.layers.11.mlp.down_proj"),
    ("params/lm_head/kernel", None, "lm_head"),
    ("params/transformer/h/attn/c_attn/kernel", 2, "transformer.h.2.attn.c_attn"),
    ("params/transformer/h_10/mlp/c_proj/kernel", None, "transformer.h.10.mlp.c_proj"),
    ("encoder/layer_1/attention/self/value/kernel", None, "encoder.layer.1.attention.self.value"),
])
def test_torch_name(path, layer, name):
  assert lora_peft.torch_name(path, layer) == name


def test_torch_name_needs_a_layer_exactly_for_scanned_stacks():
  with pytest.raises(ValueError, match=r"kernel 'params/model/layers/self_attn/q_proj/kernel' "
                                       r"sits in a scanned layer stack and needs the layer index"):
    lora_peft.torch_name("params/model/layers/self_attn/q_proj/kernel")
  with pytest.raises(ValueError, match=r"kernel 'params/model/layers_2/mlp/up_proj/kernel' has a "
                                       r"stacked layer axis but no scanned layer stack"):
    lora_peft.torch_name("params/model/layers_2/mlp/up_proj/kernel", 0)


def test_patterns_match_exactly_the_names():
  names = ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense", "pooler.dense",
           "encoder.layer.10.output.dense", "encoder.layer.1.attention.output.dense"]
  found = lora_peft.patterns(names)
  assert found == [r"encoder\.layer\.1\.attention\.output\.dense",
                   r"encoder\.layer\.(0|1|10)\.output\.dense", r"pooler\.dense"]
  others = ["encoder.layer.2.output.dense", "encoder.layer.0.attention.output.dense",
            "bert.pooler.dense", "encoder.layer.1x.output.dense"]
  for name in names + others:
    assert any(re.fullmatch(p, name) for p in found) == (name in names), name


@pytest.mark.interop
@pytest.mark.parametrize("pattern_map,name", [
    ({"value": 2}, "encoder.layer.0.attention.self.value"),
    ({"output.dense": 2}, "encoder.layer.0.attention.output.dense"),
    ({"layer.0.output.dense": 2, "dense": 3}, "encoder.layer.0.output.dense"),
    ({"dense": 3, "layer.0.output.dense": 2}, "encoder.layer.0.output.dense"),
    ({r"layer\.(0|1)\.attention": 5}, "encoder.layer.1.attention"),
    ({"uery": 2}, "encoder.layer.0.attention.self.query"),
])
def test_pattern_lookup_is_peft_rule(pattern_map, name):
  _, _, peft = interop()
  from peft.utils.other import get_pattern_key
  want = pattern_map.get(get_pattern_key(pattern_map.keys(), name), 0)
  assert lora_peft.pattern_value(pattern_map, name, 0) == want


# ---- export -> PEFT ------------------------------------------------------------------------------

@needs_minilm
@pytest.mark.interop
def test_trained_export_loads_in_peft_with_equal_outputs(minilm, tmp_path):
  torch, transformers, peft = interop()
  config, params, batch = minilm
  model = models.BertModel(config)
  lora_config = lora_jax.LoraConfig(
      targets=["query", "value", "attention/output/dense"], rank=8, alpha=16,
      rank_pattern={"value": 4}, alpha_pattern={"attention/output": 6}, use_rslora=True)
  uses = lora_jax.analyze(model.apply, params, *batch)
  adapters = lora_jax.init(lora_config, params, key=jax.random.key(0), uses=uses)
  optimizer = optax.adam(1e-2)
  step = lora_jax.train_step(lambda p, b: jnp.mean(model.apply(p, *b)[0] ** 2), optimizer)
  opt_state = optimizer.init(adapters)
  for _ in range(3):
    adapters, opt_state, _, _ = step(params, adapters, opt_state, batch)
  lora_peft.export_peft(tmp_path, adapters, config=lora_config,
                        base_model_name_or_path=str(bert.minilm_dir()))

  hf = transformers.BertModel.from_pretrained(str(bert.minilm_dir()))
  peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
  inputs = [torch.tensor(x, dtype=torch.long) for x in batch]
  with torch.no_grad():
    want = peft_model(*inputs).last_hidden_state.numpy()
    with peft_model.disable_adapter():
      base = peft_model(*inputs).last_hidden_state.numpy()
  got, _ = jax.jit(lora_jax.lora(model.apply))(params, adapters, *batch)
  assert np.abs(want - base).max() > 0.05  # training moved the adapters
  assert np.abs(want - np.asarray(got)).max() <= 1e-4

  scales = {name: m.scaling["default"] for name, m in peft_model.base_model.model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}
  expected = {f"encoder.layer.{i}.{module}": scale for i in range(6) for module, scale in [
      ("attention.self.query", 16 / math.sqrt(8)), ("attention.self.value", 16 / math.sqrt(4)),
      ("attention.output.dense", 6 / math.sqrt(8))]}
  assert scales == pytest.approx(expected)


@pytest.mark.interop
def test_adapter_config_has_every_peft_field_as_peft_writes_it(tmp_path):
  _, _, peft = interop()
  model = tiny_model("bert", True)
  params = abstract(model)
  config = lora_jax.LoraConfig(targets=["query", "value"], rank=4, alpha=8, dropout=0.1,
                               rank_pattern={"value": 2})
  lora_peft.export_peft(tmp_path, _trained_like(params, config), config=config,
                        base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
  text = (tmp_path / "adapter_config.json").read_text()
  data = json.loads(text)
  assert text == json.dumps(data, indent=2, sort_keys=True)
  assert set(data) == {f.name for f in dataclasses.fields(peft.LoraConfig)} - {"runtime_config"}
  assert (data["peft_type"], data["inference_mode"], data["peft_version"]) == ("LORA", True,
                                                                               "0.21.2")
  assert (data["r"], data["lora_alpha"], data["lora_dropout"]) == (4, 8, 0.1)
  assert data["rank_pattern"] == {r"encoder\.layer\.(0|1)\.attention\.self\.value": 2}
  assert data["alpha_pattern"] == {} and data["fan_in_fan_out"] is False
  loaded = peft.PeftConfig.from_pretrained(str(tmp_path))  # no warning (warnings are errors)
  assert isinstance(loaded, peft.LoraConfig) and loaded.r == 4
  tensors = load_file(tmp_path / "adapter_model.safetensors")
  assert tensors["base_model.model.encoder.layer.1.attention.self.value.lora_A.weight"].shape == (
      2, 32)
  assert tensors["base_model.model.encoder.layer.1.attention.self.query.lora_B.weight"].shape == (
      32, 4)
  assert len(tensors) == 8 and all(t.dtype == np.float32 for t in tensors.values())
  from safetensors import safe_open
  with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
    assert f.metadata() == {"format": "pt"}


# ---- PEFT -> import ------------------------------------------------------------------------------

@needs_minilm
@pytest.mark.interop
def test_import_of_peft_saved_minilm_gives_peft_outputs(minilm, tmp_path):
  torch, transformers, peft = interop()
  config, _, batch = minilm
  torch.manual_seed(0)
  hf = transformers.BertModel.from_pretrained(str(bert.minilm_dir()))
  peft_model = peft.get_peft_model(hf, peft.LoraConfig(
      r=8, lora_alpha=16, target_modules=["query", "value", "dense"], use_rslora=True,
      rank_pattern={"value": 4}, alpha_pattern={"output.dense": 6}, init_lora_weights=False))
  peft_model.save_pretrained(str(tmp_path))
  inputs = [torch.tensor(x, dtype=torch.long) for x in batch]
  with torch.no_grad():
    out = peft_model.eval()(*inputs)
    with peft_model.disable_adapter():
      base = peft_model(*inputs).last_hidden_state.numpy()
  assert np.abs(out.last_hidden_state.numpy() - base).max() > 0.05  # the adapter matters
  for scan in (True, False):
    config, params = bert.load(scan_layers=scan)
    model = models.BertModel(config)
    lora_config, adapters = lora_peft.import_peft(tmp_path, params)
    h, pooled = jax.jit(lora_jax.lora(model.apply))(params, adapters, *batch)
    assert np.abs(out.last_hidden_state.numpy() - np.asarray(h)).max() <= 1e-4
    assert np.abs(out.pooler_output.numpy() - np.asarray(pooled)).max() <= 1e-4
    assert lora_jax.count(params, adapters).trainable == 6 * (
        8 * (384 + 384) + 4 * (384 + 384) + 8 * (384 + 384) + 8 * (384 + 1536)
        + 8 * (1536 + 384)) + 8 * (384 + 384)
    remade = lora_jax.init(lora_config, params, key=jax.random.key(0))
    assert jax.tree_util.tree_structure(remade) == jax.tree_util.tree_structure(adapters)


PEFT_CASES = {  # GPT-2: Conv1D layers (fan_in_fan_out), a fused c_attn, c_proj in two places
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                 rank_pattern={"c_fc": 2}, alpha_pattern={"attn.c_proj": 3}),
    "llama": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj"], use_rslora=True,
                  rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3},
                  layers_to_transform=[1], layers_pattern="layers"),
}


@pytest.mark.interop
@pytest.mark.parametrize("family", list(PEFT_CASES))
def test_import_of_peft_saved_tiny_models_gives_peft_outputs(family, tmp_path):
  torch, transformers, peft = interop()
  hf_cls, hf_config = {"gpt2": ("GPT2LMHeadModel", "GPT2Config"),
                       "llama": ("LlamaForCausalLM", "LlamaConfig")}[family]
  extra = {"rms_norm_eps": 1e-5} if family == "llama" else {}  # as the Flax Llama's default
  torch.manual_seed(0)
  hf = getattr(transformers, hf_cls)(getattr(transformers, hf_config)(
      **TINY[family], bos_token_id=0, eos_token_id=0, **extra)).eval()
  models_by_scan = {scan: tiny_model(family, scan) for scan in (True, False)}
  params_by_scan = {scan: copy_torch_weights(hf, m) for scan, m in models_by_scan.items()}
  peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                       **PEFT_CASES[family]))
  peft_model.save_pretrained(str(tmp_path))
  with torch.no_grad():
    want = peft_model.eval()(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    with peft_model.disable_adapter():
      base = peft_model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  assert np.abs(want - base).max() > 1e-2  # the adapter matters
  for scan, model in models_by_scan.items():
    params = params_by_scan[scan]
    _, adapters = lora_peft.import_peft(tmp_path, params)
    got = jax.jit(lora_jax.lora(model.apply))(params, adapters, IDS)
    assert np.abs(want - np.asarray(got)).max() <= 1e-4
  if family == "llama":  # layers_to_transform=[1]: layer 0 of each stacked kernel is zero
    stacked = _flat(lora_peft.import_peft(tmp_path, params_by_scan[True])[1])
    lw = stacked["params/model/layers/self_attn/q_proj/kernel"]
    assert not np.any(lw.a[0]) and not np.any(lw.b[0]) and np.all(lw.b[1] != 0)
    unrolled = _flat(lora_peft.import_peft(tmp_path, params_by_scan[False])[1])
    assert not any("layers_0" in p for p in unrolled) and len(unrolled) == 7


# ---- export -> import round trip -------------------------------------------------------------

ROUND_TRIP = {
    "bert": dict(targets="all-linear", rank_pattern={"value": 2}, alpha_pattern={"query": 3}),
    "gpt2": dict(targets="all-linear", use_rslora=True, rank_pattern={"c_fc": 2}),
    "llama": dict(targets=["q_proj", "v_proj", "down_proj"], alpha_pattern={"v_proj": 5.5},
                  init="gaussian", dropout=0.05),
}


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("family", list(ROUND_TRIP))
def test_export_import_round_trip_is_exact(family, scan, tmp_path):
  model = tiny_model(family, scan)
  params = abstract(model)
  config = lora_jax.LoraConfig(rank=4, alpha=8, **ROUND_TRIP[family])
  adapters = _trained_like(params, config)
  lora_peft.export_peft(tmp_path, adapters, config=config)
  data = json.loads((tmp_path / "adapter_config.json").read_text())
  assert data["fan_in_fan_out"] is (family == "gpt2")
  got_config, got = lora_peft.import_peft(tmp_path, params)
  _assert_same_adapters(got, adapters)
  assert _plan_rows(got_config, params) == _plan_rows(config, params, _stack_axes(params))
  assert (got_config.dropout, got_config.init, got_config.use_rslora) == (
      config.dropout, config.init, config.use_rslora)
  lora_peft.export_peft(tmp_path / "again", got, config=got_config)
  for name in ("adapter_config.json", "adapter_model.safetensors"):
    assert (tmp_path / "again" / name).read_bytes() == (tmp_path / name).read_bytes()


def test_sequence_classifier_names_carry_the_bert_prefix(tmp_path):
  model = models.BertForSequenceClassification(models.BertConfig(**TINY["bert"]))
  params = abstract(model)
  config = lora_jax.LoraConfig(targets=["query", "classifier"], rank=2, alpha=4)
  adapters = _trained_like(params, config)
  lora_peft.export_peft(tmp_path, adapters, config=config)
  assert sorted(load_file(tmp_path / "adapter_model.safetensors"))[:3] == [
      "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
      "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight",
      "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"]
  assert "base_model.model.classifier.lora_B.weight" in load_file(
      tmp_path / "adapter_model.safetensors")
  _assert_same_adapters(lora_peft.import_peft(tmp_path, params)[1], adapters)


def test_custom_name_map_for_other_models(tmp_path):
  kernel = jax.ShapeDtypeStruct((4, 6), jnp.float32)
  params = {"params": {"attn_q": {"kernel": kernel}, "x_attn_q": {"kernel": kernel},
                       "proj": {"kernel": kernel}}}
  names = {"params/attn_q/kernel": "blocks.attn.q", "params/proj/kernel": "blocks.out"}
  name_map = lambda path, layer: names[path]  # noqa: E731
  config = lora_jax.LoraConfig(targets=["/attn_q", "proj"], rank=3, alpha=6,
                               rank_pattern={"proj": 2})
  adapters = _trained_like(params, config)
  lora_peft.export_peft(tmp_path, adapters, config=config, name_map=name_map)
  data = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (data["target_modules"], data["rank_pattern"]) == (r"blocks\.attn\.q|blocks\.out",
                                                            {r"blocks\.out": 2})
  got_config, got = lora_peft.import_peft(tmp_path, params, name_map=name_map)
  _assert_same_adapters(got, adapters)
  assert _plan_rows(got_config, params) == _plan_rows(config, params)
  names["params/x_attn_q/kernel"] = "attn.q"  # a dotted suffix of blocks.attn.q
  config = lora_jax.LoraConfig(targets=["attn_q"], rank=3, alpha=6, rank_pattern={"^p.*/x_": 2})
  with pytest.raises(ValueError, match=r"module 'blocks\.attn\.q' is a dotted suffix of another "
                                       r"adapted module's name"):
    lora_peft.export_peft(tmp_path, _trained_like(params, config), config=config,
                          name_map=name_map)


def test_per_layer_ranks_import_onto_scanned_params(tmp_path):
  unrolled, scanned = abstract(tiny_model("bert", False)), abstract(tiny_model("bert", True))
  config = lora_jax.LoraConfig(targets=["query", "value"], rank=4, alpha=8,
                               rank_pattern={"layer_1/attention/self/query": 2})
  adapters = _trained_like(unrolled, config)
  lora_peft.export_peft(tmp_path, adapters, config=config)
  data = json.loads((tmp_path / "adapter_config.json").read_text())
  assert data["rank_pattern"] == {r"encoder\.layer\.1\.attention\.self\.query": 2}
  _assert_same_adapters(lora_peft.import_peft(tmp_path, unrolled)[1], adapters)
  got_config, got = lora_peft.import_peft(tmp_path, scanned)
  lw = _flat(got)["params/encoder/layer/attention/self/query/kernel"]
  assert (lw.ranks, lw.scale, lw.a.shape) == ((4, 2), (2.0, 4.0), (2, 32, 4))
  want = _flat(adapters)["params/encoder/layer_1/attention/self/query/kernel"]
  np.testing.assert_array_equal(lw.a[1], np.pad(want.a, ((0, 0), (0, 2))))
  np.testing.assert_array_equal(lw.b[1], np.pad(want.b, ((0, 2), (0, 0))))
  assert got_config.rank_pattern == {
      r"^(?:params/encoder/layer_1/attention/self/query/kernel)$": 2}
  remade = lora_jax.init(got_config, scanned, key=jax.random.key(0), uses=_stack_axes(scanned))
  assert (jax.tree_util.tree_structure(remade) == jax.tree_util.tree_structure(got)
          and lora_jax.count(scanned, remade) == lora_jax.count(unrolled, adapters))


def test_per_layer_alphas_import_onto_scanned_params(tmp_path):
  unrolled = tiny_model("bert", False)
  config = lora_jax.LoraConfig(targets="value", rank=4, alpha=8,
                               alpha_pattern={"layer_0/": 16})
  lora_peft.export_peft(tmp_path, _trained_like(abstract(unrolled), config),
                        config=config)
  lw = _flat(lora_peft.import_peft(tmp_path, abstract(tiny_model("bert", True)))[1])[
      "params/encoder/layer/attention/self/value/kernel"]
  assert (lw.scale, lw.ranks) == ((4.0, 2.0), None)


def test_per_layer_ranks_outside_a_family_stack_are_refused(tmp_path):
  params = {"params": {"blocks": {"kernel": jax.ShapeDtypeStruct((2, 4, 6), jnp.float32)}}}
  rng = np.random.default_rng(0)
  save_file({f"base_model.model.blocks.{i}.{name}.weight": rng.normal(size=shape).astype(
      np.float32) for i, r in enumerate((2, 3)) for name, shape in
      (("lora_A", (r, 4)), ("lora_B", (6, r)))}, tmp_path / "adapter_model.safetensors")
  (tmp_path / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "target_modules": ["blocks"], "r": 3, "rank_pattern": {"0": 2}}))
  with pytest.raises(ValueError, match=r"adapter_model\.safetensors: the layers of the stacked "
                                       r"kernel 'params/blocks/kernel' have different ranks or "
                                       r"scales \(rank 2 alpha 8, rank 3 alpha 8\).*registered "
                                       r"model family"):
    lora_peft.import_peft(tmp_path, params, name_map=lambda path, layer: f"blocks.{layer}")


def test_export_refuses_adapters_that_disagree_with_the_config(tmp_path):
  model = tiny_model("llama", False)
  params = abstract(model)
  config = lora_jax.LoraConfig(targets="q_proj", rank=4, alpha=8)
  adapters = _trained_like(params, config)
  with pytest.raises(ValueError, match=r"adapter at 'params/model/layers_0/self_attn/q_proj/"
                                       r"kernel' has rank 4 and scale 2 \(alpha 8\), but the "
                                       r"config gives rank 4, alpha 16, scale 4"):
    lora_peft.export_peft(tmp_path, adapters, config=dataclasses.replace(config, alpha=16))
  with pytest.raises(ValueError, match=r"adapters hold no LoraWeights"):
    lora_peft.export_peft(tmp_path, {}, config=config)
  assert not list(tmp_path.iterdir())


def test_failed_export_leaves_the_previous_files_whole(tmp_path, monkeypatch):
  model = tiny_model("bert", True)
  params = abstract(model)
  config = lora_jax.LoraConfig(targets="query", rank=4, alpha=8)
  lora_peft.export_peft(tmp_path, _trained_like(params, config), config=config)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

  def fail(*args):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    lora_peft.export_peft(tmp_path, _trained_like(params, config, seed=5), config=config)
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file left


# ---- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def exported(tmp_path):
  """A tiny scanned BERT's params and a folder with its query/value adapter (rank 4)."""
  model = tiny_model("bert", True)
  params = abstract(model)
  config = lora_jax.LoraConfig(targets=["query", "value"], rank=4, alpha=8)
  adapters = _trained_like(params, config)
  lora_peft.export_peft(tmp_path, adapters, config=config)
  return tmp_path, params, adapters


QUERY_A = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
QUERY_B = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_file_is_named(exported, name):
  folder, params, _ = exported
  (folder / name).unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(f"{folder / name} not found")):
    lora_peft.import_peft(folder, params)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_unreadable_safetensors_is_named(exported, damage):
  folder, params, _ = exported
  path = folder / "adapter_model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:-7] if damage == "truncated" else data[:8] + b"{garbage" + data[16:])
  with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable safetensors file")):
    lora_peft.import_peft(folder, params)


def test_invalid_json_is_named(exported):
  folder, params, _ = exported
  (folder / "adapter_config.json").write_text('{"peft_type": "LORA",')
  with pytest.raises(ValueError, match=re.escape(f"{folder}/adapter_config.json is not valid")):
    lora_peft.import_peft(folder, params)


def test_tensor_for_no_module_of_the_base_is_named(exported):
  folder, params, _ = exported

  def rename(tensors):
    for key in (QUERY_A, QUERY_B):
      tensors[key.replace("layer.0", "layer.7")] = tensors.pop(key)

  edit_tensors(folder, rename)
  with pytest.raises(ValueError, match=r"adapter_model.safetensors: tensor 'base_model\.model\."
                                       r"encoder\.layer\.7\.attention\.self\.query\.lora_A\.weight"
                                       r"' names the module 'encoder\.layer\.7\.attention\.self\."
                                       r"query', which is not a kernel of the base params"):
    lora_peft.import_peft(folder, params)


def test_tensor_that_does_not_fit_the_kernel_is_named(exported):
  folder, params, _ = exported
  edit_tensors(folder, lambda t: t.update({QUERY_A: np.zeros((4, 31), np.float32)}))
  with pytest.raises(ValueError, match=re.escape(
      f"{QUERY_A}' has shape (4, 31) and '{QUERY_B}' (32, 4), which do not fit the base kernel "
      f"'params/encoder/layer/attention/self/query/kernel' of shape (2, 32, 32)")):
    lora_peft.import_peft(folder, params)


def test_config_rank_that_does_not_match_the_tensors_is_named(exported):
  folder, params, _ = exported
  edit_config(folder, r=6)
  with pytest.raises(ValueError, match=r"'base_model\.model\.encoder\.layer\.0\.attention\.self\."
                                       r"query\.lora_A\.weight' has rank 4 and .* rank 4, but "
                                       r"adapter_config\.json gives rank 6"):
    lora_peft.import_peft(folder, params)


def test_unpaired_factor_is_named(exported):
  folder, params, _ = exported
  edit_tensors(folder, lambda t: t.pop(QUERY_B))
  with pytest.raises(ValueError, match=re.escape(f"tensor '{QUERY_A}' has no lora_B partner")):
    lora_peft.import_peft(folder, params)


def test_unknown_config_keys_warn_and_are_ignored(exported):
  folder, params, adapters = exported
  edit_config(folder, future_knob=1, another_one=None)
  with pytest.warns(lora_peft.PeftConfigWarning, match=r"keys \['another_one', 'future_knob'\] "
                                                       r"are unknown to PEFT 0\.21\.2"):
    _, got = lora_peft.import_peft(folder, params)
  _assert_same_adapters(got, adapters)


@pytest.mark.parametrize("changes,match", [
    (dict(peft_type="IA3"), r"peft_type is 'IA3'; only LoRA adapters"),
    (dict(bias="lora_and_more"), r"bias='lora_and_more' is not supported"),
    (dict(lora_bias=True), r"lora_bias=True is not supported"),
    (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' is not supported"),
    (dict(fan_in_fan_out=True), r"fan_in_fan_out is true, but the base model's layers are Linear"),
    (dict(r=0), r"r must be an integer >= 1, got 0"),
    (dict(rank_pattern={"query": 2.5}), r"rank_pattern\['query'\] must be an integer >= 1"),
])
def test_config_features_that_cannot_be_reproduced_are_refused(exported, changes, match):
  folder, params, _ = exported
  edit_config(folder, **changes)
  with pytest.raises(ValueError, match=r"adapter_config\.json.*" + match):
    lora_peft.import_peft(folder, params)


@pytest.mark.parametrize("key,match", [
    ("base_model.model.embeddings.word_embeddings.base_layer.weight", "a modules_to_save copy"),
    ("base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector",
     "the lora_magnitude_vector of the adapter kind dora"),
    ("base_model.model.encoder.layer.0.attention.self.query.lora_B.bias", "a trained bias"),
    ("base_model.model.pooler.dense.weight", "a modules_to_save copy"),
])
def test_tensors_that_are_not_lora_factors_are_refused(exported, key, match):
  folder, params, _ = exported
  edit_tensors(folder, lambda t: t.update({key: np.zeros((4, 32), np.float32)}))
  with pytest.raises(ValueError, match=re.escape(f"tensor '{key}' is not a LoRA factor") + ".* "
                     f"but {match}"):
    lora_peft.import_peft(folder, params)


def test_gpt2_adapter_without_fan_in_fan_out_is_refused(tmp_path):
  model = tiny_model("gpt2", True)
  params = abstract(model)
  config = lora_jax.LoraConfig(targets="c_attn", rank=4, alpha=8)
  lora_peft.export_peft(tmp_path, _trained_like(params, config), config=config)
  edit_config(tmp_path, fan_in_fan_out=False)
  with pytest.raises(ValueError, match=r"fan_in_fan_out is false, but the base model's layers "
                                       r"are GPT-2 Conv1D"):
    lora_peft.import_peft(tmp_path, params)
  assert lora_peft.import_peft(tmp_path, params, fan_in_fan_out=False)[0].rank == 4


def test_bfloat16_tensors_are_read_as_float32(exported):
  import ml_dtypes

  folder, params, adapters = exported
  edit_tensors(folder, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
  got = _flat(lora_peft.import_peft(folder, params)[1])
  for path, lw in _flat(adapters).items():
    assert got[path].a.dtype == jnp.float32
    for g, w in ((got[path].a, lw.a), (got[path].b, lw.b)):
      np.testing.assert_array_equal(g, np.asarray(w).astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_modules_to_save_round_trip(tmp_path, scan):
  """A classifier head and per-layer LayerNorms trained in full (modules_to_save) are written
  under their torch names (Linear weights (out, in)) and read back exactly."""
  config = models.BertConfig(**TINY["bert"], scan_layers=scan, num_labels=3)
  model = models.BertForSequenceClassification(config)
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  lora = lora_jax.LoraConfig(targets=["query", "value"], rank=2, alpha=4,
                             modules_to_save=["classifier", "attention/output/LayerNorm"])
  uses = lora_jax.analyze(model.apply, params, IDS)
  trainable = lora_jax.init(lora, params, key=jax.random.key(1), uses=uses)
  rng = np.random.default_rng(0)
  trainable = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                                     trainable)
  lora_peft.export_peft(tmp_path, trainable, config=lora, task_type="SEQ_CLS")
  tensors = load_file(tmp_path / lora_peft.WEIGHTS_FILE)
  head = np.asarray(trainable["params"]["classifier"]["kernel"])
  np.testing.assert_array_equal(tensors["base_model.model.classifier.weight"], head.T)
  norm = "bert.encoder.layer.1.attention.output.LayerNorm"
  layer = trainable["params"]["bert"]["encoder"]["layer" if scan else "layer_1"]
  scale = np.asarray(layer["attention"]["output"]["LayerNorm"]["scale"])
  np.testing.assert_array_equal(tensors[f"base_model.model.{norm}.weight"],
                                scale[1] if scan else scale)
  saved = json.loads((tmp_path / lora_peft.CONFIG_FILE).read_text())["modules_to_save"]
  assert saved == sorted(["classifier", "bert.encoder.layer.0.attention.output.LayerNorm", norm])
  got_config, got = lora_peft.import_peft(tmp_path, params)
  assert_trees_close(got, trainable, rtol=0, atol=0)
  assert (lora_jax.plan(got_config, params, uses=uses).counts
          == lora_jax.plan(lora, params, uses=uses).counts)
