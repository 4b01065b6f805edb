"""The folders ``lora-jax`` writes, and the promise that it touches nothing else.

A *run folder* is ours when its ``config.json`` is the one ``lora-jax train`` writes (a JSON
object with ``options``, ``total_steps`` and the ``lora_jax`` version) and every entry in it is
one a run writes (``RUN_ENTRIES``; event files in ``tensorboard/``, steps in ``checkpoints/``).
Only such a folder is ever replaced (``--overwrite``), and only once the new run has saved its
first checkpoint in a staging folder beside it (``.NAME.new``). A folder that is not a run is
never replaced or deleted; a run folder holding files no run wrote is refused, naming them.
An export (``merge``, ``export-peft``) goes to a new or empty folder, outside every run folder,
checked before any work; it is written into a temporary folder beside it and appears whole or
not at all. Whatever a command made for itself (its lock file, staging and temporary folders,
parent folders it created) is removed when it ends, refused, failed or interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import threading

import jax

from lora_jax import _files

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
RUN_ENTRIES = frozenset({CONFIG, "metrics.jsonl", "metrics.json", "tensorboard", "curves.png",
                         CHECKPOINTS})
_WRITTEN_INSIDE = {  # what a run writes inside its sub-folders
    "tensorboard": re.compile(r"events\.out\.tfevents\..+"),
    CHECKPOINTS: re.compile(r"\d+(\.orbax-checkpoint-tmp.*)?"),
}


class RunError(ValueError):
  """A problem with a run or export folder (one line for the command line)."""


# ----------------------------------------------------------------------- processes


def primary() -> bool:
  """Whether this process writes the run's files and prints (process 0 of a multi-host run)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits for every process of a multi-host run (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def interrupts_deferred():
  """Holds SIGINT (Ctrl-C) until the block is done, then raises KeyboardInterrupt: a save, a
  move into place or a clean-up is never cut midway."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    raise KeyboardInterrupt


# ----------------------------------------------------------------------- what is ours


def is_run(folder) -> bool:
  """Whether ``folder`` holds a ``config.json`` written by ``lora-jax train``."""
  path = pathlib.Path(folder) / CONFIG
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError):
    return False
  return (isinstance(saved, dict) and isinstance(saved.get("options"), dict)
          and "total_steps" in saved and "lora_jax" in saved)


def foreign(folder) -> list[str]:
  """The entries of ``folder`` (relative paths, sorted) that no run writes."""
  folder = pathlib.Path(folder)
  out = []
  for entry in sorted(folder.iterdir()):
    if entry.name not in RUN_ENTRIES:
      out.append(entry.name)
    elif entry.name in _WRITTEN_INSIDE:
      if entry.is_symlink() or not entry.is_dir():
        out.append(entry.name)
        continue
      pattern = _WRITTEN_INSIDE[entry.name]
      out += [f"{entry.name}/{e.name}" for e in sorted(entry.iterdir())
              if not pattern.fullmatch(e.name)]
    elif entry.is_symlink() or not entry.is_file():
      out.append(entry.name)
  return out


def shown(names, limit: int = 4) -> str:
  """``a, b, c and 2 more``."""
  names = list(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def staging(run: pathlib.Path) -> pathlib.Path:
  """Where a new run writes until its first checkpoint: ``runs/.NAME.new``, beside the folder."""
  run = pathlib.Path(run).absolute()
  return run.parent / f".{run.name}.new"


def _old(run: pathlib.Path) -> pathlib.Path:
  run = pathlib.Path(run).absolute()
  return run.parent / f".{run.name}.old"


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
  """Whether ``path`` is ``folder`` or inside it (both resolved)."""
  return path == folder or folder in path.parents


# ----------------------------------------------------------------------- run folders


def check(run, *, overwrite: bool, resume: bool, inputs=None) -> None:
  """Raises RunError, changing nothing, unless the run folder can be used as asked.

  Args:
    run: the ``--out`` folder.
    overwrite: whether a run already there may be replaced.
    resume: whether the run there is continued.
    inputs: ``{flag: path}`` of the files the run reads (``--data``, ``--model``, ...); a new
      run's folder must not hold them.

  Raises:
    RunError: ``run`` is a file or a link; with ``resume``, it holds no run; else it is the
      working directory (or above it), holds an input, is not a run folder but holds files,
      holds a run and ``overwrite`` is not set, or holds files no run wrote (named).
  """
  run = pathlib.Path(run)
  if run.is_symlink():
    raise RunError(f"--out {run} is a symbolic link; give the folder it points to "
                   f"({os.path.realpath(run)}) or another path.")
  if run.exists() and not run.is_dir():
    raise RunError(f"--out {run} is a file, not a folder; a run writes a folder of its own: "
                   f"give a new path.")
  if resume:
    if not (run / CONFIG).exists():
      raise RunError(f"{run} holds no run to resume (no {CONFIG} written by lora-jax train).")
    saved_config(run)  # readable, and a run's
    return
  where = run.resolve()
  if _inside(pathlib.Path.cwd().resolve(), where):
    raise RunError(f"--out {run} is the working directory or a folder above it; a new run "
                   f"replaces its folder as a whole: give a folder inside it, e.g. --out "
                   f"runs/NAME.")
  for name, path in (inputs or {}).items():
    if path and _inside(pathlib.Path(path).resolve(), where):
      raise RunError(f"--out {run} holds the {name} file {path}; a new run must never be "
                     f"able to replace its own inputs: give another --out.")
  for leftover in (staging(run), _old(run)):  # left by a run that was killed (SIGKILL)
    if leftover.is_symlink() or (leftover.exists() and (not leftover.is_dir()
                                                        or foreign(leftover))):
      raise RunError(f"{leftover} is in the way (the name of a run's staging folder, but it "
                     f"holds files no run writes); move it away, then train again.")
  if not run.exists() or not any(run.iterdir()):
    return
  entries = sorted(p.name for p in run.iterdir())
  if not is_run(run):
    raise RunError(f"--out {run} is not a lora-jax run folder (no {CONFIG} written by "
                   f"lora-jax train) and holds {shown(entries)}; lora-jax never replaces such "
                   f"a folder, --overwrite or not: give a new or empty folder.")
  if not overwrite:
    raise RunError(f"output folder {run} already holds files; pass --overwrite to replace "
                   f"them or --resume to continue that run.")
  extra = foreign(run)
  if extra:
    raise RunError(f"--out {run} holds a run and also files no run wrote ({shown(extra)}); "
                   f"--overwrite replaces only what a run wrote: move them out first.")


def prepare(run, *, overwrite: bool, resume: bool, inputs=None) -> None:
  """Checks the run folder again (``check``) and, for a new run, makes an empty staging folder
  beside it (a leftover of a run killed before its first checkpoint is removed: the lock is
  held). The run folder itself is not touched until the new run has saved its first
  checkpoint."""
  check(run, overwrite=overwrite, resume=resume, inputs=inputs)
  if resume:
    return
  sync("lora_jax: run folder checked")  # every process has looked before one changes it
  if primary():
    shutil.rmtree(staging(run), ignore_errors=True)
    staging(run).mkdir(parents=True)
  sync("lora_jax: run folder ready")


class RunLock:
  """An exclusive lock on a run folder, held for the run's life: ``fcntl.flock`` on a file
  beside the folder (``runs/.NAME.lock``, so replacing the folder keeps it), removed when the
  run ends. The kernel drops the lock when its process ends, however it ends (a SIGKILL
  included), so a lock left by a killed run never blocks the next one. Only the primary
  process of a multi-host run locks. Parent folders made for the lock are removed with it
  when they are still empty."""

  def __init__(self, run):
    run = pathlib.Path(run).absolute()
    self.path = run.parent / f".{run.name}.lock"
    self._file = None
    self._made: list[pathlib.Path] = []

  def acquire(self) -> "RunLock":
    if not primary():
      return self
    import fcntl
    self._make_parents()
    self._refuse_foreign()
    while True:
      f = self.path.open("a+")
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        self._remove_parents()
        raise RunError(f"run folder {self.path.parent / self.path.name[1:-5]} is in use by "
                       f"{holder}; wait for it to finish or stop it (two runs must not write "
                       f"one folder).") from None
      try:  # the holder before us removed the file on release: lock the one there now
        same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      f.close()
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}")
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      self.path.unlink(missing_ok=True)  # still held: no one else can have locked it
      self._file.close()  # closing the file drops the flock
      self._file = None
      self._remove_parents()

  def _make_parents(self) -> None:
    missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
    if not (self.path.parent.parents[len(missing) - 1] if missing else self.path.parent).is_dir():
      raise RunError(f"--out {self.path.parent / self.path.name[1:-5]}: a folder above it is a "
                     f"file; give a path inside a folder.")
    for p in reversed(missing):
      with contextlib.suppress(FileExistsError):
        p.mkdir()
        self._made.append(p)

  def _refuse_foreign(self) -> None:
    """A file by the lock's name that no run wrote (ours say which process held them)."""
    try:
      text = self.path.read_text() if not self.path.is_symlink() else None
    except FileNotFoundError:
      return
    except (OSError, UnicodeDecodeError):
      text = None
    if text is None or (text and not re.fullmatch(r"process \d+ on \S+", text)):
      self._remove_parents()
      raise RunError(f"{self.path} is in the way: it has the name of a run's lock file but no "
                     f"run wrote it; move it away, then train again.")

  def _remove_parents(self) -> None:
    """The parent folders this lock made, if nothing else was put in them."""
    for p in reversed(self._made):
      with contextlib.suppress(OSError):
        p.rmdir()
    self._made = []

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class Folder:
  """The folder a run writes: the staging folder of a new run until ``promote`` (after its
  first checkpoint) moves it into place, replacing an old run only then; ``discard`` removes
  the staging folder of a run that ended before that."""

  def __init__(self, run: pathlib.Path, *, staged: bool):
    self.run, self.staged = pathlib.Path(run), staged
    self.path = staging(run) if staged else self.run

  def promote(self) -> None:
    if not self.staged:
      return
    sync("lora_jax: first checkpoint saved")
    if primary():
      if self.run.exists() and any(self.run.iterdir()):
        extra = foreign(self.run) if is_run(self.run) else sorted(
            p.name for p in self.run.iterdir())
        if extra:  # put there while this run started: the old folder stays as it was
          raise RunError(f"{self.run} gained files no run wrote ({shown(extra)}) while this "
                         f"run started; it was left as it was and this run stopped.")
      old = _old(self.run)
      shutil.rmtree(old, ignore_errors=True)
      if self.run.exists():
        self.run.rename(old)
      self.path.rename(self.run)
      shutil.rmtree(old, ignore_errors=True)
    sync("lora_jax: run folder in place")
    self.path, self.staged = self.run, False

  def discard(self) -> None:
    if self.staged and primary():
      shutil.rmtree(self.path, ignore_errors=True)


