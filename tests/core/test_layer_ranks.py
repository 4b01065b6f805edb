"""Per-layer ranks and scales inside one stacked (scanned) adapter: config semantics, forward
and gradients against a dense float64 reference written from the formula
``W_l + s_l·A_l@B_l`` (true-rank slices), training that keeps the padding zero and matches the
unrolled model, counts, checkpoints, and PEFT both ways with real PEFT."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import lora_jax
from _fixtures import FAMILY_MODEL, IDS, TINY, copy_torch_weights
from _models import nnx_stack_case
from _utils import flat_adapters
from lora_jax import family, models
from lora_jax import peft as lora_peft

TINY, FAMILY_MODEL = TINY, FAMILY_MODEL
Q, V, DOWN = "self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj"
CONFIG = lora_jax.LoraConfig(targets=["q_proj", "v_proj", "down_proj"], rank=4, alpha=8,
                             rank_pattern={"layers_0/self_attn/q_proj": 2},
                             alpha_pattern={"layers_1/mlp/down_proj": 3})


def _setting(path: str, layer: int) -> tuple[int, float]:
  """(rank, scale) of one layer, read off CONFIG's patterns by hand (not by lora_jax)."""
  rank = 2 if (Q in path and layer == 0) else 4
  alpha = 3.0 if (DOWN in path and layer == 1) else 8.0
  return rank, alpha / rank


def _is_lora(x) -> bool:
  return isinstance(x, lora_jax.LoraWeights)


def _llama(scan: bool):
  return models.get(FAMILY_MODEL["llama"], **TINY["llama"], scan_layers=scan)


def _stacked_params(unrolled, scanned_like):
  """The scanned model's params holding the unrolled model's weights (layer l at index l)."""
  src = lora_jax.targets.leaves_by_path(unrolled)
  out = {}
  for path, x in lora_jax.targets.leaves_by_path(scanned_like).items():
    layers = [family.unrolled_path(path, i) for i in range(x.shape[0])] if x.ndim else []
    value = jnp.stack([src[p] for p in layers]) if layers and None not in layers else src[path]
    out[tuple(path.split("/"))] = value
  return lora_jax._tree.nest(out)


@pytest.fixture(scope="module")
def llama():
  """{scan: (model, params)} with the same random weights (norm scales near 1)."""
  rng = np.random.default_rng(0)
  unrolled = jax.tree_util.tree_map(
      lambda x: jnp.asarray((0.2 if x.ndim > 1 else 1.0) * rng.normal(size=x.shape) + (
          x.ndim == 1), jnp.float32), jax.eval_shape(_llama(False).init, jax.random.key(0), IDS))
  scanned = _stacked_params(unrolled, jax.eval_shape(_llama(True).init, jax.random.key(0), IDS))
  return {False: (_llama(False), unrolled), True: (_llama(True), scanned)}


_USES = {}


def _uses(model, params):
  """``analyze`` of the tiny Llama, once per variant."""
  if model.config.scan_layers not in _USES:
    _USES[model.config.scan_layers] = lora_jax.analyze(model.apply, params, IDS)
  return _USES[model.config.scan_layers]


def _run(model, params, adapters):
  return jax.jit(lora_jax.lora(model.apply))(params, adapters, IDS)


def _random_b(tree, seed=1):
  """Random (nonzero) B on each layer's true ranks; the padding left zero."""
  rng = np.random.default_rng(seed)

  def fill(lw):
    if not _is_lora(lw):
      return lw
    b = 0.5 * rng.normal(size=lw.b.shape).astype(np.float32)
    if lw.ranks is not None:  # b (layers, rank, out)
      b *= (np.arange(lw.rank)[None, :] < np.asarray(lw.ranks)[:, None])[:, :, None]
    return dataclasses.replace(lw, b=jnp.asarray(b))

  return jax.tree_util.tree_map(fill, tree, is_leaf=_is_lora)


def _unrolled_adapters(tree):
  """The same adapters on the unrolled model: layer l's true-rank slices, its own scale."""
  flat = {}
  for path, lw in flat_adapters(tree).items():
    for layer in range(lw.a.shape[0]):
      r = lw.rank if lw.ranks is None else lw.ranks[layer]
      s = lw.scale[layer] if isinstance(lw.scale, tuple) else lw.scale
      flat[tuple(family.unrolled_path(path, layer).split("/"))] = lora_jax.LoraWeights(
          a=lw.a[layer][:, :r], b=lw.b[layer][:r], scale=s, axes="io")
  return lora_jax._tree.nest(flat)


