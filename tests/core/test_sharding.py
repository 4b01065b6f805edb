"""Sharded LoRA on 8 simulated CPU devices: adapter shardings follow the base, ready-made Llama
specs and meshes, a sharded train step equal to the single-device one, checkpoints across
meshes."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import lora_jax
from lora_jax import checkpoint, sharding
from lora_jax.models import LlamaConfig, LlamaForCausalLM, llama
from _utils import assert_trees_close


def llama_specs(params, *, mesh, fsdp=False):
  """The reference Llama's layout, from its family record's partition rules."""
  return sharding.tensor_parallel_specs(params, llama.FAMILY.partition_rules, mesh=mesh,
                                        fsdp=fsdp)

LW = lora_jax.LoraWeights
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
SEQ = 5  # batch 8 x seq 5 = 40 tokens: no activation shares a kernel's shape
CONFIG = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8)
OPT = optax.adamw(1e-2, weight_decay=0.1)
BATCH = np.random.default_rng(0).integers(0, LLAMA["vocab_size"], (8, SEQ + 1)).astype(np.int32)
LAYERS = "params/model/layers"


def _is_lora(x):
  return isinstance(x, LW)


def _at(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _random(abstract, seed):
  """numpy values for an abstract tree (kernels ~N(0, 0.2), norm scales ~1)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    noise = 0.2 * rng.standard_normal(x.shape).astype(np.float32)
    return noise / 2 + 1 if jax.tree_util.keystr(path).endswith("['scale']") else noise

  return jax.tree_util.tree_map_with_path(leaf, abstract)


@functools.cache
def _llama(scan=True):
  model = LlamaForCausalLM(LlamaConfig(**LLAMA, scan_layers=scan))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
  return model, abstract


