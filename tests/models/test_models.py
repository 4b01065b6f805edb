"""Reference models: published parameter counts, and LoRA on scanned and unrolled stacks."""

import resource
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from _fixtures import FAMILY_MODEL, IDS, TINY, tiny_model
from lora_jax import models
from _utils import assert_trees_close, randomize_b

HF = "Hugging Face transformers, {cls} built from the checkpoint's config.json"
# Published total parameter counts of the original checkpoints (base models, no LoRA).
PUBLISHED = {
    "llama-2-7b": (6_738_415_616, HF.format(cls="LlamaForCausalLM") + ", meta-llama/Llama-2-7b-hf"),
    "llama-2-13b": (13_015_864_320, HF.format(cls="LlamaForCausalLM") + ", Llama-2-13b-hf"),
    "llama-2-70b": (68_976_648_192, HF.format(cls="LlamaForCausalLM") + ", Llama-2-70b-hf"),
    "llama-3-8b": (8_030_261_248, HF.format(cls="LlamaForCausalLM") + ", Meta-Llama-3-8B"),
    "llama-3-70b": (70_553_706_496, HF.format(cls="LlamaForCausalLM") + ", Meta-Llama-3-70B"),
    "llama-3.2-1b": (1_235_814_400, HF.format(cls="LlamaForCausalLM") + ", Llama-3.2-1B (tied)"),
    "llama-3.2-3b": (3_212_749_824, HF.format(cls="LlamaForCausalLM") + ", Llama-3.2-3B (tied)"),
    "gpt2": (124_439_808, HF.format(cls="GPT2LMHeadModel") + ", gpt2 (tied head)"),
    "gpt2-medium": (354_823_168, HF.format(cls="GPT2LMHeadModel") + ", gpt2-medium"),
    "gpt2-large": (774_030_080, HF.format(cls="GPT2LMHeadModel") + ", gpt2-large; "
                   "LoRA paper Table 3: 774.03M"),
    "gpt2-xl": (1_557_611_200, HF.format(cls="GPT2LMHeadModel") + ", gpt2-xl"),
    "roberta-base": (124_645_632, HF.format(cls="RobertaModel") + ", roberta-base"),
    "roberta-large": (355_359_744, HF.format(cls="RobertaModel") + ", roberta-large"),
    "bert-base-uncased": (109_482_240, HF.format(cls="BertModel") + ", bert-base-uncased"),
    "smollm2-135m-instruct": (134_515_008, "transformers' LlamaForCausalLM from the bundled "
                              "SmolLM2-135M-Instruct GGUF (tied head; QUANT_FORMATS.md)"),
    "minilm-l6-h384": (22_713_216, HF.format(cls="BertModel") + ", sentence-transformers/"
                       "all-MiniLM-L6-v2 (22.7M on its model card)"),
}
# GPT-3 175B has no released checkpoint: Brown et al. 2020, Table 2.1 names it "175.0B"; the
# architecture given there (96 layers, d 12288, 2048 positions, 50257 tokens, tied head) has
# 174.6B, which is 175B at three significant figures.
GPT3_PUBLISHED_B = 175


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_total_equals_published_count(name):
  assert lora_jax.targets.num_params(models.abstract_params(name)) == PUBLISHED[name][0]


def test_gpt3_total_rounds_to_published():
  total = lora_jax.targets.num_params(models.abstract_params("gpt-3-175b"))
  assert round(total / 1e9) == GPT3_PUBLISHED_B
  assert set(PUBLISHED) | {"gpt-3-175b"} == set(models.CONFIGS)


def _hf_model(name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  c = models.spec_of(name).config
  if isinstance(c, models.LlamaConfig):
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, tie_word_embeddings=c.tie_word_embeddings)
    cls = transformers.LlamaForCausalLM
  elif isinstance(c, models.GPT2Config):
    cfg = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_positions,
                                  n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head)
    cls = transformers.GPT2LMHeadModel
  else:
    roberta = c.position_offset == 2
    cfg = (transformers.RobertaConfig if roberta else transformers.BertConfig)(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size)
    cls = transformers.RobertaModel if roberta else transformers.BertModel
  with torch.device("meta"):  # shapes only, no memory
    return cls(cfg)


@pytest.mark.interop
@pytest.mark.parametrize("name", list(models.CONFIGS))
def test_total_equals_transformers_on_meta_device(name):
  hf = _hf_model(name)
  assert sum(p.numel() for p in hf.parameters()) == lora_jax.targets.num_params(
      models.abstract_params(name))