def _padding(lw) -> list:
  """The padded entries of every layer of ``lw`` (a, then b)."""
  ranks = lw.ranks or (lw.rank,) * lw.a.shape[0]
  return [x for i, r in enumerate(ranks) for x in (lw.a[i][..., r:], lw.b[i][r:])]


# ---- config semantics --------------------------------------------------------------------

def test_patterns_on_unrolled_layer_paths_give_one_padded_stacked_adapter(llama):
  model, params = llama[True]
  uses = _uses(model, params)
  targets = {t.path: t for t in lora_jax.plan(CONFIG, params, uses=uses).targets}
  q = targets["params/model/layers/self_attn/q_proj/kernel"]
  assert (q.rank, q.ranks, q.alphas, q.scales) == (4, (2, 4), (8.0, 8.0), (4.0, 2.0))
  down = targets["params/model/layers/mlp/down_proj/kernel"]
  assert (down.ranks, down.alphas, down.scales) == ((4, 4), (8.0, 3.0), (2.0, 0.75))
  assert targets["params/model/layers/self_attn/v_proj/kernel"].ranks is None
  tree = lora_jax.init(CONFIG, params, key=jax.random.key(1), uses=uses)
  lws = flat_adapters(tree)
  lq, ld = lws[q.path], lws[down.path]
  assert (lq.a.shape, lq.b.shape, lq.scale, lq.ranks) == ((2, 32, 4), (2, 4, 32), (4.0, 2.0),
                                                          (2, 4))
  assert (ld.scale, ld.ranks) == ((2.0, 0.75), None)
  assert not np.any(lq.a[0, :, 2:]) and np.all(lq.a[1] != 0)
  v = lws["params/model/layers/self_attn/v_proj/kernel"]
  assert (v.scale, v.ranks) == (2.0, None)  # a uniform stack: one float, as before
  assert jax.tree_util.tree_leaves(tree) == [x for lw in lws.values() for x in (lw.a, lw.b)]
  table = str(lora_jax.plan(CONFIG, params, uses=uses))
  assert re.search(r"q_proj/kernel\s+2x32x32\s+lio\s+2 \[1: 4\]\s+8\s+4 \[1: 2\]\s+384", table)


def test_a_pattern_naming_no_layer_or_kernel_is_an_error(llama):
  model, params = llama[True]
  config = dataclasses.replace(CONFIG, rank_pattern={"layers_7/self_attn/q_proj": 2})
  with pytest.raises(ValueError, match=r"rank_pattern pattern 'layers_7/self_attn/q_proj' "
                                       r"matched no targeted kernel"):
    lora_jax.plan(config, params, uses=_uses(model, params))


def test_config_serialises_unchanged():
  assert lora_jax.LoraConfig.from_dict(json.loads(json.dumps(CONFIG.to_dict()))) == CONFIG


def test_counts_are_the_true_ranks(llama):
  shapes = {Q: (32, 32), V: (32, 16), DOWN: (48, 32)}  # (in, out); by hand: r_l * (in + out)
  want = sum(_setting(k, layer)[0] * sum(shapes[k]) for k in shapes for layer in (0, 1))
  counts = {}
  for scan, (model, params) in llama.items():
    uses = _uses(model, params)
    plan = lora_jax.plan(CONFIG, params, uses=uses)
    tree = lora_jax.init(CONFIG, params, key=jax.random.key(1), uses=uses)
    counted = lora_jax.count(params, tree)
    assert counted.trainable == plan.counts.trainable == want
    assert sum(t.num_params for t in plan.targets) == want
    counts[scan] = counted
  assert counts[True] == counts[False]


# ---- forward and gradients against the dense float64 formula --------------------------------

def _reference_params(params, adapters, setting):
  """float64 ``W_l + s_l·A_l[:, :r_l]@B_l[:r_l]`` for every layer of every adapted kernel,
  (r_l, s_l) from ``setting(path, layer)``; the padding takes no part."""
  flat = lora_jax.adapters.split(adapters)[0]

  def one(w, a, b, rank, scale):
    return w + scale * jnp.einsum("ir,ro->io", a[:, :rank], b[:rank])

  def update(path, w):
    w = jnp.asarray(w, jnp.float64)
    if path not in flat:
      return w
    lw, name = flat[path], "/".join(path)
    a, b = lw.a.astype(jnp.float64), lw.b.astype(jnp.float64)
    if lw.axes == "io":  # an unrolled layer: its index is in the path
      return one(w, a, b, *setting(name, int(re.search(r"_(\d+)/", name)[1])))
    return jnp.stack([one(w[i], a[i], b[i], *setting(name, i)) for i in range(w.shape[0])])

  return lora_jax._tree.map_with_path(update, params)


