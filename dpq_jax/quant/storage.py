"""The quantized model on disk, and its sizes as report.json states them.

DIR/ holds four files, written into a temporary sibling and renamed into place:
  codes.bin            every layer's codes, bit-packed at ceil(log2 K) bits (RTN: b bits)
  codebooks.bin        PQ/VQ codebooks and RTN scales/offsets, float16 (configurable)
  full_precision.bin   everything else (biases, embedders, final layer), float32
  index.json           model spec and, per array, its file, offset, shape, dtype and bits
`bytes` in report.json are these files' sizes, so the artifact is exactly as small as stated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from dpq_jax.quant import packing
from dpq_jax.quant import rtn as rtn_lib
from dpq_jax.quant.surgery import QuantizedParams, RTNLayer

FILES = {'codes': 'codes.bin', 'codebooks': 'codebooks.bin', 'full_precision': 'full_precision.bin'}
INDEX = 'index.json'


class _Writer:
  def __init__(self, directory: str):
    self.handles = {k: open(os.path.join(directory, f), 'wb') for k, f in FILES.items()}
    self.entries: list[dict[str, Any]] = []

  def add(self, kind: str, path: str, data: np.ndarray, **meta: Any) -> None:
    f = self.handles[kind]
    raw = np.ascontiguousarray(data).tobytes()
    self.entries.append({'path': path, 'file': kind, 'offset': f.tell(), 'nbytes': len(raw), **meta})
    f.write(raw)

  def close(self) -> None:
    for f in self.handles.values():
      f.close()


def _flat(tree: dict) -> list[tuple[str, np.ndarray]]:
  return [('/'.join(k.key for k in p), np.asarray(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)]


def save(directory: str, q: QuantizedParams, model_meta: dict[str, Any], codebook_dtype: str = 'float16') -> dict:
  """Writes the artifact atomically; returns its sizes {codes, codebooks, full_precision, metadata, total}."""
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(directory) + '.tmp-', dir=parent)
  try:
    w = _Writer(tmp)
    codes = dict(_flat(q.quant))
    for path, value in _flat(q.params):
      module = path.rsplit('/', 1)[0]
      if path.endswith('/codebooks'):
        k = value.shape[1]
        bits = packing.index_bits(k)
        c = codes[module + '/codes']
        w.add('codebooks', path, value.astype(codebook_dtype), shape=list(value.shape), dtype=codebook_dtype)
        w.add('codes', module + '/codes', packing.pack(c, bits), shape=list(c.shape), bits=bits, dtype=str(c.dtype))
      elif path.endswith('/kernel') and module in q.rtn:
        r = q.rtn[module]
        w.add('codes', path, packing.pack(r.codes, r.bits), shape=list(r.codes.shape), bits=r.bits, rtn=True)
        for name, arr in (('scale', r.scale), ('offset', r.offset)):
          w.add('codebooks', f'{module}/rtn_{name}', arr.astype(codebook_dtype), shape=list(arr.shape),
                dtype=codebook_dtype)  # fmt: skip
      else:
        w.add('full_precision', path, value.astype(np.float32), shape=list(value.shape), dtype='float32')
    w.close()
    with open(os.path.join(tmp, INDEX), 'w') as f:
      json.dump({'model': model_meta, 'entries': w.entries}, f)
    if os.path.exists(directory):
      old = directory + '.old'
      shutil.rmtree(old, ignore_errors=True)
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
    os.chmod(directory, 0o755)  # mkdtemp made it private
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return sizes_on_disk(directory)


def sizes_on_disk(directory: str) -> dict[str, int]:
  sizes = {k: os.path.getsize(os.path.join(directory, f)) for k, f in FILES.items()}
  sizes['metadata'] = os.path.getsize(os.path.join(directory, INDEX))
  sizes['total'] = sum(sizes.values())
  return sizes


def load(directory: str) -> tuple[dict[str, Any], QuantizedParams]:
  """Reads an artifact back: (model meta, QuantizedParams with rows empty)."""
  with open(os.path.join(directory, INDEX)) as f:
    index = json.load(f)
  blobs = {k: np.fromfile(os.path.join(directory, f), np.uint8) for k, f in FILES.items()}
  params: dict = {}
  quant: dict = {}
  rtn_parts: dict[str, dict[str, Any]] = {}
  for e in index['entries']:
    raw = blobs[e['file']][e['offset'] : e['offset'] + e['nbytes']]
    shape = tuple(e['shape'])
    keys = e['path'].split('/')
    if e['file'] == 'codes':
      n = int(np.prod(shape))
      arr = packing.unpack(raw, e['bits'], n).reshape(shape)
      if e.get('rtn'):
        rtn_parts.setdefault(e['path'].rsplit('/', 1)[0], {})['codes'] = (arr.astype(np.int32), e['bits'])
        continue
      _set(quant, keys, arr.astype(e['dtype']))
    else:
      arr = np.frombuffer(raw.tobytes(), e['dtype']).reshape(shape).astype(np.float32)
      if keys[-1].startswith('rtn_'):
        rtn_parts.setdefault('/'.join(keys[:-1]), {})[keys[-1][4:]] = arr
        continue
      _set(params, keys, arr)
  rtn_layers = {}
  for module, parts in rtn_parts.items():
    codes, bits = parts['codes']
    rtn_layers[module] = RTNLayer(codes, parts['scale'], parts['offset'], bits)
    kernel = np.asarray(rtn_lib.dequantize(codes, parts['scale'], parts['offset'])).T
    _set(params, module.split('/') + ['kernel'], kernel)
  return index['model'], QuantizedParams(params, quant, rtn_layers, [])


def _set(tree: dict, keys: list[str], value: Any) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value