@pytest.mark.interop
@pytest.mark.parametrize("name,peft_targets,ours", [
    ("llama-2-7b", ["q_proj", "v_proj"], "q,v"),
    ("llama-3-8b", "all-linear", "all-linear"),
    ("gpt2", ["c_attn"], "qkv"),
    ("roberta-base", ["query", "value"], "q,v"),
])
def test_lora_counts_equal_peft_on_meta_device(name, peft_targets, ours):
  peft = pytest.importorskip("peft")
  hf = _hf_model(name)
  peft_model = peft.get_peft_model(hf, peft.LoraConfig(
      r=8, lora_alpha=16, target_modules=peft_targets, fan_in_fan_out=name == "gpt2"))
  config = lora_jax.LoraConfig(targets=models.targets_for(name, ours), rank=8, alpha=16)
  counts = models.plan_model(name, config).counts
  assert (counts.trainable, counts.total) == peft_model.get_nb_trainable_parameters()


def test_counting_70b_allocates_no_weights():
  before = sum(x.nbytes for x in jax.live_arrays())
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  config = lora_jax.LoraConfig(targets="all-linear", rank=16)
  counts = models.plan_model("llama-2-70b", config).counts
  assert counts.total > 68_976_648_192
  assert sum(x.nbytes for x in jax.live_arrays()) - before < 1 << 20  # < 1 MiB of arrays
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 512 * 1024  # KiB


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("family", list(TINY))
def test_lora_on_each_family_equals_merged(family, scan):
  model = models.get(FAMILY_MODEL[family], **TINY[family], scan_layers=scan)
  ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  params = jax.jit(model.init)(jax.random.key(1), ids)
  uses = lora_jax.analyze(model.apply, params, ids)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8)
  adapters = randomize_b(lora_jax.init(config, params, key=jax.random.key(2), uses=uses),
                         jax.random.key(3))
  plan = lora_jax.plan(config, params, uses=uses)
  assert all(t.axes == ("lio" if len(t.shape) == 3 else "io") for t in plan.targets)
  assert any(len(t.shape) == 3 for t in plan.targets) == scan  # stacked only when scanned
  assert not plan.fallbacks
  with warnings.catch_warnings():
    warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
    got = jax.jit(lora_jax.lora(model.apply))(params, adapters, ids)
  apply = jax.jit(model.apply)  # jitted, as eagerly each op would compile on its own
  want = apply(lora_jax.merge(params, adapters), ids)
  assert_trees_close(got, want, rtol=1e-4, atol=1e-4)
  base = apply(params, ids)
  assert not np.allclose(jax.tree_util.tree_leaves(want)[0], jax.tree_util.tree_leaves(base)[0])
  at_init = lora_jax.init(config, params, key=jax.random.key(2), uses=uses)  # B = 0: the base
  # (up to float32 rounding: a scanned stack's rebuilt scan compiles apart from the base's)
  assert_trees_close(jax.jit(lora_jax.lora(model.apply))(params, at_init, ids), base, rtol=0,
                     atol=1e-6)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("family", list(TINY))
def test_each_family_trains_with_its_base_bit_identical_and_round_trips(family, scan, tmp_path):
  """The rest of the family contract: training moves every adapter and never the base, and
  the adapters round-trip through an orbax checkpoint and a PEFT folder (the family's names)
  onto the same model, scanned or unrolled."""
  model, ids = tiny_model(family, scan), IDS
  params = jax.jit(model.init)(jax.random.key(1), ids)
  before = [np.array(x) for x in jax.tree_util.tree_leaves(params)]
  uses = lora_jax.analyze(model.apply, params, ids)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8)
  adapters = lora_jax.init(config, params, key=jax.random.key(2), uses=uses)
  def loss(p, ids):  # every output (BERT's pooled one too), so every adapter gets a gradient
    return sum(jnp.mean(y ** 2) for y in jax.tree_util.tree_leaves(model.apply(p, ids)))
  optimizer = optax.sgd(0.5)
  step, state = lora_jax.train_step(loss, optimizer), optimizer.init(adapters)
  for _ in range(2):
    adapters, state, _, _ = step(params, adapters, state, ids)
  assert all(np.any(np.asarray(lw.b) != 0) for lw in jax.tree_util.tree_leaves(
      adapters, is_leaf=lora_jax.kinds.is_adapter))
  for was, now in zip(before, jax.tree_util.tree_leaves(params)):
    assert np.array_equal(was, np.asarray(now))  # bit-identical
  want = model.apply(lora_jax.merge(params, adapters), ids)
  lora_jax.checkpoint.save(tmp_path / "ckpt", 2, adapters, config=config, base=params)
  restored = lora_jax.checkpoint.restore(tmp_path / "ckpt", base=params).adapters
  assert_trees_close(lora_jax.lora(model.apply)(params, restored, ids), want,
                     rtol=1e-4, atol=1e-5)
  lora_jax.peft.export_peft(tmp_path / "peft", adapters, config=config)
  _, imported = lora_jax.peft.import_peft(tmp_path / "peft", params)
  assert_trees_close(imported, adapters, rtol=1e-6, atol=1e-7)
  assert_trees_close(lora_jax.lora(model.apply)(params, imported, ids), want,
                     rtol=1e-4, atol=1e-5)


def test_every_registered_family_has_a_tiny_model_in_the_contract():
  """The family contract above runs over every registered family (a new one adds its tiny
  config to ``_fixtures.TINY`` and its named model to ``FAMILY_MODEL``)."""
  assert set(TINY) == set(FAMILY_MODEL) == set(lora_jax.family.registered())


