"""Llama checkpoints: Hugging Face folders into the Flax Llama and back (llama_io.load,
llama_io.save), against transformers where it is installed."""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_jax.models import llama_io, weights
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

SIZES = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
SHAPE = {"max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 1000.0}
IDS = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (3, 11)).astype(np.int32)
TOL = 1e-5
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _logits(config, params, ids=IDS) -> np.ndarray:
  return np.asarray(LlamaForCausalLM(config).apply(params, ids), np.float32)


def _close(a, b, tol=TOL):
  assert a.shape == b.shape
  assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() <= tol


# --- Our own round trip (no torch) ----------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def ours(request, tmp_path_factory):
  """A random Flax Llama (config, params) and the folder llama_io.save wrote for it."""
  config = LlamaConfig(**SIZES, **SHAPE, tie_word_embeddings=request.param)
  params = LlamaForCausalLM(config).init(jax.random.key(0), IDS[:1, :4])
  folder = llama_io.save(tmp_path_factory.mktemp("ours") / "llama", config, params)
  return config, params, folder


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_save_then_load_round_trips(ours, scan):
  config, params, folder = ours
  loaded_config, loaded = llama_io.load(folder, scan_layers=scan)
  assert loaded_config == LlamaConfig(**SIZES, **SHAPE, scan_layers=scan,
                                      tie_word_embeddings=config.tie_word_embeddings)
  assert ("lm_head" in loaded["params"]) != config.tie_word_embeddings
  _close(_logits(loaded_config, loaded), _logits(config, params), 0.0 if scan else TOL)
  tensors = llama_io.tensors_from_params(loaded, loaded_config)
  assert tensors.keys() == load_file(folder / weights.SAFETENSORS).keys()


def _rewrite(tmp_path, folder, tensors):
  """A copy of ``folder``'s config with ``tensors`` as its weights."""
  tmp_path.mkdir(exist_ok=True)
  shutil.copy(folder / weights.CONFIG_FILE, tmp_path / weights.CONFIG_FILE)
  save_file(tensors, str(tmp_path / weights.SAFETENSORS))
  return tmp_path


def test_missing_unexpected_and_misshaped_tensors_listed(ours, tmp_path):
  config, _, folder = ours
  tensors = load_file(folder / weights.SAFETENSORS)
  tensors.pop("model.norm.weight")
  tensors["score.weight"] = np.zeros((2, 32), np.float32)
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 16), np.float32)
  with pytest.raises(ValueError, match=r"checkpoint does not fit the Llama config; missing: "
                                       r"model\.norm\.weight; unexpected: score\.weight; "
                                       r"mis-shaped: model\.layers\.1\.mlp\.up_proj\.weight "
                                       r"\(64, 16\) \(expected \(64, 32\)\)\.$"):
    llama_io.load(_rewrite(tmp_path, folder, tensors))
  with pytest.raises(ValueError, match=r"unexpected: score\.weight;"):
    llama_io.check_tensors(tensors, config)  # the same check, on the tensors alone


def test_head_of_a_tied_checkpoint_ignored_only_as_a_copy(ours, tmp_path):
  config, params, folder = ours
  tensors = load_file(folder / weights.SAFETENSORS)
  embed = tensors[llama_io.EMBED_TENSOR]
  old_buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"  # old transformers saved it
  if not config.tie_word_embeddings:  # the untied head is required
    tensors.pop(llama_io.HEAD_TENSOR)
    with pytest.raises(ValueError, match=r"missing: lm_head\.weight\.$"):
      llama_io.load(_rewrite(tmp_path, folder, tensors))
    return
  tensors.update({llama_io.HEAD_TENSOR: embed.copy(), old_buffer: np.ones(4, np.float32)})
  loaded_config, loaded = llama_io.load(_rewrite(tmp_path / "copy", folder, tensors))
  _close(_logits(loaded_config, loaded), _logits(config, params), 0.0)
  tensors[llama_io.HEAD_TENSOR] = embed + 1
  with pytest.raises(ValueError, match=r"; unexpected: lm_head\.weight\.$"):
    llama_io.load(_rewrite(tmp_path / "other", folder, tensors))


