"""Paths and atomic writes, on local disks and on object stores (gs://, s3://) alike.

Every path is a plain str. A local path goes through os/open exactly as before; a URL path
(`scheme://...`) goes through etils.epath (the layer orbax and tfds use; gs:// needs gcsfs, or
TensorFlow's gfile when TensorFlow is installed).

What "atomic" guarantees:
  local     write into a temp file in the same directory, then os.replace: readers see the old
            file or the new one, never a part, and a failed write leaves the old one untouched.
  object    an object store has no rename; one object is always written whole or not at all
  store     (GCS/S3 uploads commit on completion). The file is written to a local temp file
            first, uploaded to a temp object `.NAME.<id>.tmp` next to the target, then moved
            over it (a server-side copy + delete): the target name never holds a partial upload,
            also when the upload itself fails half-way (fsspec commits a file on close, even after
            an error). A crash can leave a stray `.NAME.*.tmp` object behind, never a broken target.
  directory local: the finished temp directory is renamed into place (the old one renamed aside
            first). Object stores cannot move a directory at once: `replace_dir` first copies the
            old directory to `DIR.old`, deletes DIR's commit file (index.json, model.json), uploads
            the new files with the commit file last, and only then removes `DIR.old`. Readers that
            require the commit file (all of dpq_jax's do) see the old version, or a directory
            without it (an error naming it), or the new version: never a mix that reads as valid.
            After a crash the previous version is still complete in `DIR.old`.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import IO, Any, Callable, Iterator

from dpq_jax import errors

_COPY_CHUNK = 16 << 20
_TEMP_DIRS: list[str] = []  # local_copy's downloads, removed at exit


def is_remote(path: str) -> bool:
  """True for URL paths (gs://bucket/x, s3://...), which go through etils.epath."""
  return '://' in str(path)


def epath(path: str):
  """The etils.epath.Path of `path` (imported lazily: it is only needed for URL paths)."""
  from etils import epath as epath_lib

  return epath_lib.Path(path)


def abspath(path: str) -> str:
  """os.path.abspath for local paths; URLs are already absolute."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  if is_remote(path):
    p = epath(path)
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """Names in a directory (a prefix on object stores)."""
  return sorted(p.name for p in epath(path).iterdir()) if is_remote(path) else os.listdir(path)


def makedirs(path: str) -> None:
  """os.makedirs(exist_ok=True); nothing on object stores, whose directories are implicit."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def getsize(path: str) -> int:
  return int(epath(path).stat().length) if is_remote(path) else os.path.getsize(path)


def remove(path: str) -> None:
  if is_remote(path):
    epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str, missing_ok: bool = False) -> None:
  if is_remote(path):
    epath(path).rmtree(missing_ok=missing_ok)
  else:
    shutil.rmtree(path, ignore_errors=missing_ok)


def relpath(path: str, start: str) -> str:
  """`path` relative to the directory `start` (one of its ancestors), for local paths and URLs."""
  if not is_remote(path):
    return os.path.relpath(path, start)
  prefix = str(start).rstrip('/') + '/'
  if not str(path).startswith(prefix):
    raise ValueError(f'{path!r} is not under {start!r}')
  return str(path)[len(prefix) :]


def walk_files(path: str) -> list[str]:
  """Every file under directory `path`, recursively, sorted."""
  if not is_remote(path):
    return sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
  scheme = str(path).split('://', 1)[0]
  out = []
  for root, _, files in epath(path).walk():
    root = str(root)
    if '://' not in root:  # fsspec walks yield 'bucket/dir', without the scheme
      root = f'{scheme}://{root.lstrip("/")}'
    out += [f'{root.rstrip("/")}/{f}' for f in files]
  return sorted(out)


def open_file(path: str, mode: str = 'r') -> IO:
  """open() for local paths, epath's open for URLs ('r', 'w', 'a' with optional 'b')."""
  return epath(path).open(mode) if is_remote(path) else open(path, mode)


def read_text(path: str) -> str:
  with open_file(path) as f:
    return f.read()


def read_json(path: str) -> Any:
  return json.loads(read_text(path))


def read_bytes(path: str) -> bytes:
  with open_file(path, 'rb') as f:
    return f.read()


@contextlib.contextmanager
def load_npz(path: str) -> Iterator[Any]:
  """np.load of an .npz as a context manager, from a local path or a URL (read through a file object)."""
  import numpy as np

  if not is_remote(path):
    with np.load(path) as f:
      yield f
    return
  with open_file(path, 'rb') as raw, np.load(raw) as f:
    yield f


