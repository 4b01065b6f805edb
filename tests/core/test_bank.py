"""Many adapters on one base (lora_jax.bank): stacking, selection without retracing, mixed
batches (each example with its own adapter, equal to running it alone), generation, reading
saved adapters, and multi-task training (equal to separate training, bit for bit)."""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest

import lora_jax
from _fixtures import FAMILY_MODEL, TINY
from _utils import randomize_b
from lora_jax import bank as bank_lib
from lora_jax import generate as gen
from lora_jax import models
from lora_jax.models import llama

IDS = np.random.RandomState(0).randint(1, 64, (4, 8)).astype(np.int32)
# name: (targets, rank, alpha, modules_to_save); other targets, ranks and alphas per adapter
ADAPTERS = {
    "all": ("all-linear", 4, 8.0, True),
    "qv": ("q_proj|v_proj|query|value|c_attn", 2, 3.0, False),
    "mlp": ("mlp|intermediate|output/dense|c_fc", 8, 32.0, False),
}
SAVED = {"llama": "model/norm", "gpt2": "ln_f", "bert": "pooler"}


@functools.lru_cache(maxsize=None)
def _setup(family: str, scan: bool, remat: bool = False):
  """The tiny model, its params, and three different trained-like adapter trees."""
  model = models.get(FAMILY_MODEL[family], **TINY[family], scan_layers=scan, remat=remat)
  params = jax.jit(model.init)(jax.random.key(0), IDS)
  uses = lora_jax.analyze(model.apply, params, IDS)
  trees = {}
  for seed, (name, (targets, rank, alpha, extra)) in enumerate(ADAPTERS.items()):
    config = lora_jax.LoraConfig(targets=targets, rank=rank, alpha=alpha,
                                 exclude=[SAVED[family]] if extra else (),
                                 modules_to_save=[SAVED[family]] if extra else ())
    tree = lora_jax.init(config, params, key=jax.random.key(seed), uses=uses)
    tree = randomize_b(tree, jax.random.key(10 + seed))
    trees[name] = jax.tree_util.tree_map(lambda x: x + 0.1 * (seed + 1), tree)  # extras move
  return model, params, trees


def _first(out):
  return jax.tree_util.tree_leaves(out)[0]


@pytest.mark.parametrize("family,scan,remat", [
    ("llama", True, False), ("llama", False, False), ("llama", True, True),
    ("gpt2", True, False), ("bert", False, True)])
def test_mixed_batch_equals_each_example_alone(family, scan, remat):
  model, params, trees = _setup(family, scan, remat)
  bank = bank_lib.stack(trees, params)
  names = ["mlp", None, "all", "qv"]
  mixed = _assert_rows_alone(model, params, bank, trees, names)
  assert not np.allclose(mixed[0], mixed[2], atol=1e-3)  # the adapters do differ


def _assert_rows_alone(model, params, bank, trees, names):
  """The mixed batch's rows equal each row run alone with its adapter (None: the base), to
  1e-5 of the outputs' scale (float32 sums in another order)."""
  adapted = lora_jax.lora(model.apply)
  mixed = _first(jax.jit(adapted)(params, bank, IDS, adapter_index=bank.indices(names)))
  base, adapted = jax.jit(model.apply), jax.jit(adapted)  # eagerly, each op compiles alone
  for row, name in enumerate(names):
    x = IDS[row:row + 1]
    alone = base(params, x) if name is None else adapted(params, trees[name], x)
    want = _first(alone)[0]
    np.testing.assert_allclose(mixed[row], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  return mixed


@pytest.mark.parametrize("family,scan", [("llama", True), ("gpt2", False), ("bert", True)])
def test_a_bank_without_extras_runs_the_batch_as_one(family, scan):
  """No trained extras: the batch is not split per example; each product gathers every
  row's own factors (the examples on the activation's leading axis)."""
  model, params, trees = _setup(family, scan)
  bank = bank_lib.stack({n: trees[n] for n in ("qv", "mlp")}, params)
  assert not bank.has_extras
  _assert_rows_alone(model, params, bank, trees, ["mlp", None, "qv", "mlp"])


def test_products_without_the_examples_first_need_per_example():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(5, 4)).astype(np.float32)}
  config = lora_jax.LoraConfig(targets="w", rank=2, kernel_names=("w",))
  trees = {n: randomize_b(lora_jax.init(config, params, key=jax.random.key(i)),
                          jax.random.key(9 + i)) for i, n in enumerate("ab")}
  bank = bank_lib.stack(trees, params)
  x = rng.normal(size=(3, 6, 5)).astype(np.float32)
  index = np.array([1, 0, -1], np.int32)
  flat = lora_jax.lora(lambda p, x: (x.reshape(-1, 5) @ p["w"]).reshape(x.shape[0], -1, 4))
  with pytest.raises(ValueError, match="18 rows on its leading axis for 3 examples.*per_example"):
    flat(params, bank, x, adapter_index=index)
  got = flat(params, bank, x, adapter_index=index, per_example=True)
  for row, tree in enumerate([trees["b"], trees["a"], None]):
    want = x[row] @ lora_jax.merge(params, tree)["w"] if tree else x[row] @ params["w"]
    np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-5)


