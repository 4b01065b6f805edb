"""The kernel-kind seam: one contract every registered kernel kind passes (identity at init,
the transform and merge against a float64 dense reference on the kind's own dense kernel,
gradients against autodiff of that dense form, the frozen base bit-identical after training,
checkpoint and PEFT round trips onto the kind), and a kind defined in this file alone
(``Bf16Kernel``) passing it without a change to lora_jax."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import assert_trees_close, randomize_b

import lora_jax
from lora_jax import checkpoint, kernels, quant


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Bf16Kernel:
  """A toy kind: the kernel's values kept in bfloat16, its dense kernel float32."""
  values: jax.Array

  @property
  def shape(self):
    return self.values.shape

  @property
  def dtype(self):
    return jnp.dtype(jnp.float32)


@pytest.fixture(scope="module", autouse=True)
def bf16_kind():
  kernels.register(Bf16Kernel, to_dense=lambda k: k.values.astype(jnp.float32))
  yield Bf16Kernel
  kernels.unregister(Bf16Kernel)


MAKERS = {  # each kernel kind under the contract: a dense (in, out) kernel -> an instance
    "q4_1": lambda w: quant.quantize_kernel(w, "q4_1", roles="io"),
    "q8_0": lambda w: quant.quantize_kernel(w, "q8_0", roles="io"),
    "nf4": lambda w: quant.quantize_kernel(w, "nf4", roles="io"),
    "nf4_dq": lambda w: quant.quantize_kernel(w, "nf4", roles="io", double_quant=True),
    "int8": lambda w: quant.quantize_kernel(w, "int8", roles="io"),
    "bf16": lambda w: Bf16Kernel(w.astype(jnp.bfloat16)),
}
IN, HIDDEN, OUT, RANK, ALPHA = 64, 128, 32, 4, 8.0
X = jax.random.normal(jax.random.key(1), (6, IN))
BATCH = {"x": X, "y": jax.random.normal(jax.random.key(2), (6, OUT))}
CONFIG = lora_jax.LoraConfig(targets=["up", "down"], rank=RANK, alpha=ALPHA)


def _dense_base():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"up": {"kernel": jax.random.normal(k1, (IN, HIDDEN)) / 8},
          "down": {"kernel": jax.random.normal(k2, (HIDDEN, OUT)) / 11}}


def _base(name):
  """The toy base with both kernels as ``name``'s kind."""
  return jax.tree_util.tree_map(MAKERS[name], _dense_base())


def _model(params, x):
  return jnp.tanh(x @ params["up"]["kernel"]) @ params["down"]["kernel"]


def _loss(params, batch):
  return jnp.mean((_model(params, batch["x"]) - batch["y"]) ** 2)


def _trained(base):
  return randomize_b(lora_jax.init(CONFIG, base, key=jax.random.key(3)), jax.random.key(4),
                     scale=0.1)


def _reference(base, adapters, x):
  """The adapted model in float64 NumPy from the formula, on the kind's own dense kernels."""
  def kernel(name):
    lw = adapters[name]["kernel"]
    w = np.asarray(kernels.dense(base[name]["kernel"]), np.float64)
    return w + lw.scale * np.asarray(lw.a, np.float64) @ np.asarray(lw.b, np.float64)
  return np.tanh(np.asarray(x, np.float64) @ kernel("up")) @ kernel("down")


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


# ----------------------------------------------------------------------- the contract


def test_every_kernel_kind_lora_jax_registers_is_under_the_contract():
  made = {type(make(_dense_base()["up"]["kernel"])) for make in MAKERS.values()}
  ours = {k for k in kernels.registered() if k.__module__.startswith("lora_jax")}
  assert ours and ours <= made
  assert Bf16Kernel in kernels.registered()


@pytest.mark.parametrize("name", MAKERS)
def test_init_is_the_identity_on_the_kinds_dense_kernel(name):
  base = _base(name)
  adapters = lora_jax.init(CONFIG, base, key=jax.random.key(3))
  got = jax.jit(lora_jax.lora(_model))(base, adapters, X)
  np.testing.assert_allclose(got, _model(quant.dequantize(base), X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", MAKERS)
def test_transform_and_merge_equal_the_float64_dense_reference(name):
  base = _base(name)
  adapters = _trained(base)
  want = _reference(base, adapters, X)
  assert not np.allclose(want, _model(quant.dequantize(base), X), atol=1e-3)  # adapters matter
  np.testing.assert_allclose(jax.jit(lora_jax.lora(_model))(base, adapters, X), want,
                             rtol=1e-5, atol=1e-5)
  merged = lora_jax.merge(base, adapters)  # a merged kind comes back dense
  assert not any(kernels.is_kind(x) for x in
                 jax.tree_util.tree_leaves(merged, is_leaf=kernels.is_kind))
  np.testing.assert_allclose(_model(merged, X), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MAKERS)
def test_gradients_equal_autodiff_of_the_dense_form(name):
  base = _base(name)
  adapters = _trained(base)
  value, grads = jax.jit(lora_jax.value_and_grad(_loss))(base, adapters, BATCH)
  want_value, want = jax.value_and_grad(
      lambda t: _loss(lora_jax.merge(quant.dequantize(base), t), BATCH))(adapters)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  assert_trees_close(grads, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", MAKERS)
def test_training_moves_the_adapters_and_never_the_base(name):
  base = _base(name)
  before = _leaves(base)
  adapters = lora_jax.init(CONFIG, base, key=jax.random.key(3))
  optimizer = optax.adam(1e-2)
  step = lora_jax.train_step(_loss, optimizer)
  state, losses = optimizer.init(adapters), []
  for _ in range(6):
    adapters, state, loss, _ = step(base, adapters, state, BATCH)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  assert all(not np.array_equal(np.asarray(lw.b), 0)
             for lw in jax.tree_util.tree_leaves(adapters, is_leaf=lora_jax.kinds.is_adapter)
             if lora_jax.kinds.is_adapter(lw))
  assert jax.tree_util.tree_structure(base, is_leaf=kernels.is_kind) == \
      jax.tree_util.tree_structure(_base(name), is_leaf=kernels.is_kind)
  for was, now in zip(before, _leaves(base)):
    assert was.dtype == now.dtype and np.array_equal(was, now)  # bit-identical codes, scales


@pytest.mark.parametrize("name", MAKERS)
def test_checkpoint_round_trip_onto_the_kind(name, tmp_path):
  base = _base(name)
  adapters = _trained(base)
  checkpoint.save(tmp_path, 1, adapters, config=CONFIG, base=base)
  restored = checkpoint.restore(tmp_path, base=base).adapters
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(adapters)
  for a, b in zip(_leaves(restored), _leaves(adapters)):
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name", MAKERS)
def test_peft_round_trip_onto_the_kind(name, tmp_path):
  base = _base(name)
  adapters = _trained(base)
  lora_jax.peft.export_peft(tmp_path, adapters, config=CONFIG)
  config, restored = lora_jax.peft.import_peft(tmp_path, base)
  assert (config.rank, config.alpha) == (RANK, ALPHA)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(adapters)
  for a, b in zip(_leaves(restored), _leaves(adapters)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jax.jit(lora_jax.lora(_model))(base, restored, X),
                             _reference(base, adapters, X), rtol=1e-5, atol=1e-5)


def test_unregister_refuses_a_kind_that_is_not_registered():
  with pytest.raises(ValueError, match=r"'dict' is not a registered kernel kind; registered: "
                                       r".*Q4_1Kernel"):
    kernels.unregister(dict)
