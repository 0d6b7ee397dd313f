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
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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
