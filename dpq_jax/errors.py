"""Errors a user can fix: the message names the bad value (or file) and what was expected.

UserError is the family main.py prints as one line with exit status 2; anything else is a bug and keeps
its traceback. OSErrors of the kinds a user causes or fixes (a full disk, a read-only or missing path)
are user faults too (`user_message`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Iterator


class UserError(Exception):
  """A fault the user causes or fixes: a bad value, file, path or a busy workdir."""


class ConfigError(UserError, ValueError):
  """A config value that cannot run."""


class CheckpointError(ConfigError):
  """A checkpoint that cannot be read or does not match what it is loaded into: a converted or PyTorch
  model (corrupt, or not the requested model) or a calibration checkpoint (from another config). The
  user fixes it by pointing at another file or deleting it, so main prints one line for it."""


class ArtifactError(UserError):
  """A damaged file of a written artifact (digest mismatch, truncated, edited): named, never used."""


class NonFiniteError(UserError, FloatingPointError):
  """Weights, a loss or samples holding NaN or Inf, named where they entered or were produced."""


class WorkdirError(UserError, OSError):
  """A workdir that cannot be used: not a directory, not writable, or held by another run."""


# OSErrors that name a path the user can fix (or a disk to free); others (EIO, EBADF, ...) stay tracebacks.
_USER_ERRNOS = {
  errno.ENOSPC: 'no space left on the device: free some and rerun',
  errno.EDQUOT: 'disk quota exceeded: free some and rerun',
  errno.EROFS: 'read-only file system: choose a writable --workdir',
  errno.EACCES: 'permission denied',
  errno.EPERM: 'operation not permitted',
  errno.ENOTDIR: 'a component of the path is not a directory',
  errno.EISDIR: 'is a directory',
  errno.ENOENT: 'no such file or directory',
  errno.EEXIST: 'exists already',
}


def user_message(e: BaseException) -> str | None:
  """The one line main prints for a user fault, or None for a bug (which keeps its traceback)."""
  if isinstance(e, UserError):
    return str(e).strip()  # a config with several problems names each on its own line
  if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
    where = e.filename if e.filename is not None else ''
    return f'{os.fsdecode(where)}: {_USER_ERRNOS[e.errno]}' if where else _USER_ERRNOS[e.errno]
  return None


@contextlib.contextmanager
def reported(also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
  """User faults raised inside (and exceptions of the types `also`) print `error: <message>` to stderr and exit
  with status 2; anything else propagates with its traceback."""
  try:
    yield
  except Exception as e:
    message = user_message(e) or (str(e).strip() if isinstance(e, also) else None)
    if message is None:
      raise
    print(f'error: {message}', file=sys.stderr)
    raise SystemExit(2) from None
