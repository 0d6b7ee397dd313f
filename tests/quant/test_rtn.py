"""RTN baseline against a direct numpy computation of the min-max uniform grid."""

import numpy as np
import pytest

from dpq_jax.quant import rtn


def _numpy_rtn(w, bits, g):
  out = np.empty_like(w)
  levels = 2**bits - 1
  for r in range(w.shape[0]):
    for s in range(0, w.shape[1], g):
      x = w[r, s : s + g].astype(np.float64)
      lo, hi = x.min(), x.max()
      grid = lo + (hi - lo) * np.arange(levels + 1) / levels
      out[r, s : s + g] = grid[np.abs(x[:, None] - grid[None]).argmin(1)]
  return out


@pytest.mark.parametrize('bits,group', [(1, None), (2, None), (4, 16), (8, 32)])
def test_matches_numpy_grid(bits, group):
  w = np.random.default_rng(bits).standard_t(3, (24, 64)).astype(np.float32)
  got = np.asarray(rtn.quantize_dequantize(w, bits, group))
  np.testing.assert_allclose(got, _numpy_rtn(w, bits, group or 64), atol=1e-5)
  assert len(np.unique(got[0, : group or 64])) <= 2**bits


def test_error_falls_with_bits_and_constant_rows_exact():
  w = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
  errs = [float(np.mean((rtn.quantize_dequantize(w, b) - w) ** 2)) for b in (1, 2, 4, 8)]
  assert errs == sorted(errs, reverse=True)
  const = np.full((4, 8), 0.3, np.float32)
  np.testing.assert_array_equal(rtn.quantize_dequantize(const, 2), const)


def test_bad_specs():
  w = np.zeros((4, 10), np.float32)
  with pytest.raises(ValueError, match='group_size=4'):
    rtn.quantize(w, 2, 4)
  with pytest.raises(ValueError, match='bits=0'):
    rtn.quantize(w, 0)
