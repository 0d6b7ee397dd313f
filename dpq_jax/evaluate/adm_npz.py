"""ADM-format sample batches: `arr_0` (N, H, W, 3) uint8 images, `arr_1` (N,) int64 labels.

The file is written as a stream from chunk files, so a 50k-sample batch (about 10 GB at
256x256) is never held in memory, and atomically (temp file + rename; on gs:// a local temp
file uploaded at the end, see io_utils). It is a plain uncompressed .npz: `np.load` and the
ADM evaluator's zip reader both read it.
"""

from __future__ import annotations

import zipfile
from typing import Iterable

import numpy as np

from dpq_jax import io_utils

IMAGES_KEY = 'arr_0'
LABELS_KEY = 'arr_1'
_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_streaming(path: str, arrays: dict[str, tuple[tuple[int, ...], np.dtype, Iterable[np.ndarray]]]) -> None:
  """Writes an .npz whose entry `name` has (shape, dtype) and the concatenation of `blocks` as data.

  Args:
    path: output .npz, replaced atomically.
    arrays: name -> (full shape, dtype, iterable of blocks along axis 0 adding up to shape[0]).
  """

  def write(tmp: str) -> None:
    with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
      for name, (shape, dtype, blocks) in arrays.items():
        dtype = np.dtype(dtype)
        rows = 0
        info = zipfile.ZipInfo(name + '.npy', date_time=_EPOCH)  # fixed: same samples, same bytes
        with zf.open(info, 'w', force_zip64=True) as f:
          header = {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False, 'shape': tuple(shape)}
          np.lib.format.write_array_header_2_0(f, header)
          for block in blocks:
            block = np.ascontiguousarray(block, dtype)
            if block.shape[1:] != tuple(shape[1:]):
              raise ValueError(f'{name}: block of shape {block.shape} in an array of shape {tuple(shape)}')
            rows += block.shape[0]
            f.write(block.tobytes())
        if rows != shape[0]:
          raise ValueError(f'{name}: blocks hold {rows} rows; the header says {shape[0]}')

  io_utils.atomic_write(path, write)


def read_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every array in an .npz, from the .npy headers alone (no data is read)."""
  out = {}
  with io_utils.open_file(path, 'rb') as raw, zipfile.ZipFile(raw) as zf:
    for info in zf.infolist():
      if not info.filename.endswith('.npy'):
        continue
      with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
      out[info.filename[: -len('.npy')]] = (tuple(shape), dtype)
  return out


def check_samples(path: str, image_size: int | None = None) -> tuple[int, int]:
  """Checks an ADM sample batch from its headers; returns (num_images, image_size).

  Raises:
    ValueError: naming the file and what was expected.
  """
  try:
    headers = read_headers(path)
  except (OSError, zipfile.BadZipFile, ValueError) as e:
    raise ValueError(f'{path}: not a readable .npz ({e})') from None
  if IMAGES_KEY not in headers:
    raise ValueError(
      f'{path}: no {IMAGES_KEY!r} array (an ADM sample batch holds arr_0 images); found {sorted(headers)}'
    )
  shape, dtype = headers[IMAGES_KEY]
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'{path}: arr_0 is {dtype} {shape}; expected uint8 (N, H, W, 3) images')
  want = image_size or shape[1]
  if shape[1] != want or shape[2] != want:
    raise ValueError(f'{path}: arr_0 images are {shape[1]}x{shape[2]}; expected {want}x{want}')
  if LABELS_KEY in headers and headers[LABELS_KEY][0] != shape[:1]:
    raise ValueError(f'{path}: arr_1 has shape {headers[LABELS_KEY][0]}; expected ({shape[0]},) labels')
  return int(shape[0]), int(shape[1])