def _check_against_reference(fn, params, adapters, x, setting):
  loss = lambda p, x: jnp.mean(jax.tree_util.tree_leaves(fn(p, x))[0] ** 2)  # noqa: E731
  value, grads = jax.jit(jax.value_and_grad(
      lambda a: lora_jax.lora(loss)(params, a, x)))(adapters)
  with jax.enable_x64(True):
    a64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), adapters)
    want, want_grads = jax.jit(jax.value_and_grad(  # dtype=float32 layers stay float32
        lambda a: loss(_reference_params(params, a, setting), x)))(a64)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for got, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  for lw in jax.tree_util.tree_leaves(grads, is_leaf=_is_lora):
    if lw.ranks is not None:  # no gradient reaches the padding
      assert not any(np.any(p) for p in _padding(lw))
  return value


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_llama_forward_and_gradients_equal_the_dense_float64_formula(llama, scan):
  model, params = llama[scan]
  tree = _random_b(lora_jax.init(CONFIG, params, key=jax.random.key(1),
                                 uses=_uses(model, params)))
  if scan:  # the per-layer adapters are really there
    assert flat_adapters(tree)["params/model/layers/self_attn/q_proj/kernel"].ranks == (2, 4)
  _check_against_reference(model.apply, params, tree, IDS, _setting)


def test_nnx_scanned_stack_equals_the_dense_float64_formula():
  c = nnx_stack_case()  # layers/kernel (3, 16, 16), run with nnx.scan
  ranks, scales = (2, 4, 3), (1.0, 0.5, 2.0)
  config = lora_jax.LoraConfig(targets="layers", rank=4, axes_pattern={"layers": "lio"})
  rng = np.random.default_rng(0)
  mask = np.arange(4)[None, :] < np.asarray(ranks)[:, None]  # (layers, rank)

  def per_layer(lw):
    a = rng.normal(size=lw.a.shape).astype(np.float32) * mask[:, None, :]
    b = rng.normal(size=lw.b.shape).astype(np.float32) * mask[:, :, None]
    return lora_jax.LoraWeights(a=jnp.asarray(a), b=jnp.asarray(b), scale=scales, axes="lio",
                                ranks=ranks)

  tree = jax.tree_util.tree_map(per_layer, lora_jax.init(config, c.params, key=jax.random.key(0)),
                                is_leaf=_is_lora)
  _check_against_reference(c.fn, c.params, tree, c.x,
                           lambda path, layer: (ranks[layer], scales[layer]))


def test_merge_unmerge_and_dora_equal_the_unrolled_model(llama):
  (sm, sp), (um, up) = llama[True], llama[False]
  tree = _random_b(lora_jax.init(CONFIG, sp, key=jax.random.key(1), uses=_uses(sm, sp)))
  unrolled = _unrolled_adapters(tree)
  merged = lora_jax.targets.leaves_by_path(lora_jax.merge(sp, tree))
  want = lora_jax.targets.leaves_by_path(lora_jax.merge(up, unrolled))
  for path in flat_adapters(tree):
    for layer in range(2):
      np.testing.assert_allclose(merged[path][layer], want[family.unrolled_path(path, layer)],
                                 rtol=1e-6, atol=1e-6)
  back = lora_jax.unmerge(lora_jax.merge(sp, tree), tree)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), back, sp)
  dora = dataclasses.replace(CONFIG, kind="dora")
  tree = _random_b(lora_jax.init(dora, sp, key=jax.random.key(1), uses=_uses(sm, sp)))
  unrolled = lora_jax.init(dora, up, key=jax.random.key(1))
  per_layer = {p: lw for p, lw in flat_adapters(tree).items() if lw.per_layer}
  flat = {}  # the scanned DoRA adapters' layers, at their true ranks
  for path, lw in flat_adapters(unrolled).items():
    stacked = re.sub(r"layers_(\d+)", "layers", path)
    src, layer = flat_adapters(tree)[stacked], int(re.search(r"layers_(\d+)", path)[1])
    r = lw.rank
    flat[tuple(path.split("/"))] = dataclasses.replace(
        lw, a=src.a[layer][:, :r], b=src.b[layer][:r], magnitude=src.magnitude[layer])
  unrolled = lora_jax._tree.nest(flat)
  assert set(per_layer) == {"params/model/layers/self_attn/q_proj/kernel",
                            "params/model/layers/mlp/down_proj/kernel"}
  got = _run(sm, sp, tree)
  np.testing.assert_allclose(got, _run(um, up, unrolled), atol=2e-5)
  np.testing.assert_allclose(got, jax.jit(sm.apply)(lora_jax.merge(sp, tree), IDS), atol=2e-5)


