"""Errors a user can fix: the message names the bad value (or file) and what was expected.

UserError is the family main.py prints as one line with exit status 2; anything else is a bug and keeps
its traceback. OSErrors of the kinds a user causes or fixes (a full disk, a read-only or missing path)
are user faults too (`user_message`). A write names no file when it fails (`f.write` on a full disk), and orbax
(tensorstore) reports a full disk as a ValueError whose text carries the errno; `writing(path)` turns both into a
WriteError naming what was being written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
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


class WriteError(UserError, OSError):
  """A write that failed for a reason the user fixes (a full disk, a read-only path), naming what it was writing.

  Carries errno and filename like any OSError; its text is the one line (write_fault)."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ''


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


# Errnos where the file being written is the culprit, whatever file name the error carries (often a temp file's).
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# tensorstore's text for an OSError, as orbax raises it: "... No space left on device [os_error_code='28']".
_TEXT_ERRNO = re.compile(r"os_error_code='?(\d+)")


def os_errno(e: BaseException | str | None) -> int | None:
  """The errno of an OSError, or of an error (or log message) that carries one only in its text (orbax's
  tensorstore errors)."""
  if isinstance(e, OSError):
    return e.errno
  m = _TEXT_ERRNO.search(str(e)) if e is not None else None
  return int(m.group(1)) if m else None


def _free_space(path: str) -> str:
  """' (N KiB free on MOUNT)' for a local path's file system, '' when it cannot be told."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe) and os.path.dirname(probe) != probe:
    probe = os.path.dirname(probe)
  try:
    st = os.statvfs(probe)
  except OSError:
    return ''
  mount = probe
  while not os.path.ismount(mount):
    mount = os.path.dirname(mount)
  return f' ({st.f_bavail * st.f_frsize // 1024} KiB free on {mount})'


def write_fault(e: BaseException, path: str, note: str = '') -> WriteError | None:
  """The WriteError naming `path` for a user fault `e` raised while writing it, or None (a bug, or an OSError that
  already names another file: a missing input read by the writer stays as it is). A full disk always names `path`:
  the file that did not fit, not the temp file it was being written as. `note` follows the message."""
  code = os_errno(e)
  if code not in _USER_ERRNOS or isinstance(e, UserError):
    return None
  if code not in _DISK_FULL and isinstance(e, OSError) and e.filename is not None:
    return None
  out = WriteError(_describe(code, path) + note)
  out.errno, out.strerror, out.filename = code, os.strerror(code), path
  return out


def _describe(code: int, path: str) -> str:
  what = _USER_ERRNOS[code]
  if code in _DISK_FULL and '://' not in path:
    what = what.replace(':', _free_space(path) + ':', 1)
  return f'{path}: {what}'


@contextlib.contextmanager
def writing(path: str, note: str = '') -> Iterator[None]:
  """A user fault raised inside while writing `path` (see write_fault) becomes a WriteError naming it."""
  try:
    yield
  except Exception as e:
    fault = write_fault(e, path, note)
    if fault is None:
      raise
    raise fault from e


class _QuietDiskFull(logging.Filter):
  """Drops log records about a full disk: orbax's writer threads and asyncio log one per array, each with its
  traceback, for the fault that main then reports in one line. Every other record passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return os_errno(exc) not in _DISK_FULL and os_errno(record.getMessage()) not in _DISK_FULL


_QUIET = _QuietDiskFull()


def quiet_disk_full_logs() -> None:
  """Installs the filter on the loggers of orbax (absl) and asyncio, once; it stays for the process."""
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if _QUIET not in logger.filters:
      logger.addFilter(_QUIET)


class _AbandonedWrites:
  """sys.unraisablehook while errors.reported runs: tensorstore reports an unraisable `RuntimeError('Event loop is
  closed')` (with no object) for each write that orbax abandoned after another one failed, before or after the
  failure reaches main. They are held; dropped when the run ends in a full disk (reported once, as one line), else
  passed on to the previous hook, which then is back."""

  def __init__(self):
    self.previous, self.held, self.drop = sys.unraisablehook, [], False

  def __call__(self, unraisable) -> None:
    e = unraisable.exc_value
    if unraisable.object is None and isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
      if not self.drop:
        self.held.append(unraisable)
      return
    self.previous(unraisable)

  def end(self, disk_full: bool) -> None:
    if disk_full:
      self.drop, self.held = True, []  # (stays installed: abandoned writes may still call back)
      return
    sys.unraisablehook = self.previous
    for unraisable in self.held:
      self.previous(unraisable)
    self.held = []


def user_message(e: BaseException) -> str | None:
  """The one line main prints for a user fault, or None for a bug (which keeps its traceback)."""
  if isinstance(e, UserError):
    return str(e).strip()  # a config with several problems names each on its own line
  if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
    return _describe(e.errno, os.fsdecode(e.filename)) if e.filename is not None else _USER_ERRNOS[e.errno]
  return None


@contextlib.contextmanager
def reported(also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
  """User faults raised inside (and exceptions of the types `also`) print `error: <message>` to stderr and exit
  with status 2; anything else propagates with its traceback. Log records about a full disk are dropped from here
  on (quiet_disk_full_logs), and so are the reports of writes orbax abandoned when the run ends in a full disk
  (_AbandonedWrites): the one line names it."""
  quiet_disk_full_logs()
  abandoned = sys.unraisablehook = _AbandonedWrites()
  disk_full = False
  try:
    yield
  except Exception as e:
    message = user_message(e) or (str(e).strip() if isinstance(e, also) else None)
    if message is None:
      raise
    disk_full = os_errno(e) in _DISK_FULL
    print(f'error: {message}', file=sys.stderr)
    raise SystemExit(2) from None
  finally:
    abandoned.end(disk_full)
