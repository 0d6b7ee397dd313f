"""The quantized model on disk, and its sizes as report.json states them.

DIR/ holds four files, written into a temporary sibling and renamed into place:
  codes.bin            every layer's codes, bit-packed at ceil(log2 K) bits (RTN: b bits); a compressed
                       layer (one with `quant/alive`): one byte-aligned stream per codebook at
                       ceil(log2 K') bits, K' its live codewords
  codebooks.bin        PQ/VQ codebooks, per-output-channel scales and RTN scales/offsets, float16
                       (config.quant.codebook_dtype); 'int8' codebooks: int8 values and one float16 scale
                       per codebook (`<module>/codebook_scales` [num_codebooks], codebook_values), the other
                       scalars float16; a compressed layer: K' per codebook (`codebook_sizes`, uint16) and
                       only the live rows
  full_precision.bin   everything else (biases, embedders, final layer), float32
  index.json           model spec and, per array, its file, offset, shape, dtype and bits
`bytes` in report.json are these files' sizes, so the artifact is exactly as small as stated.
DIR may be a gs:// (any etils.epath) URL: the files are built locally and uploaded with index.json last
(io_utils.replace_dir). In a multi-process run only process 0 puts the artifact in place; every process
builds it (in a local temp dir) to measure the same sizes, and all wait until it is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import numpy as np

from dpq_jax import distributed, io_utils, tree_utils
from dpq_jax.quant import codebook_values, compress, packing
from dpq_jax.quant import rtn as rtn_lib
from dpq_jax.quant.surgery import QuantizedParams, RTNLayer

FILES = {'codes': 'codes.bin', 'codebooks': 'codebooks.bin', 'full_precision': 'full_precision.bin'}
INDEX = 'index.json'
ARTIFACT_DIR = 'quantized'  # DIR/quantized/: the run's quantized model


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


def save(
  directory: str,
  q: QuantizedParams,
  model_meta: dict[str, Any],
  codebook_dtype: str = 'float16',
  check: Callable[[dict[str, int], list[dict[str, Any]]], None] | None = None,
  commit: bool | None = None,
) -> dict:
  """Writes the artifact atomically; returns its sizes {codes, codebooks, full_precision, metadata, total}.

  check(sizes, entries), if given, sees the written files' sizes (metadata not yet counted) and
  index entries before anything is moved into place; raising there leaves `directory` untouched.
  commit: put the artifact at `directory` (default: this process is the job's writer, process 0);
  False builds it only to measure it. In a multi-process run every process must call save.
  """
  codebook_dtype = codebook_values.dtype_name(codebook_dtype)  # raises before anything is written
  side_dtype = codebook_values.side_dtype(codebook_dtype)  # channel scales, RTN scale/offset: never int8
  commit = distributed.is_writer() if commit is None else commit
  directory = io_utils.abspath(directory)
  parent = None  # object stores and measure-only builds: the local temp dir
  if commit and not io_utils.is_remote(directory):
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)  # same filesystem, so the final rename is atomic
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(directory.rstrip('/')) + '.tmp-', dir=parent)
  try:
    w = _Writer(tmp)
    codes = dict(_flat(q.quant))
    for path, value in _flat(q.params):
      module = path.rsplit('/', 1)[0]
      if path.endswith('/codebooks') and module + '/alive' in codes:
        _add_compressed(w, module, value, codes[module + '/codes'], codes[module + '/alive'], codebook_dtype)
      elif path.endswith('/codebooks'):
        k = value.shape[1]
        bits = packing.index_bits(k)
        c = codes[module + '/codes']
        if codebook_dtype == 'int8':
          values, scales = codebook_values.encode(value, codebook_dtype)  # [C, K, d] int8, [C] float16
          w.add(
            'codebooks', module + '/codebook_scales', scales, shape=[scales.size], dtype=codebook_values.SCALE_DTYPE
          )
          w.add('codebooks', path, values, shape=list(value.shape), dtype=codebook_dtype)
        else:
          w.add('codebooks', path, value.astype(codebook_dtype), shape=list(value.shape), dtype=codebook_dtype)
        w.add('codes', module + '/codes', packing.pack(c, bits), shape=list(c.shape), bits=bits, dtype=str(c.dtype))
      elif path.endswith('/scale') and module + '/codes' in codes:  # PQ/VQ per-output-channel scale
        w.add('codebooks', path, value.astype(side_dtype), shape=list(value.shape), dtype=side_dtype)
      elif path.endswith('/kernel') and module in q.rtn:
        r = q.rtn[module]
        w.add('codes', path, packing.pack(r.codes, r.bits), shape=list(r.codes.shape), bits=r.bits, rtn=True)
        for name, arr in (('scale', r.scale), ('offset', r.offset)):
          w.add('codebooks', f'{module}/rtn_{name}', arr.astype(side_dtype), shape=list(arr.shape),
                dtype=side_dtype)  # fmt: skip
      else:
        w.add('full_precision', path, value.astype(np.float32), shape=list(value.shape), dtype='float32')
    w.close()
    if check is not None:
      check({k: os.path.getsize(os.path.join(tmp, f)) for k, f in FILES.items()}, w.entries)  # raises: nothing replaced
    with open(os.path.join(tmp, INDEX), 'w') as f:
      json.dump({'model': model_meta, 'entries': w.entries}, f)
    sizes = sizes_on_disk(tmp)  # the same bytes that land in `directory`
    if commit:
      io_utils.replace_dir(tmp, directory, commit_file=INDEX)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(tmp, ignore_errors=True)  # measure-only builds (a committed tmp is gone already)
  distributed.sync('dpq_jax storage.save')  # nobody reads DIR before process 0 has put it in place
  return sizes


def _add_compressed(w: _Writer, module: str, codebooks: np.ndarray, codes: np.ndarray, alive: np.ndarray,
                    codebook_dtype: str) -> None:  # fmt: skip
  """A compressed layer: K' of each codebook, only its live rows, its codes at ceil(log2 K') bits.

  codebooks [num_codebooks, K, d], codes [num_subvectors, out_features], alive [num_codebooks, K] with
  the live codewords first (alive[c, k] == k < K'_c). int8: scales from the live rows only.
  """
  num_codebooks, codebook_size, _ = codebooks.shape
  alive = np.asarray(alive, bool)
  live = alive.sum(axis=1)  # [num_codebooks] K'
  if not np.array_equal(alive, np.arange(codebook_size)[None] < live[:, None]) or live.min(initial=1) < 1:
    raise ValueError(f'{module}/alive: expected the live codewords first and at least one per codebook')
  per_codebook = np.asarray(codes).reshape(num_codebooks, -1)  # PQ: codebook c serves row c; VQ: all codes
  if (per_codebook >= live[:, None]).any():
    raise ValueError(f'{module}/codes: a code points at a dead codeword')
  size_dtype = compress.size_dtype(codebook_size)
  w.add('codebooks', module + '/codebook_sizes', live.astype(size_dtype), shape=[num_codebooks], dtype=str(size_dtype))
  if codebook_dtype == 'int8':
    values, scales = codebook_values.encode(codebooks, codebook_dtype, alive)  # [C, K, d] int8, [C] float16
    w.add('codebooks', module + '/codebook_scales', scales, shape=[num_codebooks], dtype=codebook_values.SCALE_DTYPE)
    rows = values[alive]  # [sum K', d]
  else:
    rows = np.asarray(codebooks)[alive].astype(codebook_dtype)  # [sum K', d]
  w.add('codebooks', module + '/codebooks', rows, shape=list(codebooks.shape), dtype=codebook_dtype,
        live_rows=True)  # fmt: skip
  bits = compress.bits_of(live)
  stream = np.concatenate([packing.pack(c, int(b)) for c, b in zip(per_codebook, bits)])
  w.add('codes', module + '/codes', stream, shape=list(np.shape(codes)), bits=bits.tolist(), dtype=str(codes.dtype))


def _unpack_compressed(raw: np.ndarray, bits: list[int], shape: tuple[int, ...], dtype: str) -> np.ndarray:
  num_codebooks = len(bits)
  per = int(np.prod(shape)) // num_codebooks
  out, offset = [], 0
  for b in bits:
    n = packing.packed_nbytes(per, b)
    out.append(packing.unpack(raw[offset : offset + n], b, per, dtype))
    offset += n
  return np.concatenate(out).reshape(shape)


def sizes_on_disk(directory: str) -> dict[str, int]:
  sizes = {k: io_utils.getsize(os.path.join(directory, f)) for k, f in FILES.items()}
  sizes['metadata'] = io_utils.getsize(os.path.join(directory, INDEX))
  sizes['total'] = sum(sizes.values())
  return sizes


def _read_blob(path: str) -> np.ndarray:
  if io_utils.is_remote(path):
    return np.frombuffer(io_utils.read_bytes(path), np.uint8)
  return np.fromfile(path, np.uint8)


def load_meta(directory: str) -> dict[str, Any]:
  """The model meta of an artifact (index.json's `model`)."""
  return io_utils.read_json(os.path.join(directory, INDEX))['model']


def load(directory: str) -> tuple[dict[str, Any], QuantizedParams]:
  """Reads an artifact back: (model meta, QuantizedParams with rows empty)."""
  index = io_utils.read_json(os.path.join(directory, INDEX))
  blobs = {k: _read_blob(os.path.join(directory, f)) for k, f in FILES.items()}
  params: dict = {}
  quant: dict = {}
  rtn_parts: dict[str, dict[str, Any]] = {}
  live: dict[str, np.ndarray] = {}  # K' per codebook of compressed layers
  scales: dict[str, np.ndarray] = {}  # the float16 scale per codebook of int8 codebooks, by module
  for e in index['entries']:
    if e['path'].endswith('/codebook_scales'):
      raw = blobs[e['file']][e['offset'] : e['offset'] + e['nbytes']]
      scales[e['path'].rsplit('/', 1)[0]] = np.frombuffer(raw.tobytes(), e['dtype'])
  for e in index['entries']:
    raw = blobs[e['file']][e['offset'] : e['offset'] + e['nbytes']]
    shape = tuple(e['shape'])
    keys = e['path'].split('/')
    if e['file'] == 'codes' and isinstance(e['bits'], list):
      tree_utils.set_path(quant, keys, _unpack_compressed(raw, e['bits'], shape, e['dtype']))
    elif e['file'] == 'codes':
      n = int(np.prod(shape))
      arr = packing.unpack(raw, e['bits'], n).reshape(shape)
      if e.get('rtn'):
        rtn_parts.setdefault(e['path'].rsplit('/', 1)[0], {})['codes'] = (arr.astype(np.int32), e['bits'])
        continue
      tree_utils.set_path(quant, keys, arr.astype(e['dtype']))
    else:
      if keys[-1] == 'codebook_sizes':
        live[e['path'].rsplit('/', 1)[0]] = np.frombuffer(raw.tobytes(), e['dtype']).astype(np.int64)
        continue
      if keys[-1] == 'codebook_scales':
        continue
      module = e['path'].rsplit('/', 1)[0]
      if e.get('live_rows'):
        rows = np.frombuffer(raw.tobytes(), e['dtype']).reshape(-1, shape[-1])
        rows = codebook_values.decode_rows(rows, scales[module] if e['dtype'] == 'int8' else None, live[module])
        alive = np.arange(shape[1])[None] < live[module][:, None]  # [num_codebooks, K]
        arr = np.broadcast_to(rows[np.cumsum(live[module]) - live[module]][:, None], shape).copy()  # dead: row 0
        arr[alive] = rows
        tree_utils.set_path(params, keys, arr)
        tree_utils.set_path(quant, keys[:-1] + ['alive'], alive)
        continue
      arr = np.frombuffer(raw.tobytes(), e['dtype']).reshape(shape)
      arr = codebook_values.decode(arr, scales[module] if e['dtype'] == 'int8' else None)
      if keys[-1].startswith('rtn_'):
        rtn_parts.setdefault('/'.join(keys[:-1]), {})[keys[-1][4:]] = arr
        continue
      tree_utils.set_path(params, keys, arr)
  rtn_layers = {}
  for module, parts in rtn_parts.items():
    codes, bits = parts['codes']
    rtn_layers[module] = RTNLayer(codes, parts['scale'], parts['offset'], bits)
    kernel = np.asarray(rtn_lib.dequantize(codes, parts['scale'], parts['offset'])).T
    tree_utils.set_path(params, module.split('/') + ['kernel'], kernel)
  return index['model'], QuantizedParams(params, quant, rtn_layers, [])