# ---- training --------------------------------------------------------------------------------

def test_adamw_keeps_the_padding_zero_and_matches_the_unrolled_run(llama):
  (sm, sp), (um, up) = llama[True], llama[False]
  tree = _random_b(lora_jax.init(CONFIG, sp, key=jax.random.key(1), uses=_uses(sm, sp)))
  runs = {True: (sm, sp, tree), False: (um, up, _unrolled_adapters(tree))}
  optimizer = optax.adamw(1e-2, weight_decay=0.1)
  losses = {}
  for scan, (model, params, adapters) in runs.items():
    loss_fn = lambda p, ids, m=model: jnp.mean(m.apply(p, ids) ** 2)  # noqa: E731
    step = lora_jax.train_step(loss_fn, optimizer)
    state = optimizer.init(adapters)
    losses[scan] = []
    for _ in range(4):
      adapters, state, loss, _ = step(params, adapters, state, IDS)
      losses[scan].append(float(loss))
    runs[scan] = adapters
  np.testing.assert_allclose(losses[True], losses[False], rtol=2e-6)
  assert losses[True][-1] < losses[True][0]
  for lw in flat_adapters(runs[True]).values():
    assert all(not np.any(p) for p in _padding(lw))  # exactly zero after decay and updates
  trained = lora_jax.targets.leaves_by_path(_unrolled_adapters(runs[True]))
  for path, x in lora_jax.targets.leaves_by_path(runs[False]).items():
    np.testing.assert_allclose(trained[path], x, rtol=1e-5, atol=1e-6)


# ---- checkpoints, and what refuses ---------------------------------------------------------

def test_checkpoint_round_trip_keeps_per_layer_scales_and_ranks(llama, tmp_path):
  model, params = llama[True]
  tree = _random_b(lora_jax.init(CONFIG, params, key=jax.random.key(1),
                                 uses=_uses(model, params)))
  lora_jax.checkpoint.save(tmp_path, 3, tree, config=CONFIG, base=params)
  restored = lora_jax.checkpoint.restore(tmp_path, base=params)
  assert restored.config == CONFIG
  assert jax.tree_util.tree_structure(restored.adapters) == jax.tree_util.tree_structure(tree)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.adapters, tree)
  lw = flat_adapters(restored.adapters)["params/model/layers/self_attn/q_proj/kernel"]
  assert (lw.scale, lw.ranks) == ((4.0, 2.0), (2, 4))
  adapted = jax.jit(lora_jax.lora(model.apply))
  np.testing.assert_array_equal(adapted(params, restored.adapters, IDS),
                                adapted(params, tree, IDS))


def test_what_cannot_hold_per_layer_scales_refuses(llama, tmp_path):
  model, params = llama[True]
  tree = _random_b(lora_jax.init(CONFIG, params, key=jax.random.key(1),
                                 uses=_uses(model, params)))
  path = "params/model/layers/self_attn/q_proj/kernel"
  with pytest.raises(ValueError, match=r"adapter 't' has one scale per layer at 'params/model/"
                                       r"layers/(self_attn/q|mlp/down)_proj/kernel'.*which a bank "
                                       r"does not hold"):
    lora_jax.bank.stack({"t": tree}, params)
  with pytest.raises(ValueError, match=r"adapters\[0\] has one scale per layer at 'params/model/"
                                       r"layers/mlp/down_proj/kernel'.*which combine does not "
                                       r"weigh"):
    lora_jax.combine.weighted([tree, tree], [0.5, 0.5], combination_type="cat")
  lw = flat_adapters(tree)[path]
  bad = lora_jax._tree.nest({tuple(path.split("/")): dataclasses.replace(lw, ranks=(2, 4, 4))})
  with pytest.raises(ValueError, match=r"per-layer scales \(4\.0, 2\.0\) and ranks \(2, 4, 4\), "
                                       r"which must give one scale and one rank in \[1, 4\] to "
                                       r"each of the 2 layers"):
    lora_jax.merge(params, bad)
  padded = lora_jax._tree.nest({tuple(path.split("/")): dataclasses.replace(
      lw, b=lw.b.at[0, 3].set(1.0))})
  with pytest.raises(ValueError, match=r"nonzero entries beyond layer 0's rank 2"):
    lora_peft.export_peft(tmp_path, padded, config=CONFIG)
  with pytest.raises(ValueError, match=r"adapter at '" + path + r"' \(layer 0\) has rank 2 and "
                                       r"scale 4 \(alpha 8\), but the config gives rank 4"):
    lora_peft.export_peft(tmp_path, tree, config=dataclasses.replace(CONFIG, rank_pattern={}))


