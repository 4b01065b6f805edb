"""orbax adapter checkpoints: round trip, retention, atomicity, resume, sharding, bad input."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lora_jax
from _fixtures import CHECKPOINT_CONFIG as CONFIG, checkpoint_base as _base, damage as _damage
from lora_jax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _trained(base):
  """Adapters after two optax steps (B != 0) and the optimizer state."""
  adapters = lora_jax.init(CONFIG, base, key=jax.random.key(1))
  optimizer = optax.adam(1e-2)
  loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["params"]["l0"]["kernel"])  # noqa: E731
                              @ p["params"]["l1"]["kernel"]) ** 2
  step = lora_jax.train_step(loss, optimizer)
  opt_state = optimizer.init(adapters)
  for i in range(2):
    out = step(base, adapters, opt_state, jnp.ones((3, base["params"]["l0"]["kernel"].shape[0])))
    adapters, opt_state = out.adapters, out.opt_state
  return adapters, opt_state, optimizer


def _equal(x, y):
  lx, ly = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
  return (jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)
          and all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(lx, ly)))


def test_round_trip_is_exact(tmp_path):
  base = _base()
  adapters, opt_state, optimizer = _trained(base)
  assert float(jnp.abs(adapters["params"]["l0"]["kernel"].b).max()) > 0
  checkpoint.save(tmp_path, 7, adapters, config=CONFIG, base=base, opt_state=opt_state,
                  data_position={"epoch": 1, "offset": 96}, base_name="toy")
  r = checkpoint.restore(tmp_path, base=base, opt_state=jax.eval_shape(optimizer.init, adapters))
  assert _equal(r.adapters, adapters) and _equal(r.opt_state, opt_state)
  assert jax.tree_util.tree_structure(r.adapters) == jax.tree_util.tree_structure(adapters)
  assert (r.step, r.data_position, r.config) == (7, {"epoch": 1, "offset": 96}, CONFIG)
  assert r.meta["base"]["name"] == "toy"
  # the static parts (scale with rsLoRA and a rank pattern) come back too
  assert r.adapters["params"]["l1"]["kernel"].scale == pytest.approx(4.0 / 2.0)
  assert r.adapters["params"]["l1"]["kernel"].rank == 4


def test_restore_without_optimizer_state_and_merge_matches(tmp_path):
  base = _base()
  adapters, _, _ = _trained(base)
  checkpoint.save(tmp_path, 0, adapters, config=CONFIG, base=base)
  r = checkpoint.restore(tmp_path, base=base)
  assert r.opt_state is None and r.data_position is None
  np.testing.assert_array_equal(lora_jax.merge(base, r.adapters)["params"]["l0"]["kernel"],
                                lora_jax.merge(base, adapters)["params"]["l0"]["kernel"])


def test_base_is_never_written(tmp_path):
  base = _base(d_in=1024, d_mid=512)  # 2 MiB of base kernels, ~20 KiB of adapters
  # trained, so B != 0: orbax writes no data at all for an array equal to its fill value (0),
  # and a fresh adapter's B would make the lower bound below meaningless
  adapters, _, _ = _trained(base)
  checkpoint.save(tmp_path, 0, adapters, config=CONFIG, base=base)
  written = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
  base_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(base))
  adapter_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(adapters))
  assert written < base_bytes / 10
  assert written > adapter_bytes / 2  # random floats barely compress: the adapters are there


def test_keeps_the_newest_n(tmp_path):
  base = _base()
  adapters = lora_jax.init(CONFIG, base, key=jax.random.key(1))
  for step in range(5):
    checkpoint.save(tmp_path, step, adapters, config=CONFIG, base=base, keep=2)
  assert checkpoint.steps(tmp_path) == [3, 4]
  assert checkpoint.restore(tmp_path, base=base).step == 4
  assert checkpoint.restore(tmp_path, base=base, step=3).step == 3


CRASH = """
import os, sys, jax
import orbax.checkpoint._src.path.async_path as async_path
import lora_jax
from lora_jax import checkpoint
sys.path.insert(0, {tests!r})
from _fixtures import CHECKPOINT_CONFIG as CONFIG, checkpoint_base as _base
base = _base()
adapters = lora_jax.init(CONFIG, base, key=jax.random.key(1))
checkpoint.save({dir!r}, 1, adapters, config=CONFIG, base=base, data_position=1)
async def die(*args, **kwargs):  # the process dies with step 2 written but not yet in place
  os.kill(os.getpid(), 9)
