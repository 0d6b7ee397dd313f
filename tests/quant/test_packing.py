"""Bit-packing round trips and exact sizes, checked against a bit-by-bit Python reference."""

import numpy as np
import pytest

from dpq_jax.quant import packing


def _reference_pack(codes, bits):
  """Straightforward bit stream: code i at bits [i*bits, (i+1)*bits), LSB first."""
  stream = []
  for c in codes:
    stream += [(int(c) >> j) & 1 for j in range(bits)]
  stream += [0] * (-len(stream) % 8)
  return np.array([sum(b << j for j, b in enumerate(stream[i : i + 8])) for i in range(0, len(stream), 8)], np.uint8)


@pytest.mark.parametrize('bits', range(0, 17))
def test_roundtrip_every_width(bits):
  rng = np.random.default_rng(bits)
  for n in (0, 1, 7, 8, 9, 1001):
    codes = rng.integers(0, 1 << bits, n) if bits else np.zeros(n, np.int64)
    data = packing.pack(codes, bits)
    assert data.dtype == np.uint8 and data.size == (n * bits + 7) // 8
    np.testing.assert_array_equal(packing.unpack(data, bits, n), codes)
    if n <= 9:
      np.testing.assert_array_equal(data, _reference_pack(codes, bits))


def test_chunk_boundaries(monkeypatch):
  monkeypatch.setattr(packing, '_CHUNK', 16)
  codes = np.random.default_rng(0).integers(0, 1 << 12, 1000)
  data = packing.pack(codes, 12)
  np.testing.assert_array_equal(data, _reference_pack(codes, 12))
  np.testing.assert_array_equal(packing.unpack(data, 12, 1000), codes)


@pytest.mark.parametrize('k,bits', [(1, 0), (2, 1), (3, 2), (16, 4), (17, 5), (256, 8), (257, 9), (4096, 12)])
def test_index_bits(k, bits):
  assert packing.index_bits(k) == bits
  assert packing.code_dtype(k) == (np.uint8 if bits <= 8 else np.uint16)


def test_k16_two_codes_per_byte_and_k4096_12_bits():
  assert packing.pack(np.array([0x3, 0xA]), 4).tolist() == [0xA3]
  assert packing.pack(np.arange(4096), 12).size == 4096 * 12 // 8


def test_bad_inputs():
  with pytest.raises(ValueError, match='codebook_size=0'):
    packing.index_bits(0)
  with pytest.raises(ValueError, match='at most 16'):
    packing.index_bits(1 << 17)
  with pytest.raises(ValueError, match='out of range for 4 bits'):
    packing.pack(np.array([16]), 4)
  with pytest.raises(ValueError, match='need'):
    packing.unpack(np.zeros(3, np.uint8), 4, 10)