# ---- PEFT both ways --------------------------------------------------------------------------

def _hf_llama():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **TINY["llama"], bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-5)).eval()


PEFT_PATTERNS = dict(rank_pattern={"model.layers.0.self_attn.q_proj": 2},
                     alpha_pattern={"model.layers.1.mlp.down_proj": 3})


@pytest.mark.interop
def test_peft_per_layer_patterns_import_onto_the_scanned_llama(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")

  hf = _hf_llama()
  models_by_scan = {scan: _llama(scan) for scan in (True, False)}
  params = {scan: copy_torch_weights(hf, m) for scan, m in models_by_scan.items()}
  peft_model = peft.get_peft_model(hf, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
      init_lora_weights=False, **PEFT_PATTERNS))
  peft_model.save_pretrained(str(tmp_path))
  with torch.no_grad():
    want = peft_model.eval()(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  trainable, total = peft_model.get_nb_trainable_parameters()
  got, merged = {}, {}
  for scan, model in models_by_scan.items():
    config, adapters = lora_peft.import_peft(tmp_path, params[scan])
    got[scan] = np.asarray(jax.jit(lora_jax.lora(model.apply))(params[scan], adapters, IDS))
    assert np.abs(want - got[scan]).max() <= 1e-4
    counted = lora_jax.count(params[scan], adapters)
    assert (counted.trainable, counted.total) == (trainable, total)
    assert lora_jax.plan(config, params[scan]).counts == counted
    remade = lora_jax.init(config, params[scan], key=jax.random.key(0))
    assert jax.tree_util.tree_structure(remade) == jax.tree_util.tree_structure(adapters)
    merged[scan] = lora_jax.targets.leaves_by_path(lora_jax.merge(params[scan], adapters))
  assert np.abs(got[True] - got[False]).max() <= 1e-5
  lw = flat_adapters(lora_peft.import_peft(tmp_path, params[True])[1])[
      "params/model/layers/self_attn/q_proj/kernel"]
  assert (lw.ranks, lw.scale) == ((2, 4), (4.0, 2.0))
  for path, w in merged[True].items():
    for layer in range(2) if family.unrolled_path(path, 0) else []:
      np.testing.assert_allclose(w[layer], merged[False][family.unrolled_path(path, layer)],
                                 rtol=1e-6, atol=1e-7)


@pytest.mark.interop
def test_exported_per_layer_adapter_gives_peft_our_outputs(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")

  hf = _hf_llama()
  model = _llama(True)
  params = copy_torch_weights(hf, model)
  tree = _random_b(lora_jax.init(CONFIG, params, key=jax.random.key(1),
                                 uses=_uses(model, params)))
  ours = np.asarray(jax.jit(lora_jax.lora(model.apply))(params, tree, IDS))
  lora_peft.export_peft(tmp_path, tree, config=CONFIG)
  data = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (data["rank_pattern"], data["alpha_pattern"]) == (
      {r"model\.layers\.0\.self_attn\.q_proj": 2}, {r"model\.layers\.1\.mlp\.down_proj": 3})
  tensors = load_file(tmp_path / "adapter_model.safetensors")
  assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
  assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
  loaded = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
  with torch.no_grad():
    theirs = loaded(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  assert np.abs(theirs - ours).max() <= 1e-4
  assert np.abs(theirs - np.asarray(model.apply(params, IDS))).max() > 1e-2  # it matters
  lora_sizes = sum(p.numel() for n, p in loaded.named_parameters() if ".lora_" in n)
  assert lora_sizes == lora_jax.count(params, tree).trainable
  again = lora_peft.import_peft(tmp_path, params)[1]
  assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(tree)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, tree)
