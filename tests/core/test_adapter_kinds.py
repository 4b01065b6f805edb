"""The adapter-kind seam: one contract every registered kind passes (identity at init, merge
equivalence against a float64 dense reference, gradients against autodiff of the dense
form, the frozen base bit-identical, LoRA+ groups, counts, checkpoint and PEFT round
trips), and a kind defined in this file alone (``GainLora``) trained, merged, checkpointed
and counted without a change to lora_jax."""

import dataclasses
import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import checkpoint, kinds
from lora_jax.adapters import LoraWeights


@dataclasses.dataclass(frozen=True)
class GainLora(LoraWeights):
  """A toy kind: ``W + g·s·A@B`` with a trained scalar gain ``g`` (1 at init)."""

  name: ClassVar[str] = "gain"
  summary: ClassVar[str] = "gain: W + g·s·A@B, g a trained scalar"
  additive: ClassVar[bool] = True

  gain: jax.Array = None

  @classmethod
  def of_factors(cls, lw, *, base):
    del base
    fields = {f.name: getattr(lw, f.name) for f in dataclasses.fields(LoraWeights)}
    return cls(**fields, gain=jnp.ones((), lw.a.dtype))

  @classmethod
  def extra_params(cls, target):
    del target
    return 1

  def _as_lora(self):
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoraWeights)}
    return LoraWeights(**{**fields, "b": self.b * self.gain})

  def delta(self, *, axes=None, precision=jax.lax.Precision.HIGHEST):
    return self._as_lora().delta(axes=axes, precision=precision)

  def terms(self, **kwargs):
    return self._as_lora().terms(**kwargs)

  def factors(self):
    return self._as_lora().factors()

  def laid_out(self, a_spec, b_spec, wrap):
    out = LoraWeights.laid_out(self, a_spec, b_spec, wrap)
    return dataclasses.replace(out, gain=wrap(jax.sharding.PartitionSpec()))

  def reshaped(self, roles, shape):
    return dataclasses.replace(LoraWeights.reshaped(self, roles, shape), gain=self.gain)


jax.tree_util.register_dataclass(GainLora, data_fields=["a", "b", "gain"],
                                 meta_fields=["scale", "axes", "dropout", "ranks"])


@pytest.fixture(scope="module", autouse=True)
def gain_kind():
  kinds.register(GainLora)
  yield GainLora
  kinds.unregister(GainLora)


KINDS = ("lora", "dora", "gain")
PEFT_FORM = ("lora", "dora")  # the kinds with a Hugging Face PEFT form
IN, HIDDEN, OUT, RANK, ALPHA = 5, 7, 3, 2, 6.0


def _base():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"up": {"kernel": jax.random.normal(k1, (IN, HIDDEN))},
          "down": {"kernel": jax.random.normal(k2, (HIDDEN, OUT)) / 3}}


def _model(params, x):
  return jnp.tanh(x @ params["up"]["kernel"]) @ params["down"]["kernel"]


def _loss(params, batch):
  return jnp.mean((_model(params, batch["x"]) - batch["y"]) ** 2)


X = jax.random.normal(jax.random.key(1), (9, IN))
BATCH = {"x": X, "y": jax.random.normal(jax.random.key(2), (9, OUT))}


def _config(kind):
  return lora_jax.LoraConfig(targets=["up", "down"], rank=RANK, alpha=ALPHA, kind=kind)


def _trained(kind, key=3):
  """Adapters of ``kind`` with every trained array moved off its init."""
  adapters = lora_jax.init(_config(kind), _base(), key=jax.random.key(key))

  def shift(lw):
    if not kinds.is_adapter(lw):
      return lw
    leaves, tree = jax.tree_util.tree_flatten(lw)
    keys = jax.random.split(jax.random.key(key + 1), len(leaves))
    moved = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, moved)

  return jax.tree_util.tree_map(shift, adapters, is_leaf=kinds.is_adapter)


def _dense_kernel(kind, w, lw, xp=np):
  """The adapted kernel from the paper's formula, written here: ``xp`` numpy (float64) or
  jax.numpy (for autodiff, the DoRA column norm held constant as the paper's §4.3)."""
  dtype = np.float64 if xp is np else jnp.float32
  a, b, w = (xp.asarray(v, dtype) for v in (lw.a, lw.b, w))
  adapted = w + lw.scale * (a @ b) * (xp.asarray(lw.gain, dtype) if kind == "gain" else 1.0)
  if kind != "dora":
    return adapted
  norm = xp.sqrt((adapted ** 2).sum(axis=0, keepdims=True))
  if xp is not np:
    norm = jax.lax.stop_gradient(norm)
  return xp.asarray(lw.magnitude, dtype)[None] * adapted / norm


def _dense_params(kind, base, adapters, xp=np):
  return {name: {"kernel": _dense_kernel(kind, base[name]["kernel"],
                                         adapters[name]["kernel"], xp)}
          for name in base}


# ----------------------------------------------------------------------- the contract


