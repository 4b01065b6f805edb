"""Training with optax: adapter-only gradients and state, frozen base, no weight gradient."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from _fixtures import BIG, dots_into_big_weight
from _models import linen_stack_case, nnx_case
from _utils import flat_adapters, randomize_b


def _mse(fn):
  return lambda params, batch: jnp.mean((fn(params, batch["x"]) - batch["y"]) ** 2)


def _setup(make_case):
  case = make_case()
  uses = lora_jax.analyze(case.fn, case.params, case.x)
  config = lora_jax.LoraConfig(targets="all-linear", rank=4, alpha=8.0)
  adapters = lora_jax.init(config, case.params, key=jax.random.key(1), uses=uses)
  y = jnp.sin(case.fn(case.params, case.x))
  return case, adapters, {"x": case.x, "y": y}


@pytest.mark.parametrize("make_case", [linen_stack_case, nnx_case], ids=["linen-scan", "nnx"])
def test_steps_train_adapters_and_leave_base_bit_identical(make_case):
  case, adapters, batch = _setup(make_case)
  base_before = jax.tree_util.tree_map(np.array, case.params)
  optimizer = optax.adam(1e-2)
  step = lora_jax.train_step(_mse(case.fn), optimizer)
  state, new = optimizer.init(adapters), adapters
  losses = []
  for _ in range(5):
    new, state, loss, _ = step(case.params, new, state, batch)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  for before, after in zip(jax.tree_util.tree_leaves(base_before),
                           jax.tree_util.tree_leaves(case.params)):
    np.testing.assert_array_equal(before, np.asarray(after))
  for old, trained in zip(jax.tree_util.tree_leaves(adapters), jax.tree_util.tree_leaves(new)):
    assert not np.allclose(old, trained)


def test_gradients_and_optimizer_state_exist_for_adapters_only():
  case, adapters, batch = _setup(nnx_case)
  loss, grads = lora_jax.value_and_grad(_mse(case.fn))(case.params, adapters, batch)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
  assert np.isfinite(loss)
  state = optax.adamw(1e-3).init(adapters)
  trainable = lora_jax.count(case.params, adapters).trainable
  moments = [x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0]
  assert sum(moments) == 2 * trainable  # Adam's mu and nu, nothing for the base


def test_train_step_does_not_retrace():
  case, adapters, batch = _setup(linen_stack_case)
  traces = []

  def loss_fn(params, batch):
    traces.append(1)
    return _mse(case.fn)(params, batch)

  optimizer = optax.sgd(1e-2)
  step = lora_jax.train_step(loss_fn, optimizer)
  out = step(case.params, adapters, optimizer.init(adapters), batch)
  out = step(case.params, out.adapters, out.opt_state, batch)
  step(case.params, out.adapters, out.opt_state, batch)
  assert len(traces) == 1


def test_train_step_has_aux_and_dropout_key():
  case, adapters, batch = _setup(linen_stack_case)
  adapters = randomize_b(adapters, jax.random.key(5))
  loss_fn = lambda p, b: (_mse(case.fn)(p, b), {"n": b["x"].shape[0]})  # noqa: E731
  optimizer = optax.sgd(1e-2)
  step = lora_jax.train_step(loss_fn, optimizer, has_aux=True)
  out = step(case.params, adapters, optimizer.init(adapters), batch, key=jax.random.key(0))
  assert out.aux["n"] == 2 and np.isfinite(out.loss)


def _big_setup():
  base = {"proj": {"kernel": jax.ShapeDtypeStruct((BIG, BIG), jnp.float32)}}
  config = lora_jax.LoraConfig(targets="proj", rank=8)
  adapters = lora_jax.init(config, base, key=jax.random.key(0))
  batch = {"x": jax.ShapeDtypeStruct((2, 128, BIG), jnp.float32),  # 256 tokens
           "y": jax.ShapeDtypeStruct((2, 128, BIG), jnp.float32)}
  loss_fn = _mse(lambda p, x: x @ p["proj"]["kernel"])
  return base, adapters, batch, loss_fn


def test_training_step_builds_no_weight_gradient():
  base, adapters, batch, loss_fn = _big_setup()
  optimizer = optax.adam(1e-3)
  step = lora_jax.train_step(loss_fn, optimizer)
  state = jax.eval_shape(optimizer.init, adapters)
  jaxpr = jax.make_jaxpr(step)(base, adapters, state, batch).jaxpr
  assert dots_into_big_weight(jaxpr, 256) == []
  big_arrays = [v for e in jaxpr.eqns for v in e.outvars if v.aval.shape == (BIG, BIG)]
  assert big_arrays == []  # no full-size update, gradient or zero for the frozen kernel
  hlo = step.lower(base, adapters, state, batch).compile().as_text()
  assert _big_hlo_values(hlo) == []  # in the compiled step, W is only ever an input
  # Control: differentiating through merge() does build the weight gradient xᵀ·dy, so both
  # checks above can fail.
  merged_grad = jax.jit(
      lambda base, a, b: jax.grad(lambda a: loss_fn(lora_jax.merge(base, a), b))(a))
  assert len(dots_into_big_weight(jax.make_jaxpr(merged_grad)(base, adapters, batch).jaxpr,
                                   256)) >= 1
  assert any(" dot(" in line for line in
             _big_hlo_values(merged_grad.lower(base, adapters, batch).compile().as_text()))


def _big_hlo_values(hlo: str) -> list[str]:
  """HLO instructions that produce a BIG x BIG value other than an entry parameter."""
  pattern = re.compile(rf"= f32\[{BIG},{BIG}\]\S* (?!parameter\()")
  return [line.strip() for line in hlo.splitlines() if pattern.search(line)]


def test_lora_plus_scales_b_learning_rate():
  case, adapters, batch = _setup(linen_stack_case)
  adapters = randomize_b(adapters, jax.random.key(5))
  _, grads = lora_jax.value_and_grad(_mse(case.fn))(case.params, adapters, batch)
  for lr in (0.1, optax.constant_schedule(0.1)):
    optimizer = lora_jax.lora_plus(optax.sgd, learning_rate=lr, ratio=16.0)
    out = lora_jax.train_step(_mse(case.fn), optimizer)(
        case.params, adapters, optimizer.init(adapters), batch)
    flat, g = flat_adapters(adapters), flat_adapters(grads)
    for path, lw in flat_adapters(out.adapters).items():
      np.testing.assert_allclose(lw.a, flat[path].a - 0.1 * g[path].a, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(lw.b, flat[path].b - 1.6 * g[path].b, rtol=1e-5, atol=1e-7)


def test_lora_plus_rejects_bad_ratio():
  with pytest.raises(ValueError, match=r"ratio must be > 0 \(lr_B / lr_A\), got 0"):
    lora_jax.lora_plus(optax.adam, learning_rate=1e-3, ratio=0)


def test_run_lora_plus_option_gives_b_ratio_times_the_learning_rate():
  """``lora-jax train --lora-plus-ratio``: B and the head's bias at ratio x lr, A and the head's
  kernel at lr (PEFT's create_loraplus_optimizer: lora_B and 1-D parameters in the fast
  group); the head is a modules_to_save extra in the same trainable tree."""
  from lora_jax.app import runner
  from lora_jax.app.options import RunOptions
  lw = lora_jax.adapters.LoraWeights(a=jnp.zeros((3, 2)), b=jnp.zeros((2, 5)), scale=2.0,
                                     axes="io", dropout=0.0)
  trained = {"dense": {"kernel": lw}, "head": {"kernel": jnp.zeros((5, 2)),
                                               "bias": jnp.zeros((2,))}}
  grads = jax.tree_util.tree_map(jnp.ones_like, trained)  # AdamW's step is then -lr exactly

  def second_update(options):  # the warm-up starts at lr 0, so take the second step's
    optimizer = runner.optimizer_for(options, total_steps=10)
    state = optimizer.init(trained)
    for _ in range(2):
      updates, state = optimizer.update(grads, state, trained)
    kernel, head = updates["dense"]["kernel"], updates["head"]
    return (float(kernel.a[0, 0]), float(kernel.b[0, 0]), float(head["kernel"][0, 0]),
            float(head["bias"][0]))

  a, b, head, bias = second_update(RunOptions(lr=1e-2, lora_plus_ratio=8.0))
  assert a == pytest.approx(-1e-2, rel=1e-4)  # one warm-up step, then the peak lr
  assert b == pytest.approx(8.0 * a, rel=1e-5) and head == pytest.approx(a, rel=1e-5)
  assert bias == pytest.approx(8.0 * a, rel=1e-5)
  a, b, head, bias = second_update(RunOptions(lr=1e-2))
  assert b == pytest.approx(a, rel=1e-5) and head == bias == pytest.approx(a, rel=1e-5)


def test_run_options_name_the_field():
  from lora_jax.app.options import OptionError, RunOptions
  with pytest.raises(OptionError, match=r"^lora_plus_ratio applies to a LoRA run, not with full, "
                                        r"got 4.0 with full\.$"):
    RunOptions(full=True, lora_plus_ratio=4.0)
  with pytest.raises(OptionError, match=r"^lora_plus_ratio must be a number > 0, got -1.0\.$"):
    RunOptions(lora_plus_ratio=-1.0)
  with pytest.raises(OptionError, match=r"^batch_size must be an integer > 0, got 0\.$") as e:
    RunOptions(batch_size=0)
  assert e.value.field == "batch_size"


def test_classify_rejects_an_unknown_pooling_before_loading_weights():
  from lora_jax.app.classify import ClassifyOptions
  with pytest.raises(ValueError, match=r"^pooling must be one of pooler, mean, got 'cls'\.$"):
    ClassifyOptions(pooling="cls")


def test_options_round_trip_through_the_one_serializer():
  from lora_jax.app.classify import ClassifyOptions
  o = ClassifyOptions(rank=4, targets="q,k,v", steps=7, mesh="2x4", full=False, lr=3e-3)
  assert ClassifyOptions.from_dict(json.loads(json.dumps(o.to_dict()))) == o
  config = lora_jax.LoraConfig(targets=["q", "v"], rank=4, modules_to_save=("head",),
                               dtype=jnp.bfloat16, rank_pattern={"q": 2})
  assert lora_jax.LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  numpy = lora_jax.LoraConfig(targets="q", rank=np.int64(4), alpha=np.float32(8.0))
  assert numpy.to_dict()["rank"] == 4 and numpy.to_dict()["alpha"] == 8.0  # numbers, not dtypes
  assert lora_jax.LoraConfig.from_dict(json.loads(json.dumps(numpy.to_dict()))) == numpy
  with pytest.raises(ValueError, match=r"ClassifyOptions has no field\(s\) rnak; known fields: "):
    ClassifyOptions.from_dict({"rnak": 4})


def test_the_logged_loss_is_the_mean_over_the_interval():
  from lora_jax.app.runner import _Interval
  interval = _Interval()
  for loss in (1.0, 2.0, 6.0):
    interval.add(jnp.asarray(loss))
  assert interval.mean() == (pytest.approx(3.0), 0) and interval.steps == 0
  interval.add(jnp.asarray(5.0))
  assert interval.mean() == (pytest.approx(5.0), 0)
  interval.add(jnp.asarray(jnp.nan))
  assert np.isnan(interval.mean()[0])  # stops the run
  skipping = _Interval(skip_nonfinite=True)
  for loss in (1.0, jnp.nan, 3.0):
    skipping.add(jnp.asarray(loss))
  assert skipping.mean() == (pytest.approx(2.0), 1)


def test_labels_must_be_every_class_from_zero():
  from lora_jax.app.classify import check_labels
  from lora_jax.app.data import Examples
  ex = lambda *labels: Examples(tuple("x" * len(labels)), np.asarray(labels, np.int32))  # noqa
  assert check_labels(ex(0, 1, 2, 1), ex(2, 0), where="d.tsv") == 3
  assert check_labels(ex(0, 0), ex(0), where="d.tsv") == 2  # one class still gets a 2-way head
  with pytest.raises(ValueError, match=r"^d\.tsv: labels must be 0, 1, \.\.\., K-1 .*found 2 "
                                       r"classes up to 2, missing 0\.$"):
    check_labels(ex(1, 2), ex(1), where="d.tsv")
  with pytest.raises(ValueError, match=r"found 3 classes up to 100000, missing 2, 3, 4, 5, 6, "
                                       r"\.\.\.\.$"):
    check_labels(ex(0, 1, 100000), ex(1), where="d.tsv")
  with pytest.raises(ValueError, match=r"validation labels \[3\] are not among the training "
                                       r"data's classes 0\.\.1\."):
    check_labels(ex(0, 1), ex(3), where="d.tsv")


def test_classify_options_check_lengths_against_the_model():
  from lora_jax.app.classify import ClassifyOptions
  with pytest.raises(ValueError, match=r"^max_length must be an integer from 2 to 512 \(the "
                                       r"model's positions\), got 1000\.$"):
    ClassifyOptions(max_length=1000)
  with pytest.raises(ValueError, match=r"^max_train must be an integer > 0, got 0\.$"):
    ClassifyOptions(max_train=0)
  with pytest.raises(ValueError, match=r"^steps must be an integer > 0, got 0\.$"):
    ClassifyOptions(steps=0)
  with pytest.raises(ValueError, match=r"^lr must be a number > 0, got nan\.$"):
    ClassifyOptions(lr=float("nan"))


def test_a_non_finite_value_stops_the_run_naming_the_step():
  from lora_jax.app.runner import RunError, _check_finite, _finite_tree
  assert _finite_tree({"a": jnp.ones(3), "b": jnp.zeros((2, 2))}) == 0.0
  assert np.isnan(_finite_tree({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}))
  _check_finite(0.5, 3, [])
  with pytest.raises(RunError, match=r"the training loss became non-finite by step 12 .*the "
                                     r"checkpoint of step 8 is kept"):
    _check_finite(float("nan"), 12, [{"step": 4}, {"step": 8}])


@pytest.mark.parametrize("total", [1, 2, 10])
def test_the_schedule_fits_any_number_of_steps(total):
  from lora_jax.app import runner
  from lora_jax.app.options import RunOptions
  optimizer = runner.optimizer_for(RunOptions(lr=1e-2), total_steps=total)
  params = {"w": jnp.ones(3)}
  state = optimizer.init(params)
  updates, _ = optimizer.update({"w": jnp.ones(3)}, state, params)
  assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_resume_keeps_the_saved_options_and_only_grows_steps():
  from lora_jax.app.classify import ClassifyOptions
  from lora_jax.app.options import OptionError, resumed
  saved = ClassifyOptions(steps=20, rank=8)
  assert resumed(saved, {}, total_steps=20) == saved
  assert resumed(saved, {"rank": 8, "steps": 40}, total_steps=20).steps == 40
  with pytest.raises(OptionError, match=r"^rank 4 differs from the saved run's 8; --resume "
                                        r"continues a run with the options it started with"):
    resumed(saved, {"rank": 4, "steps": 40}, total_steps=20)
  with pytest.raises(OptionError, match=r"^steps 10 is fewer than the saved run's 20 steps"):
    resumed(saved, {"steps": 10}, total_steps=20)


def test_skip_nonfinite_leaves_parameters_as_they_were():
  from lora_jax.app import runner
  from lora_jax.app.options import RunOptions
  optimizer = runner.optimizer_for(RunOptions(lr=1e-2, skip_nonfinite=True), total_steps=10)
  params = {"w": jnp.ones(3)}
  state = optimizer.init(params)
  updates, state = optimizer.update({"w": jnp.array([1.0, jnp.nan, 1.0])}, state, params)
  np.testing.assert_array_equal(updates["w"], np.zeros(3))  # the step is skipped
  for _ in range(2):  # the warm-up's first step has lr 0: the skipped step did not count
    updates, state = optimizer.update({"w": jnp.ones(3)}, state, params)
  assert np.all(np.asarray(updates["w"]) < 0) and np.all(np.isfinite(np.asarray(updates["w"])))


def test_ctrl_c_during_a_save_lands_after_it():
  import os
  import signal
  from lora_jax.app.run_folder import interrupts_deferred
  done = []
  with pytest.raises(KeyboardInterrupt):
    with interrupts_deferred():
      os.kill(os.getpid(), signal.SIGINT)
      done.append("the block ran to its end")
  assert done == ["the block ran to its end"]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_dropped_inside_a_garbage_collector_callback_is_still_seen():
  """Python runs a signal handler inside whatever code is running, a gc callback too (JAX
  registers one), where the KeyboardInterrupt is printed and dropped: a Ctrl-C during a run's
  start-up was lost that way. The run's handler also remembers it for the loop to act on."""
  import gc
  import signal
  from lora_jax.app.runner import _interrupts_kept

  def callback(phase, info):
    if phase == "start":
      signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the callback

  with _interrupts_kept() as interrupted:
    assert not interrupted()
    gc.callbacks.append(callback)
    try:
      gc.collect()  # the KeyboardInterrupt raised inside the callback does not come out here
    finally:
      gc.callbacks.remove(callback)
    assert interrupted()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_lora_dropout_is_the_adapters_and_dropout_the_heads():
  from lora_jax.app.classify import ClassifyOptions, lora_config
  assert lora_config(ClassifyOptions()).dropout == 0.0  # PEFT's default lora_dropout
  assert lora_config(ClassifyOptions(lora_dropout=0.2, dropout=0.3)).dropout == 0.2


def test_a_damaged_metrics_file_is_named(tmp_path):
  from lora_jax.app.runner import RunError, _saved_summary, saved_config
  (tmp_path / "metrics.json").write_text('{"history": [')
  with pytest.raises(RunError, match=r"metrics\.json is damaged \(JSONDecodeError"):
    _saved_summary(tmp_path, 4)
  (tmp_path / "metrics.json").write_text('{"history": [{"step": 4}, {"step": 6}]}')
  assert _saved_summary(tmp_path, 4)["history"] == [{"step": 4}]  # cut at the restored step
  with pytest.raises(RunError, match=r"is not a run folder \(no config\.json\)"):
    saved_config(tmp_path)
  (tmp_path / "config.json").write_text('{"options": {')
  with pytest.raises(RunError, match=r"config\.json is damaged \(JSONDecodeError"):
    saved_config(tmp_path)
  (tmp_path / "config.json").write_text('{"_name_or_path": "a transformers model"}')
  with pytest.raises(RunError, match=r"config\.json was not written by lora-jax train"):
    saved_config(tmp_path)