def saved_config(run) -> dict:
  """A run folder's ``config.json`` (its options and total steps).

  Raises:
    RunError: the folder holds no run, or its config is not readable JSON (named).
  """
  path = pathlib.Path(run) / CONFIG
  try:
    saved = json.loads(path.read_text())
  except FileNotFoundError:
    raise RunError(f"{run} is not a run folder (no {CONFIG}); train one with lora-jax "
                   f"train.") from None
  except (OSError, ValueError) as e:
    raise RunError(f"{path} is damaged ({type(e).__name__}: {e}); the run's options cannot be "
                   f"read.") from None
  if not is_run(run):
    raise RunError(f"{run} is not a run folder ({path} was not written by lora-jax train); "
                   f"give a folder that lora-jax train wrote.")
  return saved


# ----------------------------------------------------------------------- exports


def export_folder(run, out) -> pathlib.Path:
  """``out``, checked before any work: a new or empty folder outside every run folder.

  Raises:
    RunError: ``out`` is a file or a link, holds files, or is (or is inside) a run folder.
  """
  out, run = pathlib.Path(out), pathlib.Path(run)
  if out.is_symlink() or (out.exists() and not out.is_dir()):
    raise RunError(f"--out {out} is {'a link' if out.is_symlink() else 'a file'}; an export "
                   f"writes a folder of its own: give a new or empty folder.")
  for folder in (out, *out.resolve().parents):
    if folder.resolve() == run.resolve() or (folder / CHECKPOINTS).is_dir():
      raise RunError(f"--out {out} is inside the run folder {folder}; write the export "
                     f"somewhere else (it would overwrite the run's files).")
  if out.exists() and any(out.iterdir()):
    held = shown(sorted(p.name for p in out.iterdir()))
    raise RunError(f"--out {out} already holds files ({held}); an export never replaces "
                   f"files: give a new or empty folder.")
  return out


