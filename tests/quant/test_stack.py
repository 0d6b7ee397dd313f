"""pq.quantize_stack (every layer of one shape in one program, as the quantize stage runs them) against numpy and
faiss, and surgery.stack_groups."""

import jax
import numpy as np
import pytest

from dpq_jax.quant import pq, surgery
from tests import helpers


def _np_nearest(sub, codebooks):
  """sub [M, out, d], codebooks [C, K, d] (C = M or 1) -> first nearest codes [M, out] (float64 distances)."""
  dist = ((sub[:, :, None, :].astype(np.float64) - codebooks[:, None].astype(np.float64)) ** 2).sum(-1)
  return dist.argmin(-1)


@pytest.mark.parametrize('shared', [False, True])
def test_stack_codes_scales_and_errors_match_numpy(shared):
  kernels = helpers.heavy_tailed((3, 32, 48), 7)  # [num_layers, in, out]
  spec = pq.CodebookSpec(16, 4, shared)
  out = jax.device_get(pq.quantize_stack(kernels, spec, jax.random.key(0), 4, 'float16', 'float16'))
  num_codebooks = 1 if shared else 8
  assert out.codebooks.shape == (3, num_codebooks, 16, 4) and out.codes.shape == (3, 8, 48)
  np.testing.assert_array_equal(out.codebooks, out.codebooks.astype(np.float16))  # stored as float16
  for i, w in enumerate(kernels):
    sub = w.reshape(8, 4, 48).transpose(0, 2, 1)  # [M, out, d]
    np.testing.assert_array_equal(out.codes[i], _np_nearest(sub, out.codebooks[i]))
    books = np.broadcast_to(out.codebooks[i], (8, 16, 4))
    decoded = np.take_along_axis(books, out.codes[i][..., None], axis=1).transpose(0, 2, 1).reshape(32, 48)
    scale = (np.linalg.norm(w, axis=0) / np.linalg.norm(decoded, axis=0)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out.scale[i], scale)
    approx = decoded * scale
    np.testing.assert_allclose(out.rel_mse[i], ((w - approx) ** 2).sum() / (w**2).sum(), rtol=1e-5)
    np.testing.assert_allclose(out.sq_norm[i], (w.astype(np.float64) ** 2).sum(), rtol=1e-5)


def test_stack_quality_vs_faiss():
  """Layers quantized together are as good as faiss on each (the stack batches problems; its seeding differs)."""
  faiss = pytest.importorskip('faiss', reason='faiss-cpu not installed (pip install -e ".[dev]")')
  kernels = helpers.heavy_tailed((3, 256, 512), 5)  # [num_layers, in, out]
  out = jax.device_get(pq.quantize_stack(kernels, pq.CodebookSpec(64, 4), jax.random.key(0), 20))
  for i, w in enumerate(kernels):
    quantizer = faiss.ProductQuantizer(256, 64, 6)
    quantizer.cp.niter = 20
    quantizer.train(np.ascontiguousarray(w.T))
    theirs = float(((quantizer.decode(quantizer.compute_codes(np.ascontiguousarray(w.T))) - w.T) ** 2).sum())
    assert out.rel_mse[i] <= theirs / (w**2).sum() * 1.02, (i, out.rel_mse[i], theirs / (w**2).sum())


def test_stack_groups_equal_sizes_within_budget():
  a, b = ((64, 32), pq.CodebookSpec(16, 4)), ((32, 64), pq.CodebookSpec(16, 4))
  layer_bytes = 64 * 32 * 4
  layers = [a, b] * 6 + [a]  # 7 of shape a, 6 of shape b, interleaved as a model's blocks
  # Room for 3 layers per call: 7 a's (prime) go one at a time, 6 b's in 2 calls of 3.
  groups = surgery.stack_groups(layers, budget=3 * layer_bytes)
  a_idx, b_idx = list(range(0, 13, 2)), list(range(1, 12, 2))
  assert sorted(i for g in groups for i in g) == list(range(13))
  assert [g for g in groups if g[0] in a_idx] == [[i] for i in a_idx]
  assert [g for g in groups if g[0] in b_idx] == [b_idx[:3], b_idx[3:]]
  # Room for all: one call per (shape, spec); another spec of the same shape is a call of its own.
  other = ((64, 32), pq.CodebookSpec(16, 8))
  assert surgery.stack_groups(layers + [other], budget=2**30) == [a_idx, b_idx, [13]]
