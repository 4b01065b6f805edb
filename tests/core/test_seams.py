"""The library's seams: what `import lora_jax` loads, key paths, trainable extras
(modules_to_save), model-family records and kernel kinds."""

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax import checkpoint, family, kernels, peft, sharding
from lora_jax.models._layers import layer_stack
from _utils import assert_trees_close, flat_adapters, randomize_b

# ----------------------------------------------------------------------- layout


def test_import_lora_jax_loads_the_core_only():
  code = "import json, sys, lora_jax; print(json.dumps(sorted(sys.modules)))"
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  loaded = set(json.loads(done.stdout))
  assert "lora_jax.transform" in loaded and "lora_jax.checkpoint" in loaded  # the check can see
  app = sorted(m for m in loaded if m.startswith(("lora_jax.models", "lora_jax.app")))
  assert app == []
  for heavy in ("tokenizers", "matplotlib", "vaderSentiment", "tqdm", "tensorboardX", "torch",
                "transformers", "peft"):
    assert heavy not in loaded, heavy


# ----------------------------------------------------------------------- key paths


def _slashed():
  params = {"blk/0": {"kernel": jax.random.normal(jax.random.key(0), (4, 6))},
            "head": {"kernel": jax.random.normal(jax.random.key(1), (6, 3)),
                     "bias": jnp.zeros((3,))}}

  def fn(params, x):
    h = jnp.tanh(x @ params["blk/0"]["kernel"])
    return h @ params["head"]["kernel"] + params["head"]["bias"][None]

  return params, fn


def test_a_key_holding_a_slash_round_trips(tmp_path):
  params, fn = _slashed()
  config = lora_jax.LoraConfig(targets=r"blk/0", rank=2, modules_to_save="head")
  trainable = lora_jax.init(config, params, key=jax.random.key(2))
  assert set(trainable) == {"blk/0", "head"}  # the key stays one key
  trainable = randomize_b(trainable, jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (5, 4))
  np.testing.assert_allclose(lora_jax.lora(fn)(params, trainable, x),
                             fn(lora_jax.merge(params, trainable), x), rtol=1e-5, atol=1e-6)
  checkpoint.save(tmp_path, 1, trainable, config=config, base=params)
  restored = checkpoint.restore(tmp_path, base=params)
  assert jax.tree_util.tree_structure(restored.adapters) == jax.tree_util.tree_structure(
      trainable)
  assert_trees_close(restored.adapters, trainable, rtol=0, atol=0)
  assert restored.config == config
  specs = sharding.adapter_shardings(trainable, jax.tree_util.tree_map(lambda _: P(), params))
  assert set(specs) == {"blk/0", "head"}


# ----------------------------------------------------------------------- trainable extras


class _MLP(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, param_dtype=self.dtype, dtype=self.dtype,  # noqa: E731
                                     name=name)
    return dense(2, "head")(jnp.tanh(dense(8, "fc1")(x)))


def _mse(model):
  return lambda params, batch: jnp.mean((model.apply(params, batch[0]) - batch[1]) ** 2)


def test_extras_step_equals_autodiff_over_adapters_and_extras_in_float64():
  with jax.enable_x64(True):
    model = _MLP(jnp.float64)
    x = jax.random.normal(jax.random.key(0), (16, 5), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (16, 2), jnp.float64)
    base = jax.jit(model.init)(jax.random.key(2), x)
    config = lora_jax.LoraConfig(targets="fc1", rank=2, alpha=6, modules_to_save="head",
                                 dtype=jnp.float64)
    trainable = randomize_b(lora_jax.init(config, base, key=jax.random.key(3)),
                            jax.random.key(4))
    loss = _mse(model)

    def reference(t):  # autodiff of the same loss over (A, B, head), W formed densely
      lw = t["params"]["fc1"]["kernel"]
      fc1 = {**base["params"]["fc1"], "kernel": base["params"]["fc1"]["kernel"]
             + lw.scale * lw.a @ lw.b}
      return loss({"params": {"fc1": fc1, "head": t["params"]["head"]}}, (x, y))

    want_loss, want = jax.value_and_grad(reference)(trainable)
    got_loss, got = lora_jax.value_and_grad(loss)(base, trainable, (x, y))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-12)
    assert_trees_close(got, want, rtol=1e-10, atol=1e-12)
    assert got["params"]["head"]["kernel"].dtype == jnp.float64
    optimizer = optax.sgd(0.1)
    out = lora_jax.train_step(loss, optimizer)(base, trainable, optimizer.init(trainable), (x, y))
    stepped = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, trainable, want)
    assert_trees_close(out.adapters, stepped, rtol=1e-10, atol=1e-12)