class staged:
  """A temporary folder beside ``out`` whose files become ``out`` only once all are written
  (a rename, or a move into an empty ``out``), with the umask's ordinary modes; on any
  failure, Ctrl-C included, the temporary folder is removed and ``out`` is not made."""

  def __init__(self, out: pathlib.Path):
    self.out = pathlib.Path(out)
    self._made: list[pathlib.Path] = []

  def __enter__(self) -> pathlib.Path:
    import tempfile
    missing = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]
    for p in reversed(missing):
      p.mkdir()
      self._made.append(p)
    self.tmp = pathlib.Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}."))
    return self.tmp

  def __exit__(self, kind, *_):
    with interrupts_deferred():
      try:
        if kind is None:
          self._move()
      finally:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if kind is not None or self.tmp.exists() or not self.out.exists():
          for p in reversed(self._made):
            with contextlib.suppress(OSError):
              p.rmdir()

  def _move(self) -> None:
    _files.publish(self.tmp)
    if self.out.is_symlink() or (self.out.exists() and (not self.out.is_dir()
                                                        or any(self.out.iterdir()))):
      raise RunError(f"--out {self.out} appeared while the export was written; it was left "
                     f"as it is and nothing was exported.")
    if not self.out.exists():
      self.tmp.rename(self.out)
      return
    for f in self.tmp.iterdir():  # an empty folder of the user's: only files are added
      f.rename(self.out / f.name)
