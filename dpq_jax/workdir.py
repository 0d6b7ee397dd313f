"""The run's workdir: usable before any work starts, held by one run at a time, cleared of dead runs' temps.

`check` finds what would fail later (a file where the directory should be, no write permission) before any
stage runs; `hold` takes an advisory fcntl lock on DIR/.lock (the holder's pid inside; removed when the run ends)
before anything is written, so a second run on the same workdir is refused instead of rewriting what the first one uses, and
then removes the temp files and directories that killed runs left (atomic writers' `.NAME.*.tmp` files,
`.NAME.tmp-*` directories, `quantized.old` copies and orbax's unfinished `checkpoints/N.orbax-checkpoint-tmp*` steps:
none can belong to a live run while the lock is held).
A gs:// workdir is held by a lease on the object DIR/.lock, taken and renewed with GCS preconditions (gcs_lock.py:
tested against a fake of gcsfs, not GCS); other object stores (s3://) are not locked. Object-store workdirs are
checked for being a file only, and their killed runs' temps are not removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from typing import Iterator

from dpq_jax import errors, gcs_lock, io_utils

LOCK = '.lock'
# Temp names of io_utils.atomic_write ('.report.json.ab12cd.tmp'), mkdtemp-built dirs ('.quantized.tmp-ab12'),
# replace_dir's aside copy ('quantized.old') and orbax's unfinished checkpoint steps ('2.orbax-checkpoint-tmp-1234').
_STALE = re.compile(r'\..+\.tmp(-[A-Za-z0-9_]+)?|quantized\.old|\d+\.orbax-checkpoint-tmp(-\d+)?')
_STALE_DEPTH = 3  # DIR, DIR/samples, DIR/rows/<name>: where the writers put temps


def check(workdir: str, what: str = '--workdir') -> None:
  """Raises WorkdirError unless `workdir` is, or can be created as, a writable directory."""
  if io_utils.is_remote(workdir):
    if io_utils.isfile(workdir):
      raise errors.WorkdirError(f'{what}={workdir}: exists and is not a directory')
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.WorkdirError(f'{what}={workdir}: exists and is not a directory')
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise errors.WorkdirError(f'{what}={workdir} is not writable: {probe} is a file, not a directory')
  if not os.access(probe, os.W_OK | os.X_OK):
    raise errors.WorkdirError(f'{what}={workdir}: {probe} is not writable; choose another directory')


class Held:
  """What `hold` yields: check() raises WorkdirError once the lock is no longer this run's (a gs:// lease taken
  over after this run could not renew it for a whole lease); the pipeline calls it before every stage."""

  def __init__(self, workdir: str, lease: gcs_lock.Lease | None = None):
    self.workdir, self.lease = workdir, lease

  def check(self) -> None:
    if self.lease is not None and self.lease.lost.is_set():
      raise errors.WorkdirError(
        f'--workdir={self.workdir}: this run lost its lock {self.lease.url} (not renewed within its lease, then '
        'taken over or removed); another run may be writing there: check its outputs before using them'
      )


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[Held]:
  """Creates `workdir`, locks it for this process and removes dead runs' temps; WorkdirError if held."""
  if io_utils.is_remote(workdir):
    if not workdir.startswith('gs://'):
      yield Held(workdir)
      return
    lease = gcs_lock.Lease(workdir.rstrip('/') + '/' + LOCK)
    lease.acquire(f'--workdir={workdir}')
    held = Held(workdir, lease)
    try:
      yield held
    finally:
      lease.release()
    held.check()  # a run that lost its lock does not end as if it had held it throughout
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or 'unknown'
      os.close(fd)
      raise errors.WorkdirError(
        f'--workdir={workdir} is in use by another run (pid {holder}, {path}); wait for it or choose another workdir'
      ) from None
    if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
      break
    os.close(fd)  # the holder removed the file between our open and lock: lock the one at `path` now
  try:
    with errors.writing(path):  # a full disk is found here, before any work
      os.ftruncate(fd, 0)
      os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    remove_stale(workdir)
    yield Held(workdir)
  finally:
    os.remove(path)  # while still locked: a run that opened it meanwhile sees another inode and retries
    os.close(fd)


def remove_stale(workdir: str) -> list[str]:
  """Removes the temps of killed runs under `workdir` (see the module doc); returns their paths."""
  removed = []
  base = workdir.rstrip(os.sep).count(os.sep)
  for root, dirs, files in os.walk(workdir):
    for name in [d for d in dirs if _STALE.fullmatch(d)] + [f for f in files if _STALE.fullmatch(f)]:
      target = os.path.join(root, name)
      if name.endswith('.old') and io_utils.restore_old(target):
        continue
      shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
      removed.append(target)
    dirs[:] = [d for d in dirs if not _STALE.fullmatch(d)]
    if root.count(os.sep) - base >= _STALE_DEPTH - 1:
      dirs[:] = []
  return removed