def test_extras_are_planned_counted_merged_and_never_touch_the_base():
  model = _MLP()
  x = jnp.ones((3, 5))
  base = jax.jit(model.init)(jax.random.key(0), x)
  config = lora_jax.LoraConfig(targets="fc1", rank=2, modules_to_save=["head"])
  plan = lora_jax.plan(config, base)
  head = 8 * 2 + 2
  assert [e.path for e in plan.extras] == ["params/head/bias", "params/head/kernel"]
  lora = 2 * (5 + 8)
  base_total = 5 * 8 + 8 + head
  # PEFT: modules_to_save counted once as trainable, twice in the total (original + copy)
  assert (plan.counts.trainable, plan.counts.total) == (lora + head, base_total + lora + head)
  assert "1 kernels adapted, 2 parameters trained in full (modules_to_save)" in str(plan)
  trainable = lora_jax.init(config, base, key=jax.random.key(1))
  assert lora_jax.count(base, trainable) == plan.counts
  trainable["params"]["head"]["kernel"] = trainable["params"]["head"]["kernel"] + 1.0
  merged = lora_jax.merge(base, trainable)
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"],
                                base["params"]["head"]["kernel"] + 1.0)
  np.testing.assert_allclose(lora_jax.lora(model.apply)(base, trainable, x),
                             model.apply(merged, x), rtol=1e-6)
  before = jax.tree_util.tree_map(np.array, base)
  optimizer = optax.adam(1e-2)
  step = lora_jax.train_step(_mse(model), optimizer)
  state = optimizer.init(trainable)
  for _ in range(3):
    trainable, state, _, _ = step(base, trainable, state, (x, jnp.zeros((3, 2))))
  assert_trees_close(base, before, rtol=0, atol=0)  # the frozen base is bit-identical


def test_modules_to_save_errors_name_the_pattern():
  base = _MLP().init(jax.random.key(0), jnp.ones((1, 5)))
  with pytest.raises(ValueError, match=r"modules_to_save pattern 'clasifier' matched no "
                                       r"parameter; available paths include params/fc1/bias"):
    lora_jax.plan(lora_jax.LoraConfig(targets="fc1", rank=2, modules_to_save="clasifier"), base)
  with pytest.raises(ValueError, match=r"params/fc1/kernel is both a LoRA target and in "
                                       r"modules_to_save"):
    lora_jax.init(lora_jax.LoraConfig(targets="fc1", rank=2, modules_to_save="fc1"), base,
                  key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"targets must name at least one pattern .*or set "
                                       r"modules_to_save"):
    lora_jax.LoraConfig(targets=())
  only_head = lora_jax.LoraConfig(targets=(), modules_to_save="head")
  assert lora_jax.plan(only_head, base).counts.trainable == 8 * 2 + 2


# ----------------------------------------------------------------------- model families


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  vocab: int = 16
  d: int = 8
  ffn: int = 12
  layers: int = 2
  scan_layers: bool = True
  remat: bool = False


class ToyBlock(nn.Module):
  config: ToyConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    return x + nn.Dense(c.d, name="down")(nn.relu(nn.Dense(c.ffn, name="up")(x)))


class Toy(nn.Module):
  """A toy two-layer model, registered as a family by this test file alone."""

  config: ToyConfig

  @nn.compact
  def __call__(self, ids):
    c = self.config
    x = nn.Embed(c.vocab, c.d, name="embed")(ids)
    x = layer_stack(ToyBlock, c, c.layers, "blocks", x)
    return nn.Dense(c.vocab, name="head")(x)


@pytest.fixture
def toy_family():
  record = family.register(family.Family(
      name="toy", layer_stack="blocks", target_aliases={"up": "up", "down": "down"},
      partition_rules=((r"up/kernel$", "column"), (r"down/kernel$", "row")),
      configs={"toy-2l": (Toy, ToyConfig())}))
  yield record
  family.unregister("toy")