@functools.cache
def _loss(scan):
  model = _llama(scan)[0]

  def loss_fn(params, batch):
    logits = model.apply(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  return loss_fn


@functools.cache
def _problem():
  """Scanned Llama params and adapters with random A and B (numpy, on no device)."""
  model, abstract = _llama()
  uses = lora_jax.analyze(model.apply, abstract, BATCH[:, :-1])
  shapes = jax.eval_shape(lambda k: lora_jax.init(CONFIG, abstract, key=k, uses=uses),
                          jax.random.key(0))
  return _random(abstract, 1), _random(shapes, 2)


@functools.cache
def _reference():
  """Two AdamW steps of the jitted single-device step: (losses, adapters)."""
  params, adapters = _problem()
  step = lora_jax.train_step(_loss(True), OPT)
  opt_state, losses = OPT.init(adapters), []
  for _ in range(2):
    adapters, opt_state, loss, _ = step(params, adapters, opt_state, BATCH)
    losses.append(float(loss))
  assert jax.tree_util.tree_leaves(adapters)[0].sharding.device_set == {jax.devices()[0]}
  return losses, adapters


def _unroll(tree):
  """A scanned Llama tree (params or adapters) as the unrolled model's: layers -> layers_i."""
  def layer(i, x):
    if _is_lora(x):
      return LW(a=x.a[i], b=x.b[i], scale=x.scale, axes=x.axes[1:], dropout=x.dropout)
    return x[i]

  model = dict(tree["params"]["model"])
  stack = model.pop("layers")
  for i in range(LLAMA["num_hidden_layers"]):
    model[f"layers_{i}"] = jax.tree_util.tree_map(functools.partial(layer, i), stack,
                                                  is_leaf=_is_lora)
  return {"params": {**tree["params"], "model": model}}


def _shard_shapes(x):
  return {tuple(s.data.shape) for s in x.addressable_shards}


# ----------------------------------------------------------------------- adapter shardings


def test_factor_specs_follow_axis_roles():
  assert sharding.factor_specs(P("data", "model"), "io") == (P("data", None), P(None, "model"))
  assert sharding.factor_specs(P(None, "data", "model"), "lio") == (
      P(None, "data", None), P(None, None, "model"))
  assert sharding.factor_specs(P("x", "data", "model"), "lio") == (
      P("x", "data", None), P("x", None, "model"))
  # DenseGeneral query (d, heads, head_dim) and output (heads, head_dim, d)
  assert sharding.factor_specs(P("data", "model", None), "ioo") == (
      P("data", None), P(None, "model", None))
  assert sharding.factor_specs(P("model", None, "data"), "iio") == (
      P("model", None, None), P(None, "data"))
  assert sharding.factor_specs(P("model", "data"), "oi") == (P("data", None), P(None, "model"))
  assert sharding.factor_specs(P(("data", "model")), "io") == (
      P(("data", "model"), None), P(None, None))  # short specs are padded with None
  with pytest.raises(ValueError, match=r"spec .* at 'w' has 3 entries but the kernel has 2 axes"):
    sharding.factor_specs(P("data", None, "model"), "io", path="w")


def _toy():
  params = {"params": {"stack": {"kernel": jnp.zeros((2, 16, 8))},
                       "dense": {"kernel": jnp.zeros((16, 8)), "bias": jnp.zeros(8)}}}
  config = lora_jax.LoraConfig(targets="kernel", rank=2, axes_pattern={"stack": "lio"})
  return params, lora_jax.init(config, params, key=jax.random.key(0))


def test_adapter_shardings_from_specs_named_shardings_and_placed_arrays():
  params, adapters = _toy()
  specs = {"params": {"stack": {"kernel": P(None, "data", "model")},
                      "dense": {"kernel": P(None, "model"), "bias": P()}}}
  got = sharding.adapter_shardings(adapters, specs)
  assert jax.tree_util.tree_structure(got, is_leaf=_is_lora) == jax.tree_util.tree_structure(
      adapters, is_leaf=_is_lora)
  stack, dense = got["params"]["stack"]["kernel"], got["params"]["dense"]["kernel"]
  assert (stack.a, stack.b) == (P(None, "data", None), P(None, None, "model"))
  assert (dense.a, dense.b) == (P(None, None), P(None, "model"))
  assert (stack.scale, stack.axes) == (adapters["params"]["stack"]["kernel"].scale, "lio")

  mesh = sharding.mesh("4x2")
  named = sharding.adapter_shardings(adapters, sharding.named_shardings(specs, mesh))
  assert named["params"]["stack"]["kernel"].a == NamedSharding(mesh, P(None, "data", None))
  placed = jax.device_put(adapters, named)  # the tree goes straight to device_put
  assert _shard_shapes(placed["params"]["stack"]["kernel"].a) == {(2, 4, 2)}
  assert _shard_shapes(placed["params"]["stack"]["kernel"].b) == {(2, 2, 4)}
  np.testing.assert_array_equal(placed["params"]["stack"]["kernel"].a,
                                adapters["params"]["stack"]["kernel"].a)
  # the base's own placed arrays work as base_shardings too
  base = jax.device_put(params, sharding.named_shardings(specs, mesh))
  assert sharding.adapter_shardings(adapters, base) == named
  # a replicated non-named sharding is kept as it is; None (unspecified) stays None
  one = SingleDeviceSharding(jax.devices()[1])
  mixed = {"params": {"stack": {"kernel": one}, "dense": {"kernel": None, "bias": None}}}
  got = sharding.adapter_shardings(adapters, mixed)["params"]
  assert got["stack"]["kernel"].a == one and got["dense"]["kernel"].b is None


def test_adapter_shardings_errors():
  _, adapters = _toy()
  with pytest.raises(ValueError, match=r"no entry for the adapted kernel 'params/stack/kernel'"):
    sharding.adapter_shardings(adapters, {"params": {"dense": {"kernel": P(), "bias": P()}}})
  too_long = {"params": {"stack": {"kernel": P(None, None, None, "model")},
                         "dense": {"kernel": P(), "bias": P()}}}
  with pytest.raises(ValueError, match=r"'params/stack/kernel' has 4 entries .* has 3 axes"):
    sharding.adapter_shardings(adapters, too_long)
  wrong = {"params": {"stack": {"kernel": "model"}, "dense": {"kernel": P(), "bias": P()}}}
  with pytest.raises(TypeError, match=r"at 'params/stack/kernel' is a str; expected a "
                     r"PartitionSpec"):
    sharding.adapter_shardings(adapters, wrong)


class _Attention(nn.Module):
  """DenseGeneral kernels with logical axis names, as Flax's partitioning guide writes them."""

  @nn.compact
  def __call__(self, x):  # (batch, 16) -> (batch, 4, 8) -> (batch, 16)
    init = lambda names: nn.with_logical_partitioning(  # noqa: E731
        nn.initializers.lecun_normal(), names)
    q = nn.DenseGeneral((4, 8), use_bias=False, kernel_init=init(("embed", "heads", "kv")),
                        name="query")(x)
    return nn.DenseGeneral(16, axis=(-2, -1), use_bias=False,
                           kernel_init=init(("heads", "kv", "embed")), name="out")(q)


def test_flax_logical_rules_multi_axis_kernels():
  model, x = _Attention(), jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)),
                                       jnp.float32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), x)
  mesh = sharding.mesh("4x2")
  base_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                        [("embed", "data"), ("heads", "model")])
  abstract = nn.unbox(boxed)
  uses = lora_jax.analyze(model.apply, abstract, x)
  config = lora_jax.LoraConfig(targets=["query", "out"], rank=2)
  adapters = lora_jax.init(config, abstract, key=jax.random.key(1), uses=uses)
  got = sharding.adapter_shardings(adapters, base_sh)["params"]
  query, out = got["query"]["kernel"], got["out"]["kernel"]
  assert (query.axes, out.axes) == ("ioo", "iio")
  assert (query.a.spec, query.b.spec) == (P("data", None), P(None, "model", None))
  assert (out.a.spec, out.b.spec) == (P("model", None, None), P(None, "data"))
  assert query.a.mesh == mesh


