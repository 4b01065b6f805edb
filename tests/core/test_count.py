"""Counting and plan: PEFT's convention, from concrete or abstract trees."""

import math
import re

import jax
import jax.numpy as jnp
import pytest

import lora_jax
from _models import D, H, K, L, linen_stack_case, nnx_case


def test_count_concrete_and_abstract_agree_with_hand_count():
  case = nnx_case()  # dense (D, D), query (D, H, K), einsum (D, H, K)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4)
  uses = lora_jax.analyze(case.fn, case.params, case.x)
  adapters = lora_jax.init(config, case.params, key=jax.random.key(0), uses=uses)
  by_hand = 4 * (D + D) + 2 * 4 * (D + H * K)
  base = sum(x.size for x in jax.tree_util.tree_leaves(case.params))
  counted = lora_jax.count(case.params, adapters)
  assert (counted.trainable, counted.total) == (by_hand, base + by_hand)
  abstract = jax.eval_shape(lambda: case.params)
  abstract_adapters = jax.eval_shape(
      lambda: lora_jax.init(config, abstract, key=jax.random.key(0), uses=uses))
  assert lora_jax.count(abstract, abstract_adapters) == counted
  assert lora_jax.plan(config, abstract, uses=uses).counts == counted
  assert str(counted) == (f"trainable params: {by_hand:,d} || all params: {base + by_hand:,d} || "
                          f"trainable%: {100 * by_hand / (base + by_hand):.4f}")


def test_plan_lists_each_target():
  case = linen_stack_case()
  config = lora_jax.LoraConfig(targets="mlp", rank=2, alpha=16)
  shown = lora_jax.plan(config, case.params, uses=lora_jax.analyze(case.fn, case.params, case.x))
  (t,) = shown.targets
  assert (t.path, t.shape, t.axes, t.rank, t.alpha, t.scale) == (
      "params/layers/mlp/kernel", (L, D, D), "lio", 2, 16, 8.0)
  assert t.num_params == L * 2 * (D + D) and t.route == "factored"
  text = str(shown)
  assert re.search(r"params/layers/mlp/kernel\s+3x16x16\s+lio\s+2\s+16\s+8\s+192\s+factored", text)
  assert text.splitlines()[-1].startswith("1 kernels adapted; trainable params: 192 ||")


def test_plan_of_a_large_abstract_model_allocates_nothing():
  layers, d, f = 80, 8192, 28672  # a 70B-sized stack of MLP kernels, never allocated
  params = {"layers": {"up": {"kernel": jax.ShapeDtypeStruct((layers, d, f), jnp.bfloat16)},
                       "down": {"kernel": jax.ShapeDtypeStruct((layers, f, d), jnp.bfloat16)}}}
  config = lora_jax.LoraConfig(targets="all-linear", rank=16, axes_pattern={"layers": "lio"})
  counts = lora_jax.plan(config, params).counts
  assert counts.trainable == 2 * layers * 16 * (d + f)
  assert counts.total == 2 * layers * d * f + counts.trainable


# ---- Interop with Hugging Face PEFT: the same model and config give the same counts ---------

def _flax_tree_of(torch_model):
  """The Flax-named abstract tree of a torch module: Linear weight (out, in) -> kernel (in, out)."""
  tree = {}
  for name, p in torch_model.named_parameters():
    *module, leaf = name.split(".")
    is_linear = leaf == "weight" and p.ndim == 2 and "embeddings" not in module
    shape = tuple(p.shape[::-1]) if is_linear else tuple(p.shape)
    leaf = "kernel" if is_linear else {"weight": "scale"}.get(leaf, leaf)
    node = tree
    for key in module:
      node = node.setdefault(key, {})
    node[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32)
  return tree


@pytest.mark.interop
@pytest.mark.parametrize("targets,ours,rank_pattern", [
    (["query", "value"], ["query", "value"], {}),
    ("all-linear", "all-linear", {}),
    (["query", "key", "dense"], ["query", "key", "dense"], {"key": 2}),
])
def test_trainable_count_matches_peft(targets, ours, rank_pattern):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=96)
  model = transformers.BertModel(config)
  flax_tree = _flax_tree_of(model)
  peft_model = peft.get_peft_model(model, peft.LoraConfig(
      r=8, lora_alpha=16, target_modules=targets, rank_pattern=rank_pattern))
  trainable, total = peft_model.get_nb_trainable_parameters()
  counts = lora_jax.plan(lora_jax.LoraConfig(targets=ours, rank=8, alpha=16,
                                             rank_pattern=rank_pattern), flax_tree).counts
  assert (counts.trainable, counts.total) == (trainable, total)
  assert math.isclose(counts.percent, 100 * trainable / total)


def test_counts_leave_out_buffers_and_rng_state():
  import flax.linen as nn
  from flax import nnx

  class WithStats(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=True)(nn.Dense(16)(x))

  variables = WithStats().init(jax.random.key(0), jnp.ones((2, 16)))
  dense_and_bn = 16 * 16 + 16 + 2 * 16  # kernel, bias, BatchNorm scale and bias; not mean/var
  assert lora_jax.count(variables, {}).total == dense_and_bn
  _, state = nnx.split(nnx.Dropout(0.1, rngs=nnx.Rngs(0)))  # only RNG state: a key and a count
  assert len(jax.tree_util.tree_leaves(state)) == 2 and lora_jax.count(state, {}).total == 0