def test_a_path_adapted_by_one_and_trained_in_full_by_another_is_refused():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(5, 4)).astype(np.float32)}
  lora = lora_jax.init(lora_jax.LoraConfig(targets="w", rank=2, kernel_names=("w",)), params,
                       key=jax.random.key(0))
  full = lora_jax.init(lora_jax.LoraConfig(targets=(), modules_to_save="w"), params,
                       key=jax.random.key(0))
  with pytest.raises(ValueError, match="'w' is adapted by 'a' but trained in full"):
    bank_lib.stack({"a": lora, "b": full}, params)
  with pytest.raises(ValueError, match="paths the bank lacks .*: w"):
    bank_lib.stack({"a": lora}, params, capacity=2).put("b", full, params)


def test_an_index_outside_the_slots_is_refused():
  model, params, trees = _setup("llama", True)
  bank = bank_lib.stack(trees, params)
  adapted = lora_jax.lora(model.apply)
  for bad in (3, -2):
    with pytest.raises(ValueError, match=f"adapter index {bad} is outside the bank's slots: "
                                         f"use 0 .. 2, or -1"):
      adapted(params, bank, IDS, adapter_index=np.array([0, bad, 1, -1], np.int32))
  with pytest.raises(ValueError, match="adapter index 7 is outside"):
    bank.pick(7)
  with pytest.raises(ValueError, match="adapter index 5 is outside"):
    gen.generate(adapted, (params, bank), [[1], [2]], init_cache=functools.partial(
        llama.init_cache, model.config), max_new_tokens=1, adapted=True, adapter_index=[0, 5])
  traced = jax.jit(lambda i: adapted(params, bank.pick(i), IDS))(7)  # unchecked: the base
  np.testing.assert_allclose(traced, model.apply(params, IDS), atol=1e-6)


def test_pick_is_the_adapter_itself():
  model, params, trees = _setup("llama", True)
  bank = bank_lib.stack(trees, params)
  adapted = jax.jit(lora_jax.lora(model.apply))
  for name, tree in trees.items():
    picked = bank.pick(bank.index(name))
    np.testing.assert_allclose(adapted(params, picked, IDS), adapted(params, tree, IDS),
                               rtol=1e-5, atol=1e-5)
    merged, want = lora_jax.merge(params, picked), lora_jax.merge(params, tree)
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, atol=1e-6), merged,
                           want)
    lazy = bank.lazy(bank.index(name))
    np.testing.assert_allclose(adapted(params, lazy, IDS), adapted(params, tree, IDS),
                               rtol=1e-5, atol=1e-5)
  base = lora_jax.merge(params, bank.pick(bank_lib.NO_ADAPTER))
  jax.tree_util.tree_map(np.testing.assert_array_equal, base, params)