def _copy_stream(src: IO, dst: IO) -> None:
  shutil.copyfileobj(src, dst, _COPY_CHUNK)


def upload(local: str, remote: str) -> None:
  """Copies local file `local` to URL `remote` atomically (temp object, then a server-side move)."""
  target = epath(remote)
  tmp = target.parent / f'.{target.name}.{uuid.uuid4().hex[:12]}.tmp'
  try:
    with open(local, 'rb') as src, tmp.open('wb') as dst:
      _copy_stream(src, dst)
    tmp.replace(target)
  except BaseException:
    with contextlib.suppress(Exception):
      tmp.unlink(missing_ok=True)
    raise


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls write(tmp_path) on a local temp file, then puts it at `path` atomically (see the module doc).

  Local: the temp file sits in `path`'s directory and is renamed over it. URL: the temp file is in
  the local temp dir ($TMPDIR) and is uploaded (see `upload`) once write() returned.
  """
  remote = is_remote(path)
  with errors.writing(path):  # a full disk names `path` (a failed write() names no file)
    if remote:
      directory = None
    else:
      directory = os.path.dirname(os.path.abspath(path))
      os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
    os.close(fd)
    try:
      write(tmp)
      if remote:
        upload(tmp, path)
        os.remove(tmp)
      else:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise


@contextlib.contextmanager
def building_dir(directory: str, parent: str | None) -> Iterator[str]:
  """A new temp dir `.NAME.tmp-XXXX` in `parent` (None: the system's temp dir) to build `directory` in, removed
  on the way out unless it was moved into place (replace_dir). While this process builds it, it holds an flock
  on the temp dir itself; so first, beside a local `directory`, what killed builders of it left is cleaned up:
  temp dirs nobody holds are removed, and `DIR.old` (a kill between replace_dir's renames) becomes DIR again
  where DIR is missing, else is removed. A full disk (or another user fault) while building it is a WriteError
  naming `directory`."""
  base = os.path.basename(directory.rstrip('/'))
  with errors.writing(directory):
    if parent is not None:
      remove_dead_builds(parent, base)
    tmp = tempfile.mkdtemp(prefix=f'.{base}.tmp-', dir=parent)
    fd = os.open(tmp, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      yield tmp
    finally:
      os.close(fd)
      if os.path.exists(tmp):  # not moved into place: a failed build
        remove_settled(tmp)


def remove_settled(path: str, settle_s: float = 1.0, timeout_s: float = 30.0) -> None:
  """Removes the tree at `path` and again while it reappears within `settle_s` (up to `timeout_s` in all): after a
  failed orbax save, tensorstore's writes still in flight (C++ threads no Python join reaches) finish after the
  first removal and recreate their file's parent dirs."""
  deadline, quiet_since = time.monotonic() + timeout_s, None
  while time.monotonic() < deadline:
    if os.path.lexists(path):
      shutil.rmtree(path, ignore_errors=True)
      quiet_since = None
    elif quiet_since is None:
      quiet_since = time.monotonic()
    elif time.monotonic() - quiet_since >= settle_s:
      return
    time.sleep(0.05)


def join_threads_of(module_prefix: str, timeout_s: float = 60.0) -> None:
  """Waits (up to `timeout_s` in all) for the live threads whose class comes from modules `module_prefix*` (orbax's
  writers of a failed save: its wait returns the first failed part while others run on; left alone they log
  tracebacks after the run's one-line error and write into a temp dir after it is removed)."""
  deadline = time.monotonic() + timeout_s
  for thread in threading.enumerate():
    if type(thread).__module__.startswith(module_prefix) and thread is not threading.current_thread():
      try:
        thread.join(max(deadline - time.monotonic(), 0.0))
      except Exception:  # orbax's threads re-raise their own failure from join(): the one being reported
        pass


def remove_dead_builds(parent: str, base: str) -> list[str]:
  """What killed `building_dir` builders of parent/base left there (see building_dir); returns the paths
  removed or restored. A live builder's temp dir, and then DIR.old too (it may be mid-replace), are left alone."""
  done, live = [], False
  for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
    path = os.path.join(parent, name)
    if not (name.startswith(f'.{base}.tmp-') and os.path.isdir(path)):
      continue
    try:
      fd = os.open(path, os.O_RDONLY)
    except OSError:
      continue  # removed meanwhile
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      shutil.rmtree(path, ignore_errors=True)
      done.append(path)
    except BlockingIOError:
      live = True
    finally:
      os.close(fd)
  old = os.path.join(parent, base + '.old')
  if os.path.isdir(old) and not live:
    if not restore_old(old):
      shutil.rmtree(old, ignore_errors=True)
    done.append(old)
  return done


def restore_old(old: str) -> bool:
  """Puts `DIR.old` back as DIR where DIR is missing (replace_dir killed between its renames: the old copy is
  whole); returns whether it did."""
  target = old[: -len('.old')]
  if os.path.exists(target):
    return False
  os.rename(old, target)
  return True


def replace_dir(tmp: str, directory: str, commit_file: str | None = None) -> None:
  """Moves the finished local directory `tmp` to `directory`, replacing an existing one only at the end.

  Local: the old copy is renamed aside first and removed after; the new one gets mkdtemp-free 0755
  rights. URL: see the module doc; `commit_file` (a file name in tmp) is uploaded last and is what
  readers check for; `tmp` is removed after the upload.
  """
  if is_remote(directory):
    _replace_remote_dir(tmp, directory, commit_file)
    return
  if os.path.exists(directory):
    old = directory + '.old'
    shutil.rmtree(old, ignore_errors=True)
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, directory)
  os.chmod(directory, 0o777 & ~_umask())


def _replace_remote_dir(tmp: str, directory: str, commit_file: str | None) -> None:
  target, old = epath(directory), epath(directory.rstrip('/') + '.old')
  new = sorted(relpath(f, tmp) for f in walk_files(tmp))
  if commit_file is not None and commit_file in new:  # the commit file goes last
    new.remove(commit_file)
    new.append(commit_file)
  complete = target.exists() and (commit_file is None or (target / commit_file).exists())
  if complete:  # keep the current version whole in DIR.old until the new one is in place
    if old.exists():
      old.rmtree()
    for f in walk_files(directory):
      with epath(f).open('rb') as src, (old / relpath(f, directory)).open('wb') as dst:
        _copy_stream(src, dst)
  # An incomplete DIR (a crash half-way) keeps the DIR.old of the version before it.
  if commit_file is not None and (target / commit_file).exists():
    (target / commit_file).unlink()
  stale = set(relpath(f, directory) for f in walk_files(directory)) - set(new) if target.exists() else set()
  for rel in sorted(stale):
    (target / rel).unlink()
  for rel in new:
    upload(os.path.join(tmp, rel), str(target / rel))
  if old.exists():
    old.rmtree()
  shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_text(path: str, text: str) -> None:
  def write(tmp: str) -> None:
    with open(tmp, 'w') as f:
      f.write(text)

  atomic_write(path, write)


def append_bytes(path: str, data: bytes) -> None:
  """Appends to a file, all or nothing: in place locally (a failed append, e.g. on a full disk, is cut off again:
  nothing half-written is left; the error names the file); on object stores (immutable objects) by rewriting it
  atomically."""
  if is_remote(path):
    old = read_bytes(path) if exists(path) else b''

    def write(tmp: str) -> None:
      with open(tmp, 'wb') as f:
        f.write(old + data)

    atomic_write(path, write)
    return
  with errors.writing(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
      size = os.fstat(fd).st_size
      try:
        done = 0
        while done < len(data):
          done += os.write(fd, data[done:])
      except BaseException:
        os.ftruncate(fd, size)
        raise
    finally:
      os.close(fd)


def append_text(path: str, text: str) -> None:
  """append_bytes of `text`, UTF-8."""
  append_bytes(path, text.encode())


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


def local_copy(path: str) -> str:
  """A local path holding the contents of `path`: `path` itself when local, else a download of the
  file or directory into a fresh local temp dir (for readers that need a real file: torch.load,
  np.load with mmap, safetensors). The copy lives until the process exits."""
  if not is_remote(path):
    return path
  root = tempfile.mkdtemp(prefix='dpq_jax-remote-')
  _TEMP_DIRS.append(root)
  src = epath(path)
  dst = os.path.join(root, src.name or 'data')
  files = walk_files(path) if src.is_dir() else [path]
  for f in files:
    rel = relpath(f, path) if src.is_dir() else ''
    out = os.path.join(dst, rel) if rel else dst
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with epath(f).open('rb') as s, open(out, 'wb') as d:
      _copy_stream(s, d)
  if not files:
    os.makedirs(dst, exist_ok=True)
  return dst


def _remove_temp_dirs() -> None:
  for d in _TEMP_DIRS:
    shutil.rmtree(d, ignore_errors=True)


atexit.register(_remove_temp_dirs)
