"""The quantized model on disk, and its sizes as report.json states them.

DIR/ holds four files, written into a temporary sibling and renamed into place:
  codes.bin            every layer's codes, bit-packed at ceil(log2 K) bits (RTN: b bits); a compressed
                       layer (a PQWeight with an alive mask): one byte-aligned stream per codebook at
                       ceil(log2 K') bits, K' its live codewords
  codebooks.bin        PQ/VQ codebooks, per-output-channel scales and RTN scales/offsets, float16
                       (config.quant.codebook_dtype); 'int8' codebooks: int8 values and one float16 scale
                       per codebook (`<module>/codebook_scales` [num_codebooks], codebook_values), the other
                       scalars float16; a compressed layer: K' per codebook (`codebook_sizes`, uint16) and
                       only the live rows
  full_precision.bin   everything else (biases, embedders, final layer), float32
  index.json           model spec, per array its file, offset, shape, dtype and bits, and per file its size
                       and XXH3-128 digest (`files`): load verifies them (on other threads while it unpacks) before it
                       returns, so a damaged or truncated file is named (ArtifactError), never used;
                       digest(DIR), index.json's own, covers them all
save refuses weights holding NaN/Inf before writing anything (NonFiniteError naming the tensor).
`bytes` in report.json are these files' sizes, so the artifact is exactly as small as stated.
DIR may be a gs:// (any etils.epath) URL: the files are built locally and uploaded with index.json last
(io_utils.replace_dir). In a multi-process run only process 0 puts the artifact in place; every process
builds it (in a local temp dir) to measure the same sizes, and all wait until it is in place.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import jax
import numpy as np

from dpq_jax import distributed, errors, integrity, io_utils, tree_utils
from dpq_jax.quant import codebook_values, compress, packing
from dpq_jax.quant.qweight import PQWeight, RTNWeight
from dpq_jax.quant.surgery import QuantizedParams

FILES = {'codes': 'codes.bin', 'codebooks': 'codebooks.bin', 'full_precision': 'full_precision.bin'}
INDEX = 'index.json'
ARTIFACT_DIR = 'quantized'  # DIR/quantized/: the run's quantized model
# Entry names in index.json, '<module path>/<name>': the format's own vocabulary (fixed by the artifacts
# already written; it matches the PQDense variable names it was taken from).
CODEBOOKS = 'codebooks'  # codebooks.bin: [num_codebooks, K, d], or only the live rows of a compressed layer
CODES = 'codes'  # codes.bin: [num_subvectors, out_features], bit-packed
SCALE = 'scale'  # codebooks.bin: the per-output-channel scale [out_features]
CODEBOOK_SIZES = 'codebook_sizes'  # codebooks.bin: K' per codebook of a compressed layer
CODEBOOK_SCALES = 'codebook_scales'  # codebooks.bin: the float16 scale per codebook of int8 codebooks
RTN_CODES = 'kernel'  # codes.bin: an RTN layer's codes [out_features, num_groups, group_size] (entry has rtn=True)
RTN_SIDE = ('rtn_scale', 'rtn_offset')  # codebooks.bin: an RTN layer's scale and offset [out, num_groups, 1]


class _Writer:
  def __init__(self, directory: str):
    self.handles = {k: open(os.path.join(directory, f), 'wb') for k, f in FILES.items()}
    self.hashes = {k: integrity.hasher() for k in FILES}  # the files' digests, computed as they are written
    self.entries: list[dict[str, Any]] = []

  def add(self, kind: str, path: str, data: np.ndarray, **meta: Any) -> None:
    f = self.handles[kind]
    raw = np.ascontiguousarray(data).tobytes()
    self.entries.append({'path': path, 'file': kind, 'offset': f.tell(), 'nbytes': len(raw), **meta})
    f.write(raw)
    self.hashes[kind].update(raw)

  def close(self) -> dict[str, dict[str, Any]]:
    """Closes the files; returns index.json's `files`: {file name: {'bytes', digest}}."""
    out = {}
    for kind, f in self.handles.items():
      out[FILES[kind]] = {'bytes': f.tell(), integrity.ALGORITHM: self.hashes[kind].hexdigest()}
      f.close()
    return out

  def __enter__(self) -> _Writer:
    return self

  def __exit__(self, exc_type, *_) -> None:
    """A failed write closes its files at once: open, they would keep their disk space after their temp dir is
    removed (on a full disk, the space that the error message reports free)."""
    if exc_type is None:
      return
    for f in self.handles.values():
      try:
        f.close()
      except OSError:
        pass  # the unflushed rest of a file on a full disk: its directory is being removed anyway