def test_save_llama_writes_atomically_and_refuses_an_existing_folder(ours, tmp_path, monkeypatch):
  config, params, _ = ours
  out = tmp_path / "out"
  out.mkdir()  # an empty folder is replaced
  extra = {"tokenizer.json": '{"model": {}}', "tokenizer.model": b"\x00\x01"}
  llama_io.save(out, config, params, dtype="bfloat16", bos_token_id=1, eos_token_id=[2, 3],
                     extra_files=extra)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
  assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors",
                                                          *extra])
  assert (out / "tokenizer.model").read_bytes() == b"\x00\x01"
  hf = json.loads((out / "config.json").read_text())
  assert (hf["dtype"], hf["torch_dtype"], hf["bos_token_id"], hf["eos_token_id"]) == (
      "bfloat16", "bfloat16", 1, [2, 3])
  assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 1000.0}
  assert {str(t.dtype) for t in load_file(out / "model.safetensors").values()} == {"bfloat16"}
  with pytest.raises(FileExistsError, match=rf"{re.escape(str(out))} already exists and is not "
                                            r"an empty folder"):
    llama_io.save(out, config, params)

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr("safetensors.numpy.save_file", fail)
  with pytest.raises(OSError, match="disk full"):
    llama_io.save(tmp_path / "failed", config, params)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written


def test_save_llama_refuses_bad_arguments(ours, tmp_path):
  config, params, _ = ours
  other = LlamaConfig(**SIZES, **SHAPE, tie_word_embeddings=not config.tie_word_embeddings)
  head = "missing" if config.tie_word_embeddings else "unexpected"
  with pytest.raises(ValueError, match=rf"params do not fit the Llama config; {head}: "
                                       r"lm_head/kernel\."):
    llama_io.save(tmp_path / "a", other, params)
  unrolled = LlamaConfig(**SIZES, **SHAPE, tie_word_embeddings=config.tie_word_embeddings,
                         scan_layers=False)
  with pytest.raises(ValueError, match=r"missing: model/layers_0/"):
    llama_io.tensors_from_params(params, unrolled)
  with pytest.raises(ValueError, match=r"dtype 'int8' cannot be saved"):
    llama_io.save(tmp_path / "b", config, params, dtype="int8")
  with pytest.raises(ValueError, match=r"extra_files name '\.\./x' is not a plain file name"):
    llama_io.save(tmp_path / "c", config, params, extra_files={"../x": ""})
  with pytest.raises(ValueError, match=r"extra_files name 'config\.json' collides"):
    llama_io.save(tmp_path / "d", config, params, extra_files={"config.json": ""})
  assert not any(tmp_path.iterdir())


def test_missing_files_named(tmp_path):
  folder = re.escape(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=rf"{folder}/config\.json: no such file"):
    llama_io.load(tmp_path)
  (tmp_path / weights.CONFIG_FILE).write_text(json.dumps(_hf_config()))
  with pytest.raises(FileNotFoundError, match=rf"{folder}/model\.safetensors: no such file "
                                              r"\(nor model\.safetensors\.index\.json\)"):
    llama_io.load(tmp_path)
  index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
  (tmp_path / weights.SAFETENSORS_INDEX).write_text(json.dumps(index))
  with pytest.raises(FileNotFoundError, match=r"model-00001-of-00002\.safetensors: no such "
                                              r"file, though model\.safetensors\.index\.json"):
    llama_io.load(tmp_path)


# --- config.json ----------------------------------------------------------------------------


def _hf_config(**changes) -> dict:
  hf = llama_io.hf_config(LlamaConfig(**SIZES, **SHAPE))
  hf.update(changes)
  return {k: v for k, v in hf.items() if v is not None or k.endswith("token_id")}


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": LLAMA3_ROPE}, r"rope_scaling\.rope_type 'llama3' is not supported"),
    ({"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}},
     r"rope_parameters\.rope_type 'llama3' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling\.type 'linear'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}},
     r"rope_parameters \{'full_attention'"),
    ({"attention_bias": True}, r"attention_bias True is not supported"),
    ({"mlp_bias": True}, r"mlp_bias True is not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"head_dim": 16}, r"head_dim 16 is not supported; .* = 8\."),
    ({"model_type": "mistral"}, r"model_type 'mistral' is not supported"),
    ({"hidden_size": None}, r"config: no hidden_size; "),
], ids=["rope_scaling", "rope_parameters", "linear", "per-layer", "attention_bias", "mlp_bias",
        "gelu", "head_dim", "mistral", "no_size"])
