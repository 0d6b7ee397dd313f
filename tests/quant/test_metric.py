"""The layer-output metric (quant/metric.py) and the output-aware PQ/VQ fit, against numpy references of the
objective sum_(j,r) (w_rj - c)^T H_j (w_rj - c)."""

import jax
import numpy as np
import pytest

from dpq_jax.quant import metric, pq
from tests import helpers


def _moments(rng, num_subvectors, d, tokens=64, spread=None):
  """Second moments [M, d, d] of correlated, unevenly scaled inputs (as a layer's activations are)."""
  spread = np.geomspace(0.05, 5.0, d) if spread is None else spread
  mix = rng.normal(size=(num_subvectors, d, d)) * spread
  x = rng.normal(size=(num_subvectors, tokens, d)) @ mix  # [M, tokens, d]
  return np.einsum('mtd,mte->mde', x, x)


def _objective(kernel, approx, moments):
  """numpy float64: sum_j sum_r (w_rj - c_rj)^T H_j (w_rj - c_rj)."""
  d = moments.shape[-1]
  e = (np.asarray(kernel, np.float64) - np.asarray(approx, np.float64)).reshape(-1, d, kernel.shape[1])  # [M, d, out]
  return float(np.einsum('mdr,mde,mer->', e, np.asarray(moments, np.float64), e))


def _damped_numpy(moments, damping):
  d = moments.shape[-1]
  mean_diag = np.trace(moments, axis1=1, axis2=2) / d
  return moments + damping * mean_diag[:, None, None] * np.eye(d)


def test_factor_whitens_the_damped_moments_and_unwhiten_inverts():
  rng = np.random.default_rng(0)
  moments = _moments(rng, 6, 4)
  u = np.asarray(metric.factor(moments, 0.01), np.float64)
  np.testing.assert_allclose(np.einsum('mdi,mde->mie', u, u), _damped_numpy(moments, 0.01), rtol=1e-4, atol=1e-3)
  assert np.allclose(np.tril(u, -1), 0)
  z = rng.normal(size=(6, 10, 4)).astype(np.float32)
  np.testing.assert_allclose(metric.whiten(metric.unwhiten(z, u), u), z, rtol=1e-4, atol=1e-4)
  zero = metric.factor(np.zeros((2, 4, 4), np.float32), 0.01)  # inputs that never move: the identity
  np.testing.assert_array_equal(zero, np.broadcast_to(np.eye(4), (2, 4, 4)))