# ----------------------------------------------------------------------- init_sharded


def test_init_sharded_creates_only_each_devices_shard():
  model, abstract = _llama()
  uses = lora_jax.analyze(model.apply, abstract, BATCH[:, :-1])
  config = lora_jax.LoraConfig(targets=["q_proj", "o_proj"], rank=4)
  mesh = sharding.mesh("4x2")
  specs = llama_specs(abstract, mesh=mesh, fsdp=True)
  got = sharding.init_sharded(config, abstract, key=jax.random.key(3), shardings=specs,
                              mesh=mesh, uses=uses)
  attn = got["params"]["model"]["layers"]["self_attn"]
  q, o = attn["q_proj"]["kernel"], attn["o_proj"]["kernel"]
  # q: W (2, 32, 32) over (None, data, model): A (2, 32/4, 4), B (2, 4, 32/2)
  # o: W (2, 32, 32) over (None, model, data): A (2, 32/2, 4), B (2, 4, 32/4)
  assert _shard_shapes(q.a) == {(2, 8, 4)} and _shard_shapes(q.b) == {(2, 4, 16)}
  assert _shard_shapes(o.a) == {(2, 16, 4)} and _shard_shapes(o.b) == {(2, 4, 8)}
  assert all(len(x.addressable_shards) == 8 for x in (q.a, q.b, o.a, o.b))
  assert q.a.sharding == NamedSharding(mesh, P(None, "data", None))
  assert o.b.sharding == NamedSharding(mesh, P(None, None, "data"))
  want = lora_jax.init(config, abstract, key=jax.random.key(3), uses=uses)
  assert_trees_close(got, want, rtol=0, atol=0)


def test_init_sharded_needs_a_mesh_for_partition_specs():
  params, _ = _toy()
  specs = jax.tree_util.tree_map(lambda x: P(), params)
  with pytest.raises(ValueError, match=r"shardings holds PartitionSpecs; pass mesh="):
    sharding.init_sharded(lora_jax.LoraConfig(targets="dense"), params, key=jax.random.key(0),
                          shardings=specs)


# ----------------------------------------------------------------------- meshes, Llama specs


def test_mesh_from_a_string_or_a_tuple():
  m = sharding.mesh("4x2")
  assert dict(m.shape) == {"data": 4, "model": 2} and m.devices.size == 8
  assert set(m.devices.flat) == set(jax.devices())
  assert dict(sharding.mesh((2, 4)).shape) == {"data": 2, "model": 4}
  assert dict(sharding.mesh("8", ("batch",)).shape) == {"batch": 8}
  assert m.axis_types == (jax.sharding.AxisType.Auto,) * 2


