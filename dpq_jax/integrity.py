"""Digests of written files, verified when they are read back; finiteness of weights and samples.

A digest is blake2b-128 of the file's bytes plus its size: recorded by the writer next to the files it
covers (index.json, model.json), checked by the reader before any byte is used, so a damaged, truncated or
edited file is named instead of loaded. blake2b over bytes already in memory costs a few percent of a load
(benchmarks/integrity.py).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from dpq_jax import errors, io_utils

_CHUNK = 16 << 20


def digest_bytes(data: Any) -> str:
  """blake2b-128 hex of a bytes-like object (bytes, a contiguous numpy array)."""
  return hashlib.blake2b(memoryview(data).cast('B'), digest_size=16).hexdigest()


def file_digest(path: str) -> dict[str, Any]:
  """{'bytes', 'blake2b'} of a file, read in large chunks."""
  h, size = hashlib.blake2b(digest_size=16), 0
  with io_utils.open_file(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      size += len(chunk)
  return {'bytes': size, 'blake2b': h.hexdigest()}


def tree_digests(directory: str) -> dict[str, dict[str, Any]]:
  """{relative path: file_digest} of every file under `directory`."""
  return {io_utils.relpath(f, directory): file_digest(f) for f in io_utils.walk_files(directory)}


def check(path: str, data: Any, recorded: dict[str, Any], fix: str) -> None:
  """Raises ArtifactError naming `path` unless `data` (its bytes) has the recorded size and digest."""
  size = memoryview(data).nbytes
  if size != recorded['bytes']:
    raise errors.ArtifactError(f'{path}: {size} bytes, {recorded["bytes"]} were written (truncated or replaced); {fix}')
  if digest_bytes(data) != recorded['blake2b']:
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
