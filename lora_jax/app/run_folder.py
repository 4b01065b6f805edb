"""The folders ``lora-jax`` writes, and the promise that it touches nothing else.

A *run folder* is ours when its ``config.json`` is the one ``lora-jax train`` writes (a JSON
object with ``options``, ``total_steps`` and the ``lora_jax`` version) and every entry in it is
one a run writes (``LAYOUT``: its files, event files in ``tensorboard/``, orbax's steps in
``checkpoints/``).
Only such a folder is ever replaced (``--overwrite``), and only once the new run has saved its
first checkpoint in a staging folder beside it (``.NAME.new``). A folder that is not a run is
never replaced or deleted; a run folder holding files no run wrote is refused, naming them.
Exports go to a new or empty folder outside every run (``lora_jax.app.exports``). Whatever a
command made for itself (its lock file, staging and temporary folders, parent folders it
created) is removed when it ends, refused, failed or interrupted. Every check of what a run
folder is (``is_run``), where its checkpoints are (``adapters_at``) and what its
``config.json`` says (``saved_config``) is here.
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
import sys
import threading

import jax


CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
# What a run writes, as {name pattern: None for a file, or what the folder holds}: its own files,
# TensorBoard's event files and lora_jax.checkpoint's orbax steps (orbax 0.12's layout).
_HASHES = {r"[0-9a-f]{32}": None}
_ITEM = {r"_sharding|commit_success\.txt|manifest\.ocdbt|_METADATA|metadata": None,
         r"array_metadatas": {r"process_\d+": None}, r"d": _HASHES,
         r"ocdbt\.process_\d+": {r"manifest\.ocdbt": None, r"d": _HASHES}}
_STEP = {r"_CHECKPOINT_METADATA|commit_success\.txt": None, r"[a-z_]+": _ITEM}
LAYOUT = {r"config\.json|metrics\.jsonl|metrics\.json|curves\.png": None,
          r"tensorboard": {r"events\.out\.tfevents\..+": None},
          CHECKPOINTS: {r"\d+(\.orbax-checkpoint-tmp.*)?": _STEP}}
RUN_ENTRIES = frozenset({CONFIG, "metrics.jsonl", "metrics.json", "curves.png", "tensorboard",
                         CHECKPOINTS})


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
def interrupts_kept():
  """Raises KeyboardInterrupt on SIGINT as Python does, and also remembers it: yields a
  function telling whether one arrived. Python runs signal handlers between any two bytecodes,
  also inside a garbage-collector callback (JAX registers one) where the exception is printed
  and dropped, so a Ctrl-C could be lost; callers check at their safe points. Such a dropped
  Ctrl-C is not printed (it is remembered)."""
  if threading.current_thread() is not threading.main_thread():
    yield lambda: False
    return
  received = []

  def handler(*_):
    received.append(True)
    raise KeyboardInterrupt

  def unraisable(info):
    if not isinstance(info.exc_value, KeyboardInterrupt):
      hook(info)

  previous, hook = signal.signal(signal.SIGINT, handler), sys.unraisablehook
  sys.unraisablehook = unraisable
  try:
    yield lambda: bool(received)
  finally:
    signal.signal(signal.SIGINT, previous)
    sys.unraisablehook = hook


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
  """The entries under ``folder`` (relative paths, sorted) that no run writes (``LAYOUT``):
  other names, a folder where a run writes a file or the other way round, links."""
  return _unwritten(pathlib.Path(folder), LAYOUT, "")


def _unwritten(folder: pathlib.Path, layout: dict, at: str) -> list[str]:
  out = []
  for entry in sorted(folder.iterdir()):
    rel = at + entry.name
    inner = next((v for k, v in layout.items() if re.fullmatch(k, entry.name)), False)
    if inner is False or entry.is_symlink():
      out.append(rel)
    elif inner is None:
      if not entry.is_file():
        out.append(rel)
    elif not entry.is_dir():
      out.append(rel)
    else:
      out += _unwritten(entry, inner, rel + "/")
  return out


def _replaceable(run: pathlib.Path) -> list[str]:
  """What stops ``run`` (an existing, non-empty folder) from being replaced by a new run: all
  its entries when it holds no run, else the files no run wrote; [] when nothing does."""
  if not is_run(run):
    return sorted(p.name for p in run.iterdir())
  return foreign(run)


def shown(names, limit: int = 4) -> str:
  """``a, b, c and 2 more``."""
  names = list(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _beside(run, suffix: str) -> pathlib.Path:
  """``runs/.NAME.SUFFIX``: the lock file, staging folder and old run of ``runs/NAME``."""
  run = pathlib.Path(run).absolute()
  return run.parent / f".{run.name}.{suffix}"


def staging(run) -> pathlib.Path:
  """Where a new run writes until its first checkpoint: ``runs/.NAME.new``, beside the folder."""
  return _beside(run, "new")


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
  """Whether ``path`` is ``folder`` or inside it (both resolved)."""
  return path == folder or folder in path.parents


def _run_above(path: pathlib.Path) -> pathlib.Path | None:
  """The run folder ``path`` is inside (resolved), if any."""
  return next((p for p in path.resolve().parents if is_run(p)), None)


def _writable_parent(path: pathlib.Path, flag: str) -> list[pathlib.Path]:
  """The missing folders above ``path`` (deepest first), once the nearest existing one is
  known to be a folder this process may write in.

  Raises:
    RunError: it is a file, or not writable.
  """
  path = pathlib.Path(path).absolute()
  missing = [p for p in path.parents if not p.exists()]
  nearest = path.parents[len(missing)]
  if not nearest.is_dir():
    raise RunError(f"{flag} {path}: {nearest} above it is a file; give a path inside a folder.")
  if not os.access(nearest, os.W_OK | os.X_OK):
    raise RunError(f"{flag} {path}: {nearest} is not writable by this user; give a folder "
                   f"you may write in.")
  return missing


def _make(folders: list[pathlib.Path]) -> list[pathlib.Path]:
  """Makes the missing ``folders`` (deepest first), returning those this call made."""
  made = []
  for p in reversed(folders):
    with contextlib.suppress(FileExistsError):
      p.mkdir()
      made.append(p)
  return made


def _unmake(made: list[pathlib.Path]) -> None:
  """Removes the folders ``_make`` made, where nothing else was put in them."""
  for p in reversed(made):
    with contextlib.suppress(OSError):
      p.rmdir()


# ----------------------------------------------------------------------- run folders


def check(run, *, overwrite: bool, resume: bool, inputs=None) -> None:
  """Raises RunError, changing nothing, unless the run folder can be used as asked.

  Args:
    run: the ``--out`` folder.
    overwrite: whether a run already there may be replaced.
    resume: whether the run there is continued.
    inputs: ``{flag: path}`` of the files the run reads (``--data``, ``--model``, ...); a new
      run's folder (and its staging folder) must not hold them.

  Raises:
    RunError: ``run`` is a file or a link, or inside another run; with ``resume``, it holds
      no run; else it is the working directory (or above it), holds an input, is not a run
      folder but holds files, holds a run and ``overwrite`` is not set, or holds files no run
      wrote (named).
  """
  run = pathlib.Path(run)
  if run.is_symlink():
    raise RunError(f"--out {run} is a symbolic link; give the folder it points to "
                   f"({os.path.realpath(run)}) or another path.")
  if run.exists() and not run.is_dir():
    raise RunError(f"--out {run} is a file, not a folder; a run writes a folder of its own: "
                   f"give a new path.")
  above = _run_above(run)
  if above is not None:
    raise RunError(f"--out {run} is inside the run folder {above}; give a folder outside it.")
  if resume:
    if not (run / CONFIG).exists():
      raise RunError(f"{run} holds no run to resume (no {CONFIG} written by lora-jax train).")
    saved_config(run)  # readable, and a run's
    return
  _writable_parent(run, "--out")
  where = run.resolve()
  if _inside(pathlib.Path.cwd().resolve(), where):
    raise RunError(f"--out {run} is the working directory or a folder above it; a new run "
                   f"replaces its folder as a whole: give a folder inside it, e.g. --out "
                   f"runs/NAME.")
  for name, path in (inputs or {}).items():
    found = pathlib.Path(path).resolve()
    for folder in (where, staging(run).resolve(), _beside(run, "old").resolve()):
      if _inside(found, folder):
        raise RunError(f"--out {run} holds the {name} file {path}; a new run must never be "
                       f"able to replace its own inputs: give another --out.")
  for leftover in (staging(run), _beside(run, "old")):  # left by a killed run (SIGKILL)
    if leftover.is_symlink() or (leftover.exists() and (not leftover.is_dir()
                                                        or foreign(leftover))):
      raise RunError(f"{leftover} is in the way (the name of a run's staging folder, but it "
                     f"holds files no run writes); move it away, then train again.")
  if not run.exists() or not any(run.iterdir()):
    return
  if not is_run(run):
    raise RunError(f"--out {run} is not a lora-jax run folder (no {CONFIG} written by "
                   f"lora-jax train) and holds {shown(_replaceable(run))}; lora-jax never "
                   f"replaces such a folder, --overwrite or not: give a new or empty folder.")
  if not overwrite:
    raise RunError(f"output folder {run} already holds files; pass --overwrite to replace "
                   f"them or --resume to continue that run.")
  extra = foreign(run)
  if extra:
    raise RunError(f"--out {run} holds a run and also files no run wrote ({shown(extra)}); "
                   f"--overwrite replaces only what a run wrote: move them out first.")


class RunLock:
  """An exclusive lock on a run folder, held for the run's life: ``fcntl.flock`` on a file
  beside the folder (``runs/.NAME.lock``, so replacing the folder keeps it), removed when the
  run ends. The kernel drops the lock when its process ends, however it ends (a SIGKILL
  included), so a lock left by a killed run never blocks the next one. Only the primary
  process of a multi-host run locks. Parent folders made for the lock are removed with it
  when they are still empty."""

  def __init__(self, run):
    self.run = pathlib.Path(run)
    self.path = _beside(run, "lock")
    self._file = None
    self._made: list[pathlib.Path] = []

  def acquire(self) -> "RunLock":
    if not primary():
      return self
    import fcntl
    missing = _writable_parent(self.run, "--out")
    self._refuse_foreign()
    self._made = _make(missing)
    while True:
      f = self.path.open("a+")
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        _unmake(self._made)
        raise RunError(f"run folder {self.run} is in use by {holder}; wait for it to finish "
                       f"or stop it (two runs must not write one folder).") from None
      if self._ours(f):
        break
      f.close()  # the holder before us removed the file on release: lock the one there now
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}")
    f.flush()
    self._file = f
    return self

  def _ours(self, f) -> bool:
    """Whether the lock's path still names the file ``f`` has open."""
    try:
      return os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
      return False

  def release(self) -> None:
    if self._file is not None:
      if self._ours(self._file):  # still held: no one else can have locked it
        self.path.unlink(missing_ok=True)
      self._file.close()  # closing the file drops the flock
      self._file = None
      _unmake(self._made)

  def _refuse_foreign(self) -> None:
    """A file by the lock's name that no run wrote (ours say which process held them)."""
    try:
      text = self.path.read_text() if not self.path.is_symlink() else None
    except FileNotFoundError:
      return
    except (OSError, UnicodeDecodeError):
      text = None
    if text is None or (text and not re.fullmatch(r"process \d+ on \S+", text)):
      raise RunError(f"{self.path} is in the way: it has the name of a run's lock file but no "
                     f"run wrote it; move it away, then train again.")

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class Folder:
  """The folder a run writes. A new run writes into a staging folder beside it (``open``)
  until ``promote`` (after its first checkpoint) puts it in place, replacing an old run only
  then; ``discard`` removes the staging folder of a run that ended before that."""

  def __init__(self, run, *, staged: bool):
    self.run, self.staged = pathlib.Path(run), staged
    self.path = staging(run) if staged else self.run
    self._opened = False

  def open(self, *, overwrite: bool, inputs=None) -> None:
    """Checks the run folder again (``check``, now under the lock) and, for a new run, makes
    the empty staging folder (a leftover of a killed run, holding only what a run writes, is
    removed first)."""
    check(self.run, overwrite=overwrite, resume=not self.staged, inputs=inputs)
    if not self.staged:
      return
    sync("lora_jax: run folder checked")  # every process has looked before one changes it
    if primary():
      with interrupts_deferred():
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        self._opened = True
    sync("lora_jax: run folder ready")

  def promote(self) -> None:
    if not self.staged:
      return
    sync("lora_jax: first checkpoint saved")
    if primary():
      self._promote()
    sync("lora_jax: run folder in place")
    self.path, self.staged = self.run, False

  def _promote(self) -> None:
    run = self.run
    if run.exists() and any(run.iterdir()):
      extra = _replaceable(run)
      if extra:  # put there while this run started: the old folder stays as it was
        raise RunError(f"{run} gained files no run wrote ({shown(extra)}) while this run "
                       f"started; it was left as it was and this run stopped.")
    if run.is_dir() and not any(run.iterdir()):  # the user's empty folder (a mount point?)
      for entry in self.path.iterdir():  # keeps it, its mode and owner: only entries move in
        shutil.move(entry, run / entry.name)
      self.path.rmdir()
      return
    old = _beside(run, "old")
    shutil.rmtree(old, ignore_errors=True)
    if run.exists():
      run.rename(old)
    self.path.rename(run)
    shutil.rmtree(old, ignore_errors=True)

  def discard(self) -> None:
    if self.staged and self._opened and primary():
      with interrupts_deferred():
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


def adapters_at(path) -> pathlib.Path:
  """The folder ``lora_jax.bank.read`` reads for ``path``: a run's ``checkpoints/``, else
  ``path`` itself (a PEFT or lora_jax checkpoint folder).

  Raises:
    RunError: a run trained on a residual base (PiSSA / OLoRA), whose adapters do not act on
      the original base.
  """
  path = pathlib.Path(path)
  if not is_run(path):
    return path
  init = saved_config(path)["options"].get("init", "")
  if init.startswith(("pissa", "olora")):
    raise RunError(f"{str(path)!r} is a run with init {init!r}: its adapters act on a residual "
                   f"base, not the base given; export it with lora-jax export-peft (which "
                   f"converts it to LoRA on the original base) and read that folder.")
  return path / CHECKPOINTS