def _layout(q: QuantizedParams) -> list[tuple[tuple[str, ...], str, str]]:
  """(sort key, kind, path) of every group of entries, sorted as the leaves of the runtime params tree
  (a PQ/VQ layer's codebooks and scale where those variables sit, an RTN layer where its kernel sits).
  path: the fp leaf's path ('fp'), else the module path ('pq', 'scale', 'rtn')."""
  out = [(tuple(str(k.key) for k in p), 'fp', '/'.join(str(k.key) for k in p))
         for p, _ in jax.tree_util.tree_leaves_with_path(q.fp)]  # fmt: skip
  for name, weight in q.pq.items():
    out.append((tuple(name.split('/')) + (CODEBOOKS,), 'pq', name))
    if weight.scale is not None:
      out.append((tuple(name.split('/')) + (SCALE,), 'scale', name))
  out += [(tuple(name.split('/')) + (RTN_CODES,), 'rtn', name) for name in q.rtn]
  return sorted(out)


def _add_pq(w: _Writer, module: str, weight: PQWeight, codebook_dtype: str) -> None:
  """A PQ/VQ layer's codebooks (and int8 scales) and codes; a compressed one (with an alive mask) apart."""
  codebooks, codes = np.asarray(weight.codebooks), np.asarray(weight.codes)
  if weight.alive is not None:
    _add_compressed(w, module, codebooks, codes, np.asarray(weight.alive), codebook_dtype)
    return
  path = f'{module}/{CODEBOOKS}'
  if codebook_dtype == 'int8':
    values, scales = codebook_values.encode(codebooks, codebook_dtype)  # [C, K, d] int8, [C] float16
    w.add('codebooks', f'{module}/{CODEBOOK_SCALES}', scales, shape=[scales.size], dtype=codebook_values.SCALE_DTYPE)
    w.add('codebooks', path, values, shape=list(codebooks.shape), dtype=codebook_dtype)
  else:
    w.add('codebooks', path, codebooks.astype(codebook_dtype), shape=list(codebooks.shape), dtype=codebook_dtype)
  bits = packing.index_bits(codebooks.shape[1])
  w.add('codes', f'{module}/{CODES}', packing.pack(codes, bits), shape=list(codes.shape), bits=bits,
        dtype=str(codes.dtype))  # fmt: skip


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
  integrity.check_finite({'fp': q.fp, 'pq': q.pq, 'rtn': q.rtn}, f'quantized model (not written to {directory})')
  parent = None  # object stores and measure-only builds: the local temp dir
  if commit and not io_utils.is_remote(directory):
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)  # same filesystem, so the final rename is atomic
  with io_utils.building_dir(directory, parent) as tmp:  # removed after, unless moved into place
    with _Writer(tmp) as w:
      for _, kind, path in _layout(q):  # the order of the model's params tree, as index.json always had it
        if kind == 'fp':
          value = np.asarray(tree_utils.get_path(q.fp, path.split('/')))
          w.add('full_precision', path, value.astype(np.float32), shape=list(value.shape), dtype='float32')
        elif kind == 'pq':
          _add_pq(w, path, q.pq[path], codebook_dtype)
        elif kind == 'scale':
          value = np.asarray(q.pq[path].scale)
          w.add('codebooks', f'{path}/{SCALE}', value.astype(side_dtype), shape=list(value.shape), dtype=side_dtype)
        else:
          r = q.rtn[path]
          codes = np.asarray(r.codes)
          w.add('codes', f'{path}/{RTN_CODES}', packing.pack(codes, r.bits), shape=list(codes.shape), bits=r.bits,
                rtn=True)  # fmt: skip
          for name, arr in zip(RTN_SIDE, (r.scale, r.offset)):
            arr = np.asarray(arr)
            w.add('codebooks', f'{path}/{name}', arr.astype(side_dtype), shape=list(arr.shape), dtype=side_dtype)
      files = w.close()
    if check is not None:
      check({k: os.path.getsize(os.path.join(tmp, f)) for k, f in FILES.items()}, w.entries)  # raises: nothing replaced
    with open(os.path.join(tmp, INDEX), 'w') as f:
      json.dump({'model': model_meta, 'entries': w.entries, 'files': files}, f)
    sizes = sizes_on_disk(tmp)  # the same bytes that land in `directory`
    if commit:
      io_utils.replace_dir(tmp, directory, commit_file=INDEX)
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
  w.add(
    'codebooks', f'{module}/{CODEBOOK_SIZES}', live.astype(size_dtype), shape=[num_codebooks], dtype=str(size_dtype)
  )
  if codebook_dtype == 'int8':
    values, scales = codebook_values.encode(codebooks, codebook_dtype, alive)  # [C, K, d] int8, [C] float16
    w.add('codebooks', f'{module}/{CODEBOOK_SCALES}', scales, shape=[num_codebooks], dtype=codebook_values.SCALE_DTYPE)
    rows = values[alive]  # [sum K', d]
  else:
    rows = np.asarray(codebooks)[alive].astype(codebook_dtype)  # [sum K', d]
  w.add('codebooks', f'{module}/{CODEBOOKS}', rows, shape=list(codebooks.shape), dtype=codebook_dtype,
        live_rows=True)  # fmt: skip
  bits = compress.bits_of(live)
  stream = np.concatenate([packing.pack(c, int(b)) for c, b in zip(per_codebook, bits)])
  w.add('codes', f'{module}/{CODES}', stream, shape=list(np.shape(codes)), bits=bits.tolist(), dtype=str(codes.dtype))


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