@pytest.mark.parametrize('shared', [False, True])
def test_output_aware_fit_has_lower_output_error_than_plain_kmeans(shared):
  rng = np.random.default_rng(1)
  kernel = helpers.heavy_tailed((64, 96), seed=1)  # [in, out]
  d, k = 4, 16
  moments = _moments(rng, 64 // d, d)
  spec = pq.CodebookSpec(k, d, shared=shared)
  key = jax.random.key(0)
  plain_books, plain_codes, _ = pq.fit(kernel, spec, key, iters=20)
  u = metric.factor(moments, 1e-4)
  books, codes, _ = pq.fit(kernel, spec, key, iters=20, u=u)
  plain = _objective(kernel, pq.decode(plain_books, plain_codes), moments)
  aware = _objective(kernel, pq.decode(books, codes), moments)
  assert aware < 0.9 * plain, (aware, plain)
  # ... and the codes are the metric's nearest codewords (numpy argmin over every codeword).
  sub = np.asarray(pq.to_subvectors(kernel, d), np.float64)  # [M, out, d]
  per = np.broadcast_to(np.asarray(books, np.float64), (sub.shape[0], k, d))
  diff = sub[:, :, None, :] - per[:, None]  # [M, out, K, d]
  dist = np.einsum('mokd,mde,moke->mok', diff, _damped_numpy(moments, 1e-4), diff)
  chosen = np.take_along_axis(dist, np.asarray(codes)[..., None], axis=2)[..., 0]
  np.testing.assert_allclose(chosen, dist.min(axis=2), rtol=1e-4, atol=1e-6)


def test_identity_metric_equals_plain_kmeans():
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(32, 80)).astype(np.float32)
  spec = pq.CodebookSpec(8, 4)
  identity = np.broadcast_to(np.eye(4, dtype=np.float32), (8, 4, 4))
  u = metric.factor(identity, 0.0)
  books, codes, obj = pq.fit(kernel, spec, jax.random.key(3), iters=10, u=u)
  plain_books, plain_codes, plain_obj = pq.fit(kernel, spec, jax.random.key(3), iters=10)
  np.testing.assert_array_equal(codes, plain_codes)
  np.testing.assert_allclose(books, plain_books, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(obj, plain_obj, rtol=1e-6)


def test_vq_weighted_centroid_is_the_numpy_solve_and_lloyd_never_increases():
  rng = np.random.default_rng(4)
  num_subvectors, n, d, k = 5, 40, 3, 6
  sub = rng.normal(size=(num_subvectors, n, d)).astype(np.float32)
  moments = _moments(rng, num_subvectors, d)
  u = metric.factor(moments, 0.01)
  h = _damped_numpy(moments, 0.01)
  codes = rng.integers(0, k - 1, size=(num_subvectors, n))  # codeword k - 1 is empty: it stays
  codebook = rng.normal(size=(1, k, d)).astype(np.float32)
  got = np.asarray(metric.vq_centroids(sub, codes, u, codebook))[0]
  for c in range(k):
    members = codes == c
    if not members.any():
      np.testing.assert_array_equal(got[c], codebook[0, c])
      continue
    lhs = sum(h[j] * members[j].sum() for j in range(num_subvectors))
    rhs = sum(h[j] @ sub[j][members[j]].sum(axis=0) for j in range(num_subvectors))
    np.testing.assert_allclose(got[c], np.linalg.solve(lhs, rhs), rtol=2e-4, atol=2e-5)

  def objective(book, codes):
    e = sub.astype(np.float64) - np.asarray(book, np.float64)[0][codes]
    return float(np.einsum('mnd,mde,mne->', e, h, e))

  values = []
  for iters in range(5):
    book, c = metric.vq_lloyd(sub, codebook, u, iters)
    values.append(objective(book, np.asarray(c)))
  assert all(b <= a * (1 + 1e-5) for a, b in zip(values, values[1:])), values


def test_lsq_scale_is_the_closed_form_minimum():
  rng = np.random.default_rng(5)
  kernel = rng.normal(size=(16, 12)).astype(np.float32)
  approx = (kernel + 0.5 * rng.normal(size=kernel.shape)).astype(np.float32)
  approx[:, 3] = 0  # a zero channel keeps scale 1
  moments = _moments(rng, 4, 4)
  s = np.asarray(pq.lsq_scale(kernel, approx, moments, np.float32))
  assert s[3] == 1.0

  def channel_error(r, value):
    return _objective(kernel[:, r : r + 1], value * approx[:, r : r + 1], moments)

  for r in (0, 5, 11):
    best = channel_error(r, s[r])
    assert best <= channel_error(r, s[r] * 1.01) and best <= channel_error(r, s[r] * 0.99)
  plain = np.asarray(pq.lsq_scale(kernel, approx, None, np.float32))
  np.testing.assert_allclose(plain[0], kernel[:, 0] @ approx[:, 0] / (approx[:, 0] @ approx[:, 0]), rtol=1e-5)


@pytest.mark.parametrize('shared', [False, True])
def test_dynamic_assignment_with_a_channel_scale_picks_the_metric_argmin(shared):
  """Calibration's argmin compares codewords with W / s (the layer multiplies by s afterwards), in the
  metric quantize fitted in: the numpy argmin of (w_r/s_r - c)^T H_j (w_r/s_r - c)."""
  from dpq_jax.quant import layers

  rng = np.random.default_rng(6)
  in_f, out_f, d, k = 16, 24, 4, 8
  num_subvectors = in_f // d
  kernel = rng.normal(size=(in_f, out_f)).astype(np.float32)
  scale = rng.uniform(0.3, 3.0, size=out_f).astype(np.float32)
  books = rng.normal(size=(1 if shared else num_subvectors, k, d)).astype(np.float32)
  moments = _moments(rng, num_subvectors, d)
  u = np.asarray(metric.factor(moments, 0.01))
  spec = pq.CodebookSpec(k, d, shared=shared)
  layer = layers.PQDense(out_f, spec=spec, assignment='dynamic')
  x = rng.normal(size=(3, in_f)).astype(np.float32)
  params = {'codebooks': books, 'scale': scale, 'bias': np.zeros(out_f, np.float32)}
  quant = {'codes': np.zeros((num_subvectors, out_f), np.uint8), 'latent': kernel, 'metric': u}
  _, new = layer.apply({'params': params, 'quant': quant}, x, mutable=['quant'])
  sub = np.asarray(pq.to_subvectors(kernel / scale, d), np.float64)  # [M, out, d]
  per = np.broadcast_to(books.astype(np.float64), (num_subvectors, k, d))
  diff = sub[:, :, None, :] - per[:, None]  # [M, out, K, d]
  h = _damped_numpy(moments, 0.01)
  want = np.einsum('mokd,mde,moke->mok', diff, h, diff).argmin(-1)
  np.testing.assert_array_equal(new['quant']['codes'], want)
  # Without the metric: the Euclidean argmin of W / s (not of W).
  del quant['metric']
  _, plain = layer.apply({'params': params, 'quant': quant}, x, mutable=['quant'])
  np.testing.assert_array_equal(plain['quant']['codes'], (diff**2).sum(-1).argmin(-1))
  assert not np.array_equal(plain['quant']['codes'], pq.encode(kernel, books, spec))  # W itself: other codes


def test_compression_in_the_metric_keeps_less_output_error_at_the_same_bytes():
  from dpq_jax.quant import allocation

  rng = np.random.default_rng(7)
  d, k = 4, 32
  layers, kernels = {}, {}
  for name, (in_f, out_f) in {'a': (32, 128), 'b': (64, 96)}.items():
    kernels[name] = helpers.heavy_tailed((in_f, out_f), seed=len(layers) + 10)
    moments = _moments(rng, in_f // d, d)
    u = metric.factor(moments, 0.01)
    books, codes, _ = pq.fit(kernels[name], pq.CodebookSpec(k, d), jax.random.key(1), iters=10, u=u)
    layers[name] = (np.asarray(books), np.asarray(codes), moments)

  def run(with_moments):
    todo = [
      allocation.Layer(n, b, c, kernels[n], moments=m if with_moments else None) for n, (b, c, m) in layers.items()
    ]
    return allocation.compress_layers(todo, 2600, progress=False, distortion='relative')

  aware, aware_info = run(True)
  blind, blind_info = run(False)
  assert aware_info['predicted_bytes'] <= 2600 and blind_info['predicted_bytes'] <= 2600
  for w, (name, (_, _, moments)) in zip(aware, layers.items()):
    # Codes are the metric's nearest live codeword (numpy), the dead rows never chosen.
    sub = np.asarray(pq.to_subvectors(kernels[name], d), np.float64)
    diff = sub[:, :, None, :] - np.asarray(w.codebooks, np.float64)[:, None]
    dist = np.einsum('mokd,mde,moke->mok', diff, _damped_numpy(moments, 0.01), diff)
    dist = np.where(np.asarray(w.alive)[:, None, :], dist, np.inf)
    chosen = np.take_along_axis(dist, np.asarray(w.codes, np.int64)[..., None], axis=2)[..., 0]
    np.testing.assert_allclose(chosen, dist.min(-1), rtol=1e-4, atol=1e-7)
  out_err = lambda ws: sum(_objective(kernels[n], w.decode(), layers[n][2]) for n, w in zip(layers, ws))
  assert out_err(aware) < 0.95 * out_err(blind), (out_err(aware), out_err(blind))
  assert all('rel_out_err' in row for row in aware_info['rows'])


def _nearest(target, books, moments=None, alive=None):
  """numpy: codes [M, out] of the nearest codeword (of books [M or 1, K, d]) to each sub-vector of target
  [in, out], in the damped metric of moments where given, among the live codewords where alive [M, K]."""
  d = books.shape[-1]
  sub = np.asarray(target, np.float64).reshape(-1, d, target.shape[1]).transpose(0, 2, 1)  # [M, out, d]
  books = np.broadcast_to(np.asarray(books, np.float64), (sub.shape[0], *books.shape[1:]))
  diff = sub[:, :, None, :] - books[:, None]  # [M, out, K, d]
  h = np.broadcast_to(np.eye(d), (sub.shape[0], d, d)) if moments is None else _damped_numpy(moments, 0.01)
  dist = np.einsum('mokd,mde,moke->mok', diff, h, diff)
  if alive is not None:
    dist = np.where(np.asarray(alive)[:, None, :], dist, np.inf)
  return dist.argmin(-1)


def _unscaled(w):
  return np.asarray(pq.decode(w.codebooks, w.codes), np.float64)


@pytest.mark.parametrize(
  'objective,rule,scaled', [('weight', 'norm', True), ('output', 'norm', True), ('output', 'lsq', True),
                            ('output', 'lsq', False)]
)  # fmt: skip
def test_codes_and_scales_of_the_scale_rules(objective, rule, scaled):
  """The layer computes (x @ C[a]) * s. 'norm' scales restore each channel's norm of the k-means codes; 'lsq'
  alternates closed-form scale and codes (s0 of the k-means codes, codes for W / s0, s1 of those unscaled codewords);
  with scaled_codes every code is then the nearest codeword of W / s (in the metric it was fitted in), as
  calibration's dynamic assignment would pick it at step 0. numpy references of each step."""
  from dpq_jax.quant import surgery

  rng = np.random.default_rng(8)
  in_f, out_f, d, k = 16, 48, 4, 8
  kernel = helpers.heavy_tailed((in_f, out_f), seed=3)
  params = {'blocks_0': {'mlp': {'fc1': {'kernel': kernel, 'bias': np.zeros(out_f, np.float32)}}}}
  moments = {'blocks_0/mlp/fc1': _moments(rng, in_f // d, d)} if objective == 'output' else None
  m = None if moments is None else moments['blocks_0/mlp/fc1']
  q = surgery.quantize_params(
    params, surgery.default_rules('pq', k, d), jax.random.key(0), iters=5, codebook_dtype='float32',
    channel_scale=True, moments=moments, scale_rule=rule, scaled_codes=scaled, progress=False,
  )  # fmt: skip
  w = q.pq['blocks_0/mlp/fc1']
  books, scale = np.asarray(w.codebooks), np.asarray(w.scale)
  codes = _nearest(kernel, books, m)  # the k-means codes before any scale
  for step in range(2 if rule == 'lsq' else 1):
    approx = _unscaled(w.replace(codes=codes))
    if rule == 'norm':
      want = np.linalg.norm(kernel, axis=0) / np.linalg.norm(approx, axis=0)
    else:
      want = np.asarray(pq.lsq_scale(kernel, approx, m, np.float32))
    want = want.astype(np.float16).astype(np.float32)  # stored in float16
    if step == 0 and rule == 'lsq':
      codes = _nearest(kernel / want, books, m)
  np.testing.assert_allclose(scale, want, rtol=2e-3)
  np.testing.assert_array_equal(w.codes, _nearest(kernel / scale, books, m) if scaled else codes)
  assert not np.array_equal(_nearest(kernel / scale, books, m), _nearest(kernel, books, m))  # W itself: other codes


@pytest.mark.parametrize('with_moments', [False, True])
def test_compressed_codes_are_the_nearest_live_codewords_of_w_over_the_new_scale(with_moments):
  """compress_layers(scaled_codes=True): the scale recomputed for the compressed codebooks, then each code the
  nearest live codeword of W / s (numpy)."""
  from dpq_jax.quant import allocation

  rng = np.random.default_rng(9)
  in_f, out_f, d, k = 32, 96, 4, 16
  kernel = helpers.heavy_tailed((in_f, out_f), seed=4)
  moments = _moments(rng, in_f // d, d) if with_moments else None
  u = None if moments is None else metric.factor(moments, 0.01)
  books, codes, _ = pq.fit(kernel, pq.CodebookSpec(k, d), jax.random.key(2), iters=10, u=u)
  scale = np.asarray(pq.channel_scale(kernel, pq.decode(books, codes)))
  layer = allocation.Layer('a', np.asarray(books), np.asarray(codes), kernel, scale=scale, moments=moments)
  (w,), info = allocation.compress_layers([layer], 1100, progress=False, scaled_codes=True)  # ~1600 bytes before
  assert info['predicted_bytes'] <= 1100 and not np.asarray(w.alive).all()
  new_scale = np.asarray(w.scale)
  assert not np.allclose(new_scale, scale)  # recomputed for the compressed codebooks
  np.testing.assert_array_equal(w.codes, _nearest(kernel / new_scale, np.asarray(w.codebooks), moments, w.alive))
