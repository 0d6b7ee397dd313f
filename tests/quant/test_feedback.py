"""Error feedback across sub-vector positions (quant/feedback.py) against a numpy reference of the objective
tr((W - W_hat)^T H (W - W_hat)) with every cross term between positions."""

import jax
import numpy as np
import pytest

from dpq_jax.quant import feedback, metric, pq
from tests import helpers


def _hessian(rng, in_features, tokens=256, shared=0.8):
  """Second moment [in, in] of inputs correlated across positions (a per-sample shift shared by all of them, as
  a modulated LayerNorm's output or adaLN's silu(t + y) input has) with unevenly scaled channels."""
  common = rng.normal(size=(tokens, 4)) @ rng.normal(size=(4, in_features))  # a few directions every position sees
  x = shared * common + rng.normal(size=(tokens, in_features)) * np.geomspace(0.1, 2.0, in_features)
  return x.T @ x


def _damped(h, damping):
  return h + damping * np.trace(h) / h.shape[0] * np.eye(h.shape[0])


def _objective(kernel, approx, h):
  e = np.asarray(kernel, np.float64) - np.asarray(approx, np.float64)
  return float(np.einsum('io,ij,jo->', e, np.asarray(h, np.float64), e))


def _reference(kernel, h, books, d):
  """numpy float64, the definition: position j's codes minimise (w - c)^T S_j (w - c) with S_j the Schur complement
  of the not yet quantized rows (the inverse of the (j, j) block of H_rest^-1), then those rows move by the
  optimal -H_bb^-1 H_ba (q_a - w_a). Returns codes [M, out]."""
  w = np.asarray(kernel, np.float64).copy()
  n = w.shape[0]
  codes = []
  for j in range(n // d):
    a, b = slice(j * d, (j + 1) * d), slice((j + 1) * d, n)
    rest_inv = np.linalg.inv(h[j * d :, j * d :])
    s = np.linalg.inv(rest_inv[:d, :d])
    book = books[0] if books.shape[0] == 1 else books[j]  # [K, d]
    diff = w[a].T[:, None, :] - book[None]  # [out, K, d]
    code = np.argmin(np.einsum('okd,de,oke->ok', diff, s, diff), axis=1)
    codes.append(code)
    delta = book[code].T - w[a]  # [d, out]
    if j * d + d < n:
      w[b] -= np.linalg.solve(h[b, b], h[b, a] @ delta)
  return np.stack(codes)


# (shared codebook, positions per group, rows per lazy batch): 128 rows hold every position of these layers in one
# block; 8 rows (two positions of d=4) split them into blocks whose later rows move once per block.
CASES = [(False, 1, 128), (True, 1, 128), (False, 3, 128), (True, 3, 128), (False, 1, 8), (True, 3, 8)]


@pytest.mark.parametrize(('shared', 'group', 'block'), CASES)
def test_fixed_codebooks_take_the_reference_codes(shared, group, block):
  rng = np.random.default_rng(0)
  d, k, in_f, out_f = 4, 8, 32, 40
  kernel = helpers.heavy_tailed((in_f, out_f), seed=0)
  h = _hessian(rng, in_f)
  books = rng.normal(size=(1 if shared else in_f // d, k, d)).astype(np.float32) * np.std(kernel)
  _, codes = feedback.quantize(kernel, h, books, jax.random.key(0), fit='fixed', group=group, damping=0.01,
                               block=block)  # fmt: skip
  want = _reference(kernel, _damped(h, 0.01), books.astype(np.float64), d)
  np.testing.assert_array_equal(np.asarray(codes), want)


@pytest.mark.parametrize(('shared', 'group', 'block'), CASES)
def test_assignment_targets_keep_the_reference_codes(shared, group, block):
  """The fed-back targets and conditional whitening of each position: their nearest live codeword (metric.assign,
  what calibration's dynamic assignment computes) is the numpy reference's code, dead codewords included; the
  first position's target is the kernel's own rows (nothing fed back yet), a later one's is not."""
  rng = np.random.default_rng(5)
  d, k, in_f, out_f = 4, 8, 32, 40
  kernel = helpers.heavy_tailed((in_f, out_f), seed=5)
  h = _hessian(rng, in_f)
  books = rng.normal(size=(1 if shared else in_f // d, k, d)).astype(np.float32) * np.std(kernel)
  alive = np.ones(books.shape[:2], bool)
  alive[:, -2:] = False  # two dead codewords in every codebook
  codes, targets, factors = feedback.assignment_targets(kernel, h, books, alive, group=group, damping=0.01,
                                                        block=block)  # fmt: skip
  dead_free = np.where(alive[..., None], books, 1e3)  # the reference sees the dead ones far away
  want = _reference(kernel, _damped(h, 0.01), dead_free.astype(np.float64), d)
  np.testing.assert_array_equal(np.asarray(codes), want)
  again = metric.assign(pq.to_subvectors(targets, d), books, factors, alive)
  np.testing.assert_array_equal(np.asarray(again), want)
  np.testing.assert_allclose(np.asarray(targets)[:d], kernel[:d], rtol=1e-6)
  assert not np.allclose(np.asarray(targets)[-d:], kernel[-d:], rtol=1e-2)


def test_feedback_lowers_the_full_output_error_below_the_per_position_metric():
  rng = np.random.default_rng(1)
  d, k, in_f, out_f = 4, 16, 64, 96
  kernel = helpers.heavy_tailed((in_f, out_f), seed=1)
  h = _hessian(rng, in_f)
  key = jax.random.key(0)
  u = metric.factor(feedback.blocks(h, d), 0.01)  # today's: H's diagonal blocks
  books, codes, _ = pq.fit(kernel, pq.CodebookSpec(k, d), key, iters=20, u=u)
  per_position = _objective(kernel, pq.decode(books, codes), h)  # pq.fit's codes: nearest in H_j's metric
  fb_books, fb_codes = feedback.quantize(kernel, h, np.zeros((in_f // d, k, d), np.float32), key, iters=20, group=4)
  with_feedback = _objective(kernel, pq.decode(fb_books, fb_codes), h)
  assert with_feedback < 0.7 * per_position, (with_feedback, per_position)
  # lazy batches of one group (16 rows) instead of the whole layer in one block: the same fit up to float rounding
  blocked_books, blocked_codes = feedback.quantize(kernel, h, np.zeros((in_f // d, k, d), np.float32), key, iters=20,
                                                   group=4, block=16)  # fmt: skip
  assert np.mean(np.asarray(blocked_codes) == np.asarray(fb_codes)) > 0.99
  np.testing.assert_allclose(blocked_books, fb_books, atol=1e-4 * np.abs(kernel).max())
  # the same codebooks, assigned with feedback instead of per position: lower too
  _, fixed_codes = feedback.quantize(kernel, h, books, key, fit='fixed')
  assert _objective(kernel, pq.decode(books, fixed_codes), h) < per_position


def test_block_diagonal_hessian_is_the_per_position_metric():
  """Without cross terms nothing is pushed on, and the codes are metric.assign's."""
  rng = np.random.default_rng(2)
  d, k, in_f, out_f = 4, 8, 24, 30
  kernel = rng.normal(size=(in_f, out_f)).astype(np.float32)
  x = rng.normal(size=(in_f // d, 64, d)) * np.geomspace(0.2, 3.0, d)
  moments = np.einsum('mtd,mte->mde', x, x)
  h = np.zeros((in_f, in_f))
  for j in range(in_f // d):
    h[j * d : (j + 1) * d, j * d : (j + 1) * d] = moments[j]
  np.testing.assert_allclose(feedback.blocks(h, d), moments)
  books = rng.normal(size=(in_f // d, k, d)).astype(np.float32)
  _, codes = feedback.quantize(kernel, h, books, jax.random.key(0), fit='fixed', damping=0.0)
  want = metric.assign(pq.to_subvectors(kernel, d), books, metric.factor(moments, 0.0))
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(want))


def test_lloyd_keeps_dead_codewords_dead_and_rounds_to_int8():
  rng = np.random.default_rng(3)
  d, k, in_f, out_f = 4, 8, 16, 50
  kernel = rng.normal(size=(in_f, out_f)).astype(np.float32)
  h = _hessian(rng, in_f)
  books = rng.normal(size=(in_f // d, k, d)).astype(np.float32)
  alive = np.arange(k)[None] < np.array([[2], [5], [8], [1]])
  out, codes = feedback.quantize(kernel, h, books, jax.random.key(0), fit='lloyd', alive=alive, iters=3,
                                 codebook_dtype='int8')  # fmt: skip
  assert np.all(np.take_along_axis(alive, np.asarray(codes), axis=1))
  from dpq_jax.quant import codebook_values

  np.testing.assert_array_equal(out, codebook_values.round_codebooks(out, 'int8', alive))


def test_output_norm_scale_restores_each_channels_output_energy():
  rng = np.random.default_rng(4)
  h = _hessian(rng, 12)
  kernel = rng.normal(size=(12, 5))
  approx = 0.7 * kernel + 0.1 * rng.normal(size=(12, 5))
  scale = np.asarray(pq.scale_of(kernel, approx, 'output_norm', dtype=np.float32, hessian=h), np.float64)
  got = np.einsum('io,ij,jo->o', approx * scale, h, approx * scale)
  np.testing.assert_allclose(got, np.einsum('io,ij,jo->o', kernel, h, kernel), rtol=1e-4)
  # with only the diagonal blocks: the per-position metric's energies
  moments = feedback.blocks(h, 4)
  scale = np.asarray(pq.scale_of(kernel, approx, 'output_norm', moments, np.float32), np.float64)
  energy = lambda w: np.einsum('mdo,mde,meo->o', w.reshape(3, 4, 5), moments, w.reshape(3, 4, 5))  # noqa: E731
  np.testing.assert_allclose(energy(approx * scale), energy(kernel), rtol=1e-4)


def test_bad_values_fail_with_one_line():
  kernel = np.zeros((8, 4), np.float32)
  books = np.zeros((2, 2, 4), np.float32)
  with pytest.raises(ValueError, match='hessian: expected'):
    feedback.quantize(kernel, np.eye(4), books, jax.random.key(0))
  with pytest.raises(ValueError, match='group=0'):
    feedback.quantize(kernel, np.eye(8), books, jax.random.key(0), group=0)
  with pytest.raises(ValueError, match='block=0'):
    feedback.quantize(kernel, np.eye(8), books, jax.random.key(0), block=0)
  with pytest.raises(ValueError, match="fit='x'"):
    feedback.quantize(kernel, np.eye(8), books, jax.random.key(0), fit='x')


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
  """U upper triangular with a positive diagonal and U^T U = (H + damping * mean(diag H) * I)^-1: numpy float64's
  Cholesky factor of that inverse (unique); an all-zero H gives the identity."""
  rng = np.random.default_rng(6)
  h = _hessian(rng, 48)
  u = np.asarray(feedback.inverse_factor(h.astype(np.float32), 0.01), np.float64)
  want = np.linalg.cholesky(np.linalg.inv(_damped(h, 0.01))).T
  np.testing.assert_array_equal(np.tril(u, -1), 0.0)
  np.testing.assert_allclose(u, want, atol=2e-4 * np.abs(want).max())
  np.testing.assert_array_equal(np.asarray(feedback.inverse_factor(np.zeros((8, 8), np.float32), 0.01)), np.eye(8))