def test_a_family_registered_outside_the_core_gets_counts(toy_family, capsys):
  from lora_jax import models
  from lora_jax.app import cli
  assert models.targets_for("toy-2l", "up,down") == ("up", "down")
  assert cli.main(["count", "--model", "toy-2l", "--targets", "up,down", "--rank", "4",
                   "--summary"]) == 0
  c = ToyConfig()
  params = Toy(c).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  base = sum(x.size for x in jax.tree_util.tree_leaves(params))
  lora = c.layers * 4 * ((c.d + c.ffn) + (c.ffn + c.d))
  assert capsys.readouterr().out.startswith(
      f"trainable params: {lora:,d} || all params: {base + lora:,d}")


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_a_family_registered_outside_the_core_gets_peft_names(toy_family, scan, tmp_path):
  model = Toy(ToyConfig(scan_layers=scan))
  ids = jnp.zeros((1, 3), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids)
  layer = "blocks/up" if scan else "blocks_1/up"
  assert peft.torch_name(f"params/{layer}/kernel", 1 if scan else None) == "blocks.1.up"
  config = lora_jax.LoraConfig(targets=["up", "down"], rank=2)
  uses = lora_jax.analyze(model.apply, params, ids)
  trainable = randomize_b(lora_jax.init(config, params, key=jax.random.key(1), uses=uses),
                          jax.random.key(2))
  peft.export_peft(tmp_path, trainable, config=config)
  from safetensors.numpy import load_file
  names = sorted(load_file(tmp_path / peft.WEIGHTS_FILE))
  assert names[:2] == ["base_model.model.blocks.0.down.lora_A.weight",
                       "base_model.model.blocks.0.down.lora_B.weight"] and len(names) == 8
  _, back = peft.import_peft(tmp_path, params, uses=uses)
  assert_trees_close(flat_adapters(back), flat_adapters(trainable), rtol=0, atol=0)


def test_a_family_registered_outside_the_core_gets_partition_rules(toy_family):
  params = jax.eval_shape(Toy(ToyConfig(ffn=16)).init, jax.random.key(0),
                          jnp.zeros((1, 3), jnp.int32))
  specs = sharding.tensor_parallel_specs(params, toy_family.partition_rules,
                                         mesh=sharding.mesh("2x4"))
  blocks = specs["params"]["blocks"]
  assert blocks["up"]["kernel"] == P(None, None, "model")  # (layers, d, ffn): column
  assert blocks["down"]["kernel"] == P(None, "model", None)  # (layers, ffn, d): row
  assert specs["params"]["embed"]["embedding"] == P()


# ----------------------------------------------------------------------- kernel kinds


@dataclasses.dataclass
class Int8Kernel:
  """A toy quantized kernel kind: int8 codes and one float scale per output column."""

  codes: jax.Array  # int8, the kernel's shape
  scale: jax.Array  # float32, (..., 1, out)

  @property
  def shape(self):
    return self.codes.shape

  @property
  def dtype(self):
    return self.scale.dtype


jax.tree_util.register_dataclass(Int8Kernel, data_fields=["codes", "scale"], meta_fields=[])


@pytest.fixture(scope="module", autouse=True)
def int8_kind():
  kernels.register(Int8Kernel, to_dense=lambda k: k.codes.astype(k.scale.dtype) * k.scale)
  yield Int8Kernel
  kernels.unregister(Int8Kernel)


def _quantize(w):
  scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
  return Int8Kernel(jnp.round(w / scale).astype(jnp.int8), scale)