async_path.rename = die
checkpoint.save({dir!r}, 2, adapters, config=CONFIG, base=base, data_position=2)
"""


def test_a_save_killed_midway_leaves_the_last_good_checkpoint(tmp_path):
  code = CRASH.format(tests=str(ROOT / "tests"), dir=str(tmp_path))
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == -9, done.stderr[-2000:]
  leftovers = [p.name for p in tmp_path.iterdir() if p.name != "1"]
  assert leftovers and all("tmp" in name for name in leftovers)  # step 2's unfinished folder
  assert checkpoint.steps(tmp_path) == [1]
  r = checkpoint.restore(tmp_path, base=_base())
  assert (r.step, r.data_position) == (1, 1)


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
  script = ROOT / "tests" / "_resume.py"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for phase in ("straight", "first", "second"):
    subprocess.run([sys.executable, str(script), str(tmp_path), phase, "3"], check=True,
                   env=env, capture_output=True)
  straight, resumed = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
  assert len(straight.files) == len(resumed.files) > 10
  for name in straight.files:
    assert straight[name].tobytes() == resumed[name].tobytes(), name
  first = np.load(tmp_path / "straight.npz")
  assert any(np.abs(first[n]).max() > 0 for n in first.files)


def test_restore_onto_a_sharded_mesh(tmp_path):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  base = _base()
  adapters, opt_state, optimizer = _trained(base)
  checkpoint.save(tmp_path, 0, adapters, config=CONFIG, base=base, opt_state=opt_state)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))

  def sharding(path, shape):  # A (in, r): shard the input axis; B (r, out): replicated
    return NamedSharding(mesh, P("data", None) if path.endswith("/a") else P())

  r = checkpoint.restore(tmp_path, base=base, sharding=sharding)
  a, b = r.adapters["params"]["l0"]["kernel"].a, r.adapters["params"]["l0"]["kernel"].b
  assert a.sharding == NamedSharding(mesh, P("data", None)) and len(a.addressable_shards) == 8
  assert b.sharding == NamedSharding(mesh, P())
  assert _equal(r.adapters, adapters)
  one = checkpoint.restore(tmp_path, base=base, sharding=jax.sharding.SingleDeviceSharding(
      jax.devices()[3]))
  assert one.adapters["params"]["l0"]["kernel"].a.devices() == {jax.devices()[3]}


def test_a_different_base_is_refused(tmp_path):
  base = _base()
  adapters = lora_jax.init(CONFIG, base, key=jax.random.key(1))
  checkpoint.save(tmp_path, 0, adapters, config=CONFIG, base=base, base_name="toy-16")
  with pytest.raises(ValueError, match=r"adapters for toy-16.*mis-shaped parameters: "
                                       r"params/l0/kernel \(32, 8\) \(adapters need \(16, 8\)\)"):
    checkpoint.restore(tmp_path, base=_base(d_in=32))
  renamed = {"params": {"first": base["params"]["l0"], "l1": base["params"]["l1"]}}
  with pytest.raises(ValueError, match="missing parameters: params/l0/kernel"):
    checkpoint.restore(tmp_path, base=renamed)


def test_bad_input_names_what_and_where(tmp_path):
  base = _base()
  adapters, _, optimizer = _trained(base)
  with pytest.raises(FileNotFoundError, match="no complete lora_jax checkpoint in"):
    checkpoint.restore(tmp_path / "nothing", base=base)
  with pytest.raises(ValueError, match="step must be an integer >= 0"):
    checkpoint.save(tmp_path, -1, adapters, config=CONFIG, base=base)
  with pytest.raises(ValueError, match="keep must be an integer >= 1"):
    checkpoint.save(tmp_path, 0, adapters, config=CONFIG, base=base, keep=0)
  with pytest.raises(ValueError, match="data_position must be JSON-serializable"):
    checkpoint.save(tmp_path, 0, adapters, config=CONFIG, base=base, data_position=object())
  with pytest.raises(ValueError, match="paths params/l0/kernel, params/l1/kernel are not in"):
    checkpoint.save(tmp_path, 0, adapters, config=CONFIG, base={"other": jnp.ones(2)})
  assert checkpoint.steps(tmp_path) == []  # nothing was written by the refused saves
  checkpoint.save(tmp_path, 0, adapters, config=CONFIG, base=base)
  with pytest.raises(ValueError, match=r"step 5 is not in .*saved steps: \[0\]"):
    checkpoint.restore(tmp_path, base=base, step=5)
  with pytest.raises(ValueError, match="has no optimizer state"):
    checkpoint.restore(tmp_path, base=base, opt_state=optimizer.init(adapters))


def _two_steps(tmp_path):
  base = _base()
  first = _trained(base)[0]
  second = jax.tree_util.tree_map(lambda x: x + 1.0, first)
  checkpoint.save(tmp_path, 0, first, config=CONFIG, base=base)
  checkpoint.save(tmp_path, 1, second, config=CONFIG, base=base)
  return base, first


def test_damaged_description_is_reported_and_restore_falls_back(tmp_path):
  base, first = _two_steps(tmp_path)
  meta = next((tmp_path / "1" / "meta").glob("*"))
  meta.write_text(meta.read_text()[:20])  # truncated JSON
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r"1: cannot read its description"):
    checkpoint.restore(tmp_path, base=base, step=1)
  with pytest.warns(checkpoint.CheckpointFallbackWarning,
                    match=r"restored step 0 of .*, the newest intact one; newer steps are "
                          r"damaged: .*1: cannot read its description"):
    restored = checkpoint.restore(tmp_path, base=base)
  assert restored.step == 0
  assert _equal(restored.adapters, first)


# orbax leaves a coroutine behind when tensorstore fails to open a deleted file; it is
# collected later with "Event loop is closed" (or, when the collection lands inside
# pytest.warns, as "coroutine ... was never awaited": seen once under load), which is not
# ours to fix.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_damaged_arrays_are_detected_and_restore_falls_back(tmp_path, how):
  base, first = _two_steps(tmp_path)
  _damage(tmp_path / "1" / "trainable", how)
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r"1: (cannot read the saved arrays|"
                                                         r"trainable array \d+ does not match "
                                                         r"the checksum)"):
    checkpoint.restore(tmp_path, base=base, step=1)
  with pytest.warns(checkpoint.CheckpointFallbackWarning, match=r"restored step 0 of"):
    restored = checkpoint.restore(tmp_path, base=base)
  assert _equal(restored.adapters, first)
  _damage(tmp_path / "0" / "trainable", how)
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r"every saved step is damaged"):
    checkpoint.restore(tmp_path, base=base)