def test_mesh_errors():
  with pytest.raises(ValueError, match=r"'3x2' needs 6 devices but there are 8; .*"
                     r"XLA_FLAGS=--xla_force_host_platform_device_count=8"):
    sharding.mesh("3x2")
  with pytest.raises(ValueError, match=r"'4by2' is not like '4x2'"):
    sharding.mesh("4by2")
  with pytest.raises(ValueError, match=r"must be positive integers"):
    sharding.mesh((8, 0))
  with pytest.raises(ValueError, match=r"has 2 sizes for 1 axis names"):
    sharding.mesh("4x2", ("data",))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_llama_specs(scan):
  abstract = _llama(scan)[1]
  mesh = sharding.mesh("2x4")
  tp = llama_specs(abstract, mesh=mesh)
  fsdp = llama_specs(abstract, mesh=mesh, fsdp=True)
  lead = (None,) if scan else ()
  layer = LAYERS if scan else LAYERS + "_1"
  for name, tp_spec, fsdp_spec in [
      ("self_attn/q_proj", (None, "model"), ("data", "model")),
      ("self_attn/k_proj", (None, "model"), ("data", "model")),
      ("self_attn/v_proj", (None, "model"), ("data", "model")),
      ("self_attn/o_proj", ("model", None), ("model", "data")),
      ("mlp/gate_proj", (None, "model"), ("data", "model")),
      ("mlp/up_proj", (None, "model"), ("data", "model")),
      ("mlp/down_proj", ("model", None), ("model", "data"))]:
    assert _at(tp, f"{layer}/{name}/kernel") == P(*lead, *tp_spec), name
    assert _at(fsdp, f"{layer}/{name}/kernel") == P(*lead, *fsdp_spec), name
  for specs, other in [(tp, None), (fsdp, "data")]:
    assert _at(specs, "params/model/embed_tokens/embedding") == P("model", other)
    assert _at(specs, "params/lm_head/kernel") == P(other, "model")
    assert _at(specs, "params/model/norm/scale") == P()
    assert _at(specs, f"{layer}/input_layernorm/scale") == P()
  # the specs place the real arrays: each device holds 1/8 of a FSDP kernel
  placed = jax.device_put(_random(abstract, 0), sharding.named_shardings(fsdp, mesh))
  stacked = (LLAMA["num_hidden_layers"],) if scan else ()  # W (48, 32) over ("model", "data")
  assert _shard_shapes(_at(placed, f"{layer}/mlp/down_proj/kernel")) == {(*stacked, 12, 16)}


