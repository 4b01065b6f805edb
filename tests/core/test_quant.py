"""QLoRA's quantized frozen base (lora_jax.quant): formats checked against llama.cpp's own
NumPy code and the QLoRA paper, and a quantized base under lora(fn) checked against LoRA on
its dequantized base."""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _llm import needs_smollm2
from _models import linen_case, nnx_case
from _utils import assert_trees_close, randomize_b
from flax import nnx

import lora_jax
from lora_jax import kernels, quant
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

FORMATS = [("q4_1", False), ("q8_0", False), ("nf4", False), ("nf4", True), ("int8", False)]
FORMAT_IDS = ["q4_1", "q8_0", "nf4", "nf4_dq", "int8"]


# ----------------------------------------------------------------------- the formats


@needs_smollm2
def test_gguf_blocks_kept_as_stored_dequantize_as_gguf_does_bit_for_bit():
  import gguf

  from lora_jax.models import gguf as g

  file = g.read(g.smollm2_path())
  for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight", "token_embd.weight"):
    tensor = file.tensors[name]
    kind = quant.from_gguf(tensor.data, tensor.tensor_type.name)
    want = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # (out, in)
    np.testing.assert_array_equal(np.asarray(kernels.dense(kind)).T, want)


@pytest.mark.parametrize("format,qtype", [("q4_1", "Q4_1"), ("q8_0", "Q8_0")])
def test_quantizing_rounds_as_llama_cpp_does(format, qtype):
  """Our JAX quantizer writes the same blocks as gguf.quants.quantize (llama.cpp's rounding)."""
  import gguf

  rows = np.random.default_rng(0).normal(size=(48, 256)).astype(np.float32)  # (out, in)
  rows[3, :32] = 0.25  # a constant block: scale 0
  t = gguf.GGMLQuantizationType[qtype]
  want = quant.from_gguf(gguf.quants.quantize(rows, t), qtype)
  got = quant.quantize_kernel(jnp.asarray(rows.T), format, roles="io")
  for field in ("codes", "scale") + (("minimum",) if format == "q4_1" else ()):
    np.testing.assert_array_equal(np.asarray(getattr(got, field)), getattr(want, field), field)
  np.testing.assert_array_equal(np.asarray(kernels.dense(got)).T,
                                gguf.quants.dequantize(gguf.quants.quantize(rows, t), t))


def _normal_quantile(p):
  with jax.enable_x64(True):
    return np.asarray(jax.scipy.special.ndtri(jnp.asarray(p, jnp.float64)))