def _fix(directory: str) -> str:
  return f'delete {directory} or rerun the job that wrote it (a rerun recomputes it instead of loading it)'


def _read_index(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, INDEX)
  try:
    index = io_utils.read_json(path)
    if not isinstance(index, dict) or not {'model', 'entries'} <= set(index):
      raise ValueError('expected an object with model and entries')
  except (OSError, ValueError) as e:
    raise errors.ArtifactError(f'{path}: unreadable ({type(e).__name__}: {e}); {_fix(directory)}') from None
  return index


def digest(directory: str) -> str:
  """The artifact's digest: index.json's, which holds every other file's (what the lineage records)."""
  return integrity.file_digest(os.path.join(directory, INDEX))[integrity.ALGORITHM]


def load_meta(directory: str) -> dict[str, Any]:
  """The model meta of an artifact (index.json's `model`)."""
  return _read_index(directory)['model']


def load(directory: str) -> tuple[dict[str, Any], QuantizedParams]:
  """Reads an artifact back: (model meta, QuantizedParams with rows empty).

  Raises:
    ArtifactError naming the file when one is missing, damaged (digest), truncated or malformed. An artifact
    written before index.json recorded digests (no `files`) loads unverified; the lineage still records its
    index.json's digest, so a pipeline rerun notices an edited one.
  """
  index = _read_index(directory)
  blobs, checks, fix = {}, [], _fix(directory)
  for k, f in FILES.items():
    path = os.path.join(directory, f)
    try:
      blobs[k] = _read_blob(path)
      if 'files' in index:  # artifacts written before digests have none: read unverified, as they always were
        checks.append(functools.partial(integrity.check, path, blobs[k], index['files'][f], fix))
    except (OSError, KeyError, TypeError) as e:
      raise errors.ArtifactError(f'{path}: unreadable ({type(e).__name__}: {e}); {fix}') from None

  def parse() -> tuple[dict, QuantizedParams]:
    try:
      return _parse(index, blobs, directory)
    except (KeyError, ValueError, IndexError, TypeError) as e:
      raise errors.ArtifactError(
        f'{os.path.join(directory, INDEX)}: malformed entries ({type(e).__name__}: {e}); {fix}'
      ) from None

  return integrity.verified(parse, checks)  # hashed while parsed; nothing from a damaged file is returned


