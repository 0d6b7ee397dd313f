"""Digests of written files, verified when they are read back; finiteness of weights and samples.

A digest is the sha256 of the file's bytes plus its size: recorded by the writer next to the files it covers
(index.json, model.json), checked by the reader before what it read is returned, so a damaged, truncated or
edited file is named instead of used. sha256 because this CPU hashes it in hardware: 2.3x blake2b's speed
here (benchmarks/integrity.py measures both); hashlib releases the GIL, so storage.load hashes on other cores
while it unpacks.
"""

from __future__ import annotations

import functools
import hashlib
import os
from concurrent import futures
from typing import Any, Callable, TypeVar

import numpy as np

from dpq_jax import errors, io_utils

_CHUNK = 16 << 20
T = TypeVar('T')


ALGORITHM = 'sha256'  # the key of the digest in what the writers record


def hasher():
  """A new hashlib object of ALGORITHM (for writers that hash as they write)."""
  return hashlib.new(ALGORITHM)


def digest_bytes(data: Any) -> str:
  """The hex digest of a bytes-like object (bytes, a contiguous numpy array)."""
  return hashlib.new(ALGORITHM, memoryview(data).cast('B')).hexdigest()


def file_digest(path: str) -> dict[str, Any]:
  """{'bytes', ALGORITHM} of a file, read in large chunks."""
  h, size = hasher(), 0
  with io_utils.open_file(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      size += len(chunk)
  return {'bytes': size, ALGORITHM: h.hexdigest()}


def tree_digests(directory: str) -> dict[str, dict[str, Any]]:
  """{relative path: file_digest} of every file under `directory`."""
  return {io_utils.relpath(f, directory): file_digest(f) for f in io_utils.walk_files(directory)}


def check(path: str, data: Any, recorded: dict[str, Any], fix: str) -> None:
  """Raises ArtifactError naming `path` unless `data` (its bytes) has the recorded size and digest."""
  size = memoryview(data).nbytes
  if size != recorded['bytes']:
    raise errors.ArtifactError(f'{path}: {size} bytes, {recorded["bytes"]} were written (truncated or replaced); {fix}')
  if digest_bytes(data) != recorded.get(ALGORITHM):
    raise errors.ArtifactError(f'{path}: its digest differs from the one recorded when it was written (damaged); {fix}')


def check_file(path: str, recorded: dict[str, Any], fix: str) -> None:
  """Raises ArtifactError naming `path` unless the file has the recorded size and digest."""
  got = file_digest(path)
  if got['bytes'] != recorded['bytes']:
    raise errors.ArtifactError(
      f'{path}: {got["bytes"]} bytes, {recorded["bytes"]} were written (truncated or replaced); {fix}'
    )
  if got[ALGORITHM] != recorded.get(ALGORITHM):
    raise errors.ArtifactError(f'{path}: its digest differs from the one recorded when it was written (damaged); {fix}')


def tree_checks(directory: str, recorded: dict[str, dict[str, Any]], fix: str) -> list[Callable[[], None]]:
  """The checks of every file under `directory` against `recorded` (tree_digests), to run (see `verified`);
  raises ArtifactError at once for a file missing or added."""
  found = set(io_utils.relpath(f, directory) for f in io_utils.walk_files(directory))
  for rel in sorted(set(recorded) ^ found):
    what = 'missing (it was written with the artifact)' if rel in recorded else 'not written with the artifact'
    raise errors.ArtifactError(f'{os.path.join(directory, rel)}: {what}; {fix}')
  return [functools.partial(check_file, os.path.join(directory, rel), recorded[rel], fix) for rel in sorted(found)]


def verified(work: Callable[[], T], checks: list[Callable[[], None]]) -> T:
  """work() while `checks` run on other threads (hashlib releases the GIL); its result only once every check
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