def test_sequence_classifier_head_and_tied_llama():
  c = models.BertConfig(**TINY["bert"], num_labels=3)
  clf = models.BertForSequenceClassification(c)
  ids = jnp.ones((2, 8), jnp.int32)
  params = jax.jit(clf.init)(jax.random.key(0), ids)
  assert clf.apply(params, ids, jnp.ones_like(ids)).shape == (2, 3)
  assert params["params"]["classifier"]["kernel"].shape == (32, 3)
  tied = models.get("llama-3.2-1b", **TINY["llama"])
  tree = jax.eval_shape(tied.init, jax.random.key(0), ids)
  assert "lm_head" not in tree["params"] and tied.apply(
      jax.jit(tied.init)(jax.random.key(0), ids), ids).shape == (2, 8, 64)


def test_mean_pooled_classifier_is_the_masked_mean_of_the_hidden_states():
  c = models.BertConfig(**TINY["bert"], num_labels=3, pooling="mean")
  clf = models.BertForSequenceClassification(c)
  ids = jnp.array([[5, 6, 7, 8, 0, 0], [9, 3, 4, 2, 11, 12]], jnp.int32)
  mask = (ids != 0).astype(jnp.int32)
  params = jax.jit(clf.init)(jax.random.key(0), ids)
  assert "pooler" not in params["params"]["bert"]  # the classifier does not use one
  hidden, _ = models.BertModel(c, add_pooling_layer=False).apply(
      {"params": params["params"]["bert"]}, ids, mask)
  hidden, m = np.asarray(hidden, np.float64), np.asarray(mask, np.float64)[..., None]
  head = params["params"]["classifier"]
  expected = ((hidden * m).sum(1) / m.sum(1)) @ np.asarray(head["kernel"], np.float64) + \
      np.asarray(head["bias"], np.float64)
  np.testing.assert_allclose(clf.apply(params, ids, mask), expected, rtol=1e-5, atol=1e-6)
  other = ids.at[0, 4:].set(13)  # padding content does not reach the mean
  np.testing.assert_allclose(clf.apply(params, other, mask), clf.apply(params, ids, mask),
                             atol=1e-6)


def test_unknown_pooling_is_refused():
  clf = models.BertForSequenceClassification(models.BertConfig(**TINY["bert"], pooling="max"))
  with pytest.raises(ValueError, match=r"BertConfig.pooling must be one of pooler, mean, "
                                       r"got 'max'"):
    clf.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))


def test_unknown_model_name():
  with pytest.raises(ValueError, match=r"unknown model config 'llama-9b'; choose one of "
                                       r"llama-2-7b, llama-2-13b"):
    models.get("llama-9b")


def test_roberta_positions_skip_left_padding():
  c = models.BertConfig(**{**TINY["bert"], "max_position_embeddings": 20}, type_vocab_size=1,
                        position_offset=2, pad_token_id=1)
  model = models.BertModel(c)
  ids = jnp.array([[5, 6, 7, 8]])
  padded = jnp.array([[1, 1, 5, 6, 7, 8]])  # left padding with the pad id
  params = jax.jit(model.init)(jax.random.key(0), padded)
  plain, _ = model.apply(params, ids)
  left, _ = model.apply(params, padded, jnp.array([[0, 0, 1, 1, 1, 1]]))
  np.testing.assert_allclose(left[:, 2:], plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,scan", [("llama", True), ("gpt2", False), ("bert", True)])
def test_remat_gives_the_same_lora_gradients_and_recomputes(family, scan):
  """Gradient checkpointing (``remat=True``) changes memory, not results: adapter gradients
  equal the plain model's, and the backward pass holds a rematerialized block."""
  ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  plain = models.get(FAMILY_MODEL[family], **TINY[family], scan_layers=scan)
  remat = models.get(FAMILY_MODEL[family], **TINY[family], scan_layers=scan, remat=True)
  params = jax.jit(plain.init)(jax.random.key(1), ids)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8)
  adapters = randomize_b(lora_jax.init(config, params, key=jax.random.key(2),
                                       uses=lora_jax.analyze(plain.apply, params, ids)),
                         jax.random.key(3))

  def grads(model):
    loss = lambda a: jnp.mean(lora_jax.lora(model.apply)(params, a, ids)[0] ** 2)  # noqa: E731
    return jax.grad(loss)(adapters)

  for x, y in zip(jax.tree_util.tree_leaves(grads(plain)), jax.tree_util.tree_leaves(grads(remat))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(lambda p: jax.grad(lambda p: jnp.sum(remat.apply(p, ids)[0]))(p))(
      params))
  assert "remat" in jaxpr or "checkpoint" in jaxpr
  assert not ("remat" in str(jax.make_jaxpr(lambda p: jax.grad(
      lambda p: jnp.sum(plain.apply(p, ids)[0]))(p))(params)))