def _parse(index: dict[str, Any], blobs: dict[str, np.ndarray], directory: str) -> tuple[dict, QuantizedParams]:
  fp: dict = {}
  codebooks: dict[str, np.ndarray] = {}  # by module path
  codes: dict[str, np.ndarray] = {}
  alive: dict[str, np.ndarray] = {}
  channel_scales: dict[str, np.ndarray] = {}
  rtn_codes: dict[str, tuple[np.ndarray, int]] = {}
  rtn_side: dict[str, dict[str, np.ndarray]] = {}
  live: dict[str, np.ndarray] = {}  # K' per codebook of compressed layers
  scales: dict[str, np.ndarray] = {}  # the float16 scale per codebook of int8 codebooks, by module
  for e in index['entries']:
    if e['path'].endswith('/' + CODEBOOK_SCALES):
      raw = blobs[e['file']][e['offset'] : e['offset'] + e['nbytes']]
      scales[e['path'].rsplit('/', 1)[0]] = np.frombuffer(raw.tobytes(), e['dtype'])
  for e in index['entries']:
    raw = blobs[e['file']][e['offset'] : e['offset'] + e['nbytes']]
    shape = tuple(e['shape'])
    module, _, name = e['path'].rpartition('/')
    if e['file'] == 'codes' and isinstance(e['bits'], list):
      codes[module] = _unpack_compressed(raw, e['bits'], shape, e['dtype'])
    elif e['file'] == 'codes':
      arr = packing.unpack(raw, e['bits'], int(np.prod(shape))).reshape(shape)
      if e.get('rtn'):
        rtn_codes[module] = (arr.astype(np.int32), e['bits'])
      else:
        codes[module] = arr.astype(e['dtype'])
    elif e['file'] == 'full_precision':
      arr = np.frombuffer(raw.tobytes(), e['dtype']).reshape(shape).astype(np.float32)  # a writable copy
      tree_utils.set_path(fp, e['path'].split('/'), arr)
    elif name == CODEBOOK_SIZES:
      live[module] = np.frombuffer(raw.tobytes(), e['dtype']).astype(np.int64)
    elif name == CODEBOOK_SCALES:
      continue
    elif e.get('live_rows'):
      rows = np.frombuffer(raw.tobytes(), e['dtype']).reshape(-1, shape[-1])
      rows = codebook_values.decode_rows(rows, scales[module] if e['dtype'] == 'int8' else None, live[module])
      mask = np.arange(shape[1])[None] < live[module][:, None]  # [num_codebooks, K]
      arr = np.broadcast_to(rows[np.cumsum(live[module]) - live[module]][:, None], shape).copy()  # dead: row 0
      arr[mask] = rows
      codebooks[module], alive[module] = arr, mask
    else:
      arr = np.frombuffer(raw.tobytes(), e['dtype']).reshape(shape)
      arr = codebook_values.decode(arr, scales[module] if e['dtype'] == 'int8' else None)
      if name in RTN_SIDE:
        rtn_side.setdefault(module, {})[name] = arr
      elif name == CODEBOOKS:
        codebooks[module] = arr
      elif name == SCALE:
        channel_scales[module] = arr
      else:
        raise ValueError(f'{directory}/{INDEX}: unknown codebooks entry {e["path"]!r}')
  missing = sorted(set(codebooks) ^ set(codes))
  if missing:
    raise ValueError(f'{directory}/{INDEX}: {missing[0]} has codebooks without codes or codes without codebooks')
  pq_weights = {m: PQWeight(codebooks[m], codes[m], alive.get(m), channel_scales.get(m)) for m in sorted(codebooks)}
  rtn_weights = {
    m: RTNWeight(c, rtn_side[m][RTN_SIDE[0]], rtn_side[m][RTN_SIDE[1]], bits) for m, (c, bits) in rtn_codes.items()
  }
  return index['model'], QuantizedParams(fp, pq_weights, rtn_weights, [])
