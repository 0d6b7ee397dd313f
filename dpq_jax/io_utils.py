"""Atomic file writes: a failed or interrupted run never leaves a half-written artifact."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls write(tmp_path) then renames tmp_path over `path` (same directory, so rename is atomic)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def replace_dir(tmp: str, directory: str) -> None:
  """Moves the finished directory `tmp` to `directory`, replacing an existing one only at the end
  (the old copy is renamed aside first and removed after), and gives it mkdtemp-free 0755 rights."""
  import shutil

  if os.path.exists(directory):
    old = directory + '.old'
    shutil.rmtree(old, ignore_errors=True)
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, directory)
  os.chmod(directory, 0o777 & ~_umask())


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_text(path: str, text: str) -> None:
  def write(tmp: str) -> None:
    with open(tmp, 'w') as f:
      f.write(text)

  atomic_write(path, write)


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + '\n')


def _jsonable(obj: Any) -> Any:
  import numpy as np

  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f'{type(obj).__name__} is not JSON serialisable')


def write_npz(path: str, **arrays: Any) -> None:
  import numpy as np

  def write(tmp: str) -> None:
    with open(tmp, 'wb') as f:  # A file object: np.savez would append '.npz' to a bare name.
      np.savez(f, **arrays)

  atomic_write(path, write)