def test_llama_specs_errors():
  mesh = sharding.mesh("2x4")
  odd = jax.eval_shape(LlamaForCausalLM(LlamaConfig(**{**LLAMA, "intermediate_size": 42})).init,
                       jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
  with pytest.raises(ValueError, match=re.escape(
      "params/model/layers/mlp/down_proj/kernel of shape (2, 42, 32): axis 1 (42) is not "
      "divisible by mesh axis 'model' of size 4")):
    llama_specs(odd, mesh=mesh)
  with pytest.raises(ValueError, match=r"mesh axes \('batch', 'model'\) lack \['data'\]"):
    llama_specs(_llama()[1], mesh=sharding.mesh("2x4", ("batch", "model")))
  with pytest.raises(ValueError, match=r"no parameter matches the rules"):
    llama_specs(_toy()[0], mesh=mesh)
  with pytest.raises(ValueError, match=r"layouts must be 'row' or 'column', got \['diagonal'\]"):
    sharding.tensor_parallel_specs(_toy()[0], [("kernel", "diagonal")], mesh=mesh)


# ----------------------------------------------------------------------- the sharded step


_COLLECTIVE = re.compile(r"=\s*(\S.*?)\s+(all-gather|all-reduce)(?:-start)?\(")


def _kernel_collectives(hlo: str, params) -> list:
  """(op, shape) of every all-gather / all-reduce in ``hlo`` whose result has the shape of a
  full base kernel (or of one layer of a stacked kernel)."""
  shapes = set()
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jax.tree_util.keystr(path).endswith(("['kernel']", "['embedding']")):
      shapes |= {tuple(x.shape), tuple(x.shape[1:])} if x.ndim == 3 else {tuple(x.shape)}
  found = []
  for m in _COLLECTIVE.finditer(hlo):
    for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
      shape = tuple(int(d) for d in dims.split(",") if d)
      if shape in shapes:
        found.append((m.group(2), shape))
  return found


CASES = [("8x1", True, True, False), ("4x2", False, True, False), ("2x4", False, False, False),
         ("2x4", True, True, True)]


@pytest.mark.parametrize("shape,fsdp,scan,donate", CASES,
                         ids=["8x1-fsdp", "4x2-tp", "2x4-tp-unrolled", "2x4-fsdp-donate"])
def test_sharded_step_equals_single_device(shape, fsdp, scan, donate):
  losses, want = _reference()
  params, adapters = _problem()
  if not scan:
    params, adapters, want = _unroll(params), _unroll(adapters), _unroll(want)
  mesh = sharding.mesh(shape)
  specs = llama_specs(params, mesh=mesh, fsdp=fsdp)
  step = sharding.sharded_train_step(_loss(scan), OPT, adapters, mesh=mesh, base_shardings=specs,
                                     donate=donate)
  base = jax.device_put(params, step.shardings.base)
  lora = jax.device_put(adapters, step.shardings.adapters)
  opt_state = jax.device_put(OPT.init(adapters), step.shardings.opt_state)
  batch = jax.device_put(BATCH, step.shardings.batch)
  compiled = step.lower(base, lora, opt_state, batch).compile()
  out = compiled.output_shardings
  assert out.adapters == step.shardings.adapters and out.opt_state == step.shardings.opt_state
  assert out.loss == NamedSharding(mesh, P())
  if not fsdp:  # tensor parallel: no full kernel is ever gathered (nor a weight gradient summed)
    assert _kernel_collectives(compiled.as_text(), params) == []
  first = jax.tree_util.tree_leaves((lora, opt_state))
  for i in range(2):
    lora, opt_state, loss, _ = compiled(base, lora, opt_state, batch, None)
    np.testing.assert_allclose(float(loss), losses[i], rtol=1e-5)
  assert [x.is_deleted() for x in first] == [donate] * len(first)  # donated: buffers reused
  assert_trees_close(lora, want, rtol=1e-5, atol=1e-6)
  assert jax.tree_util.tree_map(lambda x: x.sharding, lora) == step.shardings.adapters
  # the adapters moved (B != 0 from the start, so A's gradient is nonzero too)
  assert all(float(jnp.max(jnp.abs(x - y))) > 1e-3 for x, y in zip(
      jax.tree_util.tree_leaves(lora), jax.tree_util.tree_leaves(adapters)))
  # the step sees the layout: the q projection's B is split over "model" like W's output
  layer = LAYERS if scan else LAYERS + "_0"
  q = _at(lora, f"{layer}/self_attn/q_proj/kernel")
  model_size = mesh.shape["model"]
  assert _shard_shapes(q.b) == {(*q.b.shape[:-1], 32 // model_size)}


def test_collective_check_catches_a_gathered_kernel():
  """Control: the same check flags a step whose loss pins a full copy of a base kernel."""
  params, adapters = _problem()
  loss_fn, mesh = _loss(True), sharding.mesh("4x2")

  def pinned(p, batch):  # a replicated copy of the vocab-split embedding table
    table = jax.lax.with_sharding_constraint(_at(p, "params/model/embed_tokens/embedding"),
                                             NamedSharding(mesh, P()))
    model = {**p["params"]["model"], "embed_tokens": {"embedding": table}}
    return loss_fn({"params": {**p["params"], "model": model}}, batch)

  specs = llama_specs(params, mesh=mesh)
  step = sharding.sharded_train_step(pinned, OPT, adapters, mesh=mesh, base_shardings=specs)
  args = (params, adapters, OPT.init(adapters), BATCH)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), args, tuple(step.shardings))
  found = _kernel_collectives(step.lower(*abstract).compile().as_text(), params)
  assert (64, 32) in [shape for _, shape in found]

# ----------------------------------------------------------------------- checkpoints


def test_checkpoint_from_one_mesh_restores_onto_another(tmp_path):
  params, adapters = _problem()
  abstract = _llama()[1]
  here, there = sharding.mesh("4x2"), sharding.mesh("2x4")
  saved_sh = sharding.adapter_shardings(adapters, llama_specs(
      abstract, mesh=here, fsdp=True))
  saved = jax.device_put(adapters, sharding.named_shardings(saved_sh, here))
  opt_state = jax.tree_util.tree_map(lambda x: x + 1, OPT.init(adapters))
  opt_sh = sharding.opt_state_shardings(opt_state, adapters, saved_sh, mesh=here)
  checkpoint.save(tmp_path, 3, saved, config=CONFIG, base=abstract,
                  opt_state=jax.device_put(opt_state, opt_sh))

  target_sh = sharding.adapter_shardings(adapters, llama_specs(abstract, mesh=there))
  target_opt = sharding.opt_state_shardings(opt_state, adapters, target_sh, mesh=there)
  template = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state, target_opt)
  r = checkpoint.restore(tmp_path, base=abstract, opt_state=template,
                         sharding=sharding.restore_sharding(target_sh, mesh=there))
  assert_trees_close(r.adapters, adapters, rtol=0, atol=0)
  assert_trees_close(r.opt_state, opt_state, rtol=0, atol=0)
  want = sharding.named_shardings(target_sh, there)
  assert jax.tree_util.tree_map(lambda x: x.sharding, r.adapters) == want
  assert jax.tree_util.tree_map(lambda x: x.sharding, r.opt_state) == target_opt
  q = _at(r.adapters, f"{LAYERS}/self_attn/q_proj/kernel")
  assert _shard_shapes(q.b) == {(2, 4, 8)}  # (2, 4, 32) split over "model" of size 4

  one = SingleDeviceSharding(jax.devices()[0])
  r = checkpoint.restore(tmp_path, base=abstract, sharding=one)
  assert_trees_close(r.adapters, adapters, rtol=0, atol=0)
  assert all(x.sharding == one for x in jax.tree_util.tree_leaves(r.adapters))