@pytest.mark.parametrize("targets", [["up", "down"], ["up"]], ids=["both", "down_not_adapted"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_a_kernel_kind_is_adapted_like_its_dense_kernel(scan, targets):
  model = Toy(ToyConfig(scan_layers=scan))
  ids = jax.random.randint(jax.random.key(0), (2, 5), 0, 16)
  params = jax.jit(model.init)(jax.random.key(1), ids)
  is_kernel = lambda path, x: path[-1] == "kernel"  # noqa: E731
  qparams = lora_jax._tree.map_with_path(
      lambda p, x: _quantize(x) if is_kernel(p, x) else x, params)
  dense = jax.tree_util.tree_map(kernels.dense, qparams, is_leaf=kernels.is_kind)
  config = lora_jax.LoraConfig(targets=targets, rank=2)
  uses = lora_jax.analyze(model.apply, qparams, ids)
  assert lora_jax.plan(config, qparams, uses=uses).counts == lora_jax.plan(
      config, params, uses=uses).counts  # counted at the dense size, as PEFT counts 4-bit
  trainable = randomize_b(lora_jax.init(config, qparams, key=jax.random.key(2), uses=uses),
                          jax.random.key(3))
  got = jax.jit(lora_jax.lora(model.apply))(qparams, trainable, ids)
  want = model.apply(lora_jax.merge(dense, trainable), ids)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  merged = lora_jax.merge(qparams, trainable)  # a merged kind comes back dense
  assert_trees_close(merged, lora_jax.merge(dense, trainable))
  if scan and targets == ["up"]:  # the un-adapted stacked kind is dense only inside the scan
    jaxpr = jax.make_jaxpr(lora_jax.lora(model.apply))(qparams, trainable, ids).jaxpr
    stacked = [v.aval.shape for e in jaxpr.eqns for v in e.outvars
               if v.aval.shape == (2, 12, 8) and v.aval.dtype == jnp.float32]
    assert stacked == [] and any(e.primitive.name == "scan" for e in jaxpr.eqns)
  loss = lambda p, ids: jnp.mean(model.apply(p, ids) ** 2)  # noqa: E731
  grads = lora_jax.value_and_grad(loss)(qparams, trainable, ids)[1]
  want_grads = jax.grad(lambda t: loss(lora_jax.merge(dense, t), ids))(trainable)
  assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)


def test_init_sharded_with_extras_needs_concrete_params():
  params = jax.eval_shape(_MLP().init, jax.random.key(0), jnp.ones((1, 5)))
  config = lora_jax.LoraConfig(targets="fc1", rank=2, modules_to_save="head")
  specs = jax.tree_util.tree_map(lambda _: P(), params)
  with pytest.raises(ValueError, match=r"init_sharded with modules_to_save copies base values, "
                                       r"so params must be concrete"):
    sharding.init_sharded(config, params, key=jax.random.key(0), shardings=specs,
                          mesh=sharding.mesh("8x1"))


def test_register_rejects_a_missing_to_dense():
  with pytest.raises(TypeError, match=r"to_dense must be a function of a Int8Kernel"):
    kernels.register(Int8Kernel, to_dense=None)


# ---- adapter containers: a bank-like container registered outside the transform --------------

@dataclasses.dataclass(frozen=True)
class _Ensemble:
  """A toy container: the weighted mean of the adapted function over several adapter trees."""
  trees: tuple


jax.tree_util.register_dataclass(_Ensemble, data_fields=["trees"], meta_fields=[])


def _run_ensemble(adapted, base, ensemble, args, kwargs, key):
  kwargs = dict(kwargs)
  weights = kwargs.pop("weights", None) or [1.0] * len(ensemble.trees)
  outs = [adapted(base, t, *args, lora_dropout_key=key, **kwargs) for t in ensemble.trees]
  return sum(w * y for w, y in zip(weights, outs)) / sum(weights)


@pytest.fixture
def ensemble_container():
  lora_jax.transform.register_container(_Ensemble, _run_ensemble, keywords=("weights",))
  yield _Ensemble
  lora_jax.transform.unregister_container(_Ensemble)


def test_a_container_registered_outside_the_transform_runs_it(ensemble_container):
  k1, k2, kx = jax.random.split(jax.random.key(0), 3)
  base = {"w": {"kernel": jax.random.normal(k1, (6, 5))}}
  fn = lambda p, x: jnp.tanh(x @ p["w"]["kernel"])  # noqa: E731
  config = lora_jax.LoraConfig(targets="w", rank=2, alpha=4.0)
  trees = [randomize_b(lora_jax.init(config, base, key=k), k) for k in jax.random.split(k2)]
  x = jax.random.normal(kx, (3, 6))
  got = jax.jit(lora_jax.lora(fn))(base, ensemble_container(tuple(trees)), x, weights=[1.0, 3.0])
  dense = [fn(lora_jax.merge(base, t), x) for t in trees]  # each tree merged, no transform
  np.testing.assert_allclose(got, (dense[0] + 3 * dense[1]) / 4, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"weights= needs an _Ensemble as adapters"):
    lora_jax.lora(fn)(base, trees[0], x, weights=[1.0])
  with pytest.raises(ValueError, match=r"'dict' is not a registered adapter container; "
                                       r"registered: .*AdapterBank"):
    lora_jax.transform.unregister_container(dict)
