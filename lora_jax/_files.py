"""The modes of the files lora_jax writes: what ``open`` would give under the process's umask.

Temporary-file helpers (``tempfile.mkstemp``, ``mkdtemp``) and ``safetensors.save_file``
create files readable by their owner only (0600, folders 0700); a file that is renamed into
place from one of them would keep that mode.
"""

from __future__ import annotations

import os
import pathlib


def umask() -> int:
  """The process's umask, read without changing it where the system says it (Linux)."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)  # elsewhere: set and restore (briefly visible to other threads)
  os.umask(mask)
  return mask


def publish(path) -> None:
  """Gives ``path`` (a file, or a folder and everything in it) the umask's ordinary mode:
  0666 & ~umask for files, 0777 & ~umask for folders; links are left alone.

  Args:
    path: a file or folder that this process wrote.
  """
  mask = umask()
  path = pathlib.Path(path)
  inside = path.rglob("*") if path.is_dir() and not path.is_symlink() else ()
  for p in (path, *inside):
    if not p.is_symlink():
      os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
