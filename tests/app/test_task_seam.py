"""The task seam: a task registered from this file alone (a tiny linear regression on random
data) trains, evaluates, merges and exports through ``lora-jax`` (``cli.main``), with no change
to lora_jax/. The results are checked against float64 numbers computed here."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lora_jax
from lora_jax.app import cli, saved, tasks
from lora_jax.app.data import jsonl_rows
from lora_jax.app.options import RunOptions, option

IN, OUT = 6, 4


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT, name="proj")(x)


def base_params():
  """The frozen base: the same every time (a saved run's base identity is checked)."""
  return Net().init(jax.random.key(0), jnp.zeros((1, IN)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyOptions(RunOptions):
  data: str | None = option(None, "a .jsonl file of {x, y} rows")
  val: str | None = option(None, "validation rows")


def read(path):
  rows = [row for _, row in jsonl_rows(path)]
  return (np.asarray([r["x"] for r in rows], np.float32),
          np.asarray([r["y"] for r in rows], np.float32))


class Toy:
  """The runner's task: a linear layer with LoRA on its kernel, the mean squared error."""

  headline = "val_mse"
  base_name = "toy-linear"

  def __init__(self, o: ToyOptions, *, total_steps: int | None = None):
    self.options = o
    self.module = Net()
    self.lora_config = lora_jax.LoraConfig(targets=("proj",), rank=o.rank, alpha=o.alpha)
    self.base, self.trainable = lora_jax.init_with_base(self.lora_config, base_params(),
                                                        key=jax.random.key(o.seed))
    self.initial = None
    self.total_steps = total_steps
    if total_steps is None:
      self.train_x, self.train_y = read(o.data)
      self.val_x, self.val_y = read(o.val)
      self.total_steps = o.steps or math.ceil(o.epochs * len(self.train_x) / o.batch_size)

  def loss(self, params, batch):
    return jnp.mean((self.module.apply(params, batch["x"]) - batch["y"]) ** 2)

  def batch(self, step, key):
    n, b = len(self.train_x), self.options.batch_size
    index = np.arange(step * b, (step + 1) * b) % n
    return {"x": self.train_x[index], "y": self.train_y[index]}

  def batch_size(self, batch):
    return len(batch["x"])

  def mse(self, trainable, x, y) -> float:
    return float(lora_jax.lora(self.loss)(self.base, trainable, {"x": x, "y": y}))

  def evaluate(self, trainable):
    return {"val_mse": self.mse(trainable, self.val_x, self.val_y)}

  def counts(self):
    return lora_jax.count(self.base, self.trainable, config=self.lora_config)

  def place(self, trainable):
    return trainable

  def describe(self):
    return {"task": "toy"}

  def sizes(self):
    return {"train_examples": len(self.train_x), "val_examples": len(self.val_x)}


def load(run):
  return saved.load(run, lambda config: Toy(ToyOptions.from_dict(config["options"]),
                                            total_steps=config["total_steps"]))


def evaluate(runs, files, args):
  out = []
  for run, file in zip(runs, files):
    task, trainable = load(run)
    out.append({"mse": task.mse(trainable, *read(file or task.options.val))})
  return out


def write_merged(task, trainable, folder):
  np.save(folder / "kernel.npy", lora_jax.merge(task.base, trainable)["params"]["proj"]["kernel"])


def merge(run, out):
  return saved.export(run, out, load, write_merged) / "kernel.npy"


def export_peft(run, out):
  return saved.export_peft(run, out, load, base_model=lambda task: task.base_name,
                           task_type=None)


@pytest.fixture
def toy_task():
  record = tasks.register(tasks.Task(
      names=("toy",), options=ToyOptions, new=Toy, evaluate=evaluate, merge=merge,
      export_peft=export_peft, summary="toy (a linear regression)", about="a toy regression"))
  yield record
  tasks.unregister("toy")


def write_rows(path, x, y):
  path.write_text("".join(json.dumps({"x": a.tolist(), "y": b.tolist()}) + "\n"
                          for a, b in zip(x, y)))
  return str(path)


def run_main(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_a_task_registered_outside_the_app_trains_evaluates_merges_and_exports(
    toy_task, tmp_path, capsys):
  rng = np.random.default_rng(0)
  w0 = np.asarray(base_params()["params"]["proj"]["kernel"], np.float64)
  b0 = np.asarray(base_params()["params"]["proj"]["bias"], np.float64)
  target = w0 + 0.5 * rng.normal(size=(IN, 2)) @ rng.normal(size=(2, OUT))  # a rank-2 change
  x = rng.normal(size=(96, IN))
  y = x @ target + b0
  train = write_rows(tmp_path / "train.jsonl", x[:64], y[:64])
  val = write_rows(tmp_path / "val.jsonl", x[64:], y[64:])
  before = float(np.mean((x[64:] @ w0 + b0 - y[64:]) ** 2))
  run = tmp_path / "run"

  code, out, err = run_main(capsys, "train", "--task", "toy", "--data", train, "--val", val,
                            "--rank", 2, "--alpha", 2, "--lr", 0.05, "--steps", 60,
                            "--batch-size", 16, "--eval-every", 30, "--out", run)
  assert code == 0, err
  saved = json.loads((run / "config.json").read_text())
  assert saved["task"] == "toy" and saved["options"]["rank"] == 2
  summary = json.loads((run / "metrics.json").read_text())
  assert summary["val_mse"] < 0.2 * before  # the adapter learned most of the change

  code, out, err = run_main(capsys, "merge", run, "--out", tmp_path / "merged")
  assert code == 0 and out.strip() == f"wrote {tmp_path / 'merged' / 'kernel.npy'}", err
  merged = np.load(tmp_path / "merged" / "kernel.npy")

  code, out, err = run_main(capsys, "export-peft", run, "--out", tmp_path / "peft")
  assert code == 0, err
  tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert (config["base_model_name_or_path"], config["r"]) == ("toy-linear", 2)
  a = tensors["base_model.model.proj.lora_A.weight"].astype(np.float64).T  # (in, r)
  b = tensors["base_model.model.proj.lora_B.weight"].astype(np.float64).T  # (r, out)
  want = w0 + config["lora_alpha"] / config["r"] * a @ b  # the float64 merge, from PEFT's files
  np.testing.assert_allclose(merged, want, rtol=0, atol=1e-5)

  code, out, err = run_main(capsys, "eval", run, "--data", val)
  assert code == 0, err
  mse = float(np.mean((x[64:].astype(np.float32).astype(np.float64) @ want + b0 - y[64:]) ** 2))
  found = re.fullmatch(r"mse (\S+) on (.+)\n", out)
  assert found and found[2] == val, out
  assert abs(float(found[1]) - mse) < 1e-4 + 1e-4 * mse
  assert abs(mse - summary["val_mse"]) < 1e-4 + 1e-3 * mse  # the run's own evaluation agrees


def test_the_task_is_offered_and_dispatched_only_while_registered(toy_task, tmp_path, capsys):
  assert "toy" in [n for r in tasks.registered() for n in r.names]
  assert tasks.get("toy") is toy_task and tasks.default() != "toy"
  code, _, err = run_main(capsys, "train", "--task", "toy", "--pooling", "mean", "--out",
                          tmp_path / "r")
  assert code == 2 and "--pooling applies to --task classify, not toy" in err
  tasks.unregister("toy")
  with pytest.raises(SystemExit) as exit_:  # argparse's refusal: one line, exit 2
    cli.main(["train", "--task", "toy", "--out", str(tmp_path / "r")])
  assert exit_.value.code == 2 and "invalid choice: 'toy'" in capsys.readouterr().err
  with pytest.raises(ValueError, match="unknown task 'toy'"):
    tasks.get("toy")
  tasks.register(toy_task)  # the fixture unregisters it again
