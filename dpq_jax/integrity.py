"""Digests of written files, verified when they are read back; finiteness of weights and samples.

A digest is the sha256 of the file's bytes plus its size: recorded by the writer next to the files it covers
(index.json, model.json), checked by the reader before what it read is returned, so a damaged, truncated or
edited file is named instead of used. sha256 because this CPU hashes it in hardware: 2.3x blake2b's speed
here (benchmarks/integrity.py measures both); hashlib releases the GIL, so storage.load hashes on other cores
while it unpacks.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from dpq_jax import errors, io_utils

_CHUNK = 16 << 20


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


def check_tree(directory: str, recorded: dict[str, dict[str, Any]], fix: str) -> None:
  """Every file under `directory` as recorded (tree_digests): none missing, none added, none changed."""
  found = set(io_utils.relpath(f, directory) for f in io_utils.walk_files(directory))
  for rel in sorted(set(recorded) | found):
    path = os.path.join(directory, rel)
    if rel not in found:
      raise errors.ArtifactError(f'{path}: missing (it was written with the artifact); {fix}')
    if rel not in recorded:
      raise errors.ArtifactError(f'{path}: not written with the artifact (added since); {fix}')
    got = file_digest(path)
    if got != recorded[rel]:
      check(path, io_utils.read_bytes(path), recorded[rel], fix)


def check_finite(tree: Any, where: str) -> None:
  """Raises NonFiniteError naming the first leaf of `tree` ({path: ...} dicts or a pytree) holding NaN or Inf."""
  import jax

  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    x = np.asarray(leaf)
    if x.dtype.kind not in 'fc' or x.size == 0:
      continue
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
      name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
      raise errors.NonFiniteError(f'{where}: {name} holds {bad} non-finite value(s) (NaN/Inf) of {x.size}')
