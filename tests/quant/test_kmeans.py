"""k-means core (dpq_jax.quant.kmeans): numpy reference, monotone objective, faiss quality, edge cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpq_jax.quant import kmeans, seeding
from tests import helpers

_heavy = functools.partial(helpers.heavy_tailed, scale=1.0)  # k-means is scale-free: plain Student-t points


def _reconstruct(result):
  return np.take_along_axis(np.asarray(result.codebooks), np.asarray(result.codes)[..., None], axis=1)


def _rel_mse(x, x_hat):
  x = np.asarray(x, np.float64)
  return float(np.sum((x - x_hat) ** 2) / np.sum(x**2))


def _np_lloyd_step(x, codebooks):
  """Plain float64 Lloyd step: argmin, means; the i-th empty cluster takes the i-th worst-explained point."""
  x, new = x.astype(np.float64), codebooks.astype(np.float64).copy()
  dist = ((x[:, :, None, :] - new[:, None, :, :]) ** 2).sum(-1)  # [num_problems, num_points, codebook_size]
  codes, err = dist.argmin(-1), dist.min(-1)
  for p in range(x.shape[0]):
    empty = []
    for k in range(new.shape[1]):
      if (codes[p] == k).any():
        new[p, k] = x[p, codes[p] == k].mean(0)
      else:
        empty.append(k)
    worst = np.argsort(-err[p], kind='stable')
    for rank, k in enumerate(empty):
      new[p, k] = x[p, worst[rank]]
  return new


def test_lloyd_step_matches_numpy_reference():
  x = _heavy((3, 200, 4), seed=1)
  init = x[:, :8] + 0.01
  init[1, 3] = 100.0  # far away: empty after the first assignment, re-seeded
  ours, ref = init, init.astype(np.float64)
  for _ in range(6):
    ours, ref = kmeans.lloyd_step(x, ours), _np_lloyd_step(x, ref)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # kmeans() with the same init runs the same iterations.
  result = kmeans.kmeans(x, 8, jax.random.key(0), iters=6, init=init)
  np.testing.assert_allclose(result.codebooks, ref, rtol=1e-5, atol=1e-5)


def test_objective_never_increases_and_is_the_final_error():
  x = _heavy((5, 500, 8), seed=2)
  result = kmeans.kmeans(x, 32, jax.random.key(1), iters=15)
  objective = np.asarray(result.objective)
  assert objective.shape == (16,) and objective.dtype == np.float32
  assert np.all(np.diff(objective) <= 1e-6 * objective[0]), objective
  assert objective[-1] < 0.8 * objective[0]
  final = np.sum((x.astype(np.float64) - _reconstruct(result)) ** 2)
  np.testing.assert_allclose(objective[-1], final, rtol=1e-5)


def test_lloyd_stops_at_a_fixed_point_with_the_full_runs_result():
  # Few points per codeword: the codebooks stop moving after a few steps. The full run, step by step outside the
  # loop (the same arithmetic as the loop's body), must give the early-stopped result bit for bit.
  x = jnp.asarray(_heavy((6, 48, 4), seed=12))
  init = kmeans.kmeans_plusplus_init(x, 16, jax.random.key(2))
  iters = 30
  result = kmeans.kmeans(x, 16, jax.random.key(2), iters=iters)
  steps = int(result.steps)
  assert 1 <= steps < iters, steps

  mean = jnp.mean(x, axis=1, keepdims=True)
  xt, x_ones = (x - mean).transpose(0, 2, 1), kmeans._with_ones(x - mean)

  @jax.jit
  def step(codebooks):
    codes = kmeans._nearest(xt, codebooks)
    err = kmeans._sq_error(xt, codebooks, codes)
    return kmeans._update(x_ones, codes, err, codebooks), jnp.sum(err)

  codebooks, objective, moved = init - mean, [], []
  for _ in range(iters):
    updated, total = step(codebooks)
    moved.append(not np.array_equal(np.asarray(updated).view(np.int32), np.asarray(codebooks).view(np.int32)))
    codebooks, objective = updated, objective + [float(total)]
  # The loop ran up to and including the first step that returned its input, and no step after it moved.
  assert moved.index(False) == steps - 1 and not any(moved[steps - 1 :])
  np.testing.assert_array_equal(
    np.asarray(result.codebooks).view(np.int32), np.asarray(codebooks + mean).view(np.int32)
  )
  np.testing.assert_array_equal(result.codes, kmeans.assign(x, codebooks + mean))
  np.testing.assert_allclose(result.objective[:iters], objective, rtol=1e-6)
  assert len(set(np.asarray(result.objective[steps - 1 : iters]).tolist())) == 1
  # And the float64 reference agrees with the stopped codebooks: one more step does not move them.
  ref = _np_lloyd_step(np.asarray(x), np.asarray(result.codebooks))
  np.testing.assert_allclose(ref, result.codebooks, rtol=1e-5, atol=1e-6)
  # Problems that keep moving run every iteration.
  assert int(kmeans.kmeans(x, 16, jax.random.key(2), iters=2).steps) == 2


def test_assign_is_exact_argmin_even_with_an_offset():
  x = _heavy((2, 300, 4), seed=3) + 1000.0  # ||x||^2 - 2xc + ||c||^2 in float32 would lose the distances
  codebooks = _heavy((2, 16, 4), seed=4) + 1000.0
  dist = ((x[:, :, None, :].astype(np.float64) - codebooks[:, None].astype(np.float64)) ** 2).sum(-1)
  codes = kmeans.assign(x, codebooks)
  assert codes.dtype == jnp.int32 and codes.shape == (2, 300)
  np.testing.assert_array_equal(codes, dist.argmin(-1))
  np.testing.assert_array_equal(kmeans.assign(x, codebooks, chunk_size=7), codes)
  # The codes kmeans returns are what assign gives for its codebooks.
  result = kmeans.kmeans(x, 16, jax.random.key(0), iters=4)
  np.testing.assert_array_equal(kmeans.assign(x, result.codebooks), result.codes)


def test_quality_vs_faiss():
  faiss = pytest.importorskip('faiss', reason='faiss-cpu not installed (pip install -e ".[dev]")')
  w = _heavy((1024, 128), seed=5, scale=0.02)  # PyTorch layout [C_out, C_in], sub-vectors along C_in
  iters, d = 25, 4
  # PQ: one codebook per sub-vector position.
  problems = w.reshape(1024, 128 // d, d).transpose(1, 0, 2)  # [num_subvectors, C_out, d]
  ours = _rel_mse(problems, _reconstruct(kmeans.kmeans(problems, 16, jax.random.key(0), iters=iters)))
  pq = faiss.ProductQuantizer(128, 128 // d, 4)
  pq.cp.niter, pq.cp.max_points_per_centroid, pq.cp.min_points_per_centroid = iters, 1024, 1
  pq.train(w)
  theirs = _rel_mse(w, pq.decode(pq.compute_codes(w)))
  assert ours <= theirs * 1.02, (ours, theirs)
  # VQ: one codebook over all sub-vectors.
  points = w.reshape(-1, d)
  ours = _rel_mse(points[None], _reconstruct(kmeans.kmeans(points[None], 64, jax.random.key(0), iters=iters)))
  km = faiss.Kmeans(d, 64, niter=iters, seed=1, max_points_per_centroid=len(points))
  km.train(points)
  theirs = _rel_mse(points, km.centroids[km.index.search(points, 1)[1][:, 0]])
  assert ours <= theirs * 1.02, (ours, theirs)


@pytest.mark.parametrize('codebook_size', [10, 16])
def test_codebook_size_at_least_num_points_is_exact(codebook_size):
  x = _heavy((2, 10, 4), seed=6)
  x[1, 7] = x[1, 2]  # duplicates are fine
  result = kmeans.kmeans(x, codebook_size, jax.random.key(0), iters=3)
  assert result.codebooks.shape == (2, codebook_size, 4) and result.codes.dtype == jnp.int32
  np.testing.assert_array_equal(_reconstruct(result), x)
  np.testing.assert_array_equal(result.objective, np.zeros(4, np.float32))


def test_degenerate_data():
  same = np.full((2, 50, 4), 3.0, np.float32)
  result = kmeans.kmeans(same, 8, jax.random.key(0), iters=3)
  assert np.isfinite(result.codebooks).all()
  np.testing.assert_array_equal(result.objective, np.zeros(4, np.float32))
  np.testing.assert_array_equal(_reconstruct(result), same)
  # Fewer distinct points than codewords: duplicate codewords, every point reconstructed (to the
  # rounding of a mean of equal values).
  few = np.repeat(_heavy((1, 3, 2), seed=7), 20, axis=1)  # 3 distinct points, 60 in all
  result = kmeans.kmeans(few, 8, jax.random.key(1), iters=4)
  assert np.isfinite(result.codebooks).all() and float(result.objective[-1]) <= 1e-10 * np.sum(few**2)
  np.testing.assert_allclose(_reconstruct(result), few, rtol=1e-6, atol=1e-6)


def test_empty_clusters_are_reseeded():
  rng = np.random.default_rng(0)
  blobs = [rng.normal(-5, 0.1, (100, 2)), rng.normal(5, 0.1, (100, 2)), rng.normal((0, 20), 0.1, (5, 2))]
  x = np.concatenate(blobs)[None].astype(np.float32)  # [1, 205, 2]
  init = np.array([[[-5, 0], [100, 100], [200, 200], [300, 300]]], np.float32)  # three far codewords, all empty
  step = np.asarray(kmeans.lloyd_step(x, init))
  # Everything went to the first codeword; the empty ones take the three worst-explained points.
  worst = np.argsort(-((x[0] - init[0, 0]) ** 2).sum(-1), kind='stable')[:3]
  np.testing.assert_array_equal(step[0, 1:], x[0, worst])
  result = kmeans.kmeans(x, 4, jax.random.key(0), iters=5, init=init)
  counts = np.bincount(np.asarray(result.codes[0]), minlength=4)
  assert (counts > 0).all(), counts


def test_deterministic_from_key():
  x = _heavy((3, 400, 4), seed=8)
  a = kmeans.kmeans(x, 16, jax.random.key(3), iters=5)
  b = kmeans.kmeans(x, 16, jax.random.key(3), iters=5)
  for got, want in zip(a, b):
    np.testing.assert_array_equal(got, want)
  c = kmeans.kmeans(x, 16, jax.random.key(4), iters=5)
  assert not np.array_equal(a.codebooks, c.codebooks)
  seeds = np.asarray(kmeans.kmeans_plusplus_init(x, 16, jax.random.key(3)))
  np.testing.assert_array_equal(seeds, kmeans.kmeans_plusplus_init(x, 16, jax.random.key(3)))
  # Seeds are distinct points of their own problem.
  for p in range(3):
    assert all((x[p] == s).all(-1).any() for s in seeds[p]) and len(np.unique(seeds[p], axis=0)) == 16


def test_seeding_subsample_for_large_problems(monkeypatch):
  monkeypatch.setattr(kmeans, 'SEED_POINTS_PER_CODEWORD', 4)  # 4 * 8 = 32 < 300 points: seeds from a subset
  x = _heavy((2, 300, 4), seed=9)
  a = kmeans.kmeans(x, 8, jax.random.key(0), iters=3, chunk_size=299)  # fresh static args: retraced
  b = kmeans.kmeans(x, 8, jax.random.key(0), iters=3, chunk_size=299)
  np.testing.assert_array_equal(a.codebooks, b.codebooks)
  assert np.all(np.diff(np.asarray(a.objective)) <= 1e-6 * a.objective[0])


def test_chunked_equals_unchunked():
  x = _heavy((4, 300, 4), seed=10)
  whole = kmeans.kmeans(x, 16, jax.random.key(3), iters=5)
  for chunk_size in (37, 300, 1000):
    chunked = kmeans.kmeans(x, 16, jax.random.key(3), iters=5, chunk_size=chunk_size)
    for got, want in zip(chunked, whole):
      np.testing.assert_array_equal(got, want)


def test_default_chunks_are_equal_and_within_the_cache_budget(monkeypatch):
  for num_problems, num_points, d in [(576, 2304, 8), (2304, 384, 8), (1, 6912 * 1152 // 4, 4), (4, 300, 4)]:
    chunk = kmeans._chunk(num_problems, num_points, d, None)
    num_chunks = -(-num_points // chunk)
    assert num_chunks * chunk - num_points < num_chunks  # equal chunks: padding under one point per chunk
    assert chunk == num_points or 4 * num_problems * d * chunk <= kmeans.CHUNK_BYTES or chunk == kmeans.MIN_CHUNK
  assert kmeans._chunk(4, 300, 4, None) == 300  # small problems stay whole
  assert kmeans._chunk(2304, 384, 8, None) == 64  # many problems: MIN_CHUNK points
  with monkeypatch.context() as patched:  # accelerators: whole problems while the distances fit the budget
    patched.setattr(jax, 'default_backend', lambda: 'gpu')
    assert kmeans._chunk(576, 2304, 8, None) == 2304
    assert kmeans._chunk(1, 2**25, 4, None) == 2**24  # 128 MiB of distances: two chunks
  monkeypatch.setattr(kmeans, 'CHUNK_BYTES', 4 * 4 * 4 * 128)  # at most 128 points: three chunks of 100
  monkeypatch.setattr(kmeans, 'MIN_CHUNK', 1)
  assert kmeans._chunk(4, 300, 4, None) == 100
  x = _heavy((4, 300, 4), seed=10)
  split = jax.jit(lambda x, key: kmeans.kmeans.__wrapped__(x, 16, key, iters=5))(x, jax.random.key(3))  # traced anew
  whole = kmeans.kmeans(x, 16, jax.random.key(3), iters=5, chunk_size=300)
  for got, want in zip(split, whole):
    np.testing.assert_array_equal(got, want)


def test_seeding_kernels_kept_apart_give_the_fused_programs_seeds(monkeypatch):
  # _apart only changes which kernels XLA builds: the plain composition is the reference, bit for bit.
  x, key = _heavy((3, 500, 4), seed=12), jax.random.key(5)

  def compiled():  # a new function each time: traced with the _keeps_apart of the moment
    def seed(x, key):
      return seeding._kmeans_pp.__wrapped__(x, 32, key, 4)

    return jax.jit(seed).lower(x, key).compile()

  apart = compiled()
  monkeypatch.setattr(seeding, '_keeps_apart', lambda: False)
  fused = compiled()
  assert apart.as_text().count(' conditional(') == (2 if jax.default_backend() == 'cpu' else 0)
  assert ' conditional(' not in fused.as_text()
  np.testing.assert_array_equal(np.asarray(apart(x, key)).view(np.int32), np.asarray(fused(x, key)).view(np.int32))


def test_jittable_with_static_sizes():
  x = jnp.asarray(_heavy((2, 64, 4), seed=11))

  @jax.jit
  def fit_and_encode(x, key):
    result = kmeans.kmeans(x, 8, key, iters=3, chunk_size=16)
    return result, kmeans.assign(x, result.codebooks, chunk_size=16)

  result, codes = fit_and_encode(x, jax.random.key(0))
  np.testing.assert_array_equal(codes, result.codes)
  eager = kmeans.kmeans(x, 8, jax.random.key(0), iters=3)
  np.testing.assert_array_equal(result.codebooks, eager.codebooks)


def test_distance_memory_is_bounded_on_the_largest_vq_layer():
  # DiT-XL/2 adaLN (6912 x 1152) as VQ at d=4: a [1, 1990656, 256] float32 distance tensor would be 1.9 GiB.
  x = jax.ShapeDtypeStruct((1, 6912 * 1152 // 4, 4), jnp.float32)
  compiled = jax.jit(lambda x, key: kmeans.kmeans(x, 256, key, iters=1)).lower(x, jax.random.key(0)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 256 * 2**20


def test_bad_arguments_name_the_value():
  x = np.zeros((1, 4, 2), np.float32)
  with pytest.raises(ValueError, match='codebook_size=0'):
    kmeans.kmeans(x, 0, jax.random.key(0))
  with pytest.raises(ValueError, match='iters=-1'):
    kmeans.kmeans(x, 2, jax.random.key(0), iters=-1)
  with pytest.raises(ValueError, match='codebook_size=-3'):
    kmeans.kmeans_plusplus_init(x, -3, jax.random.key(0))
  with pytest.raises(ValueError, match='chunk_size=0'):
    kmeans.assign(x, np.zeros((1, 2, 2), np.float32), chunk_size=0)
  with pytest.raises(ValueError, match=r'init has shape \(1, 3, 2\)'):
    kmeans.kmeans(x, 2, jax.random.key(0), init=np.zeros((1, 3, 2), np.float32))
  with pytest.raises(ValueError, match=r'shape \(4, 2\)'):
    kmeans.kmeans(np.zeros((4, 2), np.float32), 2, jax.random.key(0))