def test_bank_pads_ranks_and_fills_absent_targets_with_zeros():
  _, params, trees = _setup("llama", True)
  bank = bank_lib.stack(trees, params, capacity=5)
  q = bank.slots["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert (q.a.shape, q.b.shape) == ((2, 32, 6 * 4), (2, 6 * 4, 32))  # 5 slots + the base, r 4
  a = q.a.reshape(2, 32, 6, 4)
  np.testing.assert_array_equal(a[:, :, bank.index("mlp")], 0)  # mlp does not adapt q_proj
  np.testing.assert_array_equal(a[:, :, bank.index("qv"), 2:], 0)  # rank 2 padded to 4
  qv = trees["qv"]["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(a[:, :, bank.index("qv"), :2], qv.a)
  np.testing.assert_array_equal(q.b.reshape(2, 6, 4, 32)[:, bank.index("qv"), :2], qv.b)
  np.testing.assert_allclose(q.scale, [8 / 4, 3 / 2, 0.0, 0.0, 0.0, 0.0])
  assert bank.names == ("all", "qv", "mlp", None, None)
  norm = bank.slots["params"]["model"]["norm"]["scale"]
  np.testing.assert_array_equal(norm[bank.index("qv")], params["params"]["model"]["norm"]["scale"])
  np.testing.assert_array_equal(norm[0], trees["all"]["params"]["model"]["norm"]["scale"])


def test_no_retrace_across_ten_swaps_with_a_changed_alpha():
  model, params, trees = _setup("llama", True)
  bank = bank_lib.stack(trees, params, capacity=4)
  traces = []

  @jax.jit
  def run(base, bank, index, x):
    traces.append(1)
    return lora_jax.lora(model.apply)(base, bank.pick(index), x)

  rescaled = jax.tree_util.tree_map(
      lambda x: dataclasses.replace(x, scale=x.scale * 3) if isinstance(x, lora_jax.LoraWeights)
      else x, trees["qv"], is_leaf=lambda x: isinstance(x, lora_jax.LoraWeights))
  swaps = [(bank, "all"), (bank, "qv"), (bank, "mlp"), (bank, None), (bank, "qv"),
           (bank.put("qv", rescaled, params), "qv"),  # alpha x3: a value, not a new trace
           (bank.put("new", trees["mlp"], params), "new"),  # a free slot filled
           (bank, "all"), (bank.put("all", trees["qv"], params), "all"), (bank, "mlp")]
  adapted = lora_jax.lora(model.apply)
  for b, name in swaps:
    got = run(params, b, b.index(name), IDS)
    tree = {"all": trees["all"], "qv": trees["qv"], "mlp": trees["mlp"], "new": trees["mlp"],
            None: None}[name]
    if b is not bank and name in ("qv", "all"):
      tree = rescaled if name == "qv" else trees["qv"]
    want = model.apply(params, IDS) if tree is None else adapted(params, tree, IDS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert len(traces) == 1


def test_traced_scales_do_not_retrace_for_a_new_alpha():
  model, params, trees = _setup("llama", True)
  traces = []

  @jax.jit
  def run(base, adapters, x):
    traces.append(1)
    return lora_jax.lora(model.apply)(base, adapters, x)

  for factor in (1.0, 2.0, 0.5):
    tree = jax.tree_util.tree_map(
        lambda x: dataclasses.replace(x, scale=x.scale * factor)
        if isinstance(x, lora_jax.LoraWeights) else x, trees["qv"],
        is_leaf=lambda x: isinstance(x, lora_jax.LoraWeights))
    np.testing.assert_allclose(run(params, bank_lib.traced_scales(tree), IDS),
                               lora_jax.lora(model.apply)(params, tree, IDS), atol=1e-5)
  assert len(traces) == 1


@pytest.mark.parametrize("extras", [True, False], ids=["per-example", "one-batch"])
def test_mixed_generation_gives_each_rows_own_greedy_tokens(extras):
  model, params, trees = _setup("llama", True)
  trees = {k: jax.tree_util.tree_map(lambda x: 3 * x, v) for k, v in trees.items()}
  if not extras:  # "all" without its trained norm: a bank of adapters alone
    trees["all"] = {"params": {"model": {"layers": trees["all"]["params"]["model"]["layers"]}}}
  bank = bank_lib.stack(trees, params)
  adapted = lora_jax.lora(model.apply)
  init_cache = functools.partial(llama.init_cache, model.config)
  prompts = [[1, 2, 3, 4, 5], [7, 8], [1, 2, 3, 4, 9, 9, 9], [3]]
  names = ["qv", "all", None, "mlp"]
  out = gen.generate(adapted, (params, bank), prompts, init_cache=init_cache, max_new_tokens=6,
                     adapted=True, adapter_index=bank.indices(names))
  for prompt, name, tokens in zip(prompts, names, out.tokens):
    if name is None:
      alone = gen.generate(model.apply, params, [prompt], init_cache=init_cache,
                           max_new_tokens=6)
    else:
      alone = gen.generate(adapted, (params, trees[name]), [prompt], init_cache=init_cache,
                           max_new_tokens=6, adapted=True)
    assert tokens == alone.tokens[0]
  assert len({tuple(t) for t in out.tokens}) > 1


def test_read_and_load_peft_and_checkpoint_folders(tmp_path):
  model, params, trees = _setup("llama", True)
  uses = lora_jax.analyze(model.apply, params, IDS)
  config = lora_jax.LoraConfig(targets=ADAPTERS["qv"][0], rank=2, alpha=3.0)
  lora_jax.peft.export_peft(tmp_path / "peft", trees["qv"], config=config)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8.0, exclude=[SAVED["llama"]],
                               modules_to_save=[SAVED["llama"]])
  lora_jax.checkpoint.save(tmp_path / "ckpt", 3, trees["all"], config=config, base=params)
  bank = bank_lib.load({"p": tmp_path / "peft", "c": tmp_path / "ckpt"}, params, uses=uses)
  adapted = lora_jax.lora(model.apply)
  for name, tree in (("p", trees["qv"]), ("c", trees["all"])):
    np.testing.assert_allclose(adapted(params, bank.pick(bank.index(name)), IDS),
                               adapted(params, tree, IDS), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="holds no adapter"):
    bank_lib.read(tmp_path, params)
  picked = bank.pick(bank.index("c"))  # a picked adapter saves and restores as it is
  lora_jax.checkpoint.save(tmp_path / "picked", 0, picked, config=config, base=params)
  again = lora_jax.checkpoint.restore(tmp_path / "picked", base=params).adapters
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, picked)


def _lm_loss(model):
  def loss(params, batch):
    logits = model.apply(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
  return loss


def test_multi_task_training_equals_separate_training_bit_for_bit():
  model, params, trees = _setup("llama", True)
  trees = {"qv": trees["qv"], "all": trees["all"]}
  loss = _lm_loss(model)
  optimizer = {"qv": optax.adamw(1e-2), "all": optax.chain(optax.clip_by_global_norm(1.0),
                                                           optax.adam(3e-3))}
  rng = np.random.default_rng(0)
  batches = [{n: rng.integers(1, 64, (2 + i, 9)).astype(np.int32) for i, n in enumerate(trees)}
             for _ in range(3)]
  step = bank_lib.multi_task_step(loss, optimizer)
  adapters = dict(trees)
  states = {n: optimizer[n].init(t) for n, t in trees.items()}
  losses = []
  for batch in batches:
    adapters, states, value, _ = step(params, adapters, states, batch)
    losses.append(value)
  for name in trees:
    alone = lora_jax.train_step(loss, optimizer[name])
    tree, state = trees[name], optimizer[name].init(trees[name])
    for batch, value in zip(batches, losses):
      tree, state, own, _ = alone(params, tree, state, batch[name])
      assert np.asarray(own) == np.asarray(value[name])
    jax.tree_util.tree_map(np.testing.assert_array_equal, adapters[name], tree)
    jax.tree_util.tree_map(np.testing.assert_array_equal, states[name], state)
  assert not np.array_equal(adapters["qv"]["params"]["model"]["layers"]["self_attn"]["q_proj"]
                            ["kernel"].b, trees["qv"]["params"]["model"]["layers"]["self_attn"]
                            ["q_proj"]["kernel"].b)


def test_multi_task_step_names_must_agree():
  model, params, trees = _setup("llama", True)
  step = bank_lib.multi_task_step(_lm_loss(model), optax.sgd(0.1), jit=False)
  with pytest.raises(ValueError, match="batches must have the adapters' names"):
    step(params, {"qv": trees["qv"]}, {"qv": optax.sgd(0.1).init(trees["qv"])},
         {"other": IDS})


def test_bad_input_is_named():
  model, params, trees = _setup("llama", True)
  adapted = lora_jax.lora(model.apply)
  bank = bank_lib.stack(trees, params)
  with pytest.raises(ValueError, match="at least one adapter"):
    bank_lib.stack({}, params)
  with pytest.raises(ValueError, match="non-empty strings"):
    bank_lib.stack({"": trees["qv"]}, params)
  with pytest.raises(ValueError, match="capacity=1 is below the 3 adapters"):
    bank_lib.stack(trees, params, capacity=1)
  with pytest.raises(ValueError, match="no adapter named 'nope'.*all, qv, mlp"):
    bank.index("nope")
  with pytest.raises(ValueError, match="name must be a non-empty string, got None"):
    bank_lib.stack(trees, params, capacity=4).put(None, trees["qv"], params)
  with pytest.raises(ValueError, match="lora_dropout_key is not applied to a bank"):
    adapted(params, bank, IDS, adapter_index=np.zeros(4, np.int32),
            lora_dropout_key=jax.random.key(0))
  with pytest.raises(ValueError, match="has no slot for 'new'"):
    bank.put("new", trees["qv"], params)
  with pytest.raises(ValueError, match="paths the bank lacks"):
    bank_lib.stack({"qv": trees["qv"]}, params, capacity=2).put("x", trees["mlp"], params)
  with pytest.raises(ValueError, match="'all' has rank 4 at .* above the bank's 2"):
    bank_lib.stack(trees, params, rank=2)
  with pytest.raises(ValueError, match="pass adapter_index="):
    adapted(params, bank, IDS)
  with pytest.raises(ValueError, match="needs an AdapterBank"):
    adapted(params, trees["qv"], IDS, adapter_index=np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="1-D integer array"):
    adapted(params, bank, IDS, adapter_index=np.zeros((4, 1), np.int32))
  with pytest.raises(ValueError, match="axis 0 should hold the 3 examples"):
    adapted(params, bank, IDS, adapter_index=np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="example_axes names \\['cache'\\]"):
    adapted(params, bank, IDS, adapter_index=np.zeros(4, np.int32), example_axes={"cache": 1})
  inside = jax.tree_util.tree_map(lambda x: x, bank)  # rebuilt: names are host-side only
  with pytest.raises(ValueError, match="does not carry adapter names"):
    inside.index("qv")
  with pytest.raises(ValueError, match="adapter_index needs adapted=True"):
    gen.generate(model.apply, params, [[1]], init_cache=None, max_new_tokens=1,
                 adapter_index=[0])
