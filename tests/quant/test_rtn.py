"""RTN baseline against direct numpy computations: the min-max uniform grid, and the clipping search by brute
force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits as digits_config
from dpq_jax.quant import rtn, surgery
from dpq_jax.stages import quantize as quantize_stage
from tests import helpers


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


# ------------------------------------------------------------------------------------------- clipping search


def _numpy_minmax(w, bits, g):
  """(codes, scale, offset) of the min-max rule, group by group in float32 numpy."""
  levels = 2**bits - 1
  wg = w.reshape(w.shape[0], -1, g)
  lo, hi = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
  scale = np.where(hi > lo, (hi - lo) / np.float32(levels), np.float32(1)).astype(np.float32)
  return np.clip(np.round((wg - lo) / scale), 0, levels).astype(np.int32), scale, lo


def _numpy_clip_search(w, bits, g, h, grid=rtn.CLIP_GRID):
  """Brute force of clip='mse': per group, every shrink factor in order, the error in float64.

  Returns (codes [out, G, g], scale, offset [out, G, 1], errs [out, G, num_candidates] float64).
  """
  levels = 2**bits - 1
  one = np.float32(1)
  h = np.ones(w.shape[1]) if h is None else np.asarray(h, np.float64)
  out, G = w.shape[0], w.shape[1] // g
  codes, scale, offset = (
    np.zeros((out, G, g), np.int32),
    np.zeros((out, G, 1), np.float32),
    np.zeros((out, G, 1), np.float32),
  )
  errs = np.zeros((out, G, len(grid)))
  for r in range(out):
    for j in range(G):
      x, hx = w[r, j * g : (j + 1) * g].astype(np.float32), h[j * g : (j + 1) * g]
      lo0, hi0 = x.min(), x.max()
      c = np.float32(min(max(0, lo0), hi0))  # 0, or the group's end nearest to it
      cands = []
      for i, a in enumerate(grid):
        lo = lo0 + (one - np.float32(a)) * (c - lo0)
        hi = hi0 + (one - np.float32(a)) * (c - hi0)
        s = (hi - lo) / np.float32(levels) if hi > lo else one
        q = np.clip(np.round((x - lo) / s), 0, levels)
        w_hat = (lo + q.astype(np.float32) * s).astype(np.float64)
        errs[r, j, i] = np.sum(hx * (x.astype(np.float64) - w_hat) ** 2)
        cands.append((q, s, lo))
      codes[r, j], scale[r, j, 0], offset[r, j, 0] = cands[int(np.argmin(errs[r, j]))]  # first minimum
  return codes, scale, offset, errs


def _weighted_err(w, w_hat, h=None):
  """sum_i h_i (w - w_hat)^2 over all rows and inputs, float64."""
  d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
  return float(np.sum((1 if h is None else np.asarray(h, np.float64)) * d**2))


@pytest.mark.parametrize('bits,group,weighted', [(1, None, False), (2, 16, True), (3, 32, False), (2, None, True)])
def test_clip_mse_matches_brute_force(bits, group, weighted):
  rng = np.random.default_rng(bits)
  w = helpers.heavy_tailed((12, 64), seed=bits)
  h = rng.lognormal(0, 1.5, 64).astype(np.float32) if weighted else None
  g = group or 64
  codes, scale, offset = (np.asarray(a) for a in rtn.quantize(w, bits, group, clip='mse', weights=h))
  ref_codes, ref_scale, ref_offset, errs = _numpy_clip_search(w, bits, g, h)
  np.testing.assert_allclose(offset, ref_offset, rtol=1e-6, atol=1e-9)  # the chosen range [lo, hi]
  np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
  np.testing.assert_array_equal(codes, ref_codes)
  # alpha = 1 (the grid's first) is min-max: per group, the error is at most min-max's
  mm = np.asarray(rtn.dequantize(*rtn.quantize(w, bits, group))).reshape(12, -1, g)
  got = np.asarray(rtn.dequantize(codes, scale, offset)).reshape(12, -1, g)
  hg = np.ones((1, 1, g)) if h is None else h.astype(np.float64).reshape(1, -1, g)
  err_mse = np.sum(hg * (w.reshape(12, -1, g) - got.astype(np.float64)) ** 2, -1)  # [out, num_groups]
  err_mm = np.sum(hg * (w.reshape(12, -1, g) - mm.astype(np.float64)) ** 2, -1)
  np.testing.assert_array_equal(err_mm, errs[..., 0])  # min-max is candidate 0
  np.testing.assert_allclose(err_mse, errs.min(-1), rtol=1e-5)
  # XLA's float32 division may differ from numpy's by an ulp: 'at most' up to that
  assert np.all(err_mse <= err_mm * (1 + 1e-6)), np.max(err_mse / err_mm)
  assert np.any(err_mse < 0.9 * err_mm)  # the search moved somewhere


@pytest.mark.parametrize('bits', [1, 2])
def test_clip_mse_beats_minmax_on_heavy_tails(bits):
  w = helpers.heavy_tailed((64, 256), seed=10 + bits)
  sq = float(np.sum(w.astype(np.float64) ** 2))
  rel = {c: _weighted_err(w, rtn.quantize_dequantize(w, bits, clip=c)) / sq for c in rtn.CLIPS}
  assert rel['mse'] < 0.9 * rel['minmax'], f'{bits} bits: rel. MSE {rel}'
  # weighted by h, the search under h beats the plain-MSE choice evaluated under h
  h = np.random.default_rng(bits).lognormal(0, 1.5, 256).astype(np.float32)
  err_h = _weighted_err(w, rtn.quantize_dequantize(w, bits, clip='mse', weights=h), h)
  err_plain = _weighted_err(w, rtn.quantize_dequantize(w, bits, clip='mse'), h)
  assert err_h < err_plain, f'{bits} bits: weighted error with h {err_h:.5g}, with h=None {err_plain:.5g}'


@pytest.mark.parametrize('bits,group', [(1, None), (2, 8), (3, 32), (8, None)])
def test_clip_minmax_is_the_minmax_rule(bits, group):
  w = helpers.heavy_tailed((10, 64), seed=bits)
  got = [np.asarray(a) for a in rtn.quantize(w, bits, group, clip='minmax')]
  for a, b in zip(got, _numpy_minmax(w, bits, group or 64)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  for a, b in zip(got, rtn.quantize(w, bits, group)):  # the default
    assert a.tobytes() == np.asarray(b).tobytes()


def test_clip_bad_args_and_degenerate_groups():
  w = np.zeros((4, 8), np.float32)
  with pytest.raises(ValueError, match="clip='l1'"):
    rtn.quantize(w, 2, clip='l1')
  with pytest.raises(ValueError, match='weights'):
    rtn.quantize(w, 2, weights=np.ones(8))
  with pytest.raises(ValueError, match=r'\[in_features\]=\(8,\)'):
    rtn.quantize(w, 2, clip='mse', weights=np.ones(4))
  with pytest.raises(ValueError, match='grid'):
    rtn.quantize(w, 2, clip='mse', grid=(1.0, 1.5))
  # constant groups and all-zero weights h: exact / min-max
  const = np.full((2, 8), -0.3, np.float32)
  np.testing.assert_array_equal(rtn.quantize_dequantize(const, 2, clip='mse'), const)
  w = jnp.asarray(helpers.heavy_tailed((4, 8)))  # a jax array: numpy's min-max divides in numpy, not XLA
  for a, b in zip(rtn.quantize(w, 2, clip='mse', weights=np.zeros(8)), rtn.quantize(w, 2)):
    np.testing.assert_array_equal(a, b)


def test_surgery_passes_clip_and_weights():
  w = helpers.heavy_tailed((24, 16), seed=3)  # kernel [in, out]
  params = {'blocks_0': {'mlp': {'fc1': {'kernel': w, 'bias': np.zeros(16, np.float32)}}}}
  rules = surgery.default_rules('rtn', 1, 1, pattern='blocks_0/mlp/fc1')
  h = np.random.default_rng(0).lognormal(0, 1, 24).astype(np.float32)
  kw = dict(method='rtn', rtn_bits=2, progress=False)
  q = surgery.quantize_params(
    params, rules, jax.random.key(0), rtn_clip='mse', rtn_weights={'blocks_0/mlp/fc1': h}, **kw
  )
  want = rtn.quantize(w.T, 2, clip='mse', weights=h)
  got = q.rtn['blocks_0/mlp/fc1']
  np.testing.assert_array_equal(got.codes, want[0])
  plain = surgery.quantize_params(params, rules, jax.random.key(0), **kw)
  assert q.rows[0]['bytes'] == plain.rows[0]['bytes']
  with pytest.raises(ValueError, match=r"rtn_weights\['blocks_0/mlp/fc1'\]"):
    surgery.quantize_params(params, rules, jax.random.key(0), rtn_clip='mse', rtn_weights={}, **kw)
  with pytest.raises(ValueError, match="rtn_clip='l1'"):
    surgery.quantize_params(params, rules, jax.random.key(0), rtn_clip='l1', **kw)
  with pytest.raises(ValueError, match="only method='rtn' with rtn_clip='mse'"):
    surgery.quantize_params(params, rules, jax.random.key(0), rtn_weights={'blocks_0/mlp/fc1': h}, **kw)


def test_stage_check_rejects_bad_rtn_clip():
  config = digits_config.get_config('tiny')
  assert quantize_stage.check(config) == []
  config.quant.rtn_clip = 'l1'
  assert quantize_stage.check(config) == ["config.quant.rtn_clip='l1': expected one of minmax, mse"]