def test_unsupported_configs_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    llama_io.config_from_hf(_hf_config(**changes))


def test_llama3_rope_scaling_refused_naming_the_file(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(rope_scaling=LLAMA3_ROPE)))
  where = re.escape(str(tmp_path / "config.json"))
  with pytest.raises(ValueError, match=rf"^{where}: rope_scaling\.rope_type 'llama3' is not "
                                       r"supported"):
    llama_io.load(tmp_path)


def test_rope_theta_and_defaults_from_either_transformers_form():
  old = {**SIZES, "rope_theta": 5e5, "rope_scaling": None}  # transformers 4
  new = {**SIZES, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}  # 5
  assert llama_io.config_from_hf(old) == llama_io.config_from_hf(new)
  config = llama_io.config_from_hf(SIZES, scan_layers=False)
  assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings,
          config.tie_word_embeddings, config.scan_layers) == (1e4, 1e-6, 2048, False, False)
  assert llama_io.config_from_hf({**SIZES, "num_key_value_heads": None}).num_key_value_heads == 4


# --- Against transformers -------------------------------------------------------------------


def _hf_model(*, tied: bool):
  """A tiny random transformers Llama (float32): every weight random, norms included."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(**SIZES, **SHAPE, tie_word_embeddings=tied)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
  return model


def _hf_logits(model, ids=IDS) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf(request):
  """A tiny random transformers Llama and its logits on IDS."""
  model = _hf_model(tied=request.param)
  return model, _hf_logits(model)


@pytest.mark.interop
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_logits_match_transformers(hf, scan, tmp_path):
  model, expected = hf
  model.save_pretrained(tmp_path)
  config, params = llama_io.load(tmp_path, scan_layers=scan)
  assert config.tie_word_embeddings == model.config.tie_word_embeddings
  assert config.rope_theta == 1000.0 and config.rms_norm_eps == 1e-5
  _close(_logits(config, params), expected)


@pytest.mark.interop
def test_sharded_checkpoint_loads(hf, tmp_path):
  model, expected = hf
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert not (tmp_path / weights.SAFETENSORS).exists()
  assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
  config, params = llama_io.load(tmp_path, scan_layers=False)
  _close(_logits(config, params), expected)


@pytest.mark.interop
def test_saved_llama_loads_in_transformers(hf, tmp_path):
  transformers = pytest.importorskip("transformers")
  model, expected = hf
  model.save_pretrained(tmp_path / "hf")
  config, params = llama_io.load(tmp_path / "hf")
  llama_io.save(tmp_path / "ours", config, params, bos_token_id=1, eos_token_id=2)
  from safetensors import safe_open

  with safe_open(tmp_path / "ours" / weights.SAFETENSORS, framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
  again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
  assert again.config.tie_word_embeddings == model.config.tie_word_embeddings
  assert again.config.rope_parameters["rope_theta"] == 1000.0
  _close(_hf_logits(again), expected)


@pytest.mark.interop
def test_bfloat16_checkpoint_loads(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _hf_model(tied=False).to(torch.bfloat16).save_pretrained(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  config, params = llama_io.load(tmp_path)  # float32 by default
  assert params["params"]["lm_head"]["kernel"].dtype == np.float32
  # The same bf16-rounded weights in float32. (Not the bf16 model cast back with .to(float32):
  # that keeps RoPE's inverse frequencies rounded to bf16, 2e-4 off in the logits.)
  expected = _hf_logits(transformers.LlamaForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32).eval())
  _close(_logits(config, params), expected)
  config, params = llama_io.load(tmp_path, dtype=jnp.bfloat16)
  assert config.dtype == config.param_dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  _close(_logits(config, params), expected, 0.1)


@pytest.mark.interop
def test_transformers_llama3_config_refused(tmp_path):
  transformers = pytest.importorskip("transformers")
  transformers.LlamaConfig(**SIZES, max_position_embeddings=64, rope_theta=5e5,
                           rope_scaling=LLAMA3_ROPE).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r"rope_\w+\.rope_type 'llama3' is not supported"):
    llama_io.config_from_hf(tmp_path)
