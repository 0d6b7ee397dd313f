"""Bit-packing of codebook indices: exactly ceil(log2 K) bits per code on disk.

Codes live in memory as small unsigned integers (uint8 for K <= 256, uint16 up to 65536);
on disk they are one little-endian bit stream: code i occupies bits [i*b, (i+1)*b) of the
stream, least significant bit first: K=16 puts two codes in a byte, K=4096 two codes in three
bytes. Packing runs on the host, in chunks, to bound memory.
"""

from __future__ import annotations

import math

import numpy as np

MAX_BITS = 16
_CHUNK = 1 << 20  # codes per chunk; a multiple of 8 so every chunk starts on a byte boundary


def index_bits(codebook_size: int) -> int:
  """Bits per code for K codewords: ceil(log2 K); a single codeword needs none."""
  if codebook_size < 1:
    raise ValueError(f'codebook_size={codebook_size}: expected >= 1')
  bits = math.ceil(math.log2(codebook_size)) if codebook_size > 1 else 0
  if bits > MAX_BITS:
    raise ValueError(f'codebook_size={codebook_size} needs {bits} bits per code; at most {MAX_BITS} are supported')
  return bits


def code_dtype(codebook_size: int) -> np.dtype:
  """Smallest unsigned dtype that holds codes of a K-word codebook."""
  return np.dtype(np.uint8 if index_bits(codebook_size) <= 8 else np.uint16)


def packed_nbytes(num_codes: int, bits: int) -> int:
  return (num_codes * bits + 7) // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Flattens `codes` (any shape, values < 2**bits) into a uint8 stream of ceil(n*bits/8) bytes."""
  flat = np.asarray(codes).reshape(-1)
  if bits == 0:
    if flat.size and flat.max() != 0:
      raise ValueError('codes must all be 0 for a single-codeword codebook')
    return np.zeros(0, np.uint8)
  if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
    raise ValueError(f'codes out of range for {bits} bits: [{flat.min()}, {flat.max()}]')
  if bits == 8:
    return flat.astype(np.uint8)
  out = np.empty(packed_nbytes(flat.size, bits), np.uint8)
  shifts = np.arange(bits, dtype=np.uint32)
  for start in range(0, flat.size, _CHUNK):
    chunk = flat[start : start + _CHUNK].astype(np.uint32)
    bitmat = ((chunk[:, None] >> shifts) & 1).astype(np.uint8)  # [chunk, bits]
    packed = np.packbits(bitmat.reshape(-1), bitorder='little')
    offset = start * bits // 8  # exact: start is a multiple of 8
    out[offset : offset + packed.size] = packed
  return out


def unpack(data: np.ndarray, bits: int, num_codes: int, dtype: np.dtype | None = None) -> np.ndarray:
  """Inverse of `pack`: the first `num_codes` codes of the stream, as a flat array."""
  dtype = np.dtype(dtype or (np.uint8 if bits <= 8 else np.uint16))
  if bits == 0:
    return np.zeros(num_codes, dtype)
  data = np.asarray(data, np.uint8).reshape(-1)
  if data.size != packed_nbytes(num_codes, bits):
    raise ValueError(f'packed stream has {data.size} bytes; {num_codes} codes of {bits} bits need '
                     f'{packed_nbytes(num_codes, bits)}')  # fmt: skip
  if bits == 8:
    return data.astype(dtype)
  out = np.empty(num_codes, dtype)
  weights = (1 << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
  for start in range(0, num_codes, _CHUNK):
    n = min(_CHUNK, num_codes - start)
    offset = start * bits // 8
    chunk = data[offset : offset + packed_nbytes(n, bits)]
    bitmat = np.unpackbits(chunk, count=n * bits, bitorder='little').reshape(n, bits)
    out[start : start + n] = (bitmat.astype(np.uint32) @ weights).astype(dtype)
  return out
