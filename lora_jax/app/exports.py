"""Export folders (``merge``, ``export-peft``): a new or empty folder outside every run, checked
before any work, written into a temporary folder and appearing whole or not at all, with the
umask's modes; on any failure or Ctrl-C the temporary folder goes.
"""

from __future__ import annotations

import pathlib
import shutil

from lora_jax import _files
from lora_jax.app.run_folder import (RunError, _make, _unmake, _writable_parent, interrupts_deferred,
                                  interrupts_kept, is_run, shown)


def export_folder(run, out) -> pathlib.Path:
  """``out`` (absolute), checked before any work: a new or empty folder outside every run
  folder, below a folder this process may write in.

  Raises:
    RunError: ``out`` is a file or a link, holds files, is (or is inside) a run folder, or
      lies below a file or an unwritable folder.
  """
  shown_out, out = out, pathlib.Path(out).absolute()
  if out.is_symlink() or (out.exists() and not out.is_dir()):
    raise RunError(f"--out {shown_out} is {'a link' if out.is_symlink() else 'a file'}; an "
                   f"export writes a folder of its own: give a new or empty folder.")
  inside = next((p for p in (out.resolve(), *out.resolve().parents)
                 if p == pathlib.Path(run).resolve() or is_run(p)), None)
  if inside is not None:
    raise RunError(f"--out {shown_out} is inside the run folder {inside}; write the export "
                   f"somewhere else (it would overwrite the run's files).")
  if out.exists() and any(out.iterdir()):
    held = shown(sorted(p.name for p in out.iterdir()))
    raise RunError(f"--out {shown_out} already holds files ({held}); an export never replaces "
                   f"files: give a new or empty folder.")
  _writable_parent(out / "file" if out.exists() else out, "--out")
  return pathlib.Path(shown_out)


class staged:
  """A temporary folder whose files become ``out`` only once all are written, with the
  umask's ordinary modes: beside a new ``out``, renamed into place; inside an existing empty
  ``out`` (a mount point, say), its files moved up. On any failure, Ctrl-C included, the
  temporary folder (and any parent folder made for it) is removed and ``out`` is as before."""

  def __init__(self, out):
    self.out = pathlib.Path(out).absolute()
    self._made: list[pathlib.Path] = []

  def __enter__(self) -> pathlib.Path:
    import tempfile
    self._kept = interrupts_kept()
    self._interrupted = self._kept.__enter__()
    try:
      with interrupts_deferred():
        self._made = _make(_writable_parent(self.out, "--out"))
        where = self.out if self.out.is_dir() else self.out.parent
        self.tmp = pathlib.Path(tempfile.mkdtemp(dir=where, prefix=f".{self.out.name}."))
    except BaseException:
      self._clean()
      self._kept.__exit__(None, None, None)
      raise
    return self.tmp

  def __exit__(self, kind, *_):
    try:
      with interrupts_deferred():
        if kind is None and self._interrupted():  # a Ctrl-C that a gc callback swallowed
          raise KeyboardInterrupt
        if kind is None:
          self._move()
    except BaseException:
      self._clean()
      raise
    finally:
      self._kept.__exit__(None, None, None)
    if kind is not None:
      self._clean()

  def _clean(self) -> None:
    with interrupts_deferred():
      if getattr(self, "tmp", None) is not None:
        shutil.rmtree(self.tmp, ignore_errors=True)
      _unmake(self._made)

  def _move(self) -> None:
    _files.publish(self.tmp)
    if self.tmp.parent == self.out:  # an existing empty folder of the user's: files move up
      names = [p.name for p in self.out.iterdir() if p != self.tmp]
      if names:
        raise RunError(f"--out {self.out} gained files ({shown(sorted(names))}) while the "
                       f"export was written; they were left as they are and nothing was "
                       f"exported.")
      for f in self.tmp.iterdir():
        f.rename(self.out / f.name)
      self.tmp.rmdir()
      return
    if self.out.exists() or self.out.is_symlink():
      raise RunError(f"--out {self.out} appeared while the export was written; it was left "
                     f"as it is and nothing was exported.")
    self.tmp.rename(self.out)