@pytest.mark.parametrize("kind", KINDS)
def test_init_is_the_kind_and_the_identity(kind):
  base = _base()
  adapters = lora_jax.init(_config(kind), base, key=jax.random.key(3))
  assert all(type(a["kernel"]) is kinds.named(kind) for a in adapters.values())
  got = lora_jax.lora(_model)(base, adapters, X)
  np.testing.assert_allclose(got, _model(base, X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_transform_equal_the_float64_dense_reference(kind):
  base, adapters = _base(), _trained(kind)
  want = _model(_dense_params(kind, base, adapters), np.asarray(X, np.float64))
  merged = lora_jax.merge(base, adapters)
  np.testing.assert_allclose(_model(merged, X), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(lora_jax.lora(_model))(base, adapters, X), want,
                             rtol=1e-5, atol=1e-5)
  if kinds.named(kind).additive:  # unmerge gives the base back
    for name in base:
      np.testing.assert_allclose(lora_jax.unmerge(merged, adapters)[name]["kernel"],
                                 base[name]["kernel"], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_equal_autodiff_of_the_dense_form(kind):
  base, adapters = _base(), _trained(kind)
  _, got = lora_jax.value_and_grad(_loss)(base, adapters, BATCH)
  want = jax.grad(lambda ad: _loss(_dense_params(kind, base, ad, jnp), BATCH))(adapters)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(got))


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_every_trained_array_and_never_the_base(kind):
  base = _base()
  before = jax.tree_util.tree_map(np.array, base)
  adapters = lora_jax.init(_config(kind), base, key=jax.random.key(3))
  start = jax.tree_util.tree_map(np.array, adapters)
  optimizer = optax.adam(3e-2)
  step = lora_jax.train_step(_loss, optimizer)
  state, losses = optimizer.init(adapters), []
  for _ in range(12):
    adapters, state, loss, _ = step(base, adapters, state, BATCH)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0]
  moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, np.asarray(b)),
                                 start, adapters)
  assert all(jax.tree_util.tree_leaves(moved))
  for was, now in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(base)):
    assert np.array_equal(was, np.asarray(now))  # bit-identical


@pytest.mark.parametrize("kind", KINDS)
def test_lora_plus_puts_b_and_the_kinds_extras_in_the_fast_group(kind):
  base, adapters = _base(), _trained(kind)
  lr, ratio = 1e-2, 16.0
  optimizer = lora_jax.lora_plus(optax.sgd, learning_rate=lr, ratio=ratio)
  _, grads = lora_jax.value_and_grad(_loss)(base, adapters, BATCH)
  updates, _ = optimizer.update(grads, optimizer.init(adapters), adapters)
  for name in base:
    g, u = grads[name]["kernel"], updates[name]["kernel"]
    np.testing.assert_allclose(u.a, -lr * g.a, rtol=1e-6)
    for field in [f.name for f in dataclasses.fields(u)
                  if f.name != "a" and isinstance(getattr(u, f.name), jax.Array)]:
      np.testing.assert_allclose(getattr(u, field), -ratio * lr * getattr(g, field), rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_counts_are_every_trained_array(kind):
  base, adapters = _base(), _trained(kind)
  arrays = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(adapters))
  lora = RANK * (IN + HIDDEN) + RANK * (HIDDEN + OUT)
  extra = {"lora": 0, "dora": HIDDEN + OUT, "gain": 2}[kind]
  assert arrays == lora + extra
  counts = lora_jax.count(base, adapters)
  assert counts.trainable == arrays
  assert counts.total == IN * HIDDEN + HIDDEN * OUT + arrays
  assert lora_jax.plan(_config(kind), base).counts == counts


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_rebuilds_the_kind(kind, tmp_path):
  base, adapters = _base(), _trained(kind)
  checkpoint.save(tmp_path, 1, adapters, config=_config(kind), base=base)
  restored = checkpoint.restore(tmp_path, base=base).adapters
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(adapters)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(adapters)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", PEFT_FORM)
def test_peft_round_trip(kind, tmp_path):
  base, adapters = _base(), _trained(kind)
  lora_jax.peft.export_peft(tmp_path, adapters, config=_config(kind))
  config, restored = lora_jax.peft.import_peft(tmp_path, base)
  assert config.kind == kind
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(adapters)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(adapters)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_a_kind_without_a_peft_form_or_of_another_kind_is_refused_by_export(tmp_path):
  with pytest.raises(ValueError, match=r"adapter kind 'gain' \(GainLora\) has no PEFT form"):
    lora_jax.peft.export_peft(tmp_path / "gain", _trained("gain"), config=_config("gain"))
  with pytest.raises(ValueError, match=r"is a DoraWeights, but config.kind is 'lora'"):
    lora_jax.peft.export_peft(tmp_path / "mixed", _trained("dora"), config=_config("lora"))
  assert not (tmp_path / "gain").exists() and not (tmp_path / "mixed").exists()


def test_each_kind_sets_only_its_own_peft_flags(tmp_path):
  written = {}
  for kind in PEFT_FORM:
    lora_jax.peft.export_peft(tmp_path / kind, _trained(kind), config=_config(kind))
    written[kind] = json.loads((tmp_path / kind / "adapter_config.json").read_text())
  assert written["lora"]["use_dora"] is False and written["dora"]["use_dora"] is True
  assert {k for k in written["lora"] if written["lora"][k] != written["dora"][k]} == {"use_dora"}


# ----------------------------------------------------------------------- the registry


def test_a_config_names_a_registered_kind_and_refuses_others():
  assert set(KINDS) == set(kinds.names())  # the contract runs over every registered kind
  with pytest.raises(ValueError, match=r"unknown adapter kind 'vera'; registered kinds: .*gain"):
    lora_jax.LoraConfig(targets="up", kind="vera")
  with pytest.raises(ValueError, match=r"kind must be an adapter kind's name"):
    lora_jax.LoraConfig(targets="up", kind=True)


def test_register_refuses_a_taken_name_and_unregister_a_builtin():
  @dataclasses.dataclass(frozen=True)
  class Other(LoraWeights):
    name: ClassVar[str] = "gain"

  with pytest.raises(ValueError, match=r"adapter kind name 'gain' is taken by GainLora"):
    kinds.register(Other)
  with pytest.raises(ValueError, match=r"'LoraWeights' is not a registered plug-in"):
    kinds.unregister(LoraWeights)
