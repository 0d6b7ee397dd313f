"""Digests of written files, verified when they are read back; finiteness of weights and samples.

A digest is the XXH3-128 hash of the file's bytes plus its size: recorded by the writer next to the files it
covers (index.json, model.json), checked by the reader before what it read is returned, so a damaged, truncated
or edited file is named instead of used. XXH3 because it detects damage (not tampering: nothing here is a
security boundary) at memory speed: several times sha256 even where the CPU hashes sha256 in hardware
(benchmarks/integrity.py measures both), so the check costs a small part of a load that only copies bytes.
Files recorded by sha256 (artifacts written before the switch) are checked by sha256. The checks run on other
threads while storage.load unpacks.
"""

from __future__ import annotations

import functools
import hashlib
import os
from concurrent import futures
from typing import Any, Callable, TypeVar

import numpy as np
import xxhash

from dpq_jax import errors, io_utils

_CHUNK = 16 << 20
T = TypeVar('T')


ALGORITHM = 'xxh3_128'  # the key of the digest in what the writers record
# every key a reader accepts -> its hash object's constructor; sha256: artifacts written before XXH3
_HASHES = {'xxh3_128': xxhash.xxh3_128, 'sha256': hashlib.sha256}


def hasher(algorithm: str = ALGORITHM):
  """A new hash object (update / hexdigest) of `algorithm`, for writers that hash as they write."""
  return _HASHES[algorithm]()


def _algorithm_of(recorded: dict[str, Any]) -> str:
  """The algorithm a record was written with (the newest one it holds)."""
  return next((a for a in _HASHES if a in recorded), ALGORITHM)


def digest_bytes(data: Any, algorithm: str = ALGORITHM) -> str:
  """The hex digest of a bytes-like object (bytes, a contiguous numpy array)."""
  h = hasher(algorithm)
  h.update(memoryview(data).cast('B'))
  return h.hexdigest()


def file_digest(path: str, algorithm: str = ALGORITHM) -> dict[str, Any]:
  """{'bytes', algorithm} of a file, read in large chunks."""
  h, size = hasher(algorithm), 0
  with io_utils.open_file(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      size += len(chunk)
  return {'bytes': size, algorithm: h.hexdigest()}


def tree_digests(directory: str) -> dict[str, dict[str, Any]]:
  """{relative path: file_digest} of every file under `directory`."""
  return {io_utils.relpath(f, directory): file_digest(f) for f in io_utils.walk_files(directory)}


def _compare(path: str, size: int, digest: Callable[[str], str], recorded: dict[str, Any], fix: str) -> None:
  """Raises ArtifactError naming `path` unless `size` and digest(algorithm) are the recorded ones; the digest
  is asked for only when the size matches."""
  if size != recorded['bytes']:
    raise errors.ArtifactError(f'{path}: {size} bytes, {recorded["bytes"]} were written (truncated or replaced); {fix}')
  algorithm = _algorithm_of(recorded)
  if digest(algorithm) != recorded.get(algorithm):
    raise errors.ArtifactError(f'{path}: its digest differs from the one recorded when it was written (damaged); {fix}')


def check(path: str, data: Any, recorded: dict[str, Any], fix: str) -> None:
  """Raises ArtifactError naming `path` unless `data` (its bytes) has the recorded size and digest."""
  _compare(path, memoryview(data).nbytes, lambda algorithm: digest_bytes(data, algorithm), recorded, fix)


def check_file(path: str, recorded: dict[str, Any], fix: str) -> None:
  """Raises ArtifactError naming `path` unless the file has the recorded size and digest (one read)."""
  got = file_digest(path, _algorithm_of(recorded))
  _compare(path, got['bytes'], got.__getitem__, recorded, fix)


def tree_checks(directory: str, recorded: dict[str, dict[str, Any]], fix: str) -> list[Callable[[], None]]:
  """The checks of every file under `directory` against `recorded` (tree_digests), to run (see `verified`);
  raises ArtifactError at once for a file missing or added."""
  found = set(io_utils.relpath(f, directory) for f in io_utils.walk_files(directory))
  for rel in sorted(set(recorded) ^ found):
    what = 'missing (it was written with the artifact)' if rel in recorded else 'not written with the artifact'
    raise errors.ArtifactError(f'{os.path.join(directory, rel)}: {what}; {fix}')
  return [functools.partial(check_file, os.path.join(directory, rel), recorded[rel], fix) for rel in sorted(found)]


def verified(work: Callable[[], T], checks: list[Callable[[], None]]) -> T:
  """work() while `checks` run on other threads (hashlib and xxhash release the GIL on large buffers); its result only once every check
  passed. A failed check is raised in place of work's own error: a damaged file explains that error."""
  with futures.ThreadPoolExecutor(max(1, min(len(checks), os.cpu_count() or 1))) as pool:
    running = [pool.submit(c) for c in checks]
    try:
      out = work()
    except Exception:
      for r in running:
        r.result()
      raise
    for r in running:
      r.result()
  return out


def check_finite(tree: Any, where: str) -> None:
  """Raises NonFiniteError naming the first leaf of `tree` ({path: ...} dicts or a pytree) holding NaN or Inf."""
  import jax

  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    x = np.asarray(leaf)
    if x.dtype.kind not in 'fc' or x.size == 0 or np.isfinite(x.sum()):  # a sum is finite iff every value is
      continue  # (but for a sum that overflows: then the count below decides)
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
      name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
      raise errors.NonFiniteError(f'{where}: {name} holds {bad} non-finite value(s) (NaN/Inf) of {x.size}')