def test_restore_sharding_errors():
  _, adapters = _toy()
  specs = sharding.adapter_shardings(adapters, {"params": {"stack": {"kernel": P()},
                                                           "dense": {"kernel": P()}}})
  with pytest.raises(ValueError, match=r"shardings holds PartitionSpecs; pass mesh="):
    sharding.restore_sharding(specs)
  fn = sharding.restore_sharding(specs, mesh=sharding.mesh("4x2"))
  assert fn("params/dense/kernel/b", (2, 8)).spec == P(None, None)
  with pytest.raises(ValueError, match=r"holds 'params/other/kernel/a' \(8, 2\), which the "
                     r"sharding tree does not"):
    fn("params/other/kernel/a", (8, 2))


def test_opt_state_shardings_follow_the_adapters_in_masked_states():
  """LoRA+ (optax.multi_transform: masked mu/nu trees) and a plain count."""
  _, adapters = _toy()
  mesh = sharding.mesh("4x2")
  lora_sh = sharding.adapter_shardings(adapters, {"params": {
      "stack": {"kernel": P(None, "data", "model")}, "dense": {"kernel": P(None, "model")}}})
  opt = lora_jax.lora_plus(optax.adam, learning_rate=1e-3)
  state = jax.eval_shape(opt.init, adapters)
  got = sharding.opt_state_shardings(state, adapters, lora_sh, mesh=mesh)
  flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(got)[0]}
  mu_a = [s for k, s in flat.items() if "mu" in k and "stack" in k and k.endswith(".a")]
  mu_b = [s for k, s in flat.items() if "mu" in k and "stack" in k and k.endswith(".b")]
  assert mu_a == [NamedSharding(mesh, P(None, "data", None))]
  assert mu_b == [NamedSharding(mesh, P(None, None, "model"))]
  counts = [s for k, s in flat.items() if "count" in k]
  assert counts and all(s == NamedSharding(mesh, P()) for s in counts)
  placed = jax.device_put(jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), state),
                          got)
  assert jax.tree_util.tree_structure(placed) == jax.tree_util.tree_structure(state)