def test_the_nf4_levels_are_the_papers_normal_quantiles():
  """QLoRA §3: the levels are quantiles of N(0, 1), 8 for the positive half and 7 for the
  negative, with an exact zero, normalized to [-1, 1]; the outermost quantile is taken at
  offset = 1 - (1/(2·15) + 1/(2·16)) / 2 = 0.9677 (bitsandbytes' create_normal_map).
  Rebuilt here in float64 with JAX's normal quantile function."""
  offset = 1 - (1 / 30 + 1 / 32) / 2
  positive = _normal_quantile(np.linspace(offset, 0.5, 9)[:-1])
  negative = -_normal_quantile(np.linspace(offset, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([positive, [0.0], negative]))
  levels /= np.abs(levels).max()
  np.testing.assert_allclose(quant.NF4, levels, rtol=0, atol=1e-6)
  assert quant.NF4.dtype == np.float32 and quant.NF4[7] == 0.0 and len(set(quant.NF4)) == 16


def _brute_force_nf4(w: np.ndarray) -> np.ndarray:
  """float64 NF4 of rows (out, in): blocks of 64, absmax, the nearest of all 16 levels."""
  b = w.reshape(w.shape[0], -1, 64).astype(np.float64)
  absmax = np.abs(b).max(-1, keepdims=True)
  levels = quant.NF4.astype(np.float64)
  nearest = levels[np.abs((b / absmax)[..., None] - levels).argmin(-1)]
  return (nearest * absmax).reshape(w.shape)


def test_nf4_error_on_gaussian_weights_is_what_the_format_predicts():
  rows = np.random.default_rng(1).normal(size=(256, 1024)).astype(np.float32)
  got = np.asarray(kernels.dense(quant.quantize_kernel(jnp.asarray(rows.T), "nf4",
                                                       roles="io"))).T
  want = _brute_force_nf4(rows)
  assert np.mean(np.abs(got - want) > 1e-6) < 1e-4  # a midpoint tie may round either way
  rel = np.sqrt(np.mean((got - rows) ** 2) / np.mean(rows ** 2))
  np.testing.assert_allclose(rel, np.sqrt(np.mean((want - rows) ** 2) / np.mean(rows ** 2)),
                             rtol=1e-3)
  # a uniform 4-bit absmax code (levels k/7, k = -7..7) on the same blocks does worse:
  b = rows.reshape(256, -1, 64)
  absmax = np.abs(b).max(-1, keepdims=True)
  int4 = (np.round(b / absmax * 7) / 7 * absmax).reshape(rows.shape)
  rel_int4 = np.sqrt(np.mean((int4 - rows) ** 2) / np.mean(rows ** 2))
  assert 0.05 < rel < 0.12 and rel < 0.9 * rel_int4, (rel, rel_int4)


def test_double_quantization_gives_the_papers_bits_per_weight():
  """QLoRA: 4 bits + 32/64 for float32 absmax = 4.5; double quantization stores the absmax
  constants in 8 bits with one float32 per 256 of them: 4 + 8/64 + 32/(64·256) ≈ 4.127."""
  w = jax.random.normal(jax.random.key(0), (4096, 2048))
  single = quant.quantize_kernel(w, "nf4", roles="io")
  double = quant.quantize_kernel(w, "nf4", roles="io", double_quant=True)
  assert single.bits_per_weight == 4.5
  n = w.size
  paper = 4 + 8 / 64 + 32 / (64 * 256)
  assert double.bits_per_weight == pytest.approx(paper + 32 / n, abs=1e-9)  # + one offset
  assert round(double.bits_per_weight, 3) == 4.127
  err = lambda k: float(jnp.sqrt(jnp.mean((kernels.dense(k) - w) ** 2)))  # noqa: E731
  assert err(double) < 1.01 * err(single)  # the 8-bit absmax costs under 1% more error


def test_dequantize_inverts_quantize_up_to_the_formats_rounding():
  w = jax.random.normal(jax.random.key(0), (3, 128, 96)) * 0.02
  for (format, dq), bound in zip(FORMATS, [0.2, 0.01, 0.12, 0.12, 0.01]):
    k = quant.quantize_kernel(w, format, roles="lio", double_quant=dq)
    assert k.shape == w.shape and k.dtype == w.dtype and kernels.is_kind(k)
    rel = float(jnp.linalg.norm(kernels.dense(k) - w) / jnp.linalg.norm(w))
    assert rel < bound, (format, rel)


# ----------------------------------------------------------------------- under lora(fn)


@functools.lru_cache(maxsize=None)  # one model per shape: jitted functions below are reused
@functools.lru_cache(maxsize=None)
def _llama(*, scan: bool, layers: int = 2, width: int = 64, ffn: int = 128):
  """A tiny random Llama, built once per shape (its ``apply`` then keys ``_jitted``'s cache)."""
  config = LlamaConfig(vocab_size=128, hidden_size=width, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       scan_layers=scan, max_position_embeddings=64)
  model = LlamaForCausalLM(config)
  ids = jax.random.randint(jax.random.key(5), (2, 8), 0, 128)
  params = jax.jit(model.init)(jax.random.key(0), ids)
  return model, params, ids, lora_jax.analyze(model.apply, params, ids)


@functools.lru_cache(maxsize=None)
def _jitted(fn):
  """(the adapted function, its loss's value and gradients), jitted once per model: the dense
  reference compiles once for every format."""
  loss = lambda p, x: jnp.mean(fn(p, x) ** 2)  # noqa: E731
  return jax.jit(lora_jax.lora(fn)), jax.jit(lora_jax.value_and_grad(loss))


def _check_equal_to_lora_on_the_dequantized_base(fn, qparams, x, uses, config):
  dense = quant.dequantize(qparams)
  trainable = randomize_b(lora_jax.init(config, qparams, key=jax.random.key(2), uses=uses),
                          jax.random.key(3), scale=0.05)
  adapted, value_and_grad = _jitted(fn)
  np.testing.assert_allclose(adapted(qparams, trainable, x), adapted(dense, trainable, x),
                             rtol=1e-5, atol=1e-5)
  assert_trees_close(value_and_grad(qparams, trainable, x)[1],
                     value_and_grad(dense, trainable, x)[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scan,format,double_quant",
                         [(True, *f) for f in FORMATS] + [(False, "q4_1", False),
                                                         (False, "nf4", True)],
                         ids=[f"scanned-{i}" for i in FORMAT_IDS] + ["unrolled-q4_1",
                                                                     "unrolled-nf4_dq"])
def test_a_quantized_llama_equals_lora_on_its_dequantized_base(scan, format, double_quant):
  model, params, ids, uses = _llama(scan=scan)
  qparams = quant.quantize(params, format, double_quant=double_quant, uses=uses)
  kinds = [x for x in jax.tree_util.tree_leaves(qparams, is_leaf=kernels.is_kind)
           if kernels.is_kind(x)]
  assert len(kinds) == 7 * (1 if scan else 2)  # q, k, v, o, gate, up, down; not the head
  config = lora_jax.LoraConfig(targets=["q_proj", "v_proj", "down_proj"], rank=4)
  _check_equal_to_lora_on_the_dequantized_base(model.apply, qparams, ids, uses, config)


def test_linen_and_nnx_models_take_a_quantized_base():
  for case in (linen_case(), nnx_case()):  # width 16: int8, whose blocks are whole rows
    uses = lora_jax.analyze(case.fn, case.params, case.x)
    qparams = quant.quantize(case.params, "int8", uses=uses)
    config = lora_jax.LoraConfig(targets="all-linear", rank=2)
    _check_equal_to_lora_on_the_dequantized_base(case.fn, qparams, case.x, uses, config)


class _NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(64, 128, rngs=rngs)
    self.down = nnx.Linear(128, 64, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


def test_an_nnx_model_in_nf4():
  graphdef, state = nnx.split(_NnxMLP(nnx.Rngs(0)))
  fn = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
  x = jax.random.normal(jax.random.key(1), (3, 64))
  qstate = quant.quantize(state, "nf4", double_quant=True)
  assert kernels.is_kind(qstate["up"]["kernel"].get_value())
  config = lora_jax.LoraConfig(targets="all-linear", rank=4)
  _check_equal_to_lora_on_the_dequantized_base(fn, qstate, x, None, config)


def test_the_compiled_step_holds_at_most_one_layer_of_dense_kernels():
  """Under lax.scan the dense kernel of a layer exists only while that layer runs, in the
  forward and (dequantized again) in the backward pass: XLA's temporary buffers stay below half
  the dense size of all layers' kernels. The control, a step that dequantizes the whole base
  first, holds them all."""
  model, params, ids, uses = _llama(scan=True, layers=8, width=128, ffn=512)
  qparams = quant.quantize(params, "nf4", uses=uses)
  dense_bytes = sum(math.prod(k.shape) * 4 for k in jax.tree_util.tree_leaves(
      qparams, is_leaf=kernels.is_kind) if kernels.is_kind(k))
  trainable = lora_jax.init(lora_jax.LoraConfig(targets="all-linear", rank=4), qparams,
                            key=jax.random.key(1), uses=uses)
  loss = lambda p, ids: jnp.mean(model.apply(p, ids) ** 2)  # noqa: E731
  grad = lora_jax.value_and_grad(loss)

  def temp(fn):
    return jax.jit(fn).lower(qparams, trainable, ids).compile().memory_analysis(
        ).temp_size_in_bytes

  quantized = temp(grad)
  control = temp(lambda q, t, ids: grad(quant.dequantize(q), t, ids))
  assert control > dense_bytes, (control, dense_bytes)  # the check sees a dense base
  assert quantized < dense_bytes / 2, (quantized, dense_bytes)


def test_merge_and_requantize():
  model, params, ids, uses = _llama(scan=True)
  qparams = quant.quantize(params, "nf4", uses=uses)
  trainable = randomize_b(lora_jax.init(lora_jax.LoraConfig(targets="all-linear", rank=4),
                                        qparams, key=jax.random.key(2), uses=uses),
                          jax.random.key(3), scale=0.05)
  merged = lora_jax.merge(qparams, trainable)  # in float, on the dequantized base
  assert_trees_close(merged, lora_jax.merge(quant.dequantize(qparams), trainable))
  with pytest.warns(quant.QuantizationWarning,
                    match=r"rounding error's norm is \d+\.\d\dx the norm of the adapters' change"):
    again = quant.requantize(merged, qparams)
  assert jax.tree_util.tree_structure(again, is_leaf=kernels.is_kind) == \
      jax.tree_util.tree_structure(qparams, is_leaf=kernels.is_kind)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no change, no warning
    quant.requantize(quant.dequantize(qparams), qparams)


def test_base_bytes_counts_codes_and_scales():
  model, params, ids, uses = _llama(scan=True)
  q = quant.base_bytes(quant.quantize(params, "q4_1", uses=uses))
  d = quant.base_bytes(params)
  weights = sum(math.prod(params["params"]["model"]["layers"][m][p]["kernel"].shape)
                for m, ps in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                              ("mlp", ("gate_proj", "up_proj", "down_proj"))) for p in ps)
  assert q["quantized_weights"] == weights and q["kernels"] == weights * 5 // 8
  assert q["bits_per_weight"] == 5.0 and d["kernels"] == 0
  assert q["dense"] + weights * 4 == d["dense"]  # float32 kernels: 4 bytes each


# ----------------------------------------------------------------------- bad input


def test_bad_input_is_named():
  model, params, ids, uses = _llama(scan=True)
  with pytest.raises(ValueError, match=r"format must be one of q4_1, q8_0, nf4, int8, got 'nf3'"):
    quant.quantize(params, "nf3", uses=uses)
  with pytest.raises(ValueError, match=r"double_quant applies to nf4's absmax constants"):
    quant.quantize(params, "int8", double_quant=True, uses=uses)
  with pytest.raises(ValueError, match=r"has input size 48, not a multiple of nf4's block of 64; "
                                       r"leave it out of targets"):
    quant.quantize_kernel(jnp.ones((48, 8)), "nf4", roles="io", path="k")
  with pytest.raises(ValueError, match=r"axis roles 'oi'; quantizing needs stacked layers first"):
    quant.quantize_kernel(jnp.ones((64, 64)), "int8", roles="oi", path="k")
  with pytest.raises(ValueError, match=r"GGUF tensor type Q6_K is not kept quantized"):
    quant.from_gguf(np.zeros((4, 210), np.uint8), "Q6_K")
  qparams = quant.quantize(params, "nf4", uses=uses)
  with pytest.raises(ValueError, match=r"are already quantized; dequantize first"):
    quant.quantize(qparams, "nf4", uses=uses)
  _, other, _, other_uses = _llama(scan=True, width=128)
  mismatched = lora_jax.init(lora_jax.LoraConfig(targets="all-linear", rank=4), other,
                             key=jax.random.key(0), uses=other_uses)
  with pytest.raises(ValueError, match=r"does not fit the base kernel of shape"):
    lora_jax.lora(model.apply)(qparams, mismatched, ids)


# ----------------------------------------------------------------------- SmolLM2 as stored


@needs_smollm2
def test_smollm2_loads_with_its_q4_1_blocks_and_gives_the_dequantized_models_logits():
  from lora_jax.models import gguf as g

  config, qparams = g.load_llama(quantize="q4_1")
  _, dense = g.load_llama()
  bytes_ = quant.base_bytes(qparams)
  assert bytes_["bits_per_weight"] == 5.0 and bytes_["quantized_weights"] == 30 * (
      576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536)
  model = LlamaForCausalLM(config)
  ids = jnp.array([[1, 504, 3156, 314, 253, 1345, 30, 2]])
  trainable = lora_jax.init(lora_jax.LoraConfig(targets="all-linear", rank=8), qparams,
                            key=jax.random.key(0), uses=lora_jax.analyze(model.apply, qparams, ids))
  got = jax.jit(lora_jax.lora(model.apply))(qparams, trainable, ids)
  np.testing.assert_allclose(got, jax.jit(model.apply)(dense, ids), atol=2e-4, rtol=0)
  # another format: each projection dequantized (q/k rows reordered) and quantized on its own
  _, int8 = g.load_llama(quantize="int8")
  q = int8["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(q, quant.Int8Kernel) and q.shape == (30, 576, 576)
  w = dense["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"][3]
  np.testing.assert_array_equal(
      kernels.dense(jax.tree_util.tree_map(lambda x: x[3], q)),
      kernels.dense(quant.quantize_kernel(w, "int8", roles="io")))


def test_a_quantized_base_on_a_mesh_splits_codes_like_w_and_gives_one_devices_step():
  """Tensor-parallel rules written for dense kernels lay out the codes and scales: a
  column-parallel kernel's codes split along their rows (W's output axis), a row-parallel one's
  along the packed input axis; a scale axis that does not divide stays whole."""
  from jax.sharding import PartitionSpec as P

  from lora_jax import sharding
  from lora_jax.models import llama

  model, params, ids, uses = _llama(scan=True)
  qparams = quant.quantize(params, "nf4", double_quant=True, uses=uses)
  trainable = randomize_b(lora_jax.init(lora_jax.LoraConfig(targets="all-linear", rank=4),
                                        qparams, key=jax.random.key(2), uses=uses),
                          jax.random.key(3), scale=0.05)
  mesh = sharding.mesh("2x4")
  specs = sharding.named_shardings(sharding.tensor_parallel_specs(
      qparams, llama.FAMILY.partition_rules, mesh=mesh), mesh)
  placed = sharding.put(qparams, specs)
  layers = placed["params"]["model"]["layers"]
  q, down = layers["self_attn"]["q_proj"]["kernel"], layers["mlp"]["down_proj"]["kernel"]
  assert q.codes.sharding.spec == P(None, "model", None)  # column: W (l, in, out) splits out
  assert q.absmax.codes.sharding.spec == P(None, "model", None)
  assert down.codes.sharding.spec == P(None, None, "model")  # row: W splits in
  assert down.absmax.codes.sharding.spec == P(None, None, None)  # 128 / 64 = 2 blocks: whole
  assert down.codes.addressable_shards[0].data.shape == (2, 64, 16)  # a quarter of 64 bytes
  adapters = sharding.put(trainable, sharding.adapter_shardings(trainable, specs))
  loss = lambda p, ids: jnp.mean(model.apply(p, ids) ** 2)  # noqa: E731
  step = jax.jit(lora_jax.value_and_grad(loss))
  (value, grads), (want_value, want_grads) = step(placed, adapters, ids), step(qparams,
                                                                               trainable, ids)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)
